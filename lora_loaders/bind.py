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
from .errors import LoraKeyError, LoraShapeError, LoraWidthError
from .families.spec import FamilySpec, Namespace, Split
from .formats.names import unflatten
from .formats.parse import ParsedLora
from .index import TargetIndex

_PREFIX_LIKE = re.compile(r"^(lora|lycoris)_[a-z0-9]+_")



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
         remap: Mapping[str, str] | None = None, where: str = "LoRA", verify: bool = True,
         widen: bool = False) -> LoraAdapter:
    """The canonical adapter of a parsed file for `spec`, checked against `index` when given
    (`verify=False` leaves that `check` to the caller).

    remap: {component: component} for layers a file names one way and a caller wants in
    another (Wan's `load_into_transformer_2`). widen: accept layers wider than a module the
    family lets LoRAs widen (the caller widens it: `lora_loaders.widen`).
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
        name = key[len(ns.prefix):]
        if ns.flat:  # some trainers write dots after the flat prefix (`lora_unet_blocks_0.self_attn.q`)
            name = name.replace(".", "_")
        try:
            resolved = _resolve(spec, name, ns, component, layer, ctx, raw)
        except LoraShapeError as e:
            raise LoraShapeError(f"{where}: {e}") from e
        except (ValueError, IndexError) as e:  # a name table that cannot read this name
            raise LoraKeyError(f"{where}: {raw}: {e}") from e
        for module, part in resolved:
            target = (component, module)
            if target in layers:
                raise LoraKeyError(f"{where}: {raw} and {origin[target]} both target {component}.{module}")
            layers[target], origin[target] = part, raw
    if unknown:
        prefixes = sorted({n.prefix for n in spec.all_namespaces() if n.prefix})
        raise LoraKeyError(f"{where}: {len(unknown)} key(s) with a prefix family {spec.name!r} does not read "
                           f"(it reads {prefixes}): {[parsed.keys[u][0] for u in unknown[:5]]}")
    layers = fit_widened(layers, index)
    if index is not None and index.inert:
        layers = {k: v for k, v in layers.items() if k not in index.inert}
    if verify:
        check(layers, index, where, origin, spec=spec, widen=widen)
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


def align(adapter: LoraAdapter, spec: FamilySpec, index: TargetIndex, widen: bool = False) -> LoraAdapter:
    """An already bound adapter, spelled as another model spells its modules (and padded where
    that model is widened), then checked."""
    layers = {(c, _alias(spec, c, m, index)): layer for (c, m), layer in adapter.layers.items()}
    layers = {k: v for k, v in fit_widened(layers, index).items() if k not in index.inert}
    check(layers, index, adapter.source or "adapter", spec=spec, widen=widen)
    same = list(layers) == list(adapter.layers) and all(layers[k] is adapter.layers[k] for k in layers)
    return adapter if same else adapter.with_layers(layers)


# -- fused layers ---------------------------------------------------------------------------------


def split_layer(layer: LoraLayer, split: Split, names: list[str], component: str, index, raw: str) -> list[LoraLayer]:
    """One layer per target: rows of the fused layer's delta, in `names` order.

    LoRA: the down projection is shared and the up projection sliced by rows (exact).
    LoHa / LoKr / full deltas: the fused delta is computed and sliced (float32, alpha
    applied). DoRA normalising each output row (PEFT's magnitude, LyCORIS' (out, 1) scale)
    splits by rows too; DoRA normalising each input column needs the whole fused weight:
    its parts are `FusedSlice`s until `resolve_fused` computes them from the base weights.
    """
    if layer.kind in ("ia3", "replace"):
        raise LoraShapeError(f"{raw}: a {layer.kind} layer on a fused layer cannot be split")
    total = layer.delta_shape()[0] if layer.kind != "full" or "diff" in layer.tensors else layer.bias.shape[0]
    sizes = _sizes(split, names, component, index, total, raw)
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    rows = list(zip(bounds, bounds[1:]))
    magnitude = _swap(layer.magnitude.reshape(-1), split) if layer.magnitude is not None else None
    dora = layer.dora_scale
    if dora is not None and not (dora.shape[0] == total and dora.numel() == total):
        group = _FusedGroup(layer, component, tuple(names), tuple(bounds), split.swap_halves, raw)
        bias = _swap(layer.bias_delta(), split)
        cols = layer.delta_shape()[1] if layer.kind != "full" else layer.tensors["diff"][0].numel()
        return [FusedSlice(group, b - a, cols, None if bias is None else bias[a:b]) for a, b in rows]
    dora = _swap(dora, split)

    def extras(a, b):
        return {"magnitude": None if magnitude is None else magnitude[a:b],
                "dora_scale": None if dora is None else dora[a:b]}

    if layer.kind == "lora":
        up = _swap(layer.tensors["up"], split)
        bias = _swap(layer.bias, split)
        return [LoraLayer("lora", {"down": layer.tensors["down"], "up": up[a:b]}, alpha=layer.alpha,
                          bias=None if bias is None else bias[a:b], **extras(a, b)) for a, b in rows]
    delta = None
    if layer.kind != "full" or "diff" in layer.tensors:
        shape = layer.delta_shape()
        delta = _swap(layer.delta(torch.Size(shape) if layer.kind == "full" else torch.Size(shape)), split)
    bias = _swap(layer.bias_delta(), split)
    parts = []
    for a, b in rows:
        tensors = {} if delta is None else {"diff": delta[a:b]}
        parts.append(LoraLayer("full", tensors, bias=None if bias is None else bias[a:b], **extras(a, b)))
    return parts


@dataclass(eq=False)
class _FusedGroup:
    layer: LoraLayer  # the file's layer, on the fused original module
    component: str
    names: tuple[str, ...]  # the diffusers modules it spans, in their row order
    bounds: tuple[int, ...]
    swap_halves: bool
    raw: str


class FusedSlice(LoraLayer):
    """Rows of a fused original layer whose values need the fused base weight (DoRA normalising
    input columns over all of q, k, v, ...): a placeholder until `resolve_fused`."""

    def __init__(self, group: _FusedGroup, rows: int, cols: int, bias: torch.Tensor | None):
        super().__init__("full", {"diff": torch.empty(rows, cols, device="meta")}, bias=bias)
        self.group = group

    def delta(self, weight_shape):
        raise LoraShapeError(f"{self.group.raw}: DoRA over the fused layer {' + '.join(self.group.names)} needs their "
                             "base weights (lora_loaders.bind.resolve_fused) before its effective weights")


def resolve_fused(adapter: LoraAdapter, base_of) -> LoraAdapter:
    """The adapter with each `FusedSlice` computed: the file's layer applied to the fused weight
    (the diffusers modules' base weights, concatenated, in the file's row order) as its trainer
    did, then split back into full deltas. `base_of(component, param)` gives exact base values.

    The result is linear in the adapter weight (`weights.weight_delta`'s LyCORIS DoRA), so the
    full deltas reproduce it at any weight; every consumer resolves from the same base bits.
    """
    from .weights import weight_delta

    groups = {id(layer.group): layer.group for layer in adapter.layers.values() if isinstance(layer, FusedSlice)}
    if not groups:
        return adapter
    layers = dict(adapter.layers)
    for g in groups.values():
        bases = [base_of(g.component, f"{n}.weight").detach().float() for n in g.names]
        fused = torch.cat(bases) if len(bases) > 1 else bases[0]
        split = Split(g.names, swap_halves=g.swap_halves)
        delta = _swap(weight_delta(g.layer, _swap(fused, split), 1.0), split)
        for name, a, b in zip(g.names, g.bounds, g.bounds[1:]):
            old = layers[(g.component, name)]
            layers[(g.component, name)] = LoraLayer("full", {"diff": delta[a:b].clone()}, bias=old.bias)
    return adapter.with_layers(layers)


def fit_widened(layers: Mapping[tuple[str, str], LoraLayer], index: TargetIndex | None) -> dict:
    """Layers on widened modules that have the module's original input width, zero-padded to its
    current width (diffusers pads them the same way), so they fit."""
    widened = index.widened if index is not None else {}
    out = dict(layers)
    for key, layer in layers.items():
        if key not in widened or isinstance(layer, FusedSlice) or layer.kind == "replace":
            continue
        target = (index.modules(key[0]) or {}).get(key[1])
        shape = layer.delta_shape()
        if target is None or len(shape) < 2 or shape[1] != widened[key] or target.weight[1] == widened[key]:
            continue
        out[key] = pad_inputs(layer, target.weight[1])
    return out


def pad_inputs(layer: LoraLayer, cols: int) -> LoraLayer:
    """`layer` with zero input columns appended up to `cols` (its delta there is zero)."""
    extra = cols - layer.delta_shape()[1]

    def pad(t, dim=1):
        shape = list(t.shape)
        shape[dim] = extra
        return torch.cat([t, torch.zeros(shape, dtype=t.dtype)], dim=dim)

    dora = layer.dora_scale
    if dora is not None and not (dora.shape[0] == layer.delta_shape()[0] and dora.numel() == dora.shape[0]):
        dora = pad(dora)  # a per-input-column norm: zero columns stay zero
    if layer.kind == "lora" and layer.tensors["down"].dim() == 2:
        return LoraLayer("lora", {"down": pad(layer.tensors["down"]), "up": layer.tensors["up"]}, alpha=layer.alpha,
                         bias=layer.bias, magnitude=layer.magnitude, dora_scale=dora)
    if layer.kind == "ia3":  # a per-input scale gets zeros too; a per-output one fits as it is
        w = layer.tensors["weight"]
        return LoraLayer("ia3", {"weight": pad(w.reshape(1, -1)).reshape(-1)}, on_input=True) if layer.on_input else layer
    if layer.kind == "replace":
        raise LoraShapeError("a weight replacement cannot be padded to a widened module")
    shape = layer.delta_shape()
    delta = layer.delta(torch.Size(shape)) if layer.kind != "full" else layer.tensors["diff"].float().reshape(shape)
    return LoraLayer("full", {"diff": pad(delta)}, bias=layer.bias_delta(), magnitude=layer.magnitude, dora_scale=dora)


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
            raise LoraShapeError(f"{raw}: the fused layer has {total} output rows, but {' + '.join(names)} "
                             f"have {' + '.join(map(str, sizes))}")
        return sizes
    ratios = split.ratios or (1,) * len(names)
    unit, rest = divmod(total, sum(ratios))
    if rest or unit == 0:
        raise LoraShapeError(f"{raw}: {total} output rows cannot be split {ratios} into {names}")
    return [unit * r for r in ratios]


# -- the one strictness check ----------------------------------------------------------------------


def check(layers: Mapping[tuple[str, str], LoraLayer], index: TargetIndex | None, where: str = "LoRA",
          origin: Mapping | None = None, spec: FamilySpec | None = None, widen: bool = False) -> None:
    """Raise unless every target is a module of the indexed component with a shape its delta fits.

    With `spec`, a layer wider than a module the family lets LoRAs widen passes when `widen`
    (the caller widens the module), and otherwise says which graph input it would widen.
    """
    if index is None:
        return
    unmatched, mismatched, wider_ones = [], [], []
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
        elif not layer.fits(target.weight) and (wider := widens(spec, component, module, layer, target)):
            if not widen:
                wider_ones.append(f"{component}.{module}{src}: {wider}")
        elif not layer.fits(target.weight):
            mismatched.append(f"{component}.{module}{src}: LoRA delta {tuple(layer.delta_shape())}"
                              f"{'' if layer.bias is None else f' (bias {tuple(layer.bias.shape)})'}"
                              f" vs weight {tuple(target.weight)}")
        elif layer.bias is not None and target.bias is None:
            mismatched.append(f"{component}.{module}{src}: LoRA has a bias delta but the module has no bias")
    if unmatched:
        raise LoraKeyError(f"{where}: {len(unmatched)} LoRA target(s) match no module of the model:\n"
                           + "\n".join(unmatched[:5]))
    if mismatched or wider_ones:
        kind = LoraShapeError if mismatched else LoraWidthError
        mismatched += wider_ones
        raise kind(f"{where}: shape mismatch for {len(mismatched)} module(s):\n  " + "\n  ".join(mismatched[:5]))


def widens(spec: FamilySpec | None, component: str, module: str, layer: LoraLayer, target) -> str | None:
    """Why `layer` does not fit `target` when it only has more input columns than a module the
    family lets LoRAs widen (a Flux Control LoRA's x_embedder); None otherwise."""
    cspec = spec.components.get(component) if spec is not None else None
    if cspec is None or module not in cspec.widen or len(target.weight) != 2:
        return None
    shape = layer.delta_shape()
    if isinstance(layer, FusedSlice) or len(shape) != 2 or shape[0] != target.weight[0] \
            or shape[1] <= target.weight[1] or (layer.bias is not None and layer.bias.numel() != shape[0]):
        return None
    field = cspec.widen[module]
    inputs = [t.name for t in cspec.inputs if any(getattr(d, "name", None) == field for d in t.dims)]
    what = f"graph input {inputs[0]!r}" if inputs else "its input"
    return (f"the LoRA widens it from {target.weight[1]} to {shape[1]} input features ({what} would take {shape[1]} "
            f"channels, not {target.weight[1]}: {cspec.widen[module]} {target.weight[1]} -> {shape[1]}); an engine "
            "exported without this LoRA cannot take it: export a new one with it baked in")
