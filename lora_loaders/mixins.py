"""diffusers-compatible LoRA loader mixins, strict and exact.

One base class, `LoraBaseMixin`, holds all the behaviour; each family's mixin is generated
from its `FamilySpec` (same class names as diffusers). Unlike diffusers + PEFT, adapters are
not injected as extra layers: the effective weights are written into the modules' own
parameters (same outputs, no inference overhead), and the exact base bits are kept, so
`unfuse_lora`, `disable_lora` and `unload_lora_weights` restore them bit for bit.

Which adapters are active, and at which weights, after each call follows diffusers + PEFT,
including per-layer "merged" state: a module with fused adapters shows only its fused
weights; `disable_lora` unmerges; `fuse_lora(lora_scale=s)` also multiplies the weights of
the active adapters by s, as diffusers does.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from .adapter import LoraAdapter, adapter_name_list
from .families import FAMILIES, FamilySpec, get_family
from .reader import align_to_model, check_against_model, read_lora
from .serialization import adapter_to_state_dict, save_state_dict
from .store import ParamStore
from .targets import targetable_modules
from .weights import weight_delta

logger = logging.getLogger(__name__)


class _Fused:
    """One adapter merged into one module: its layer and the weight it was merged at."""

    __slots__ = ("adapter", "layer", "weight")

    def __init__(self, adapter, layer, weight):
        self.adapter, self.layer, self.weight = adapter, layer, weight


class _LoraState:
    def __init__(self):
        self.adapters: dict[str, LoraAdapter] = {}
        self.active: list[str] = []
        self.weights: dict[str, dict[str, object]] = {}  # adapter -> component -> float | {module prefix: w}
        self.multipliers: dict[str, dict[str, float]] = {}  # adapter -> component -> fuse lora_scale product
        self.enabled = True
        self.fused: dict[tuple[str, str], list[_Fused]] = {}  # (component, module) -> merged adapters
        self.stores: dict[str, ParamStore] = {}


class LoraBaseMixin:
    """Shared LoRA behaviour; subclasses set `_family` and `_lora_loadable_modules`."""

    _family: str = ""
    _lora_loadable_modules: list[str] = []
    keep_base_copies = False  # True: keep full base copies instead of exact residuals

    # ---- plumbing -------------------------------------------------------------------
    @property
    def _spec(self) -> FamilySpec:
        return get_family(self._family)

    @property
    def _lora(self) -> _LoraState:
        state = self.__dict__.get("_lora_state_")
        if state is None:
            state = self.__dict__["_lora_state_"] = _LoraState()
        return state

    def _lora_components(self) -> dict[str, nn.Module]:
        return {c: m for c in self._lora_loadable_modules if (m := getattr(self, c, None)) is not None}

    def _store(self, component: str) -> ParamStore:
        stores = self._lora.stores
        model = getattr(self, component)
        if component not in stores or stores[component].model is not model:
            stores[component] = ParamStore(model, keep_copies=self.keep_base_copies)
        return stores[component]

    def _module_weight(self, adapter: str, component: str, module: str) -> float:
        spec = self._lora.weights.get(adapter, {}).get(component)
        mult = self._lora.multipliers.get(adapter, {}).get(component, 1.0)
        return _module_weight(1.0 if spec is None else spec, module) * mult

    def _contributions(self, component: str, module: str):
        state = self._lora
        fused = state.fused.get((component, module))
        if fused:
            return [(f.layer, f.weight) for f in fused]
        if not state.enabled:
            return []
        out = []
        for name in state.active:
            layer = state.adapters[name].layers.get((component, module))
            if layer is not None:
                out.append((layer, self._module_weight(name, component, module)))
        return out

    def _refresh(self, targets=None):
        """Rewrite the parameters of the given (component, module)s (default: every one touched)."""
        state = self._lora
        if targets is None:
            targets = set(state.fused)
            for adapter in state.adapters.values():
                targets.update(adapter.layers)
            for component, store in state.stores.items():
                targets.update((component, p.rsplit(".", 1)[0]) for p in store.modified())
        components = self._lora_components()
        for component, module in sorted(targets):
            if component not in components:
                continue
            store = self._store(component)
            contributions = self._contributions(component, module)
            store.write(f"{module}.weight", contributions)
            bias = f"{module}.bias"
            if store.has(bias):
                store.write(bias, [c for c in contributions if c[0].bias is not None])

    # ---- loading ----------------------------------------------------------------------
    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict, **kwargs) -> dict[str, torch.Tensor]:
        """The file's canonical adapter as a flat state dict (`<component>.<module>.lora_A.weight`, ...)."""
        return adapter_to_state_dict(read_lora(pretrained_model_name_or_path_or_dict, cls._family, **kwargs))

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          hotswap: bool = False, **kwargs):
        """Load a LoRA (any supported format) and make it the only active adapter, at weight 1.

        kwargs: `weight_name`, `allow_pickle`, and hub arguments (`subfolder`, `revision`,
        `cache_dir`, `local_files_only`, `token`). With `hotswap=True` the adapter named
        `adapter_name` is replaced in place, keeping its weights and active state.
        """
        state = self._lora
        kwargs.pop("low_cpu_mem_usage", None)  # always low: nothing is allocated but the factors
        if adapter_name is None:
            adapter_name = f"default_{len(state.adapters)}"
        if hotswap and adapter_name not in state.adapters:
            raise ValueError(f"hotswap: no adapter named {adapter_name!r} to replace")
        if adapter_name in state.adapters and not hotswap:
            raise ValueError(f"Adapter name {adapter_name!r} already in use")
        components = self._lora_components()
        unet = components.get("unet")
        adapter = read_lora(
            pretrained_model_name_or_path_or_dict, self._family,
            module_names={c: list(targetable_modules(m)) for c, m in components.items()},
            layers_per_block=getattr(getattr(unet, "config", None), "layers_per_block", None),
            **kwargs,
        )
        adapter = align_to_model(adapter, components)
        skipped = [c for c in adapter.components if c not in components]
        if skipped:
            logger.info("adapter %r: skipping components not given to this loader: %s", adapter_name, skipped)
            adapter = LoraAdapter({k: v for k, v in adapter.layers.items() if k[0] in components},
                                  adapter.family, adapter.format, adapter.source, adapter.metadata)
        if not adapter.layers:
            raise ValueError(f"adapter {adapter_name!r} has no layers for the components given: {list(components)}")
        check_against_model(adapter, components, adapter_name)
        old = state.adapters.get(adapter_name)
        state.adapters[adapter_name] = adapter
        if not hotswap:
            state.active = [adapter_name]
            state.weights[adapter_name] = {}
            state.multipliers[adapter_name] = {}
        self._refresh(None if old is None else set(old.layers) | set(adapter.layers))

    # ---- adapter selection -------------------------------------------------------------
    def set_adapters(self, adapter_names, adapter_weights=None):
        """Activate adapters with weights: a float, a per-component dict, or one entry per adapter.

        A UNet entry may be per block: `{"down": 0.9, "mid": 1, "up": {"block_0": 0.6, "block_1": [0.4, 0.8, 1]}}`.
        """
        state = self._lora
        names = adapter_name_list(adapter_names, state.adapters)
        weights = copy.deepcopy(adapter_weights)
        if not isinstance(weights, list):
            weights = [weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"Length of adapter names {len(names)} is not equal to the length of the weights "
                             f"{len(weights)}")
        components = self._lora_components()
        new_weights = {}
        for name, w in zip(names, weights):
            per_component = {}
            for component, model in components.items():
                cw = w.get(component) if isinstance(w, dict) else w
                if isinstance(cw, dict):
                    if component != "unet":
                        raise ValueError(f"per-block weights are only supported for the UNet, not {component!r}")
                    cw = _expand_unet_scales(model, cw)
                per_component[component] = 1.0 if cw is None else cw
            if isinstance(w, dict):
                unknown = set(w) - set(self._lora_loadable_modules)
                if unknown:
                    logger.warning("set_adapters: ignoring weights for unknown components %s", sorted(unknown))
            new_weights[name] = per_component
        before = self._touched_by(state.active)
        state.active = names
        for name in names:
            state.weights[name] = new_weights[name]
            state.multipliers[name] = {}
        self._refresh(before | self._touched_by(names))

    def _touched_by(self, names) -> set:
        return {k for n in names if n in self._lora.adapters for k in self._lora.adapters[n].layers}

    def disable_lora(self):
        state = self._lora
        touched = self._touched_by(state.active) | set(state.fused)
        state.enabled = False
        state.fused.clear()  # PEFT unmerges disabled layers
        self._refresh(touched)

    def enable_lora(self):
        self._lora.enabled = True
        self._refresh(self._touched_by(self._lora.active))

    def delete_adapters(self, adapter_names):
        state = self._lora
        names = adapter_name_list(adapter_names, state.adapters)
        touched = self._touched_by(names)
        for n in names:
            del state.adapters[n]
            state.weights.pop(n, None)
            state.multipliers.pop(n, None)
        state.active = [n for n in state.active if n not in names]
        self._refresh(touched)

    def unload_lora_weights(self):
        """Drop every adapter. As in diffusers, weights fused with `fuse_lora` stay fused."""
        state = self._lora
        touched = self._touched_by(state.adapters)
        for (component, module) in state.fused:
            store = state.stores.get(component)
            if store is not None:
                for p in (f"{module}.weight", f"{module}.bias"):
                    store.accept_current(p)
        fused = set(state.fused)
        state.adapters.clear()
        state.active = []
        state.weights.clear()
        state.multipliers.clear()
        state.fused.clear()
        state.enabled = True
        self._refresh(touched - fused)

    def get_active_adapters(self) -> list[str]:
        return list(self._lora.active)

    def get_list_adapters(self) -> dict[str, list[str]]:
        out = {}
        for component in self._lora_components():
            names = [n for n, a in self._lora.adapters.items() if component in a.components]
            if names:
                out[component] = names
        return out

    def set_lora_device(self, adapter_names, device):
        state = self._lora
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            if name not in state.adapters:
                raise ValueError(f"Adapter name {name!r} not in the list of present adapters: {sorted(state.adapters)}")
            for layer in state.adapters[name].layers.values():
                layer.tensors = {k: v.to(device) for k, v in layer.tensors.items()}
                for attr in ("bias", "magnitude", "dora_scale"):
                    if getattr(layer, attr) is not None:
                        setattr(layer, attr, getattr(layer, attr).to(device))

    # ---- fusing ------------------------------------------------------------------------
    def fuse_lora(self, components=None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names=None, **kwargs):
        """Merge adapters into the weights of `components` (default: the family's)."""
        state = self._lora
        components = self._check_components(components, self._spec.fuse_default, "fuse_lora")
        names = adapter_name_list(state.active if adapter_names is None else adapter_names, state.adapters)
        present = self._lora_components()
        components = [c for c in components if c in present]
        for component in components:  # diffusers scales the active adapters by lora_scale
            for name in state.active:
                m = state.multipliers.setdefault(name, {})
                m[component] = m.get(component, 1.0) * lora_scale
        plan = {}
        for name in names:
            for (component, module), layer in state.adapters[name].layers.items():
                if component not in components:
                    continue
                merged = state.fused.get((component, module), [])
                if any(f.adapter == name for f in merged):
                    continue
                plan.setdefault((component, module), []).append(
                    _Fused(name, layer, self._module_weight(name, component, module)))
        if safe_fusing:
            self._check_finite(plan)
        for key, entries in plan.items():
            state.fused.setdefault(key, []).extend(entries)
        self._refresh(set(plan))

    def _check_finite(self, plan):
        for (component, module), entries in plan.items():
            store = self._store(component)
            base = store.base(f"{module}.weight").float()
            for f in entries:
                delta = weight_delta(f.layer, base, f.weight)
                bias = f.layer.bias_delta()
                if not torch.isfinite(delta).all() or (bias is not None and not torch.isfinite(bias).all()):
                    raise ValueError(f"safe_fusing: adapter {f.adapter!r} gives NaN or Inf weights in "
                                     f"{component}.{module}; nothing was fused")

    def unfuse_lora(self, components=None, **kwargs):
        """Return fused weights of `components` to their exact base bits (active adapters stay active)."""
        state = self._lora
        components = self._check_components(components, self._spec.unfuse_default, "unfuse_lora", strict=False)
        keys = [k for k in state.fused if k[0] in components]
        for k in keys:
            del state.fused[k]
        self._refresh(set(keys) | self._touched_by(state.active))

    def _check_components(self, components, default, what, strict=True):
        if components is None:
            components = default or self._lora_loadable_modules
        components = [components] if isinstance(components, str) else list(components)
        if not components:
            raise ValueError(f"{what}: `components` cannot be empty")
        bad = [c for c in components if c not in self._lora_loadable_modules]
        if bad and strict:
            raise ValueError(f"{what}: {bad} not LoRA-loadable; loadable: {self._lora_loadable_modules}")
        return [c for c in components if c in self._lora_loadable_modules]

    @property
    def fused_loras(self) -> set[str]:
        return {f.adapter for entries in self._lora.fused.values() for f in entries}

    @property
    def num_fused_loras(self) -> int:
        return len(self.fused_loras)

    # ---- saving ------------------------------------------------------------------------
    def save_lora_weights(self, save_directory, adapter_name: str | None = None,
                          weight_name: str = "pytorch_lora_weights.safetensors",
                          safe_serialization: bool = True, **component_layers):
        """Write an adapter (or given `<component>_lora_layers` dicts) in diffusers/PEFT format.

        diffusers' `load_lora_weights` reads the file: alpha / rank is folded into `lora_B`.
        """
        if not safe_serialization:
            raise ValueError("only safetensors output is supported (pickles are not written)")
        layers = {k.removesuffix("_lora_layers"): v for k, v in component_layers.items()
                  if k.endswith("_lora_layers") and v is not None}
        if layers:
            tensors = {f"{c}.{k}": v for c, sd in layers.items() for k, v in sd.items()}
        else:
            state = self._lora
            if adapter_name is None:
                if len(state.adapters) != 1:
                    raise ValueError(f"pass adapter_name=; loaded adapters: {sorted(state.adapters)}")
                adapter_name = next(iter(state.adapters))
            if adapter_name not in state.adapters:
                raise ValueError(f"Adapter name {adapter_name!r} not in the list of present adapters: "
                                 f"{sorted(state.adapters)}")
            tensors = adapter_to_state_dict(state.adapters[adapter_name], fold_alpha=True)
        return save_state_dict(tensors, Path(save_directory) / weight_name)


def _module_weight(spec, module: str) -> float:
    """diffusers' `get_module_weight`: a float, or a {module prefix: weight} map from per-block weights."""
    if not isinstance(spec, dict):
        return float(spec)
    for prefix, w in spec.items():
        if prefix in module:
            return float(w)
    parts = module.split(".")
    if len(parts) < 4:
        return 1.0
    return float(spec.get(f"{parts[0]}.{parts[1]}.attentions.{parts[3]}", 1.0))


def _expand_unet_scales(unet: nn.Module, scales: dict, default: float = 1.0) -> dict[str, float]:
    """Expand `{"down": .., "mid": .., "up": ..}` into {`down_blocks.i.attentions.j`: weight} as diffusers does."""
    with_attn = {"down": [i for i, b in enumerate(unet.down_blocks) if hasattr(b, "attentions")],
                 "up": [i for i, b in enumerate(unet.up_blocks) if hasattr(b, "attentions")]}
    per_block = {"down": unet.config.layers_per_block, "up": unet.config.layers_per_block + 1}
    unknown = set(scales) - {"down", "mid", "up"}
    if unknown:
        raise ValueError(f"per-block weights take keys down, mid, up; got {sorted(unknown)}")
    out = {}
    mid = scales.get("mid", default)
    if isinstance(mid, list):
        if len(mid) != 1:
            raise ValueError(f"Expected 1 scales for mid, got {len(mid)}.")
        mid = mid[0]
    out["mid_block.attentions.0"] = mid
    for updown, name in (("down", "down_blocks"), ("up", "up_blocks")):
        value = scales.get(updown, default)
        blocks = value if isinstance(value, dict) else {f"block_{i}": value for i in with_attn[updown]}
        for key in blocks:
            if not key.startswith("block_") or int(key[6:]) not in with_attn[updown]:
                raise ValueError(f"Can't set lora scale for {updown}.{key}: no such block with attentions")
        for i in with_attn[updown]:
            v = blocks.get(f"block_{i}", default)
            if not isinstance(v, list):
                v = [v] * per_block[updown]
            elif len(v) == 1:
                v = v * per_block[updown]
            elif len(v) != per_block[updown]:
                raise ValueError(f"Expected {per_block[updown]} scales for {updown}.block_{i}, got {len(v)}.")
            for j, w in enumerate(v):
                out[f"{name}.{i}.attentions.{j}"] = w
    return out


# ---- the per-family mixins, generated from the family specs ----------------------------------

def _make_mixin(spec: FamilySpec) -> type:
    return type(spec.mixin, (LoraBaseMixin,), {
        "_family": spec.name,
        "_lora_loadable_modules": list(spec.components),
        "__doc__": f"LoRA loading for {spec.name} ({', '.join(spec.components)}), diffusers' {spec.mixin} API.",
        "__module__": __name__,
    })


MIXINS: dict[str, type] = {spec.name: _make_mixin(spec) for spec in FAMILIES.values()}
globals().update({cls.__name__: cls for cls in MIXINS.values()})
LoraLoaderMixin = MIXINS["sd"]  # diffusers' deprecated alias


def loader_for(family: str, **components) -> LoraBaseMixin:
    """A loader over the given components (any subset of the family's), with the family mixin's API."""
    spec = get_family(family)
    unknown = set(components) - set(spec.components)
    if unknown:
        raise ValueError(f"family {family!r} has no LoRA-loadable component(s) {sorted(unknown)}; "
                         f"it has {list(spec.components)}")
    loader = MIXINS[family].__new__(MIXINS[family])
    for c in spec.components:
        setattr(loader, c, components.get(c))
    return loader


def loader_for_pipeline(pipe) -> LoraBaseMixin:
    """A loader over a diffusers pipeline's components; the family is inferred from its LoRA mixin."""
    for spec in FAMILIES.values():
        if any(cls.__name__ == spec.mixin for cls in type(pipe).__mro__):
            return loader_for(spec.name, **{c: getattr(pipe, c, None) for c in spec.components})
    raise ValueError(f"cannot tell the family of pipeline {type(pipe).__name__}: it uses none of the LoRA mixins "
                     f"{[s.mixin for s in FAMILIES.values()]}")


__all__ = ["LoraBaseMixin", "MIXINS", "loader_for", "loader_for_pipeline", "LoraLoaderMixin",
           *[cls.__name__ for cls in MIXINS.values()]]
