"""Writers of the HiDream, Qwen-Image, Z-Image and aMUSEd LoRA layouts for tiny models, and the
comparison helpers their tests share (the models and the unmatched-key check: peft_layouts).

Each writer starts from diffusers/PEFT factors (`transformer.<module>.lora_A/B.weight`) and
spells them as a trainer does; `folded` gives the factors diffusers + PEFT must load to apply
the same deltas (alpha / rank folded into lora_B). Names are spelled here from the trainers'
own conventions, independently of `lora_loaders.families`.
"""

from __future__ import annotations

import re

import torch
from torch import nn

import lora_loaders as L
from lora_files import peft_lora
from lora_loaders.index import targetable_modules
from reference import assert_close, diffusers_loader, outputs


def linear_pattern(model: nn.Module, exclude: str | None = None) -> re.Pattern:
    """Every Linear (and ungrouped Conv2d) of the model, as a `peft_lora` pattern."""
    names = [n for n, m in targetable_modules(model).items()
             if (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1))
             and not (exclude and re.search(exclude, n))]
    return re.compile("(" + "|".join(re.escape(n) for n in names) + ")$")


def relayout(peft: dict, prefix: str, spell: str = "A", alpha: float | None = None, flat: bool = False,
             adapter: str = "") -> dict:
    """PEFT factors as `<prefix><module>.lora_A/B` (spell "A", optionally `.<adapter>.weight`) or
    `.lora_down/up` (spell "down"), module names flattened with `_` (kohya) if `flat`, `alpha` per module."""
    a, b = ("lora_down", "lora_up") if spell == "down" else ("lora_A", "lora_B")
    tail = f".{adapter}.weight" if adapter else ".weight"
    out = {}
    for k, v in peft.items():
        module, _, role = k.split(".", 1)[1].rpartition(".lora_")
        key = prefix + (module.replace(".", "_") if flat else module)
        if role == "A.weight":
            out[f"{key}.{a}{tail}"] = v.clone()
            if alpha is not None:
                out[f"{key}.alpha"] = torch.tensor(alpha)
        else:
            out[f"{key}.{b}{tail}"] = v.clone()
    return out


def folded(peft: dict, alpha: float | None) -> dict:
    """The same deltas in PEFT names at scale 1: lora_B x alpha / rank."""
    if alpha is None:
        return {k: v.clone() for k, v in peft.items()}
    return {k: v * (alpha / v.shape[1]) if ".lora_B." in k else v.clone() for k, v in peft.items()}


def lokr_expected(model: nn.Module, sd: dict, key_of) -> dict[str, torch.Tensor]:
    """{module: W + kron(w1, w2a @ w2b) * alpha / rank} for every LoKr module of `sd` (LyCORIS' formula);
    key_of(module name) -> the file's module key."""
    out = {}
    for name, module in model.named_modules():
        key = key_of(name)
        if f"{key}.lokr_w1" in sd:
            d = torch.kron(sd[f"{key}.lokr_w1"], sd[f"{key}.lokr_w2_a"] @ sd[f"{key}.lokr_w2_b"])
            w = module.weight.detach()
            out[name] = w + d.reshape(w.shape) * sd[f"{key}.alpha"] / sd[f"{key}.lokr_w2_b"].shape[0]
    return out


def assert_weights(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    for name, w in expected.items():
        torch.testing.assert_close(modules[name].weight.detach(), w, rtol=1e-5, atol=1e-6)


def every_linear(models: dict, seed: int, exclude: str | None = None) -> dict:
    t = models["transformer"]
    return peft_lora({"transformer": t}, pattern=linear_pattern(t, exclude), seed=seed)


def load_both(family: str, ours: dict, ref: dict, file_ours: dict, file_ref: dict) -> dict:
    """Our loader on one file, diffusers' mixin on another: equal outputs; ours returned."""
    L.loader_for(family, **ours).load_lora_weights(dict(file_ours), adapter_name="x")
    diffusers_loader(family, ref).load_lora_weights(dict(file_ref), adapter_name="x")
    o = outputs(family, ours)
    assert_close(o, outputs(family, ref))
    return o
