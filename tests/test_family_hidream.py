"""HiDream-I1 LoRA layouts against diffusers + PEFT (float32, tiny HiDream: 2 routed experts, 1 active).

diffusers' HiDream mixin reads PEFT files under `transformer.` or `diffusion_model.` as long as
they carry no `alpha`: any `.alpha` key (ai-toolkit, OneTrainer) and every LoKr key fail its
"all keys contain 'lora'" check with "Invalid LoRA checkpoint" (checked below), and it drops
DoRA's `dora_scale`. Files with alphas are compared with diffusers + PEFT on the same factors in
PEFT names (alpha / rank folded into lora_B); OneTrainer's DoRA and LyCORIS LoKr with their
trainers' formulas.
"""

import copy
from functools import partial

import pytest
import torch

import lora_loaders as L
from export.graph import run_torch
from export.tiny import build_tiny
from image_layouts import assert_weights, every_linear, folded, linear_pattern, load_both, lokr_expected, relayout
from lora_files import lycoris
from peft_layouts import models, raises_on_unknown_module
from reference import assert_differs, diffusers_loader, outputs

FAMILY = "hidream"
_models = partial(models, FAMILY)
_peft = every_linear
_both = partial(load_both, FAMILY)


@pytest.mark.parametrize("prefix", ["transformer.", "diffusion_model."])
def test_peft_files_match_diffusers(prefix):
    m, ours, ref = _models()
    sd = _peft(ours, seed=1)
    assert any(".ff_i.experts.1.w2." in k for k in sd)  # every expert of the MoE feed-forward
    file = relayout(sd, prefix)
    assert_differs(_both(ours, ref, file, file), outputs(FAMILY, m), "transformer")


@pytest.mark.parametrize("prefix, spell, flat", [
    ("diffusion_model.", "A", False),  # ai-toolkit / ComfyUI with alphas
    ("transformer.", "down", False),  # OneTrainer's OMI files
    ("lora_transformer_", "down", True),  # OneTrainer's legacy files
])
def test_files_with_alpha_which_diffusers_rejects(prefix, spell, flat):
    m, ours, ref = _models()
    sd = _peft(ours, seed=2)
    file = relayout(sd, prefix, spell, alpha=2.0, flat=flat)
    if not flat:
        with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
            diffusers_loader(FAMILY, copy.deepcopy(m)).load_lora_weights(dict(file), adapter_name="x")
    assert_differs(_both(ours, ref, file, folded(sd, 2.0)), outputs(FAMILY, m), "transformer")


def test_onetrainer_dora_follows_its_formula():
    """OneTrainer's DoRA: W' = dora_scale * (W + up @ down * alpha / r) / ||.||, the norm per input column
    (its default, dora_scale (1, in)) or per output row (decompose_output_axis, (out, 1))."""
    _, ours, _ = _models()
    t = ours["transformer"]
    sd = _peft(ours, seed=3)
    file = relayout(sd, "transformer.", "down", alpha=2.0)
    modules, want = dict(t.named_modules()), {}
    g = torch.Generator().manual_seed(4)
    for i, k in enumerate(k for k in sd if k.endswith(".lora_A.weight")):
        name = k.removeprefix("transformer.").removesuffix(".lora_A.weight")
        w = modules[name].weight.detach()
        merged = w + sd[k.replace("lora_A", "lora_B")] @ sd[k] * 2.0 / sd[k].shape[0]
        dim = 0 if i % 2 else 1  # odd modules: per output row
        scale = w.norm(dim=1 - dim, keepdim=True) * (1 + 0.1 * torch.randn(w.norm(dim=1 - dim, keepdim=True).shape,
                                                                            generator=g))
        file[f"transformer.{name}.dora_scale"] = scale
        want[name] = merged * scale / merged.norm(dim=1 - dim, keepdim=True)
    assert any(".experts." in n for n in want) and any(file[f"transformer.{n}.dora_scale"].shape[0] == 1 for n in want)
    L.loader_for(FAMILY, transformer=t).load_lora_weights(file, adapter_name="dora")
    assert_weights(t, want)


@pytest.mark.parametrize("prefix", ["lycoris_", "diffusion_model."])
def test_lycoris_lokr_follows_its_formula(prefix):
    m, ours, _ = _models()
    t = ours["transformer"]
    flat = prefix == "lycoris_"
    sd = lycoris({"transformer": t}, "lokr", pattern=linear_pattern(t), seed=5, prefixes={"transformer": "@"})
    names = {n.replace(".", "_"): n for n in dict(t.named_modules())}
    sd = {prefix + (k[1:].split(".")[0] if flat else names[k[1:].split(".")[0]]) + "." + k.split(".", 1)[1]: v
          for k, v in sd.items()}
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        diffusers_loader(FAMILY, copy.deepcopy(m)).load_lora_weights(dict(sd), adapter_name="k")
    want = lokr_expected(t, sd, lambda n: prefix + (n.replace(".", "_") if flat else n))
    assert len(want) > 40
    L.loader_for(FAMILY, transformer=t).load_lora_weights(sd, adapter_name="k")
    assert_weights(t, want)


def test_unmatched_key_raises_naming_it():
    _, ours, _ = _models()
    file = relayout(_peft(ours, seed=6), "diffusion_model.")
    raises_on_unknown_module(FAMILY, ours, file, "diffusion_model.double_stream_blocks.0.block.ff_i.experts.9.w1",
                             (256, 16))


def test_graph_is_the_transformer_on_square_latents():
    """The graph (patchify from shapes, batch-wide unpatchify, dense experts) gives diffusers' forward."""
    t = build_tiny(FAMILY, ["transformer"])["transformer"]
    spec = L.get_family(FAMILY).component("transformer")
    g = torch.Generator().manual_seed(7)
    feeds = {"hidden_states": torch.randn(2, 4, 10, 10, generator=g), "timesteps": torch.tensor([3.0, 700.0]),
             "encoder_hidden_states_t5": torch.randn(2, 5, 32, generator=g),
             "encoder_hidden_states_llama3": torch.randn(2, 2, 4, 32, generator=g),
             "pooled_embeds": torch.randn(2, 64, generator=g)}
    got = torch.from_numpy(run_torch(spec, t, feeds)[0])
    with torch.no_grad():
        want = t(**feeds, return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
