"""The checks of a family's diffusers/PEFT layout (test helpers), for its tiny denoiser:

- our fused outputs equal diffusers + PEFT on the same file, two adapters at set weights;
- a file without the `transformer.` prefix is the denoiser's: diffusers loads it as nothing
  (its `load_lora_adapter` keeps only keys with the prefix and logs "No LoRA keys associated";
  checked), so it is compared with diffusers on the same keys with the prefix;
- a key that matches no module raises, naming it, and loads nothing.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

import lora_loaders as L
from export.tiny import build_tiny
from lora_files import peft_lora
from reference import assert_close, assert_differs, diffusers_loader, outputs


def models(family: str, component: str = "transformer", overrides=None, init=None) -> tuple[dict, dict, dict]:
    """The family's tiny component three times: untouched, for us, for diffusers (`init(model)` first, in
    place, where the tiny model needs setting up)."""
    m = build_tiny(family, [component], overrides=overrides)
    if init is not None:
        with torch.no_grad():
            init(m[component])
    return m, copy.deepcopy(m), copy.deepcopy(m)


def targets(model, convs: bool = False) -> re.Pattern:
    """Every Linear (and, with `convs`, ungrouped Conv2d: PEFT takes no LoRA on grouped ones)."""
    names = [n for n, m in L.targetable_modules(model).items() if isinstance(m, torch.nn.Linear)
             or (convs and isinstance(m, torch.nn.Conv2d) and m.groups == 1)]
    return re.compile("(" + "|".join(re.escape(n) for n in names) + ")$")


def check_peft(family: str, convs: bool = False, must: tuple[str, ...] = (), pattern=None, triple=None,
               bias: bool = False):
    """`triple`: the family's own (untouched, ours, reference) models, where the tiny ones need setting up;
    `bias`: x also carries lora_B biases."""
    m, ours, ref = triple or models(family)
    pattern = pattern or targets(ours["transformer"], convs)
    x, y = peft_lora(ours, pattern=pattern, seed=1, bias=bias), peft_lora(ours, pattern=pattern, seed=2, every=2)
    for part in must:
        assert any(part in k for k in x), part
    a, b = L.loader_for(family, **ours), diffusers_loader(family, ref)
    for loader in (a, b):
        loader.load_lora_weights(dict(x), adapter_name="x")
        loader.load_lora_weights(dict(y), adapter_name="y")
        loader.set_adapters(["x", "y"], [0.7, 1.3])
    o = outputs(family, ours)
    assert_close(o, outputs(family, ref))
    assert_differs(o, outputs(family, m), "transformer")


def check_unprefixed(family: str, convs: bool = False):
    m, ours, ref = models(family)
    sd = peft_lora(ours, pattern=targets(ours["transformer"], convs), seed=3)
    bare = {k.removeprefix("transformer."): v for k, v in sd.items()}
    dropped = copy.deepcopy(m)
    diffusers_loader(family, dropped).load_lora_weights(dict(bare), adapter_name="x")
    assert_close(outputs(family, dropped), outputs(family, m), rel=0)  # diffusers: no effect
    L.loader_for(family, **ours).load_lora_weights(bare, adapter_name="x")
    diffusers_loader(family, ref).load_lora_weights(dict(sd), adapter_name="x")
    o = outputs(family, ours)
    assert_close(o, outputs(family, ref))
    assert_differs(o, outputs(family, m), "transformer")


def check_unmatched(family: str, module: str, down: tuple[int, ...], up: tuple[int, ...], triple=None):
    """A PEFT file of every Linear plus `module` (a name one letter off a real one; down / up: its factors'
    shapes) raises, naming it, and loads nothing."""
    _, ours, _ = triple or models(family)
    sd = peft_lora(ours, pattern=targets(ours["transformer"]), seed=4)
    raises_on_unknown_module(family, ours, sd, f"transformer.{module}", (), factors=(down, up))


def raises_on_unknown_module(family: str, models: dict, file: dict, key: str, shape: tuple[int, ...],
                             factors: tuple[tuple[int, ...], tuple[int, ...]] | None = None) -> None:
    """`file` with one more module, which the model lacks (`key`: its name as the file spells it; `shape`:
    its (out, in) features, or `factors`: its down / up shapes), raises naming it, and loads nothing."""
    a, b = ("lora_down", "lora_up") if "lora_down" in next(iter(file)) else ("lora_A", "lora_B")
    down, up = factors or ((4, shape[1]), (shape[0], 4))
    file = {**file, f"{key}.{a}.weight": torch.zeros(down), f"{key}.{b}.weight": torch.zeros(up)}
    loader = L.loader_for(family, **models)
    with pytest.raises(L.LoraKeyError, match=re.escape(key.split(".", 1)[1] if key.startswith("transformer.") else key)):
        loader.load_lora_weights(file, adapter_name="bad")
    assert loader.get_list_adapters() == {}
