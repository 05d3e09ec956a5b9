"""HunyuanVideo LoRA layouts against diffusers + PEFT (float32, tiny HunyuanVideo).

diffusers reads PEFT files and Tencent's original names itself; there it is the reference.
Where its converter cannot load a layout or loads it wrongly, the reference is diffusers + PEFT
on the same factors in PEFT names, or the weight computed directly:
- a single block's `linear1`: the converter hard-codes HunyuanVideo's hidden size 3072, so it
  raises on any other width (split_sizes [3072, 3072, 3072, -9104] for the tiny model);
- the token refiner's `self_attn_qkv`: the converter chunks lora_A into three along the rank
  as it does lora_B along the rows, and raises (or mis-pairs ranks);
- `final_layer.adaLN_modulation.1`: the converter swaps the halves of lora_A (rank rows) as
  well as of lora_B; only output rows may be permuted (delta = swap(B) @ A), so its output
  is wrong (checked below against the direct computation);
- musubi-tuner's kohya names (`lora_unet_double_blocks_0_img_attn_qkv`): no converter.
"""

import copy
from functools import partial

import pytest
import torch

import lora_loaders as L
from family_files import fused_kohya
from lora_files import peft_lora
from peft_layouts import models, raises_on_unknown_module
from reference import assert_close, assert_differs, diffusers_loader, outputs
from video_layouts import hunyuan_original, linears, respell

FAMILY = "hunyuan-video"


_models = partial(models, FAMILY)


def _original(model, prefix="diffusion_model.", seed=0, keep=lambda k: True, kohya=False):
    """(file in original names, the same factors in PEFT names): lora_A/B, no alphas (as diffusers reads them),
    or musubi's `lora_unet_` + lora_down/up + alpha."""
    file, peft = fused_kohya(model, hunyuan_original, prefix, rank=4, alpha=2.0 if kohya else 4.0, seed=seed,
                             flat=kohya)
    file = file if kohya else respell(file)
    file = {k: v for k, v in file.items() if keep(k)}
    modules = {k.removeprefix(prefix).split(".lora_")[0].removesuffix(".alpha") for k in file}
    peft = {f"transformer.{k}": v for k, v in peft.items()
            if (o := hunyuan_original(k.rsplit(".lora_", 1)[0])) and (o[0].replace(".", "_") if kohya else o[0]) in modules}
    return file, peft


def _both(ours, ref, file, ref_file):
    L.loader_for(FAMILY, **ours).load_lora_weights(dict(file), adapter_name="x")
    diffusers_loader(FAMILY, ref).load_lora_weights(dict(ref_file), adapter_name="x")
    assert_close(outputs(FAMILY, ours), outputs(FAMILY, ref))


def _diffusers_readable(k):
    return "linear1" not in k and "self_attn_qkv" not in k and "final_layer.adaLN" not in k


def test_peft_matches_diffusers():
    m, ours, ref = _models()
    sd = peft_lora(ours, pattern=linears(ours["transformer"]), seed=1)
    _both(ours, ref, sd, sd)
    assert_differs(outputs(FAMILY, ours), outputs(FAMILY, m), "transformer")


@pytest.mark.parametrize("prefix", ["diffusion_model.", "transformer.", ""])
def test_original_names_match_diffusers(prefix):
    m, ours, ref = _models()
    file, _ = _original(ours["transformer"], prefix, seed=2, keep=_diffusers_readable)
    assert any("double_blocks.0.img_attn_qkv" in k for k in file) and any("txt_in.c_embedder" in k for k in file)
    _both(ours, ref, file, file)
    assert_differs(outputs(FAMILY, ours), outputs(FAMILY, m), "transformer")


def test_fused_layers_diffusers_cannot_read_match_peft_on_the_same_factors():
    """linear1, the refiner's self_attn_qkv and the final modulation, with everything else."""
    _, ours, ref = _models()
    file, peft = _original(ours["transformer"], seed=3)
    assert any("single_blocks.0.linear1" in k for k in file) and any("refiner.blocks.0.self_attn_qkv" in k for k in file)
    with pytest.raises((ValueError, RuntimeError)):  # diffusers' own converter on this file
        diffusers_loader(FAMILY, copy.deepcopy(ref)).load_lora_weights(dict(file), adapter_name="x")
    _both(ours, ref, file, peft)


def test_final_modulation_permutes_output_rows_only():
    """norm_out.linear = final_layer.adaLN_modulation.1 with (shift, scale) -> (scale, shift):
    W + swap_rows(B @ A). diffusers' converter (which also swaps lora_A's rank rows) is off."""
    m, ours, ref = _models()
    file, _ = _original(ours["transformer"], seed=4, keep=_diffusers_readable)
    final, _ = _original(ours["transformer"], seed=5, keep=lambda k: "final_layer.adaLN" in k)
    a, b = (final[f"diffusion_model.final_layer.adaLN_modulation.1.lora_{x}.weight"] for x in "AB")
    L.loader_for(FAMILY, **ours).load_lora_weights({**file, **final}, adapter_name="x")
    diffusers_loader(FAMILY, ref).load_lora_weights({**file, **final}, adapter_name="x")
    delta = b @ a
    half = delta.shape[0] // 2
    want = m["transformer"].norm_out.linear.weight + torch.cat([delta[half:], delta[:half]])
    torch.testing.assert_close(ours["transformer"].norm_out.linear.weight, want, rtol=1e-6, atol=1e-6)
    diffusers_loader(FAMILY, ref).fuse_lora()
    assert not torch.allclose(ref["transformer"].norm_out.linear.weight, want, atol=1e-3)


def test_musubi_kohya_names_match_peft_on_the_same_factors():
    _, ours, ref = _models()
    file, peft = _original(ours["transformer"], "lora_unet_", seed=6, kohya=True)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in file
    with pytest.raises(ValueError):  # diffusers has no converter for these names
        diffusers_loader(FAMILY, copy.deepcopy(ref)).load_lora_weights(dict(file), adapter_name="x")
    _both(ours, ref, file, peft)


def test_original_reads_the_same_without_the_model():
    """Model-free, linear1 splits 1 : 1 : 1 : mlp_ratio: the same layers as bound to the model."""
    _, ours, _ = _models()
    file, _ = _original(ours["transformer"], "lora_unet_", seed=7, kohya=True)
    bound = L.read_lora(dict(file), FAMILY, index=L.TargetIndex.from_models(ours))
    free = L.read_lora(dict(file), FAMILY)
    assert set(free.layers) == set(bound.layers) and len(bound.layers) >= 40
    for k, layer in bound.layers.items():
        assert torch.equal(free.layers[k].tensors["up"], layer.tensors["up"]), k


def test_unmatched_key_raises_naming_it():
    _, ours, _ = _models()
    file, _ = _original(ours["transformer"], seed=8)
    raises_on_unknown_module(FAMILY, ours, file, "diffusion_model.double_blocks.0.img_attn_qkvv", (48, 16))
