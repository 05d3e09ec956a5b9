"""The one adapter state machine, shared by the mixins and `refit.Refitter`.

Which adapters are loaded, which are active at which weights (per component, and per
block where the component's entry expands block weights), whether LoRA is enabled, and
which adapters are fused into which modules, following diffusers + PEFT: each component
has its own active set (PEFT keeps one per model); a newly loaded adapter becomes the only
active one of the components it has layers for; `set_adapters` sets every component's; a
module with fused adapters shows only its fused weights; `disable` unmerges;
`fuse(lora_scale=s)` also scales the active adapters by s.

Transitions return the (component, module) targets whose weights must be rewritten; the
caller computes and writes them (torch parameters, or engine weights), so a failed write
can keep the previous state (`copy`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping

from .adapter import LoraAdapter, LoraLayer, adapter_name_list
from .weights import Contribution

log = logging.getLogger(__name__)

Target = tuple[str, str]  # (component, module path)


class _Fused:
    """One adapter merged into one module: its layer and the weight it was merged at."""

    __slots__ = ("adapter", "layer", "weight")

    def __init__(self, adapter: str, layer: LoraLayer, weight: float):
        self.adapter, self.layer, self.weight = adapter, layer, weight


class LoraState:
    def __init__(self):
        self.adapters: dict[str, LoraAdapter] = {}
        self.active: dict[str, list[str]] = {}  # component -> active adapters
        self.weights: dict[str, dict[str, object]] = {}  # adapter -> component -> float | {module prefix: w}
        self.multipliers: dict[str, dict[str, float]] = {}  # adapter -> component -> fuse lora_scale product
        self.enabled = True
        self.fused: dict[Target, list[_Fused]] = {}

    def copy(self) -> LoraState:
        new = LoraState()
        new.adapters = dict(self.adapters)
        new.active = {c: list(v) for c, v in self.active.items()}
        new.weights = copy.deepcopy(self.weights)
        new.multipliers = copy.deepcopy(self.multipliers)
        new.enabled = self.enabled
        new.fused = {k: list(v) for k, v in self.fused.items()}
        return new

    # -- queries -----------------------------------------------------------------------
    def active_names(self) -> list[str]:
        """Every active adapter (of any component), in load order."""
        on = {n for names in self.active.values() for n in names}
        return [n for n in self.adapters if n in on]

    def active_in(self, component: str) -> list[str]:
        return list(self.active.get(component, []))

    def active_targets(self) -> set[Target]:
        return {(c, m) for c, names in self.active.items() for n in names if n in self.adapters
                for (cc, m) in self.adapters[n].layers if cc == c}

    def module_weight(self, adapter: str, component: str, module: str) -> float:
        spec = self.weights.get(adapter, {}).get(component)
        mult = self.multipliers.get(adapter, {}).get(component, 1.0)
        return _module_weight(1.0 if spec is None else spec, module) * mult

    def contributions(self, component: str, module: str) -> list[Contribution]:
        fused = self.fused.get((component, module))
        if fused:
            return [(f.layer, f.weight) for f in fused]
        if not self.enabled:
            return []
        out = []
        for name in self.active.get(component, []):
            layer = self.adapters[name].layers.get((component, module))
            if layer is not None:
                out.append((layer, self.module_weight(name, component, module)))
        return out

    def touched(self, names: Iterable[str]) -> set[Target]:
        return {k for n in names if n in self.adapters for k in self.adapters[n].layers}

    def targets(self) -> set[Target]:
        """Every target any loaded or fused adapter has."""
        out = set(self.fused)
        for adapter in self.adapters.values():
            out.update(adapter.layers)
        return out

    # -- transitions ---------------------------------------------------------------------
    def add(self, name: str, adapter: LoraAdapter, hotswap: bool = False) -> set[Target]:
        if hotswap and name not in self.adapters:
            raise ValueError(f"hotswap: no adapter named {name!r} to replace")
        if name in self.adapters and not hotswap:
            raise ValueError(f"Adapter name {name!r} already in use")
        old = self.adapters.get(name)
        self.adapters[name] = adapter
        if not hotswap:
            before = {t for t in self.active_targets() if t[0] in adapter.components}
            for c in adapter.components:
                self.active[c] = [name]
            self.weights[name] = {}
            self.multipliers[name] = {}
            return before | set(adapter.layers) | set(self.fused)
        return set(old.layers) | set(adapter.layers)

    def register(self, name: str, adapter: LoraAdapter) -> None:
        """Know an adapter (or replace one known by name) without activating it: `set_adapters` does."""
        self.adapters[name] = adapter

    def set_adapters(self, adapter_names, adapter_weights, components: Iterable[str],
                     expand: Callable[[str, dict], dict] | None = None, known: Iterable[str] = ()) -> set[Target]:
        """diffusers' `set_adapters`: a float, a {component: float | per-block dict}, or one per adapter.

        components: those present here; known: every LoRA component of the family. A weight for a
        known component that is absent is ignored (as diffusers does for a pipeline without it);
        one for a name that is no component at all is an error, never silently weight 1."""
        names = adapter_name_list(adapter_names, self.adapters)
        weights = copy.deepcopy(adapter_weights)
        if not isinstance(weights, list):
            weights = [weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"Length of adapter names {len(names)} is not equal to the length of the weights "
                             f"{len(weights)}")
        components = list(components)
        new = {}
        for name, w in zip(names, weights):
            per_component = {}
            for component in components:
                cw = w.get(component) if isinstance(w, Mapping) else w
                if isinstance(cw, Mapping):
                    if expand is None:
                        raise ValueError(f"per-block weights are not supported for {component!r}")
                    cw = expand(component, dict(cw))
                elif cw is not None:
                    cw = finite_number(cw, f"weight of adapter {name!r}")
                per_component[component] = 1.0 if cw is None else cw
            if isinstance(w, Mapping):
                unknown = sorted(set(w) - set(components) - set(known))
                if unknown:
                    raise ValueError(
                        f"set_adapters: weights of adapter {name!r} name {unknown}, which are not components here "
                        f"({sorted(set(components) | set(known))}); per-block weights go under their component, "
                        f"e.g. {{{next(iter(components), 'unet')!r}: {{'down': 0.5, 'up': 1.0}}}}")
                absent = sorted(set(w) - set(components))
                if absent:
                    log.debug("set_adapters: no %s here; its weights are ignored", absent)
            new[name] = per_component
        touched = self.active_targets() | self.touched(names)
        self.active = {c: list(names) for c in components}
        for name in names:
            self.weights[name] = new[name]
            self.multipliers[name] = {}
        return touched

    def set_enabled(self, enabled: bool) -> set[Target]:
        touched = self.active_targets()
        if not enabled:
            touched |= set(self.fused)
            self.fused.clear()  # PEFT unmerges disabled layers
        self.enabled = enabled
        return touched

    def delete(self, adapter_names) -> set[Target]:
        names = adapter_name_list(adapter_names, self.adapters)
        touched = self.touched(names)
        for n in names:
            del self.adapters[n]
            self.weights.pop(n, None)
            self.multipliers.pop(n, None)
        self.active = {c: [n for n in v if n not in names] for c, v in self.active.items()}
        return touched

    def unload(self) -> tuple[set[Target], set[Target]]:
        """Drop every adapter. Returns (targets to rewrite, fused targets whose weights stay as they are)."""
        touched = self.touched(self.adapters)
        fused = set(self.fused)
        self.__init__()
        return touched - fused, fused

    def fuse(self, components: list[str], lora_scale: float, adapter_names=None) -> dict[Target, list[_Fused]]:
        """Plan the merge of adapters into `components` (applied with `commit_fuse`)."""
        given = adapter_names is not None
        names = adapter_name_list(adapter_names if given else self.active_names(), self.adapters)
        for component in components:  # diffusers scales the active adapters by lora_scale
            for name in self.active.get(component, []):
                m = self.multipliers.setdefault(name, {})
                m[component] = m.get(component, 1.0) * lora_scale
        plan: dict[Target, list[_Fused]] = {}
        for name in names:
            for (component, module), layer in self.adapters[name].layers.items():
                if component not in components or (not given and name not in self.active.get(component, [])):
                    continue
                if any(f.adapter == name for f in self.fused.get((component, module), [])):
                    continue
                plan.setdefault((component, module), []).append(
                    _Fused(name, layer, self.module_weight(name, component, module)))
        return plan

    def commit_fuse(self, plan: Mapping[Target, list[_Fused]]) -> set[Target]:
        for key, entries in plan.items():
            self.fused.setdefault(key, []).extend(entries)
        return set(plan)

    def unfuse(self, components: list[str]) -> set[Target]:
        keys = [k for k in self.fused if k[0] in components]
        for k in keys:
            del self.fused[k]
        return set(keys) | self.active_targets()

    @property
    def fused_adapters(self) -> set[str]:
        return {f.adapter for entries in self.fused.values() for f in entries}


def finite_number(value, what: str) -> float:
    """`value` as a float; ValueError naming `what` for anything else, NaN and infinities included."""
    import math

    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return v


def _module_weight(spec, module: str) -> float:
    """diffusers' `get_module_weight`: a float, or a {module prefix: weight} map from per-block weights."""
    if not isinstance(spec, Mapping):
        return float(spec)
    for prefix, w in spec.items():
        if prefix in module:
            return float(w)
    parts = module.split(".")
    if len(parts) < 4:
        return 1.0
    return float(spec.get(f"{parts[0]}.{parts[1]}.attentions.{parts[3]}", 1.0))
