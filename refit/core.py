"""Refit computations shared by `Refitter` and `python -m refit`.

A refit to a set of (adapter, weight) pairs recomputes, FROM BASE, every parameter in the
union of the new targets and the parameters that currently differ from base, with
`lora_loaders.weights.effective_weight` / `effective_bias` (the function the mixins and the
export use), then applies the weights-map transform. Everything is computed and validated
before anything is written.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from engines.weights_map import from_numpy, to_numpy, torch_dtype
from lora_loaders.adapter import LoraAdapter
from lora_loaders.reader import LruCache
from lora_loaders.targets import params_of
from lora_loaders.weights import Contribution, effective_bias, effective_weight, map_items

from .store import ComponentFiles, RefitError

# -- adapters, bound to an engine's weights map and cached -----------------------------------

_CACHE = LruCache()  # (file sha256, family, component, the engine's module names and shapes) -> bound adapter


def _index_key(files: ComponentFiles) -> str:
    key = getattr(files, "_index_key", None)
    if key is None:
        h = hashlib.sha256(repr(sorted(files.map.param_shapes().items())).encode())
        key = files._index_key = h.hexdigest()
    return key


def read_adapter(source, files: ComponentFiles, name: str = "adapter", **kwargs) -> tuple[LoraAdapter, str | None]:
    """(adapter, sha256 of the file or None) for a path / hub id / state dict / LoraAdapter, bound to
    this engine's mapped modules (the one strictness check of `lora_loaders.bind`).

    Files are parsed once per content; the bound adapter is cached by (content hash, family,
    component, the engine's module names and shapes).
    """
    from lora_loaders.bind import LoraKeyError, align
    from lora_loaders.families import get_family
    from lora_loaders.reader import bind_parsed, parse_file

    spec = get_family(files.family)
    try:
        if isinstance(source, LoraAdapter):
            return align(source, spec, files.index), None
        parsed, digest, where = parse_file(source, **kwargs)
        key = (digest, files.family, files.component, _index_key(files))
        cached = _CACHE.get(key) if digest is not None else None
        if cached is not None:
            return cached, digest
        adapter = bind_parsed(parsed, spec, files.index, where=where, sha256=digest)
        remap = spec.remap_into(files.component)
        if remap and not adapter.for_component(files.component):
            # A file for the family's first denoiser refits another one (Wan 2.2's transformer_2).
            adapter = bind_parsed(parsed, spec, files.index, remap=remap, where=where, sha256=digest)
    except LoraKeyError as e:
        raise RefitError(f"adapter {name!r} touches modules this {files.component} engine does not map "
                         f"(no such Linear/Conv/norm in the exported graph): {e}") from e
    except (OSError, ValueError) as e:
        if "shape mismatch" in str(e):
            raise RefitError(f"adapter {name!r} has shapes that need a different graph: {e}") from e
        raise RefitError(f"cannot read LoRA {name!r} for {files.family} {files.component}: {e}") from e
    if digest is not None:
        _CACHE.put(key, adapter)
    return adapter, digest


def clear_cache():
    from lora_loaders.reader import clear_cache as clear_parsed

    _CACHE.clear()
    clear_parsed()


# -- checks ---------------------------------------------------------------------------------

def check_adapter(adapter: LoraAdapter, files: ComponentFiles, name: str) -> None:
    """Raise unless the adapter is for this family and has layers for this engine's component."""
    family, component = files.family, files.component
    if adapter.family and family and adapter.family != family:
        raise RefitError(f"adapter {name!r} was read for family {adapter.family!r}; "
                         f"this engine is a {family!r} {component}")
    if not adapter.for_component(component):
        raise RefitError(
            f"adapter {name!r} has no layers for component {component!r} "
            f"(it targets {', '.join(adapter.components) or 'nothing'}); it cannot be applied to this engine"
        )


# -- the computation ------------------------------------------------------------------------

def compute(files: ComponentFiles, by_module: Mapping[str, list[Contribution]], dirty: Iterable[str],
            owners: Mapping[int, str] | None = None, to_onnx: bool = False, device=None,
            as_numpy: bool = True, resident: bool | None = None,
            into: Mapping[str, np.ndarray] | None = None) -> tuple[set[str], dict]:
    """(new targets, {param: new torch-layout value}) for every param in targets | dirty.

    by_module: {module: [(layer, weight)]} of the new state (`contributions_by_module`, or
    the state machine's per-module contributions). With to_onnx=True the values are already
    in the initializers' layout and dtype ({initializer name: numpy array}): a transposed
    initializer is written in its own layout while each row block is in cache, from base
    values read in place from base_weights.safetensors / the ONNX data (memory maps, no copy).
    `owners` ({id(layer): adapter name}) only serves error messages.

    device (e.g. "cuda:0"): compute there from base values kept on that device
    (`device_bases`), and return torch tensors on it (as_numpy is then ignored); with the
    default (CPU) and as_numpy=False, torch tensors instead of numpy arrays.
    resident: keep the base values on `device` (read from the files once, `device_bases`) and
    compute from them: the default on every device but the CPU, where base values are read in
    place from memory maps instead. resident=True on the CPU runs the device path there (the
    same function, the same bits: tests/test_torch_engine.py checks it).
    into ({initializer: the array the engine runs from}, `Engine.writable_weights`; with
    to_onnx on the CPU): weights held there are written there directly, in their own layout,
    and left out of the returned dict: no new memory for them. If this raises, some may have been
    written; `restore` puts the previous values back.
    """
    by_param = params_of(dict(by_module))
    targets = set(by_param)
    missing = sorted(p for p in targets if p not in files.map)
    if missing:
        raise RefitError(f"the active adapters touch weights this engine does not map: {missing[:5]}")
    order = {p: i for i, p in enumerate(files.map.entries)}
    params = sorted(targets | set(dirty), key=lambda p: order.get(p, -1))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    on_cpu = dev.type == "cpu"
    resident = not on_cpu if resident is None else bool(resident)
    numpy_out = as_numpy and on_cpu
    views = base_views(files) if not resident else None
    bases = device_bases(files, dev) if resident else None

    def one(param):
        entry = files.map[param]
        cs = by_param.get(param, [])
        base = bases.get(param) if bases is not None else views.get(param)
        held = into.get(entry.initializer) if into is not None and to_onnx else None
        try:
            if entry.kind != "bias" and to_onnx and _in_place_layout(entry):
                out = torch.empty(entry.shape, dtype=torch_dtype(entry.raw["dtype"]), device=dev) if held is None \
                    else _held(entry, held)
                _, finite = effective_weight(base, cs, out=out.t() if entry.raw["transform"] == "transpose" else out,
                                             check_finite=True)
                new = None
            else:
                if entry.kind == "bias":
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
            bad = _culprits(cs, owners)
            raise RefitError(f"effective value of {param} has NaN or Inf values (from {bad}); "
                             "the engine keeps its previous weights")
        if new is None:
            return _WRITTEN if held is not None else _check_initializer(entry, to_numpy(out) if numpy_out else out)
        if to_onnx:
            return _to_initializer(entry, new, numpy_out)
        return new

    results = _each(files, one, params, on_cpu)
    keys = [files.map[p].initializer for p in params] if to_onnx else params
    return targets, {k: r for k, r in zip(keys, results) if r is not _WRITTEN}


_WRITTEN = object()  # a weight compute wrote into the engine's own array


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


def restore(files: ComponentFiles, params: Iterable[str], by_module: Mapping[str, list[Contribution]],
            into: Mapping[str, np.ndarray], exported: Iterable[str] = ()) -> None:
    """Put back into the engine's arrays what they held before a failed in-place `compute`: the
    effective weights of the state the engine was in (`by_module`: recomputed with the same
    function, so the same bits), or, for the params in `exported` (never written since the
    export: their value came from the export), the exported initializer itself."""
    by_param, exported = params_of(dict(by_module)), set(exported)
    views = base_views(files)

    def one(param):
        entry = files.map[param]
        held = into.get(entry.initializer)
        if held is None or entry.kind == "bias" or not _in_place_layout(entry):
            return  # never written in place
        if param in exported:
            np.copyto(held, files._reader().array(entry.initializer))
        else:
            out = _held(entry, held)
            effective_weight(views.get(param), by_param.get(param, []),
                             out=out.t() if entry.raw["transform"] == "transpose" else out)

    _each(files, one, [p for p in params if p in files.map])


def _in_place_layout(entry) -> bool:
    """Whether the initializer is the parameter itself or its 2-D transpose (written directly)."""
    t = entry.raw.get("transform", "identity")
    return t == "identity" or (t == "transpose" and list(entry.raw.get("perm", [])) == [1, 0]
                               and len(entry.param_shape) == 2)


# -- base values in place ----------------------------------------------------------------------

_NP_OF = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32, "F64": np.float64, "I64": np.int64,
          "I32": np.int32, "I8": np.int8, "U8": np.uint8}


class _BaseViews:
    """Base values of mapped parameters as torch tensors over memory maps of the exported files
    (copy-on-write maps: nothing is read until used, nothing is ever written back)."""

    def __init__(self, files: ComponentFiles):
        self.files = files
        self._lock = threading.Lock()
        self._maps: dict[str, np.ndarray] = {}
        self._st: dict[str, tuple[int, str, list]] | None = None

    def _map(self, path) -> np.ndarray:
        key = str(path)
        with self._lock:
            m = self._maps.get(key)
            if m is None:
                m = self._maps[key] = np.memmap(path, dtype=np.uint8, mode="c")
            return m

    def _safetensors(self) -> dict:
        if self._st is None:
            import json
            import struct

            st = {}
            path = self.files.base_path
            if path.is_file():
                with open(path, "rb") as f:
                    n = struct.unpack("<Q", f.read(8))[0]
                    header = json.loads(f.read(n))
                for name, info in header.items():
                    if name != "__metadata__":
                        st[name] = (8 + n + info["data_offsets"][0], info["dtype"], info["shape"])
            self._st = st
        return self._st

    def _tensor(self, path, offset: int, np_dtype, shape, bf16: bool) -> torch.Tensor | None:
        itemsize = np.dtype(np_dtype).itemsize
        count = int(np.prod(shape, dtype=np.int64))
        if offset % itemsize:
            return None
        raw = self._map(path)[offset: offset + count * itemsize]
        t = torch.from_numpy(raw.view(np_dtype).reshape(shape))
        return t.view(torch.bfloat16) if bf16 else t

    def get(self, param: str) -> torch.Tensor:
        """The exact base value, torch layout (a strided view where the initializer is transposed)."""
        files, entry = self.files, self.files.map[param]
        t = None
        if param in files.baked_params():
            info = self._safetensors().get(param)
            if info is not None and info[1] in _NP_OF:
                t = self._tensor(files.base_path, info[0], _NP_OF[info[1]], info[2], info[1] == "BF16")
        elif _in_place_layout(entry):
            from onnx import TensorProto

            reader = files._reader()
            proto = reader.proto(entry.initializer)
            if proto.data_location == TensorProto.EXTERNAL:
                ext = {e.key: e.value for e in proto.external_data}
                dtype = reader.dtype(entry.initializer)
                bf16 = dtype.name == "bfloat16"
                t = self._tensor(reader.model_path.parent / ext["location"], int(ext.get("offset", 0)),
                                 np.uint16 if bf16 else dtype, tuple(proto.dims), bf16)
            else:
                t = from_numpy(np.array(reader.array(entry.initializer)))
            if t is not None and entry.raw["transform"] == "transpose":
                t = t.t()
        if t is None:
            return files.base(param)
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
    dtype = arr.dtype.name if isinstance(arr, np.ndarray) else str(arr.dtype).removeprefix("torch.")
    if tuple(arr.shape) != entry.shape or dtype != entry.raw["dtype"]:
        raise RefitError(f"{entry.param} -> {entry.initializer}: got {tuple(arr.shape)} {dtype}, the weights "
                         f"map says {entry.shape} {entry.raw['dtype']}")
    return arr


def to_initializers(files: ComponentFiles, values: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """{initializer name: array in the initializer's layout and dtype}."""
    return {files.map[p].initializer: _to_initializer(files.map[p], v) for p, v in values.items()}
