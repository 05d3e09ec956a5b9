"""Qwen-Image LoRA layouts against diffusers + PEFT (float32, tiny Qwen-Image and Qwen-Image-Edit-2511).

diffusers 0.42.1 reads `diffusion_model.`, unprefixed (PEFT `.default.` names included) and
musubi `lora_unet_` files itself and applies their `alpha` in both spellings, lora_down/up and
lora_A/B: checked here, the research notes' "alpha dropped for lora_A/B" describes an older
converter. It cannot read a `transformer.`-prefixed file that carries alphas: the converter
prefixes `transformer.` once more and PEFT raises NoMatchingPeftModuleError. Those files are
compared with diffusers + PEFT on the same factors in PEFT names (alpha / rank folded into
lora_B); LyCORIS LoKr (no converter in diffusers for Qwen) with the LyCORIS formula.
"""

import copy
from functools import partial

import pytest
import torch

import lora_loaders as L
from export.graph import run_torch
from image_layouts import assert_weights, every_linear, folded, linear_pattern, load_both, lokr_expected, relayout
from lora_files import lycoris
from lora_loaders.families.qwen_image import EDIT_TINY
from peft_layouts import models, raises_on_unknown_module
from reference import assert_close, assert_differs, diffusers_loader, outputs

FAMILY = "qwen-image"
_peft = every_linear
_both = partial(load_both, FAMILY)


def _models(edit=False):
    return models(FAMILY, overrides={"transformer": EDIT_TINY} if edit else None)


def test_peft_matches_diffusers():
    m, ours, ref = _models()
    sd = _peft(ours, seed=1)
    assert_differs(_both(ours, ref, sd, sd), outputs(FAMILY, m), "transformer")


@pytest.mark.parametrize("prefix, spell, flat, adapter", [
    ("diffusion_model.", "A", False, ""), ("diffusion_model.", "down", False, ""), ("", "A", False, "default"),
    ("lora_unet_", "down", True, ""),  # musubi-tuner
])
def test_layouts_diffusers_reads_with_alpha_applied(prefix, spell, flat, adapter):
    """Alpha 2 at rank 4 halves every delta. diffusers' output on the file (lora_A/B + alpha included)
    equals diffusers + PEFT on the same factors with alpha / rank folded into lora_B: it applies the
    alpha; ours equals both (a dropped alpha would double every delta and fail both comparisons)."""
    m, ours, ref = _models()
    sd = _peft(ours, seed=2)
    o = _both(ours, ref, relayout(sd, prefix, spell, alpha=2.0, flat=flat, adapter=adapter), folded(sd, 2.0))
    _, _, theirs = _models()
    diffusers_loader(FAMILY, theirs).load_lora_weights(relayout(sd, prefix, spell, alpha=2.0, flat=flat, adapter=adapter),
                                                       adapter_name="x")
    assert_close(outputs(FAMILY, theirs), o)
    assert_differs(o, outputs(FAMILY, m), "transformer")


@pytest.mark.parametrize("spell", ["A", "down"])
def test_transformer_prefix_with_alpha_which_diffusers_cannot_read(spell):
    m, ours, ref = _models()
    sd = _peft(ours, seed=3)
    file = relayout(sd, "transformer.", spell, alpha=8.0)
    with pytest.raises(Exception, match="not found in the base model"):  # peft's NoMatchingPeftModuleError
        diffusers_loader(FAMILY, copy.deepcopy(m)).load_lora_weights(dict(file), adapter_name="x")
    assert_differs(_both(ours, ref, file, folded(sd, 8.0)), outputs(FAMILY, m), "transformer")


def test_edit_config_musubi_file_matches_diffusers():
    m, ours, ref = _models(edit=True)
    file = relayout(_peft(ours, seed=4), "lora_unet_", "down", alpha=3.0, flat=True)
    assert_differs(_both(ours, ref, file, file), outputs(FAMILY, m), "transformer")


def test_lycoris_lokr_follows_its_formula():
    _, ours, _ = _models()
    t = ours["transformer"]
    sd = lycoris({"transformer": t}, "lokr", pattern=linear_pattern(t), seed=5, prefixes={"transformer": "lycoris_"})
    want = lokr_expected(t, sd, lambda n: "lycoris_" + n.replace(".", "_"))
    assert len(want) > 15
    L.loader_for(FAMILY, transformer=t).load_lora_weights(sd, adapter_name="k")
    assert_weights(t, want)


def test_unmatched_key_raises_naming_it():
    _, ours, _ = _models()
    file = relayout(_peft(ours, seed=6), "lora_unet_", "down", alpha=2.0, flat=True)
    raises_on_unknown_module(FAMILY, ours, file, "lora_unet_transformer_blocks_0_attn_to_qq", (16, 16))


@pytest.mark.parametrize("edit", [False, True])
def test_graph_is_the_transformer_on_packed_latents(edit):
    """The graph's packing and rotary tables (real angles, any text length) give diffusers' forward bit for bit;
    Edit-2511 (`zero_cond_t`): diffusers' forward with it, the graph without (no condition tokens), to 1e-6."""
    t = _models(edit)[0]["transformer"]
    assert t.zero_cond_t == edit
    spec = L.get_family(FAMILY).component("transformer")
    g = torch.Generator().manual_seed(7)
    b, h, w, n = 2, 6, 10, 9
    x, text = torch.randn(b, 4, h, w, generator=g), torch.randn(b, n, 32, generator=g)
    mask, step = torch.ones(b, n, dtype=torch.long), torch.rand(b, generator=g)
    mask[0, -3:] = 0
    got = run_torch(spec, t, {"hidden_states": x, "encoder_hidden_states": text, "encoder_hidden_states_mask": mask,
                              "timestep": step})[0]
    packed = x.reshape(b, 4, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 16)
    with torch.no_grad():
        out = t(hidden_states=packed, encoder_hidden_states=text, encoder_hidden_states_mask=mask, timestep=step,
                img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
    want = out.reshape(b, h // 2, w // 2, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, 4, h, w)
    if edit:  # diffusers' doubled modulation batch rounds differently
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(torch.from_numpy(got), want)
    assert t.zero_cond_t == edit  # restored


def test_edit_config_exports_with_dynamic_sizes(tmp_path):
    """Qwen-Image-Edit-2511's transformer: ONNX Runtime equals PyTorch at sizes other than the traced ones."""
    import numpy as np
    import onnxruntime as ort

    from export.graph import example_inputs
    from export.onnx_export import export_component

    spec = L.get_family(FAMILY)
    cspec, t = spec.component("transformer"), _models(edit=True)[0]["transformer"]
    export_component(t, cspec, tmp_path, spec)
    feeds = example_inputs(spec, cspec, t, torch.float32, "check", seed=1)
    got = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    want = run_torch(cspec, t, feeds)[0]
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
