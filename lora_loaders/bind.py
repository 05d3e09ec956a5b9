"""Binding: parsed layers -> a `LoraAdapter` for one family and (optionally) one model.

Everything that needs to know the family or the model happens here, in one place, for
every consumer (mixins, export, refit): the key prefix decides the component
(`Namespace`), kohya's flattened names are un-flattened (exactly, against the model's
module names, when it is given), original-checkpoint names are translated (`NameTable`),
fused original layers are split into diffusers' modules (`Split`), aliases are resolved
(CLIP's `text_model.`), and every target is checked: it exists, its shape fits, a bias
delta has a bias to go to. A key that matches nothing raises, naming it and the closest
module names.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .adapter import LoraAdapter, LoraLayer
from .families.spec import FamilySpec, Namespace, Split
from .formats.names import unflatten
from .formats.parse import ParsedLora
from .index import TargetIndex

_PREFIX_LIKE = re.compile(r"^(lora|lycoris)_[a-z0-9]+_")


class LoraKeyError(KeyError):
    """Keys of a LoRA file that match no module of the model (or no prefix of the family)."""

    def __str__(self):  # KeyError quotes its message; show it as written
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class BindContext:
    """What a name table's hook may ask about the model being bound to."""

    index: TargetIndex | None
    component: str
    file_names: tuple[str, ...] = ()  # the file's module names in this namespace (prefix removed)

    def count(self, pattern: str, default: int) -> int:
        if self.index is None or self.index.modules(self.component) is None:
            return default
        return self.index.count(self.component, pattern) or default


def namespace_of(spec: FamilySpec, key: str) -> Namespace | None:
    for ns in spec.all_namespaces():
        if ns.prefix and key.startswith(ns.prefix):
            return ns
    head = key.split(".", 1)[0]
    if head in _all_component_names():  # another family's component: bound as such, then reported
        return Namespace(f"{head}.", head)
    if _PREFIX_LIKE.match(head):
        return None  # someone else's prefix: never guess that it is this family's denoiser
    return spec.unprefixed()  # the denoiser (attention-processor era files, original names)


def _all_component_names() -> set[str]:
    from .families import FAMILIES

    return {c for f in FAMILIES.values() for c in f.components}


def bind(parsed: ParsedLora, spec: FamilySpec, index: TargetIndex | None = None, *,
         remap: Mapping[str, str] | None = None, where: str = "LoRA", verify: bool = True) -> LoraAdapter:
    """The canonical adapter of a parsed file for `spec`, checked against `index` when given
    (`verify=False` leaves that `check` to the caller).

    remap: {component: component} for layers a file names one way and a caller wants in
    another (Wan's `load_into_transformer_2`).
    """
    remap = dict(remap or {})
    layers: dict[tuple[str, str], LoraLayer] = {}
    origin: dict[tuple[str, str], str] = {}
    unknown, formats = [], {}
    spaces = {}
    for raw in parsed.layers:
        key = raw.replace("base_model.model.", "")
        spaces[raw] = (key, namespace_of(spec, key))
    names_in = {}
    for key, ns in spaces.values():
        if ns is not None:
            names_in.setdefault(ns.prefix, []).append(key[len(ns.prefix):])
    for raw, layer in parsed.layers.items():
        key, ns = spaces[raw]
        if ns is None:
            unknown.append(raw)
            continue
        component = remap.get(ns.component, ns.component)
        formats[ns.format] = formats.get(ns.format, 0) + 1
        ctx = BindContext(index, component, tuple(names_in[ns.prefix]))
        for module, part in _resolve(spec, key[len(ns.prefix):], ns, component, layer, ctx, raw):
            target = (component, module)
            if target in layers:
                raise ValueError(f"{where}: {raw} and {origin[target]} both target {component}.{module}")
            layers[target], origin[target] = part, raw
    if unknown:
        prefixes = sorted({n.prefix for n in spec.all_namespaces() if n.prefix})
        raise LoraKeyError(f"{where}: {len(unknown)} key(s) with a prefix family {spec.name!r} does not read "
                           f"(it reads {prefixes}): {[parsed.keys[u][0] for u in unknown[:5]]}")
    if verify:
        check(layers, index, where, origin)
    fmt = max(formats, key=formats.get) if formats else "diffusers"
    if fmt == "diffusers" and parsed.style == "kohya":
        fmt = "kohya"
    return LoraAdapter(layers, family=spec.name, format=fmt, source=where, metadata=dict(parsed.metadata),
                       origin=origin)


def _resolve(spec: FamilySpec, name: str, ns: Namespace, component: str, layer: LoraLayer, ctx: BindContext,
             raw: str):
    """[(module path, layer)] for one parsed layer: translated, un-flattened, split, aliased."""
    index = ctx.index
    out = ns.table.translate(name, ns.flat, ctx) if ns.table is not None else None
    split = out if isinstance(out, Split) else None
    names = list(split.targets) if split else [name if out is None else out]
    names = [_spell(spec, n, ns, component, index) for n in names]
    if split is None:
        return [(names[0], copy.copy(layer))]  # the parsed layer may be cached: never share the object
    return list(zip(names, split_layer(layer, split, names, component, index, raw)))


def _spell(spec: FamilySpec, name: str, ns: Namespace, component: str, index: TargetIndex | None) -> str:
    """A module path as the model spells it."""
    if ns.flat and "." not in name:
        name = unflatten(name, index.flat(component) if index is not None else None)
    cspec = spec.components.get(component)
    for pattern, repl in cspec.renames if cspec else ():
        name = re.sub(pattern, repl, name)
    return _alias(spec, component, name, index)


def _alias(spec: FamilySpec, component: str, name: str, index: TargetIndex | None) -> str:
    """`name`, or the spelling of it the indexed model has (CLIP with or without `text_model.`)."""
    modules = index.modules(component) if index is not None else None
    cspec = spec.components.get(component)
    if modules is not None and name not in modules and cspec is not None:
        for alias in cspec.aliases:
            other = name[len(alias):] if name.startswith(alias) else alias + name
            if other in modules:
                return other
    return name


def align(adapter: LoraAdapter, spec: FamilySpec, index: TargetIndex) -> LoraAdapter:
    """An already bound adapter, spelled as another model spells its modules, then checked."""
    layers = {(c, _alias(spec, c, m, index)): layer for (c, m), layer in adapter.layers.items()}
    check(layers, index, adapter.source or "adapter")
    return adapter if list(layers) == list(adapter.layers) else adapter.with_layers(layers)


# -- fused layers ---------------------------------------------------------------------------------


def split_layer(layer: LoraLayer, split: Split, names: list[str], component: str, index, raw: str) -> list[LoraLayer]:
    """One layer per target: rows of the fused layer's delta, in `names` order.

    LoRA: the down projection is shared and the up projection sliced by rows (exact).
    LoHa / LoKr / full deltas: the fused delta is computed and sliced (float32, alpha
    applied). DoRA renormalises over the fused weight, so it cannot be split row-wise.
    """
    if layer.magnitude is not None or layer.dora_scale is not None:
        raise ValueError(f"{raw}: DoRA on a fused layer ({' + '.join(names)}) cannot be split into diffusers' "
                         "modules")
    if layer.kind in ("ia3", "replace"):
        raise ValueError(f"{raw}: a {layer.kind} layer on a fused layer cannot be split")
    total = layer.delta_shape()[0] if layer.kind != "full" or "diff" in layer.tensors else layer.bias.shape[0]
    sizes = _sizes(split, names, component, index, total, raw)
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    if layer.kind == "lora":
        up = _swap(layer.tensors["up"], split)
        bias = _swap(layer.bias, split)
        return [LoraLayer("lora", {"down": layer.tensors["down"], "up": up[a:b]}, alpha=layer.alpha,
                          bias=None if bias is None else bias[a:b]) for a, b in zip(bounds, bounds[1:])]
    delta = None
    if layer.kind != "full" or "diff" in layer.tensors:
        shape = layer.delta_shape()
        delta = _swap(layer.delta(torch.Size(shape) if layer.kind == "full" else torch.Size(shape)), split)
    bias = _swap(layer.bias_delta(), split)
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        tensors = {} if delta is None else {"diff": delta[a:b]}
        parts.append(LoraLayer("full", tensors, bias=None if bias is None else bias[a:b]))
    return parts


def _swap(t: torch.Tensor | None, split: Split) -> torch.Tensor | None:
    if t is None or not split.swap_halves:
        return t
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]])


def _sizes(split: Split, names, component, index, total: int, raw: str) -> list[int]:
    modules = index.modules(component) if index is not None else None
    if modules is not None and all(n in modules for n in names):
        sizes = [modules[n].weight[0] for n in names]
        if sum(sizes) != total:
            raise ValueError(f"{raw}: the fused layer has {total} output rows, but {' + '.join(names)} "
                             f"have {' + '.join(map(str, sizes))}")
        return sizes
    ratios = split.ratios or (1,) * len(names)
    unit, rest = divmod(total, sum(ratios))
    if rest or unit == 0:
        raise ValueError(f"{raw}: {total} output rows cannot be split {ratios} into {names}")
    return [unit * r for r in ratios]


# -- the one strictness check ----------------------------------------------------------------------


def check(layers: Mapping[tuple[str, str], LoraLayer], index: TargetIndex | None, where: str = "LoRA",
          origin: Mapping | None = None) -> None:
    """Raise unless every target is a module of the indexed component with a shape its delta fits."""
    if index is None:
        return
    unmatched, mismatched = [], []
    for (component, module), layer in layers.items():
        modules = index.modules(component)
        if modules is None:
            continue
        target = modules.get(module)
        raw = (origin or {}).get((component, module))
        src = f" (from {raw})" if raw and raw.replace("base_model.model.", "") != f"{component}.{module}" else ""
        if target is None:
            close = difflib.get_close_matches(module, list(modules), n=3, cutoff=0.5)
            unmatched.append(f"  {component}.{module}{src} (closest: {', '.join(close) or 'none'})")
        elif not layer.fits(target.weight):
            mismatched.append(f"{component}.{module}{src}: LoRA delta {tuple(layer.delta_shape())}"
                              f"{'' if layer.bias is None else f' (bias {tuple(layer.bias.shape)})'}"
                              f" vs weight {tuple(target.weight)}")
        elif layer.bias is not None and target.bias is None:
            mismatched.append(f"{component}.{module}{src}: LoRA has a bias delta but the module has no bias")
    if unmatched:
        raise LoraKeyError(f"{where}: {len(unmatched)} LoRA target(s) match no module of the model:\n"
                           + "\n".join(unmatched[:5]))
    if mismatched:
        raise ValueError(f"{where}: shape mismatch for {len(mismatched)} module(s):\n  " + "\n  ".join(mismatched[:5]))
