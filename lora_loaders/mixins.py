"""diffusers-compatible LoRA loader mixins, strict and exact.

One base class, `LoraBaseMixin`, holds all the behaviour; each family's mixin is generated
from its registry entry (same class names as diffusers). Unlike diffusers + PEFT, adapters
are not injected as extra layers: the effective weights are written into the modules' own
parameters (same outputs, no inference overhead), and the exact base bits are kept, so
`unfuse_lora`, `disable_lora` and `unload_lora_weights` restore them bit for bit. Which
adapters are active at which weights follows diffusers + PEFT (`lora_loaders.state`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .adapter import adapter_name_list
from .families import FAMILIES, FamilySpec, get_family
from .index import TargetIndex
from .bind import fit_widened, resolve_fused
from .reader import read_lora
from .serialization import adapter_to_state_dict, save_state_dict
from .state import LoraState, _Fused
from .store import ParamStore
from .targets import param_contributions
from .weights import map_items, weight_delta
from .widen import Widened, restore, wanted, widen_modules

logger = logging.getLogger(__name__)

_READ_KWARGS = {"weight_name", "allow_pickle", "subfolder", "revision", "cache_dir", "local_files_only", "token",
                "force_download", "proxies"}
_IGNORED_KWARGS = {"low_cpu_mem_usage", "use_safetensors"}  # always low memory; safetensors unless allow_pickle


def _no_kwargs(what: str, kwargs: dict) -> None:
    if kwargs:
        raise TypeError(f"{what}() got unexpected keyword argument(s) {sorted(kwargs)}")


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
    def _lora(self) -> LoraState:
        state = self.__dict__.get("_lora_state_")
        if state is None:
            state = self.__dict__["_lora_state_"] = LoraState()
        return state

    @property
    def _stores(self) -> dict[str, ParamStore]:
        return self.__dict__.setdefault("_lora_stores_", {})

    def _lora_components(self) -> dict[str, nn.Module]:
        return {c: m for c in self._lora_loadable_modules if (m := getattr(self, c, None)) is not None}

    @property
    def _widened(self) -> dict[tuple[str, str], Widened]:
        """Modules a loaded LoRA widened (Flux Control's x_embedder), with what they were."""
        return self.__dict__.setdefault("_lora_widened_", {})

    def _index(self) -> TargetIndex:
        return TargetIndex.from_models(self._lora_components(),
                                       widened={k: r.original_width for k, r in self._widened.items()})

    def _widen(self, widths: dict, state: LoraState) -> tuple[LoraState, list]:
        """Widen these modules (zero input columns, as diffusers does); returns the state with the
        loaded adapters' layers on them padded, and the new records (for `_unwiden`)."""
        for component, module in widths:
            store = self._store(component)
            if f"{module}.weight" in store.modified():
                store.write(f"{module}.weight", [])  # back to base first: its residuals are for the old width
        records, index = widen_modules(self._lora_components(), self._spec, widths, self._widened)
        new_records = []
        for record in records:
            if (record.component, record.module) not in self._widened:  # the first width is the original
                self._widened[(record.component, record.module)] = record
                new_records.append(record)
        padded = state.copy()
        for name, adapter in state.adapters.items():
            layers = fit_widened(adapter.layers, index)
            if any(layers[k] is not v for k, v in adapter.layers.items()):
                padded.adapters[name] = adapter.with_layers(layers)
        for target, entries in state.fused.items():
            if target in index.widened:
                padded.fused[target] = [_Fused(f.adapter, fit_widened({target: f.layer}, index)[target], f.weight)
                                        for f in entries]
        return padded, new_records

    def _unwiden(self, records) -> None:
        for record in records:
            store = self._store(record.component)
            if f"{record.module}.weight" in store.modified():
                store.write(f"{record.module}.weight", [])
            restore(getattr(self, record.component), record)
            self._widened.pop((record.component, record.module), None)

    def _base_of(self, component: str, param: str) -> torch.Tensor:
        return self._store(component).base(param)

    def _store(self, component: str) -> ParamStore:
        model = getattr(self, component)
        store = self._stores.get(component)
        if store is None or store.model is not model:
            store = self._stores[component] = ParamStore(model, keep_copies=self.keep_base_copies)
        return store

    def _refresh(self, targets):
        """Rewrite the parameters of these (component, module) targets from the state."""
        state = self._lora
        components = self._lora_components()
        for component, store in self._stores.items():  # and whatever still differs from base
            targets = set(targets) | {(component, p.rsplit(".", 1)[0]) for p in store.modified()}
        writes = []
        for component, module in sorted(targets):
            if component not in components:
                continue
            store = self._store(component)
            params = param_contributions(module, state.contributions(component, module))
            for kind in ("weight", "bias"):
                name = f"{module}.{kind}"
                if store.has(name):
                    writes.append((store, name, params.get(name, [])))
        # Parameters are independent: one per worker thread, largest first (the threads finish
        # together); same bits in any thread. Everything per weight, its factors' casts included,
        # runs in the workers: torch ops of the calling thread would wake its OpenMP team, whose
        # spinning takes a core from them.
        writes.sort(key=lambda w: -w[0].numel(w[1]))
        map_items(lambda w: w[0].write(w[1], w[2]), writes, sum(w[0].numel(w[1]) for w in writes))

    # ---- loading ----------------------------------------------------------------------
    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict, **kwargs) -> dict[str, torch.Tensor]:
        """The file's canonical adapter as a flat state dict (`<component>.<module>.lora_A.weight`, ...)."""
        return adapter_to_state_dict(read_lora(pretrained_model_name_or_path_or_dict, cls._family, **kwargs))

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          hotswap: bool = False, **kwargs):
        """Load a LoRA (any supported layout) and make it the only active adapter, at weight 1.

        kwargs: `weight_name`, `allow_pickle`, hub arguments (`subfolder`, `revision`,
        `cache_dir`, `local_files_only`, `token`) and the family's own flags (Wan's
        `load_into_transformer_2`). With `hotswap=True` the adapter named `adapter_name` is
        replaced in place, keeping its weights and active state.
        """
        state = self._lora
        spec = self._spec
        remap = {}
        for option, mapping in spec.load_options.items():
            if kwargs.pop(option, False):
                missing = [c for c in mapping.values() if getattr(self, c, None) is None]
                if missing:
                    raise ValueError(f"{option}=True needs the component(s) {missing}, which this loader lacks")
                remap.update(mapping)
        for k in _IGNORED_KWARGS:
            kwargs.pop(k, None)
        _no_kwargs("load_lora_weights", {k: v for k, v in kwargs.items() if k not in _READ_KWARGS})
        if adapter_name is None:
            adapter_name = f"default_{len(state.adapters)}"
        if hotswap and adapter_name not in state.adapters:
            raise ValueError(f"hotswap: no adapter named {adapter_name!r} to replace")
        if adapter_name in state.adapters and not hotswap:
            raise ValueError(f"Adapter name {adapter_name!r} already in use")
        components = self._lora_components()
        index = self._index()
        adapter = read_lora(pretrained_model_name_or_path_or_dict, self._family, index=index, remap=remap,
                            widen=True, **kwargs)
        skipped = [c for c in adapter.components if c not in components]
        if skipped:
            logger.info("adapter %r: skipping components not given to this loader: %s", adapter_name, skipped)
            adapter = adapter.with_layers({k: v for k, v in adapter.layers.items() if k[0] in components})
        if not adapter.layers:
            raise ValueError(f"adapter {adapter_name!r} has no layers for the components given: {list(components)}")
        records, before = [], state
        widths = wanted([adapter], spec, index)
        try:
            if widths:
                logger.info("adapter %r widens %s", adapter_name, {f"{c}.{m}": w for (c, m), w in widths.items()})
                state, records = self._widen(widths, state)
            adapter = resolve_fused(adapter, self._base_of)
            new = state.copy()
            touched = new.add(adapter_name, adapter, hotswap)
        except BaseException:
            self._unwiden(records)
            raise
        self.__dict__["_lora_state_"] = new
        try:
            self._refresh(touched)
        except BaseException:
            self.__dict__["_lora_state_"] = before
            self._unwiden(records)
            self._refresh(touched)
            raise

    # ---- adapter selection -------------------------------------------------------------
    def set_adapters(self, adapter_names, adapter_weights=None):
        """Activate adapters with weights: a float, a per-component dict, or one entry per adapter.

        A UNet entry may be per block: `{"down": 0.9, "mid": 1, "up": {"block_0": 0.6, "block_1": [0.4, 0.8, 1]}}`.
        """
        components = self._lora_components()
        index = None

        def expand(component, scales):
            nonlocal index
            cspec = self._spec.components.get(component)
            if cspec is None or cspec.block_weights is None:
                raise ValueError(f"per-block weights are only supported for the UNet, not {component!r}")
            index = index or self._index()
            return cspec.block_weights(scales, index.modules(component) or {})

        self._refresh(self._lora.set_adapters(adapter_names, adapter_weights, components, expand,
                                              self._lora_loadable_modules))

    def disable_lora(self):
        self._refresh(self._lora.set_enabled(False))

    def enable_lora(self):
        self._refresh(self._lora.set_enabled(True))

    def delete_adapters(self, adapter_names):
        self._refresh(self._lora.delete(adapter_names))

    def unload_lora_weights(self, reset_to_overwritten_params: bool = True):
        """Drop every adapter. As in diffusers, weights fused with `fuse_lora` stay fused.

        Modules a LoRA widened (Flux Control) get their original weight back, unless fused
        weights live in them or `reset_to_overwritten_params=False` (diffusers' default).
        """
        touched, fused = self._lora.unload()
        for component, module in fused:
            store = self._stores.get(component)
            if store is not None:
                for p in (f"{module}.weight", f"{module}.bias"):
                    store.accept_current(p)
        self._refresh(touched)
        if reset_to_overwritten_params:
            self._unwiden([r for k, r in list(self._widened.items()) if k not in fused])

    def get_active_adapters(self) -> list[str]:
        """The active adapters (each component keeps its own set, as PEFT does; this is their union)."""
        return self._lora.active_names()

    def get_list_adapters(self) -> dict[str, list[str]]:
        out = {}
        for component in self._lora_components():
            names = [n for n, a in self._lora.adapters.items() if component in a.components]
            if names:
                out[component] = names
        return out

    def set_lora_device(self, adapter_names, device):
        state = self._lora
        for name in adapter_name_list(adapter_names, state.adapters):
            for layer in state.adapters[name].layers.values():
                layer.tensors = {k: v.to(device) for k, v in layer.tensors.items()}
                for attr in ("bias", "magnitude", "dora_scale"):
                    if getattr(layer, attr) is not None:
                        setattr(layer, attr, getattr(layer, attr).to(device))

    # ---- fusing ------------------------------------------------------------------------
    def fuse_lora(self, components=None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names=None, **kwargs):
        """Merge adapters into the weights of `components` (default: the family's)."""
        _no_kwargs("fuse_lora", kwargs)
        components = self._check_components(components, self._spec.fuse_default, "fuse_lora")
        present = self._lora_components()
        new = self._lora.copy()
        plan = new.fuse([c for c in components if c in present], float(lora_scale), adapter_names)
        if safe_fusing:
            self._check_finite(plan)
        touched = new.commit_fuse(plan)
        self.__dict__["_lora_state_"] = new
        self._refresh(touched)

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
        _no_kwargs("unfuse_lora", kwargs)
        components = self._check_components(components, self._spec.unfuse_default, "unfuse_lora", strict=False)
        self._refresh(self._lora.unfuse(components))

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
        return self._lora.fused_adapters

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
        _no_kwargs("save_lora_weights", {k: v for k, v in component_layers.items() if not k.endswith("_lora_layers")})
        if layers:
            tensors = {f"{c}.{k}": v for c, sd in layers.items() for k, v in sd.items()}
        else:
            state = self._lora
            if adapter_name is None:
                if len(state.adapters) != 1:
                    raise ValueError(f"pass adapter_name=; loaded adapters: {sorted(state.adapters)}")
                adapter_name = next(iter(state.adapters))
            adapter_name_list(adapter_name, state.adapters)
            tensors = adapter_to_state_dict(state.adapters[adapter_name], fold_alpha=True)
        return save_state_dict(tensors, Path(save_directory) / weight_name)


# ---- the per-family mixins, generated from the registry ---------------------------------------

def _make_mixin(spec: FamilySpec) -> type:
    return type(spec.mixin, (LoraBaseMixin,), {
        "_family": spec.name,
        "_lora_loadable_modules": list(spec.lora_components),
        "__doc__": f"LoRA loading for {spec.name} ({', '.join(spec.lora_components)}), diffusers' {spec.mixin} API.",
        "__module__": __name__,
    })


MIXINS: dict[str, type] = {spec.name: _make_mixin(spec) for spec in FAMILIES.values()}
globals().update({cls.__name__: cls for cls in MIXINS.values()})
LoraLoaderMixin = MIXINS["sd"]  # diffusers' deprecated alias


def loader_for(family: str, **components) -> LoraBaseMixin:
    """A loader over the given components (any subset of the family's), with the family mixin's API."""
    spec = get_family(family)
    unknown = set(components) - set(spec.lora_components)
    if unknown:
        raise ValueError(f"family {family!r} has no LoRA-loadable component(s) {sorted(unknown)}; "
                         f"it has {list(spec.lora_components)}")
    loader = MIXINS[family].__new__(MIXINS[family])
    for c in spec.lora_components:
        setattr(loader, c, components.get(c))
    return loader


def loader_for_pipeline(pipe) -> LoraBaseMixin:
    """A loader over a diffusers pipeline's components; the family is inferred from its LoRA mixin."""
    for spec in FAMILIES.values():
        if any(cls.__name__ == spec.mixin for cls in type(pipe).__mro__):
            return loader_for(spec.name, **{c: getattr(pipe, c, None) for c in spec.lora_components})
    raise ValueError(f"cannot tell the family of pipeline {type(pipe).__name__}: it uses none of the LoRA mixins "
                     f"{[s.mixin for s in FAMILIES.values()]}")


__all__ = ["LoraBaseMixin", "MIXINS", "loader_for", "loader_for_pipeline", "LoraLoaderMixin",
           *[cls.__name__ for cls in MIXINS.values()]]
