"""LTX-Video LoRA layouts against diffusers + PEFT (float32, tiny LTX-Video).

diffusers reads PEFT files and `diffusion_model.` keys over diffusers names (it only swaps the
prefix): there it is the reference. `diffusion_model.` keys in Lightricks' original names
(`patchify_proj`, `adaln_single`, `q_norm` / `k_norm`, as LTX-Video's own trainer and
ComfyUI name the modules) keep those names in diffusers' converter, so PEFT finds no such
modules and drops them (checked below): the reference is diffusers + PEFT on the same factors
in diffusers names, and the direct formula (W + diff) for norm deltas.
"""

import copy
from functools import partial

import torch

import lora_loaders as L
from export.tiny import build_tiny
from family_files import fused_kohya
from lora_files import peft_lora
from peft_layouts import models, raises_on_unknown_module
from reference import assert_close, assert_differs, diffusers_loader, outputs
from video_layouts import linears, ltx_original, respell

FAMILY = "ltx-video"


_models = partial(models, FAMILY)


def _both(ours, ref, file, ref_file):
    L.loader_for(FAMILY, **ours).load_lora_weights(dict(file), adapter_name="x")
    diffusers_loader(FAMILY, ref).load_lora_weights(dict(ref_file), adapter_name="x")
    assert_close(outputs(FAMILY, ours), outputs(FAMILY, ref))


def test_peft_and_diffusion_model_prefix_match_diffusers():
    m, ours, ref = _models()
    sd = peft_lora(ours, pattern=linears(ours["transformer"]), seed=1)
    _both(ours, ref, sd, sd)
    assert_differs(outputs(FAMILY, ours), outputs(FAMILY, m), "transformer")
    comfy = {k.replace("transformer.", "diffusion_model.", 1): v for k, v in sd.items()}  # finetrainers / ComfyUI
    _, ours, ref = _models()
    _both(ours, ref, comfy, comfy)


def test_original_names_match_peft_on_the_same_factors():
    m, ours, ref = _models()
    file, peft = fused_kohya(ours["transformer"], ltx_original, "diffusion_model.", rank=4, alpha=4.0, seed=2,
                             flat=False)
    file = respell(file)
    assert "diffusion_model.patchify_proj.lora_A.weight" in file and "diffusion_model.adaln_single.linear.lora_B.weight" in file
    _both(ours, ref, file, {f"transformer.{k}": v for k, v in peft.items()})
    dropped = copy.deepcopy(m)  # diffusers' converter on the same file: the original names target nothing
    diffusers_loader(FAMILY, dropped).load_lora_weights(dict(file), adapter_name="x")
    assert (dropped["transformer"].proj_in.base_layer.weight if hasattr(dropped["transformer"].proj_in, "base_layer")
            else dropped["transformer"].proj_in.weight).equal(m["transformer"].proj_in.weight)
    assert not hasattr(dropped["transformer"].proj_in, "lora_A")


def test_original_norm_deltas_follow_the_formula():
    """LyCORIS full deltas on the attention norms (Lightricks' q_norm / k_norm): W + diff."""
    m, ours, _ = _models()
    g = torch.Generator().manual_seed(3)
    file = {f"diffusion_model.transformer_blocks.0.attn{i}.{q}_norm.diff": torch.randn(16, generator=g) * 0.1
            for i in (1, 2) for q in "qk"}
    L.loader_for(FAMILY, **ours).load_lora_weights(dict(file), adapter_name="n")
    for i in (1, 2):
        for q in "qk":
            got = getattr(getattr(ours["transformer"].transformer_blocks[0], f"attn{i}"), f"norm_{q}").weight
            base = getattr(getattr(m["transformer"].transformer_blocks[0], f"attn{i}"), f"norm_{q}").weight
            torch.testing.assert_close(got, base + file[f"diffusion_model.transformer_blocks.0.attn{i}.{q}_norm.diff"])


def test_graph_packs_latents_like_the_pipeline():
    """The graph's 5-D latents in and out = LTXPipeline._pack_latents -> transformer -> _unpack_latents."""
    from diffusers import LTXPipeline

    from export.graph import example_inputs

    spec = L.get_family(FAMILY)
    t = build_tiny(FAMILY, ["transformer"])["transformer"]
    x = example_inputs(spec, spec.component("transformer"), t, torch.float32, "check", seed=4)
    _, _, f, h, w = x["hidden_states"].shape
    with torch.no_grad():
        ours = spec.component("transformer").graph_forward(t, dict(x, return_dict=False))[0]
        packed = LTXPipeline._pack_latents(x["hidden_states"])
        ref = t(hidden_states=packed, encoder_hidden_states=x["encoder_hidden_states"], timestep=x["timestep"],
                encoder_attention_mask=x["encoder_attention_mask"], num_frames=f, height=h, width=w,
                rope_interpolation_scale=tuple(x["rope_interpolation_scale"].tolist()), return_dict=False)[0]
    torch.testing.assert_close(ours, LTXPipeline._unpack_latents(ref, f, h, w), rtol=1e-5, atol=1e-6)


def test_unmatched_key_raises_naming_it():
    _, ours, _ = _models()
    file = {k.replace("transformer.", "diffusion_model.", 1): v
            for k, v in peft_lora(ours, pattern=linears(ours["transformer"]), seed=5).items()}
    raises_on_unknown_module(FAMILY, ours, file, "diffusion_model.transformer_blocks.0.attn1.to_qq", (16, 16))
