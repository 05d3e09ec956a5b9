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
from lora_files import peft_lora
from reference import assert_close, assert_differs, diffusers_loader, outputs

import lora_loaders as L
from export.tiny import build_tiny


def models(family: str, component: str = "transformer"):
    m = build_tiny(family, [component])
    return m, copy.deepcopy(m), copy.deepcopy(m)


def targets(model, convs: bool = False) -> re.Pattern:
    """Every Linear (and, with `convs`, ungrouped Conv2d: PEFT takes no LoRA on grouped ones)."""
    names = [n for n, m in L.targetable_modules(model).items() if isinstance(m, torch.nn.Linear)
             or (convs and isinstance(m, torch.nn.Conv2d) and m.groups == 1)]
    return re.compile("(" + "|".join(re.escape(n) for n in names) + ")$")


def check_peft(family: str, convs: bool = False, must: tuple[str, ...] = (), pattern=None):
    m, ours, ref = models(family)
    pattern = pattern or targets(ours["transformer"], convs)
    x, y = peft_lora(ours, pattern=pattern, seed=1), peft_lora(ours, pattern=pattern, seed=2, every=2)
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


def check_unmatched(family: str, module: str, down: tuple[int, ...], up: tuple[int, ...]):
    """`module`: a name one letter off a real one; down / up: its factors' shapes."""
    _, ours, _ = models(family)
    sd = peft_lora(ours, pattern=targets(ours["transformer"]), seed=4)
    sd[f"transformer.{module}.lora_A.weight"] = torch.zeros(down)
    sd[f"transformer.{module}.lora_B.weight"] = torch.zeros(up)
    loader = L.loader_for(family, **ours)
    with pytest.raises(L.LoraKeyError, match=re.escape(module)):
        loader.load_lora_weights(sd, adapter_name="bad")
    assert loader.get_list_adapters() == {}
