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
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from engines.weights_map import to_numpy
from lora_loaders.adapter import LoraAdapter
from lora_loaders.targets import params_of
from lora_loaders.weights import Contribution, effective_bias, effective_weight

from .store import ComponentFiles, RefitError

# -- adapters, bound to an engine's weights map and cached -----------------------------------

_CACHE: OrderedDict = OrderedDict()
_CACHE_LOCK = threading.Lock()
CACHE_SIZE = 16
WORKERS: int | None = None  # threads computing weights; None: min(4, torch threads)


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
        with _CACHE_LOCK:
            if digest is not None and key in _CACHE:
                _CACHE.move_to_end(key)
                return _CACHE[key], digest
        adapter = bind_parsed(parsed, spec, files.index, where=where, sha256=digest)
    except LoraKeyError as e:
        raise RefitError(f"adapter {name!r} touches modules this {files.component} engine does not map "
                         f"(no such Linear/Conv/norm in the exported graph): {e}") from e
    except (OSError, ValueError) as e:
        if "shape mismatch" in str(e):
            raise RefitError(f"adapter {name!r} has shapes that need a different graph: {e}") from e
        raise RefitError(f"cannot read LoRA {name!r} for {files.family} {files.component}: {e}") from e
    if digest is not None:
        with _CACHE_LOCK:
            _CACHE[key] = adapter
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)
    return adapter, digest


def clear_cache():
    from lora_loaders.reader import clear_cache as clear_parsed

    with _CACHE_LOCK:
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
            owners: Mapping[int, str] | None = None, to_onnx: bool = False) -> tuple[set[str], dict]:
    """(new targets, {param: new torch-layout value}) for every param in targets | dirty.

    by_module: {module: [(layer, weight)]} of the new state (`contributions_by_module`, or
    the state machine's per-module contributions). With to_onnx=True the values are already
    in the initializers' layout and dtype ({initializer name: numpy array}), transformed on
    the same threads. `owners` ({id(layer): adapter name}) only serves error messages.
    """
    by_param = params_of(dict(by_module))
    targets = set(by_param)
    missing = sorted(p for p in targets if p not in files.map)
    if missing:
        raise RefitError(f"the active adapters touch weights this engine does not map: {missing[:5]}")
    order = {p: i for i, p in enumerate(files.map.entries)}
    params = sorted(targets | set(dirty), key=lambda p: order.get(p, -1))

    def one(param):
        entry = files.map[param]
        base = files.base(param)
        cs = by_param.get(param, [])
        try:
            new = effective_bias(base, cs) if entry.kind == "bias" else effective_weight(base, cs)
        except Exception as e:  # noqa: BLE001 - report which weight and why
            raise RefitError(f"cannot compute the effective value of {param}: {e}") from e
        if tuple(new.shape) != entry.param_shape or new.dtype != entry.param_dtype:
            raise RefitError(f"effective value of {param} has shape {tuple(new.shape)} {new.dtype}, "
                             f"expected {entry.param_shape} {entry.param_dtype}")
        # NaN/Inf anywhere makes the float32 sum non-finite (one read pass, no temporary).
        if cs and new.is_floating_point() and not bool(torch.isfinite(new.sum(dtype=torch.float32))):
            bad = _culprits(cs, owners)
            raise RefitError(f"effective value of {param} has NaN or Inf values (from {bad}); "
                             "the engine keeps its previous weights")
        return _to_initializer(entry, new) if to_onnx else new

    workers = WORKERS if WORKERS is not None else min(4, torch.get_num_threads())
    if workers <= 1 or len(params) < 8:
        results = [one(p) for p in params]
    else:
        files.prepare()
        # Weights are independent: compute several at once (torch releases the GIL); same bits.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(one, params))
    keys = [files.map[p].initializer for p in params] if to_onnx else params
    return targets, dict(zip(keys, results))


def _culprits(cs, owners) -> str:
    layers = {id(layer) for layer, _ in cs}
    if not owners:
        return f"{len(layers)} adapter layer(s)"
    return "adapter(s) " + ", ".join(repr(n) for n in dict.fromkeys(owners[i] for i in layers if i in owners))


def _to_initializer(entry, v: torch.Tensor) -> np.ndarray:
    arr = to_numpy(entry.to_onnx(v))
    if tuple(arr.shape) != entry.shape or arr.dtype.name != entry.raw["dtype"]:
        raise RefitError(f"{entry.param} -> {entry.initializer}: got {tuple(arr.shape)} {arr.dtype}, the weights "
                         f"map says {entry.shape} {entry.raw['dtype']}")
    return arr


def to_initializers(files: ComponentFiles, values: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """{initializer name: array in the initializer's layout and dtype}."""
    return {files.map[p].initializer: _to_initializer(files.map[p], v) for p, v in values.items()}
