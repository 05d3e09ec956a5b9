"""FLUX.2 LoRA layouts against diffusers + PEFT (float32, tiny Flux2Transformer2DModel: 1 double + 1 single block).

diffusers reads PEFT files, ai-toolkit's `diffusion_model.` BFL names and kohya's `lora_unet_` names
itself; where it reads them wrongly or drops layers, the reference is diffusers + PEFT on the same
factors in PEFT names, or the LyCORIS formula:

- `final_layer.adaLN_modulation.1`: `_convert_non_diffusers_flux2_lora_to_diffusers` maps it to
  `norm_out.linear` as is, but BFL orders that layer (shift, scale) and diffusers (scale, shift) (its
  own checkpoint converter, `convert_flux2_transformer_checkpoint_to_diffusers`, swaps the halves):
  the LoRA's rows land on the wrong halves;
- `_convert_kohya_flux2_lora_to_diffusers` has no mapping for guidance_in, the modulation layers or the
  final modulation: it logs "Unsupported keys" and drops them;
- LyCORIS LoKr (`lycoris_`) beyond the blocks (embedders, modulations, norm_out, proj_out): diffusers'
  `_convert_lycoris_flux2_lokr_to_diffusers` raises on them; on the blocks it is the reference;
- LoKr on a double block's fused `qkv`: diffusers maps it to `to_qkv` and fuses the model's q / k / v
  projections into that module to take it (the model changes structure); here the delta is materialised
  and split by rows onto the split modules (the formula, sliced), and the outputs equal diffusers'.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

import lora_loaders as L
from export.tiny import build_tiny
from family_files import fused_kohya
from lora_files import lycoris, peft_lora
from reference import assert_close, assert_differs, diffusers_loader, outputs

FAMILY = "flux2"
LINEARS = re.compile(r"(to_[qkv]|to_out(\.0)?|add_[qkv]_proj|to_add_out|linear_(in|out)|to_qkv_mlp_proj|x_embedder"
                     r"|context_embedder|proj_out|norm_out\.linear|linear_[12]|modulation_\w+\.linear)$")

# ---- diffusers module name -> BFL FLUX.2 name (part of a fused layer or None, swapped halves) ----
_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0",
           "ff.linear_out": "img_mlp.2", "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
_QKV = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
        "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
        "attn.add_v_proj": ("txt_attn.qkv", 2)}
_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
        "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
        "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
        "single_stream_modulation.linear": "single_stream_modulation.lin"}


def bfl(name: str):
    if name == "norm_out.linear":
        return "final_layer.adaLN_modulation.1", None, True
    if name in _TOP:
        return _TOP[name], None, False
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)
    if m and m[2] in _QKV:
        return f"double_blocks.{m[1]}.{_QKV[m[2]][0]}", _QKV[m[2]][1], False
    if m and m[2] in _DOUBLE:
        return f"double_blocks.{m[1]}.{_DOUBLE[m[2]]}", None, False
    m = re.fullmatch(r"single_transformer_blocks\.(\d+)\.attn\.(to_qkv_mlp_proj|to_out)", name)
    if m:
        return f"single_blocks.{m[1]}.{'linear1' if m[2] == 'to_qkv_mlp_proj' else 'linear2'}", None, False
    return None


def _models():
    m = build_tiny(FAMILY, ["transformer"])
    return m, copy.deepcopy(m), copy.deepcopy(m)


def _both(ours, ref, file_ours, file_ref=None):
    L.loader_for(FAMILY, **ours).load_lora_weights(dict(file_ours), adapter_name="x")
    diffusers_loader(FAMILY, ref).load_lora_weights(dict(file_ref if file_ref is not None else file_ours),
                                                    adapter_name="x")
    o = outputs(FAMILY, ours)
    assert_close(o, outputs(FAMILY, ref))
    return o


def _ait(model, prefix, seed, only=None, spell="A"):
    """(BFL-named file, the same factors in PEFT names)."""
    file, peft = fused_kohya(model, lambda n: o if (o := bfl(n)) and (only is None or only(o)) else None, prefix,
                             seed=seed, alpha=4.0, flat=prefix == "lora_unet_")
    if spell == "A":
        file = {k.replace("lora_down", "lora_A").replace("lora_up", "lora_B"): v for k, v in file.items()
                if not k.endswith(".alpha")}
    return file, {f"transformer.{k}": v for k, v in peft.items()}


def test_peft_matches_diffusers():
    m, ours, ref = _models()
    sd = peft_lora(ours, pattern=LINEARS, seed=1)
    assert "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight" in sd
    o = _both(ours, ref, sd)
    assert_differs(o, outputs(FAMILY, m), "transformer")


def test_ai_toolkit_bfl_names_match_diffusers():
    """`diffusion_model.` + BFL names: fused qkv split, linear1 / linear2 as they are, modulations, embedders."""
    m, ours, ref = _models()
    file, _ = _ait(ours["transformer"], "diffusion_model.", seed=2, only=lambda o: not o[2])
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in file
    assert "diffusion_model.single_blocks.0.linear1.lora_B.weight" in file
    assert "diffusion_model.double_stream_modulation_img.lin.lora_A.weight" in file
    o = _both(ours, ref, file)
    assert_differs(o, outputs(FAMILY, m), "transformer")
    bare = {k.replace("diffusion_model.", "base_model.model.", 1): v for k, v in file.items()}  # ai-toolkit's PEFT save
    _, ours2, _ = _models()
    L.loader_for(FAMILY, **ours2).load_lora_weights(bare, adapter_name="x")
    assert_close(outputs(FAMILY, ours2), o)


def test_final_modulation_swaps_shift_and_scale():
    _, ours, ref = _models()
    file, peft = _ait(ours["transformer"], "diffusion_model.", seed=3)
    assert "diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight" in file
    o = _both(ours, ref, file, peft)
    _, _, wrong = _models()
    diffusers_loader(FAMILY, wrong).load_lora_weights(dict(file), adapter_name="x")  # its halves unswapped
    assert_differs(o, outputs(FAMILY, wrong), "transformer")


def test_kohya_matches_diffusers_and_keeps_what_it_drops():
    _, ours, ref = _models()
    dropped = ("guidance_in", "modulation", "final_layer.adaLN")
    file, _ = _ait(ours["transformer"], "lora_unet_", seed=4, spell="down",
                   only=lambda o: not any(d in o[0] for d in dropped))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in file
    _both(ours, ref, file)
    _, ours2, ref2 = _models()
    full, peft = _ait(ours2["transformer"], "lora_unet_", seed=5, spell="down")
    assert "lora_unet_double_stream_modulation_txt_lin.lora_up.weight" in full
    _both(ours2, ref2, full, peft)


def _fused(t, names):
    return torch.cat([t.get_submodule(n).weight.detach() for n in names])


def test_bfl_lokr_on_fused_qkv_is_materialised_and_sliced():
    """ai-toolkit LoKr on BFL names: W + kron(w1, w2a @ w2b) * alpha / r, the fused qkv's rows to to_q / to_k / to_v."""
    t = build_tiny(FAMILY, ["transformer"])["transformer"]
    g = torch.Generator().manual_seed(6)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    file, want = {}, {}
    for key, names in (("double_blocks.0.img_attn.qkv", [f"transformer_blocks.0.attn.to_{x}" for x in "qkv"]),
                       ("single_blocks.0.linear1", ["single_transformer_blocks.0.attn.to_qkv_mlp_proj"]),
                       ("img_in", ["x_embedder"])):
        w = _fused(t, names)
        parts = {"lokr_w1": r(2, 2), "lokr_w2_a": r(w.shape[0] // 2, 4), "lokr_w2_b": r(4, w.shape[1] // 2)}
        file.update({f"diffusion_model.{key}.{k}": v for k, v in parts.items()})
        file[f"diffusion_model.{key}.alpha"] = torch.tensor(2.0)
        fused = w + torch.kron(parts["lokr_w1"], parts["lokr_w2_a"] @ parts["lokr_w2_b"]) * 0.5
        i = 0
        for n in names:
            rows = t.get_submodule(n).out_features
            want[n] = fused[i:i + rows]
            i += rows
    ref = {"transformer": copy.deepcopy(t)}
    L.loader_for(FAMILY, transformer=t).load_lora_weights(dict(file), adapter_name="k")
    for n, w in want.items():
        torch.testing.assert_close(t.get_submodule(n).weight.detach(), w, rtol=1e-5, atol=1e-6)
    diffusers_loader(FAMILY, ref).load_lora_weights(dict(file), adapter_name="k")  # fuses to_q / to_k / to_v
    assert hasattr(ref["transformer"].transformer_blocks[0].attn, "to_qkv")
    assert_close(outputs(FAMILY, {"transformer": t}), outputs(FAMILY, ref))


def test_lycoris_lokr_follows_its_formula():
    t = build_tiny(FAMILY, ["transformer"])["transformer"]
    sd = lycoris({"transformer": t}, "lokr", pattern=LINEARS, seed=7, prefixes={"transformer": "lycoris_"})
    assert "lycoris_single_transformer_blocks_0_attn_to_qkv_mlp_proj.lokr_w1" in sd
    want = {}
    for name, module in t.named_modules():
        key = "lycoris_" + name.replace(".", "_")
        if f"{key}.lokr_w1" in sd:
            d = torch.kron(sd[f"{key}.lokr_w1"], sd[f"{key}.lokr_w2_a"] @ sd[f"{key}.lokr_w2_b"])
            want[name] = module.weight.detach() + d * sd[f"{key}.alpha"] / sd[f"{key}.lokr_w2_b"].shape[0]
    assert len(want) > 20
    L.loader_for(FAMILY, transformer=t).load_lora_weights(sd, adapter_name="k")
    for name, w in want.items():
        torch.testing.assert_close(t.get_submodule(name).weight.detach(), w, rtol=1e-5, atol=1e-6)
    # diffusers reads LyCORIS LoKr on the blocks (and raises "not LyCORIS Flux2 LoKr keys" for embedders,
    # modulations, norm_out and proj_out): the same outputs there
    blocks = {k: v for k, v in sd.items() if re.match(r"lycoris_(single_)?transformer_blocks_", k)}
    assert len(blocks) < len(sd)
    ours, ref = {"transformer": build_tiny(FAMILY, ["transformer"])["transformer"]}, _models()[1]
    L.loader_for(FAMILY, **ours).load_lora_weights(dict(blocks), adapter_name="k")
    diffusers_loader(FAMILY, ref).load_lora_weights(dict(blocks), adapter_name="k")
    assert_close(outputs(FAMILY, ours), outputs(FAMILY, ref))
    free = L.read_lora(sd, FAMILY)  # model-free: the flattened names read the same
    assert {m for _, m in free.layers} == set(want)
    bare = {}  # SimpleTuner's LoKr exports: bare dotted diffusers names
    for k, v in sd.items():
        module, _, suffix = k.removeprefix("lycoris_").rpartition(".")
        bare[f"{next(n for n in want if n.replace('.', '_') == module)}.{suffix}"] = v
    assert set(L.read_lora(bare, FAMILY).layers) == set(free.layers)


def test_unmatched_key_raises_naming_it():
    _, ours, _ = _models()
    file, _ = _ait(ours["transformer"], "diffusion_model.", seed=8)
    file["diffusion_model.double_blocks.0.img_attn.qkvv.lora_A.weight"] = torch.zeros(4, 32)
    file["diffusion_model.double_blocks.0.img_attn.qkvv.lora_B.weight"] = torch.zeros(96, 4)
    with pytest.raises(L.LoraKeyError, match=r"img_attn\.qkvv"):
        L.loader_for(FAMILY, **ours).load_lora_weights(file, adapter_name="bad")
