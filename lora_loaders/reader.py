"""`read_lora`: any supported LoRA file -> `LoraAdapter`, and strict checks against a model."""

from __future__ import annotations

import difflib
import hashlib
import logging
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

import torch

from . import formats
from .adapter import LoraAdapter
from .families import FAMILIES, FamilySpec, get_family, looks_like
from .formats.names import flat_index, unflatten
from .io import load_state_dict, resolve_path

logger = logging.getLogger(__name__)


class LoraKeyError(KeyError):
    """Keys of a LoRA file that match no module of the model."""

    def __str__(self):  # KeyError quotes its message; show it as written
        return str(self.args[0]) if self.args else ""


class _Resolver:
    """Turns flattened (kohya) module names into module paths, exactly when the model is known."""

    def __init__(self, spec: FamilySpec, module_names: Mapping[str, Iterable[str]] | None, layers_per_block):
        self._index = {c: flat_index(names) for c, names in (module_names or {}).items()}
        self._lpb = layers_per_block or spec.layers_per_block

    def __call__(self, component: str, flat: str) -> str:
        return unflatten(flat, self._index.get(component))

    def layers_per_block(self, component: str) -> int:
        return self._lpb


def read_lora(
    source,
    family: str,
    *,
    weight_name: str | None = None,
    allow_pickle: bool = False,
    module_names: Mapping[str, Iterable[str]] | None = None,
    layers_per_block: int | None = None,
    **hub_kwargs,
) -> LoraAdapter:
    """Read a LoRA (path, directory + weight_name, hub repo id + weight_name, or dict) for `family`.

    `module_names` ({component: module paths}) lets kohya names resolve exactly against a model.
    Raises on files with no LoRA keys, unknown keys, and files made for another family.
    """
    spec = get_family(family)
    where = _describe(source, weight_name, **hub_kwargs)
    state_dict, metadata = load_state_dict(source, weight_name, allow_pickle, **hub_kwargs)
    if not state_dict:
        raise ValueError(f"{where}: the file holds no tensors")
    keys = list(state_dict)
    converter = formats.detect(keys)
    if converter is None:
        raise ValueError(f"{where}: no LoRA keys found (first keys: {keys[:5]})")
    resolver = _Resolver(spec, module_names, layers_per_block)
    try:
        layers = converter.convert(state_dict, metadata, spec, resolver)
    except (KeyError, ValueError) as e:
        other = _other_family(spec, state_dict, metadata, module_names)
        hint = f"; it looks like a LoRA for {other}" if other else ""
        raise type(e)(f"{where}: {e.args[0] if e.args else e}{hint}") from e
    names = [f"{c}.{m}" for c, m in layers]
    other = looks_like(spec, names)
    if other:
        raise ValueError(f"{where} looks like a LoRA for {other}, not for {family!r} "
                         f"(targets such as {names[:3]})")
    return LoraAdapter(layers, family=family, format=converter.NAME, source=where, metadata=dict(metadata))


def _other_family(spec, state_dict, metadata, module_names) -> str | None:
    """Which other family could read this file, for error messages."""
    for other in FAMILIES.values():
        if other.name == spec.name:
            continue
        converter = formats.detect(list(state_dict))
        try:
            layers = converter.convert(state_dict, metadata, other, _Resolver(other, None, None))
        except (KeyError, ValueError):
            continue
        if looks_like(other, [f"{c}.{m}" for c, m in layers]) is None:
            return other.name
    return None


def _describe(source, weight_name=None, **hub_kwargs) -> str:
    if isinstance(source, dict):
        return "LoRA state dict"
    try:
        return str(resolve_path(source, weight_name, **hub_kwargs))
    except Exception:  # noqa: BLE001 - the real error is raised by load_state_dict
        return str(source)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# transformers 5 dropped CLIPTextModel's `text_model.` level; LoRA files keep it.
_ALIASES = ("text_model.",)


def align_to_model(adapter: LoraAdapter, components: Mapping[str, torch.nn.Module]) -> LoraAdapter:
    """The adapter with module paths spelled as the given model spells them."""
    from .targets import targetable_modules

    return align_module_names(adapter, {c: targetable_modules(m) for c, m in components.items() if m is not None})


def align_module_names(adapter: LoraAdapter, modules_of: Mapping[str, Collection[str]]) -> LoraAdapter:
    """The adapter with module paths spelled as `modules_of[component]` spells them (e.g. CLIP's
    `text_model.`, which transformers 5 dropped from parameter names); itself if none differ."""
    layers, changed = {}, False
    for (component, module), layer in adapter.layers.items():
        modules = modules_of.get(component)
        if modules is not None and module not in modules:
            for alias in _ALIASES:
                if module.startswith(alias) and module[len(alias):] in modules:
                    module, changed = module[len(alias):], True
                elif alias + module in modules:
                    module, changed = alias + module, True
        layers[(component, module)] = layer
    if not changed:
        return adapter
    return LoraAdapter(layers, adapter.family, adapter.format, adapter.source, adapter.metadata)


def check_against_model(adapter: LoraAdapter, components: Mapping[str, torch.nn.Module], name: str = "adapter"):
    """Raise unless every target is a Linear/Conv of a given component with a matching shape."""
    from .targets import targetable_modules

    unmatched, mismatched = [], []
    for component in adapter.components:
        model = components.get(component)
        if model is None:
            continue
        modules = targetable_modules(model)
        for module, layer in adapter.for_component(component).items():
            target = modules.get(module)
            if target is None:
                unmatched.append((component, module, modules))
            elif not layer.fits(target.weight.shape):
                mismatched.append(f"{component}.{module}: LoRA delta {tuple(layer.delta_shape())}"
                                  f"{'' if layer.bias is None else f' (bias {tuple(layer.bias.shape)})'}"
                                  f" vs weight {tuple(target.weight.shape)}")
            elif layer.bias is not None and target.bias is None:
                mismatched.append(f"{component}.{module}: LoRA has a bias delta but the module has no bias")
    if unmatched:
        lines = []
        for component, module, modules in unmatched[:5]:
            close = difflib.get_close_matches(module, list(modules), n=3, cutoff=0.5)
            lines.append(f"  {component}.{module} (closest: {', '.join(close) or 'none'})")
        raise LoraKeyError(
            f"{name}: {len(unmatched)} LoRA target(s) match no Linear/Conv module of the model:\n"
            + "\n".join(lines)
        )
    if mismatched:
        raise ValueError(f"{name}: shape mismatch for {len(mismatched)} module(s):\n  " + "\n  ".join(mismatched[:5]))
