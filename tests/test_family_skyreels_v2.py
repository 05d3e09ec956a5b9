"""SkyReels-V2 LoRA layouts against diffusers + PEFT (float32, tiny SkyReels-V2 T2V).

diffusers' SkyReels-V2 mixin reads PEFT files, Wan's original names (`diffusion_model.`) and
musubi's kohya names itself, through Wan's converters: it is the reference for all three (it
raises on `.alpha` keys outside the blocks: there it reads the same file with those alphas
folded into lora_up).
Our name table is Wan's (`lora_loaders.families.wan.ORIGINAL`).
"""

from functools import partial

import pytest
import torch

import lora_loaders as L
from export.tiny import build_tiny
from family_files import wan_original
from lora_files import peft_lora
from peft_layouts import models, raises_on_unknown_module
from reference import assert_close, assert_differs, diffusers_loader, outputs
from video_layouts import linears

FAMILY = "skyreels-v2"


_models = partial(models, FAMILY)


def original_file(model, prefix="diffusion_model.", seed=0, spell="down", flat=False, rank=4, alpha=2.0):
    """Every Linear the Wan writer names, in original names: kohya spelling with alpha, or lora_A/B."""
    sd = peft_lora({"transformer": model}, pattern=linears(model), rank=rank, seed=seed)
    file = {}
    for k, v in sd.items():
        module, _, role = k.removeprefix("transformer.").rpartition(".lora_")
        orig = wan_original(module)
        if orig is None:
            continue
        key = prefix + (orig.replace(".", "_") if flat else orig)
        a, b = ("lora_down", "lora_up") if spell == "down" else ("lora_A", "lora_B")
        file[f"{key}.{a if role == 'A.weight' else b}.weight"] = v
        if role == "A.weight":
            file[f"{key}.alpha"] = torch.tensor(alpha)
    return file


def _copy(sd):  # diffusers' Wan converters scale the tensors they are given in place
    return {k: v.clone() for k, v in sd.items()}


def _folded(file):
    """The file with the alphas of layers outside the blocks folded into lora_up: diffusers' Wan
    converter raises on those `.alpha` keys (`state_dict` should be empty ... 'head.head.alpha')."""
    out = dict(file)
    for k in [k for k in file if k.endswith(".alpha") and "blocks" not in k]:
        up = next(u for u in out if u.startswith(k.removesuffix("alpha")) and (".lora_up." in u or ".lora_B." in u))
        down = up.replace("lora_up", "lora_down").replace("lora_B", "lora_A")
        out[up] = out[up] * (out.pop(k) / out[down].shape[0])
    return out


def _both(ours, ref, file):
    L.loader_for(FAMILY, **ours).load_lora_weights(_copy(file), adapter_name="x")
    diffusers_loader(FAMILY, ref).load_lora_weights(_copy(_folded(file)), adapter_name="x")
    assert_close(outputs(FAMILY, ours), outputs(FAMILY, ref))


def test_peft_matches_diffusers():
    m, ours, ref = _models()
    _both(ours, ref, peft_lora(ours, pattern=linears(ours["transformer"]), seed=1))
    assert_differs(outputs(FAMILY, ours), outputs(FAMILY, m), "transformer")


@pytest.mark.parametrize("spell", ["down", "A"])
def test_original_names_match_diffusers(spell):
    m, ours, ref = _models()
    file = original_file(ours["transformer"], seed=2, spell=spell)
    assert "diffusion_model.blocks.0.cross_attn.o.alpha" in file and any("time_projection.1" in k for k in file)
    _both(ours, ref, file)
    assert_differs(outputs(FAMILY, ours), outputs(FAMILY, m), "transformer")


def test_musubi_names_match_diffusers():
    m, ours, ref = _models()
    file = original_file(ours["transformer"], prefix="lora_unet_", flat=True, seed=3)
    file = {k: v for k, v in file.items() if "_blocks_" in k or "blocks_" in k}  # musubi trains the blocks only
    assert "lora_unet_blocks_0_self_attn_q.lora_down.weight" in file
    _both(ours, ref, file)
    assert_differs(outputs(FAMILY, ours), outputs(FAMILY, m), "transformer")


def test_fps_projection_of_sample_info_models():
    """`inject_sample_info` models: SkyReels' fps_projection.0 / .2 are diffusers' FeedForward net.0.proj / net.2."""
    t = build_tiny(FAMILY, ["transformer"], overrides={"transformer": {"inject_sample_info": True}})["transformer"]
    g = torch.Generator().manual_seed(4)
    file = {f"diffusion_model.fps_projection.{i}.lora_{x}.weight": torch.randn(*s, generator=g)
            for i, shapes in ((0, ((4, 16), (16, 4))), (2, ((4, 16), (96, 4)))) for x, s in zip("AB", shapes)}
    base = {n: p.detach().clone() for n, p in t.named_parameters()}
    L.loader_for(FAMILY, transformer=t).load_lora_weights(dict(file), adapter_name="fps")
    for i, name in ((0, "fps_projection.net.0.proj"), (2, "fps_projection.net.2")):
        a, b = (file[f"diffusion_model.fps_projection.{i}.lora_{x}.weight"] for x in "AB")
        torch.testing.assert_close(dict(t.named_parameters())[f"{name}.weight"].detach(),
                                   base[f"{name}.weight"] + b @ a, rtol=1e-6, atol=1e-6)


def test_unmatched_key_raises_naming_it():
    _, ours, _ = _models()
    file = original_file(ours["transformer"], seed=5)
    raises_on_unknown_module(FAMILY, ours, file, "diffusion_model.blocks.0.self_attn.qq", (16, 16))
