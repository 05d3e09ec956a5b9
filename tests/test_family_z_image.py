"""Z-Image LoRA layouts against diffusers + PEFT (float32, tiny Z-Image with one refiner of each kind).

diffusers' converter (`_convert_non_diffusers_z_image_lora_to_diffusers`) reads `diffusion_model.`,
unprefixed and musubi `lora_unet_` files in diffusers names with their alphas, and LoKr files
(through PEFT's LoKr) with `diffusion_model.` or no prefix: compared with diffusers on the same
file. It loads Z-Image's original names in lora_A/B or lora_down/up keys wrongly (fused
`attention.qkv`, `x_embedder`, `final_layer`: ComfyUI, musubi's ComfyUI export; it splits qkv only
for `.lora.down.weight` keys): those layers are dropped with a warning. It cannot read a
`transformer.`-prefixed file with alphas (prefixed twice: PEFT raises NoMatchingPeftModuleError).
Those compare with diffusers + PEFT on the same factors in PEFT names.
"""

import copy
import re
from functools import partial

import pytest
import torch

import lora_loaders as L
from export.graph import run_torch
from export.tiny import build_tiny
from family_files import fused_kohya
from image_layouts import every_linear, folded, linear_pattern, load_both, relayout
from lora_files import lycoris
from peft_layouts import models, raises_on_unknown_module
from reference import assert_differs, diffusers_loader, outputs

FAMILY = "z-image"
_models = partial(models, FAMILY)
_peft = every_linear
_both = partial(load_both, FAMILY)


@pytest.mark.parametrize("prefix, spell, alpha, flat", [
    ("transformer.", "A", None, False), ("diffusion_model.", "A", None, False),  # ai-toolkit
    ("diffusion_model.", "down", 2.0, False), ("", "A", 2.0, False),
    ("lora_unet_", "down", 2.0, True),  # musubi-tuner (its default skips refiners and modulations)
])
def test_layouts_diffusers_reads(prefix, spell, alpha, flat):
    m, ours, ref = _models()
    exclude = r"(_refiner|adaLN)" if flat else None
    file = relayout(_peft(ours, seed=1, exclude=exclude), prefix, spell, alpha=alpha, flat=flat)
    assert_differs(_both(ours, ref, file, file), outputs(FAMILY, m), "transformer")


def test_transformer_prefix_with_alpha_which_diffusers_cannot_read():
    m, ours, ref = _models()
    sd = _peft(ours, seed=2)
    file = relayout(sd, "transformer.", "down", alpha=8.0)
    with pytest.raises(Exception, match="not found in the base model"):
        diffusers_loader(FAMILY, copy.deepcopy(m)).load_lora_weights(dict(file), adapter_name="x")
    assert_differs(_both(ours, ref, file, folded(sd, 8.0)), outputs(FAMILY, m), "transformer")


def z_image_original(name: str):
    """diffusers module -> (Z-Image's original module, index in the fused qkv or None, swap halves)."""
    m = re.fullmatch(r"((?:layers|noise_refiner|context_refiner)\.\d+\.attention)\.(to_q|to_k|to_v|to_out\.0)", name)
    if m:
        return (f"{m[1]}.qkv", "qkv".index(m[2][-1]), False) if m[2] != "to_out.0" else (f"{m[1]}.out", None, False)
    top = {"all_x_embedder.2-1": "x_embedder", "all_final_layer.2-1.linear": "final_layer.linear",
           "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1"}
    return (top.get(name, name), None, False)


@pytest.mark.parametrize("prefix, flat", [("diffusion_model.", False), ("lora_unet_", True)])
def test_original_names_which_diffusers_cannot_read(prefix, flat):
    m, ours, ref = _models()
    file, peft = fused_kohya(ours["transformer"], z_image_original, prefix, seed=3, flat=flat)
    assert any(k.endswith(("attention.qkv.lora_down.weight", "attention_qkv.lora_down.weight")) for k in file)
    assert any("x_embedder" in k and "all_" not in k for k in file)
    wrong = copy.deepcopy(m)  # diffusers drops the original-name layers with a warning
    diffusers_loader(FAMILY, wrong).load_lora_weights(dict(file), adapter_name="x")
    o = _both(ours, ref, file, {f"transformer.{k}": v for k, v in peft.items()})
    assert_differs(o, outputs(FAMILY, m), "transformer")
    assert_differs(o, outputs(FAMILY, wrong), "transformer")


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_lokr_matches_diffusers(prefix):
    """LoKr without a prefix (LyCORIS over diffusers names) or under `diffusion_model.` (ai-toolkit)."""
    m, ours, ref = _models()
    t = ours["transformer"]
    sd = lycoris({"transformer": t}, "lokr", pattern=linear_pattern(t), seed=4, prefixes={"transformer": "@"})
    names = {n.replace(".", "_"): n for n in dict(t.named_modules())}
    sd = {prefix + names[k[1:].split(".")[0]] + "." + k.split(".", 1)[1]: v for k, v in sd.items()}
    assert "layers.0.attention.to_q.lokr_w1" in {k.removeprefix(prefix) for k in sd}
    assert_differs(_both(ours, ref, sd, sd), outputs(FAMILY, m), "transformer")


def test_unmatched_key_raises_naming_it():
    _, ours, _ = _models()
    file = relayout(_peft(ours, seed=5), "lora_unet_", "down", alpha=2.0, flat=True)
    raises_on_unknown_module(FAMILY, ours, file, "lora_unet_layers_0_attention_to_qq", (32, 32))


@pytest.mark.parametrize("h, w, n", [(8, 12, 6), (16, 16, 32), (6, 4, 33)])
def test_graph_is_the_transformer_on_a_batch(h, w, n):
    """The batched graph (one padding for every sample) gives diffusers' list forward (padding 0 and > 0)."""
    t = build_tiny(FAMILY, ["transformer"])["transformer"]
    spec = L.get_family(FAMILY).component("transformer")
    g = torch.Generator().manual_seed(6)
    feeds = {"x": torch.randn(2, 4, h, w, generator=g), "t": torch.rand(2, generator=g),
             "cap_feats": torch.randn(2, n, 16, generator=g)}
    got = torch.from_numpy(run_torch(spec, t, feeds)[0])
    with torch.no_grad():
        out = t(list(feeds["x"].unsqueeze(2).unbind(0)), feeds["t"], list(feeds["cap_feats"].unbind(0)),
                return_dict=False)[0]
    torch.testing.assert_close(got, torch.stack(out).squeeze(2), rtol=1e-6, atol=1e-6)
