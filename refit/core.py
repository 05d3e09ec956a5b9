"""Refit computations shared by `Refitter` and `python -m refit`.

A refit to a set of (adapter, weight) pairs recomputes, FROM BASE, every parameter in the
union of the new targets and the parameters that currently differ from base, with
`lora_loaders.weights.effective_weight` / `effective_bias` (the function the mixins and the
export use), then applies the weights-map transform. Values are keyed by initializer name
(the weights map's key, what every engine takes).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from lora_loaders.adapter import LoraAdapter
from lora_loaders.dtypes import from_numpy, to_numpy, torch_dtype
from lora_loaders.dtypes import name as dtype_name
from lora_loaders.index import TargetIndex
from lora_loaders.reader import LruCache
from lora_loaders.targets import params_of
from lora_loaders.weights import Contribution, effective_bias, effective_weight, map_items

from .store import AdapterError, ComponentFiles, RefitError

# -- adapters, bound to an export's weights maps and cached -----------------------------------

_CACHE = LruCache()  # (file sha256, family, remap, the components' module names and shapes) -> bound adapter


def _index_key(files: ComponentFiles) -> str:
    key = getattr(files, "_index_key", None)
    if key is None:
        h = hashlib.sha256(repr(sorted(files.map.param_shapes().items())).encode())
        key = files._index_key = h.hexdigest()
    return key


def _index(files_list: Sequence[ComponentFiles]) -> TargetIndex:
    if len(files_list) == 1:
        return files_list[0].index
    return TargetIndex.combine([f.index for f in files_list])


def read_adapter(source, files_list: Sequence[ComponentFiles], name: str = "adapter", remap=None,
                 **kwargs) -> tuple[LoraAdapter, str | None]:
    """(adapter, sha256 of the file or None) for a path / hub id / state dict / LoraAdapter, bound
    once to the mapped modules of these components (the one strictness check of
    `lora_loaders.bind`: a key matching nothing in any of them is an error).

    Files are parsed once per content; the bound adapter is cached by (content hash, family,
    remap, the components' module names and shapes). `remap` sends a file's component to
    another (Wan 2.2's transformer_2); with none given, a file with no layers for these
    components is tried with the family's remap into one of them.
    """
    from lora_loaders.bind import LoraKeyError, align
    from lora_loaders.families import get_family
    from lora_loaders.reader import bind_parsed, parse_file

    family = files_list[0].family
    spec = get_family(family)
    components = [f.component for f in files_list]
    index = _index(files_list)
    try:
        if isinstance(source, LoraAdapter):
            return align(source, spec, index), None
        parsed, digest, where = parse_file(source, **kwargs)
        key = (digest, family, repr(sorted((remap or {}).items())),
               tuple((f.component, _index_key(f)) for f in files_list))
        cached = _CACHE.get(key) if digest is not None else None
        if cached is not None:
            return cached, digest
        adapter = bind_parsed(parsed, spec, index, remap=remap, where=where, sha256=digest)
        if remap is None and not any(adapter.for_component(c) for c in components):
            fallback = next((m for c in components if (m := spec.remap_into(c))), None)
            if fallback:  # a file for the family's first denoiser refits another one
                adapter = bind_parsed(parsed, spec, index, remap=fallback, where=where, sha256=digest)
    except LoraKeyError as e:
        raise AdapterError(f"adapter {name!r} touches modules the {'/'.join(components)} engine{'s' * (len(components) > 1)}"
                         f" of this export does not map (no such Linear/Conv/norm in the exported graph): {e}") from e
    except FileNotFoundError:
        raise  # as the mixins raise it: the message names the file
    except (OSError, ValueError) as e:
        if "shape mismatch" in str(e):
            raise AdapterError(f"adapter {name!r} has shapes that need a different graph: {e}") from e
        raise AdapterError(f"cannot read LoRA {name!r} for {family} {', '.join(components)}: {e}") from e
    if digest is not None:
        _CACHE.put(key, adapter)
    return adapter, digest


def clear_cache():
    from lora_loaders.reader import clear_cache as clear_parsed

    _CACHE.clear()
    clear_parsed()


def check_adapter(adapter: LoraAdapter, family: str | None, components: Sequence[str], name: str) -> LoraAdapter:
    """The adapter's layers for these components; raises unless it is for this family and has some."""
    if adapter.family and family and adapter.family != family:
        raise AdapterError(f"adapter {name!r} was read for family {adapter.family!r}; this export is {family!r}")
    layers = {k: v for k, v in adapter.layers.items() if k[0] in components}
    if not layers:
        which = ", ".join(repr(c) for c in components)
        raise AdapterError(f"adapter {name!r} has no layers for component{'s' if len(components) > 1 else ''} {which} "
                         f"(it targets {', '.join(adapter.components) or 'nothing'}); it cannot be applied here")
    return adapter if len(layers) == len(adapter.layers) else adapter.with_layers(layers)


# -- the computation ------------------------------------------------------------------------

def compute(files: ComponentFiles, by_module: Mapping[str, list[Contribution]], params: Iterable[str], *,
            owners: Mapping[int, str] | None = None, to_onnx: bool = True, device=None, as_numpy: bool = True,
            resident: bool | None = None, into: Mapping[str, np.ndarray] | None = None,
            exported: Iterable[str] = ()) -> dict:
    """{initializer name: new value} for each of `params` (torch parameter names) under the state
    whose contributions are `by_module` ({module: [(layer, weight)]}): the effective weight from
    the exact base, in the initializer's layout and dtype (to_onnx) or the parameter's.

    A transposed initializer is written in its own layout while each row block is in cache,
    from base values read in place from base_weights.safetensors / the ONNX data (memory maps,
    no copy). `owners` ({id(layer): adapter name}) only serves error messages.
    device (e.g. "cuda:0"): compute there from base values kept on that device
    (`device_bases`), and return torch tensors on it (as_numpy is then ignored); with the
    default (CPU) and as_numpy=False, torch tensors instead of numpy arrays.
    resident: keep the base values on `device` (read from the files once) and compute from them:
    the default on every device but the CPU. resident=True on the CPU runs the device path there
    (the same function, the same bits: tests/test_torch_engine.py checks it).
    into ({initializer: the array the engine runs from}, `Engine.writable_weights`; with to_onnx
    on the CPU): weights held there are written there directly, in their own layout, and left out
    of the returned dict: no new memory for them. If this raises, some may have been written.
    exported: params whose value is the exported initializer itself (never written since the
    export, whose bits may come from another backend): copied from model.onnx, not computed
    (how a failed transition puts them back).
    """
    by_param = params_of(dict(by_module))
    missing = sorted(p for p in set(by_param) | set(params) if p not in files.map)
    if missing:
        raise RefitError(f"the active adapters touch weights this engine does not map: {missing[:5]}")
    order = {p: i for i, p in enumerate(files.map.entries)}
    params = sorted(set(params), key=order.__getitem__)
    exported = set(exported)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    on_cpu = dev.type == "cpu"
    resident = not on_cpu if resident is None else bool(resident)
    numpy_out = as_numpy and on_cpu
    views = base_views(files) if not resident else None
    bases = device_bases(files, dev) if resident else None

    def one(param):
        entry = files.map[param]
        held = into.get(entry.initializer) if into is not None and to_onnx else None
        if param in exported:
            return _exported(files, entry, held, to_onnx, dev, numpy_out)
        cs = by_param.get(param, [])
        base = bases.get(param) if bases is not None else views.get(param)
        try:
            if entry.kind != "bias" and to_onnx and _in_place_layout(entry):
                out = torch.empty(entry.shape, dtype=torch_dtype(entry.raw["dtype"]), device=dev) if held is None \
                    else _held(entry, held)
                _, finite = effective_weight(base, cs, out=out.t() if entry.raw["transform"] == "transpose" else out,
                                             check_finite=True)
                new = None
            elif entry.kind == "bias":
                new = effective_bias(base, cs)
                finite = not cs or bool(torch.isfinite(new).all())
            else:
                new, finite = effective_weight(base, cs, check_finite=True)
        except Exception as e:  # noqa: BLE001 - report which weight and why
            raise RefitError(f"cannot compute the effective value of {param}: {e}") from e
        if new is not None and (tuple(new.shape) != entry.param_shape or new.dtype != entry.param_dtype):
            raise RefitError(f"effective value of {param} has shape {tuple(new.shape)} {new.dtype}, "
                             f"expected {entry.param_shape} {entry.param_dtype}")
        if cs and not finite:
            raise AdapterError(f"effective value of {param} has NaN or Inf values (from {_culprits(cs, owners)}); "
                             "the engine keeps its previous weights")
        if new is None:
            return _WRITTEN if held is not None else _check_initializer(entry, to_numpy(out) if numpy_out else out)
        if to_onnx:
            return _to_initializer(entry, new, numpy_out)
        return new

    results = _each(files, one, params, on_cpu)
    return {files.map[p].initializer: r for p, r in zip(params, results) if r is not _WRITTEN}


_WRITTEN = object()  # a weight compute wrote into the engine's own array


def _exported(files: ComponentFiles, entry, held, to_onnx: bool, dev: torch.device, numpy_out: bool):
    value = files.reader().array(entry.initializer)
    if held is not None:
        np.copyto(held, value)
        return _WRITTEN
    if to_onnx:
        return np.array(value) if numpy_out else from_numpy(np.array(value)).to(dev)
    return entry.to_torch(from_numpy(np.array(value))).to(dev)


def _each(files: ComponentFiles, fn, params: list[str], on_cpu: bool = True) -> list:
    """[fn(p) for p in params]; every call has finished before the first error is raised (some may
    be writing into the engine's arrays: a restore must not race them)."""
    def caught(p):
        try:
            return fn(p)
        except Exception as e:  # noqa: BLE001 - re-raised below, once every worker is done
            return _Failed(e)

    if on_cpu:
        files.prepare()
        # Weights are independent: one per worker thread (torch releases the GIL); same bits.
        elements = sum(int(np.prod(files.map[p].param_shape, dtype=np.int64)) for p in params)
        results = map_items(caught, params, elements)
    else:
        results = [caught(p) for p in params]
    failed = next((r for r in results if isinstance(r, _Failed)), None)
    if failed is not None:
        raise failed.error
    return results


class _Failed:
    def __init__(self, error: Exception):
        self.error = error


def _held(entry, arr: np.ndarray) -> torch.Tensor:
    """The engine's array of this weight (initializer layout) as a tensor over the same memory."""
    if tuple(arr.shape) != entry.shape or arr.dtype.name != entry.raw["dtype"] or not arr.flags.writeable:
        raise RefitError(f"the engine's array for {entry.initializer} is {arr.dtype.name} {tuple(arr.shape)}"
                         f"{'' if arr.flags.writeable else ', read-only'}; the weights map says "
                         f"{entry.raw['dtype']} {entry.shape}")
    return torch.from_numpy(arr)


def _in_place_layout(entry) -> bool:
    """Whether the initializer is the parameter itself or its 2-D transpose (written directly)."""
    t = entry.raw.get("transform", "identity")
    return t == "identity" or (t == "transpose" and list(entry.raw.get("perm", [])) == [1, 0]
                               and len(entry.param_shape) == 2)


# -- base values in place ----------------------------------------------------------------------


class _BaseViews:
    """Base values of mapped parameters as torch tensors over memory maps of the exported files
    (copy-on-write maps: nothing is read until used, nothing is ever written back)."""

    def __init__(self, files: ComponentFiles):
        self.files = files

    def get(self, param: str) -> torch.Tensor:
        """The exact base value, torch layout (a strided view where the initializer is transposed)."""
        files, entry = self.files, self.files.map[param]
        if param in files.baked_params() or not _in_place_layout(entry):
            return files.base(param)  # base_weights.safetensors through safe_open: memory-mapped too
        value = files.reader().array(entry.initializer)
        t = from_numpy(value if value.flags.writeable else np.array(value))  # inline data: a read-only buffer
        t = t.t() if entry.raw["transform"] == "transpose" else t
        if tuple(t.shape) != entry.param_shape or t.dtype != entry.param_dtype:
            raise RefitError(f"{files.directory}: base value of {param} has shape {tuple(t.shape)} {t.dtype}, "
                             f"the weights map says {entry.param_shape} {entry.param_dtype}")
        return t


def base_views(files: ComponentFiles) -> _BaseViews:
    v = getattr(files, "_base_views", None)
    if v is None:
        v = files._base_views = _BaseViews(files)
    return v


class _DeviceBases:
    """Exact base values kept on one device (read from the files once, then reused by every refit)."""

    def __init__(self, files: ComponentFiles, device: torch.device):
        self.files, self.device = files, device
        self._values: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def get(self, param: str) -> torch.Tensor:
        with self._lock:
            t = self._values.get(param)
            if t is None:
                t = self._values[param] = base_views(self.files).get(param).contiguous().to(self.device)
            return t

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._values.values())


def device_bases(files: ComponentFiles, device) -> _DeviceBases:
    device = torch.device(device)
    cache = getattr(files, "_device_bases", None)
    if cache is None:
        cache = files._device_bases = {}
    if device not in cache:
        cache[device] = _DeviceBases(files, device)
    return cache[device]


def _culprits(cs, owners) -> str:
    layers = {id(layer) for layer, _ in cs}
    if not owners:
        return f"{len(layers)} adapter layer(s)"
    return "adapter(s) " + ", ".join(repr(n) for n in dict.fromkeys(owners[i] for i in layers if i in owners))


def _to_initializer(entry, v: torch.Tensor, as_numpy: bool = True):
    v = entry.to_onnx(v)
    return _check_initializer(entry, to_numpy(v) if as_numpy else v)


def _check_initializer(entry, arr):
    dtype = dtype_name(arr.dtype)
    if tuple(arr.shape) != entry.shape or dtype != entry.raw["dtype"]:
        raise RefitError(f"{entry.param} -> {entry.initializer}: got {tuple(arr.shape)} {dtype}, the weights "
                         f"map says {entry.shape} {entry.raw['dtype']}")
    return arr
