"""Which parameters a LoRA can touch, and how adapters combine per module."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .adapter import LoraAdapter
from .weights import Contribution

# Module types whose weight (and bias) an adapter may change.
TARGETABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def targetable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{module path: module} for every Linear / Conv in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TARGETABLE_TYPES)}


def targetable_parameters(model: nn.Module) -> list[str]:
    """Parameter names (`<module>.weight`, `<module>.bias`) an adapter can change, in model order."""
    names = []
    for path, module in targetable_modules(model).items():
        for pname, p in module.named_parameters(recurse=False):
            if p is not None and pname in ("weight", "bias"):
                names.append(f"{path}.{pname}")
    return names


def contributions_by_module(
    adapters: Iterable[tuple[LoraAdapter, float]], component: str
) -> dict[str, list[Contribution]]:
    """{module path: [(layer, weight), ...]} for one component, in adapter order."""
    out: dict[str, list[Contribution]] = {}
    for adapter, weight in adapters:
        for module, layer in adapter.for_component(component).items():
            out.setdefault(module, []).append((layer, float(weight)))
    return out


def param_dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")
