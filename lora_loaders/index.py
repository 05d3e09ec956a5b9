"""What a LoRA can bind to: per component, the targetable modules with their weight shapes.

Built from torch modules (the mixins; meta-device models at export, no weights needed) or
from an export's weights map (refit), so binding and its strictness checks are the same
code everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn

from .formats.names import flat_index

# Module types whose weight (and bias) an adapter may change.
TARGETABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _is_norm(module: nn.Module) -> bool:
    """Norm layers with their own scale (LayerNorm, GroupNorm, RMSNorm and diffusers' / transformers' own)."""
    if isinstance(module, NORM_TYPES) or type(module).__name__.endswith(("Norm", "RMSNorm", "LayerNorm")):
        w = module._parameters.get("weight")
        return w is not None and w.dim() == 1
    return False


def targetable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{module path: module} for every Linear / Conv, and norm layer with a weight, in `model`."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, TARGETABLE_TYPES) or _is_norm(m)}


def targetable_parameters(model: nn.Module) -> list[str]:
    """Parameter names (`<module>.weight`, `<module>.bias`) an adapter can change, in model order."""
    names = []
    for path, module in targetable_modules(model).items():
        for pname, p in module.named_parameters(recurse=False):
            if p is not None and pname in ("weight", "bias"):
                names.append(f"{path}.{pname}")
    return names


@dataclass(frozen=True)
class Target:
    weight: tuple[int, ...]
    bias: tuple[int, ...] | None = None


class TargetIndex:
    """{component: {module path: Target}}; a component absent from it is not checked."""

    def __init__(self, modules: Mapping[str, Mapping[str, Target]],
                 widened: Mapping[tuple[str, str], int] | None = None,
                 inert: Iterable[tuple[str, str]] | None = None):
        self._modules = {c: dict(m) for c, m in modules.items()}
        self._flat: dict[str, dict[str, str]] = {}
        # (component, module) -> the input width it had before a LoRA widened it (Flux Control)
        self.widened: dict[tuple[str, str], int] = dict(widened or {})
        # (component, module) an exported graph does not read (Qwen-Image's last text stream): a LoRA
        # may name them, binding drops those layers, as they change no output there
        self.inert: set[tuple[str, str]] = set(inert or ())

    @classmethod
    def from_models(cls, components: Mapping[str, nn.Module | None],
                    widened: Mapping[tuple[str, str], int] | None = None) -> TargetIndex:
        out = {}
        for c, model in components.items():
            if model is None:
                continue
            out[c] = {}
            for path, m in targetable_modules(model).items():
                b = m._parameters.get("bias")
                out[c][path] = Target(tuple(m.weight.shape), None if b is None else tuple(b.shape))
        return cls(out, widened)

    @classmethod
    def from_params(cls, component: str, shapes: Mapping[str, Iterable[int]],
                    widened: Mapping[str, int] | None = None, inert: Iterable[str] = ()) -> TargetIndex:
        """From {param name: shape} (`<module>.weight` / `<module>.bias`), e.g. a weights map;
        `widened`: {module: its input width before a LoRA widened it}; `inert`: param names the
        graph does not read (a weights map's `unused_params`)."""
        weights, biases = {}, {}
        for param, shape in shapes.items():
            module, _, kind = param.rpartition(".")
            (weights if kind == "weight" else biases)[module] = tuple(shape)
        return cls({component: {m: Target(w, biases.get(m)) for m, w in weights.items()}},
                   {(component, m): int(w) for m, w in (widened or {}).items()},
                   {(component, p.rpartition(".")[0]) for p in inert} - {(component, m) for m in weights})

    @classmethod
    def combine(cls, indexes) -> TargetIndex:
        """One index over the components of several (an export's components, each from its weights map)."""
        out = cls({})
        for ix in indexes:
            out._modules.update(ix._modules)
            out.widened.update(ix.widened)
            out.inert |= ix.inert
        return out

    def components(self) -> list[str]:
        return list(self._modules)

    def modules(self, component: str) -> dict[str, Target] | None:
        return self._modules.get(component)

    def flat(self, component: str) -> dict[str, str]:
        """{flattened name: module path} (ambiguous flattenings left out)."""
        if component not in self._flat:
            inert = [m for c, m in self.inert if c == component]
            self._flat[component] = flat_index([*self._modules.get(component, {}), *inert])
        return self._flat[component]

    def count(self, component: str, pattern: str) -> int:
        """How many distinct values the first group of `pattern` takes over the module paths."""
        rx = re.compile(pattern)
        return len({m.group(1) for p in self._modules.get(component, {}) if (m := rx.match(p))})
