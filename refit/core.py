"""Refit computations shared by `Refitter` and `python -m refit`.

A refit to a set of (adapter, weight) pairs recomputes, FROM BASE, every parameter in the
union of the new targets and the parameters that currently differ from base, with
`lora_loaders.weights.effective_weight` / `effective_bias` (the function the mixins and the
export use), then applies the weights-map transform. Everything is computed and validated
before anything is written.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from engines.mapping import to_numpy
from lora_loaders.adapter import LoraAdapter
from lora_loaders.targets import contributions_by_module
from lora_loaders.weights import effective_bias, effective_weight

from .store import ComponentFiles, RefitError

# -- parsed adapters, cached by file content ----------------------------------------------

_CACHE: OrderedDict = OrderedDict()
_CACHE_LOCK = threading.Lock()
CACHE_SIZE = 16
WORKERS: int | None = None  # threads computing weights; None: min(4, torch threads)


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_adapter(source, family: str, module_names: dict[str, Iterable[str]] | None = None,
                 **kwargs) -> tuple[LoraAdapter, str | None]:
    """(adapter, sha256 of the file or None) for a path / hub id / state dict / LoraAdapter.

    With `module_names`, module paths come back spelled as those names spell them. Files are
    parsed once per (content hash, family): later reads come from a small cache.
    """
    from lora_loaders import read_lora
    from lora_loaders.reader import align_module_names

    names = {c: set(m) for c, m in (module_names or {}).items()}
    if isinstance(source, LoraAdapter):
        return align_module_names(source, names), None
    path = None
    if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
        path = Path(source)
    if path is None:  # dict, directory or hub id: parse every time
        return align_module_names(read_lora(source, family, module_names=module_names, **kwargs), names), None
    digest = file_sha256(path)
    key = (digest, family, tuple(sorted((c, len(m)) for c, m in names.items())), tuple(sorted(kwargs.items())))
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key], digest
    adapter = align_module_names(read_lora(str(path), family, module_names=module_names, **kwargs), names)
    with _CACHE_LOCK:
        _CACHE[key] = adapter
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return adapter, digest


def clear_cache():
    with _CACHE_LOCK:
        _CACHE.clear()


# -- checks ---------------------------------------------------------------------------------

def check_adapter(adapter: LoraAdapter, files: ComponentFiles, name: str) -> None:
    """Raise unless the adapter is for this family and only touches weights the engine maps."""
    family, component = files.family, files.component
    if adapter.family and family and adapter.family != family:
        raise RefitError(f"adapter {name!r} was read for family {adapter.family!r}; "
                         f"this engine is a {family!r} {component}")
    layers = adapter.for_component(component)
    if not layers:
        raise RefitError(
            f"adapter {name!r} has no layers for component {component!r} "
            f"(it targets {', '.join(adapter.components) or 'nothing'}); it cannot be applied to this engine"
        )
    unmapped, mismatched = [], []
    for module, layer in layers.items():
        w = f"{module}.weight"
        if w not in files.map:
            unmapped.append(w)
            continue
        shape = files.map[w].param_shape
        if not layer.fits(shape):
            mismatched.append(f"{module}: LoRA delta {tuple(layer.delta_shape())} vs weight {shape}")
        if layer.bias is not None and f"{module}.bias" not in files.map:
            unmapped.append(f"{module}.bias")
    if unmapped:
        raise RefitError(
            f"adapter {name!r} touches {len(unmapped)} weight(s) this {component} engine does not map "
            f"(no such Linear/Conv in the exported graph): {unmapped[:5]}"
        )
    if mismatched:
        raise RefitError(
            f"adapter {name!r} has shapes that need a different graph for {len(mismatched)} module(s): "
            + "; ".join(mismatched[:5])
        )


# -- the computation ------------------------------------------------------------------------

def targets_of(contribs: dict) -> set[str]:
    out = set()
    for module, cs in contribs.items():
        out.add(f"{module}.weight")
        if any(layer.bias is not None for layer, _ in cs):
            out.add(f"{module}.bias")
    return out


def compute(files: ComponentFiles, active: Sequence[tuple[LoraAdapter, float]], dirty: Iterable[str],
            names: Sequence[str] | None = None, to_onnx: bool = False) -> tuple[set[str], dict]:
    """(new targets, {param: new torch-layout value}) for every param in targets | dirty.

    With to_onnx=True the values are already in the initializers' layout and dtype
    ({initializer name: numpy array}, see `to_initializers`), transformed on the same threads.
    `names` (adapter names, parallel to `active`) only serve error messages.
    """
    contribs = contributions_by_module(active, files.component)
    targets = targets_of(contribs)
    missing = sorted(p for p in targets if p not in files.map)
    if missing:
        raise RefitError(f"the active adapters touch weights this engine does not map: {missing[:5]}")
    order = {p: i for i, p in enumerate(files.map.entries)}
    params = sorted(targets | set(dirty), key=lambda p: order.get(p, -1))

    def one(param):
        entry = files.map[param]
        base = files.base(param)
        cs = contribs.get(entry.module, [])
        try:
            new = effective_bias(base, cs) if entry.kind == "bias" else effective_weight(base, cs)
        except Exception as e:  # noqa: BLE001 - report which weight and why
            raise RefitError(f"cannot compute the effective value of {param}: {e}") from e
        if tuple(new.shape) != entry.param_shape or new.dtype != entry.param_dtype:
            raise RefitError(f"effective value of {param} has shape {tuple(new.shape)} {new.dtype}, "
                             f"expected {entry.param_shape} {entry.param_dtype}")
        # NaN/Inf anywhere makes the float32 sum non-finite (one read pass, no temporary).
        if cs and new.is_floating_point() and not bool(torch.isfinite(new.sum(dtype=torch.float32))):
            bad = _culprits(cs, names, active)
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


def _culprits(cs, names, active) -> str:
    layers = {id(layer) for layer, _ in cs}
    if names is None:
        return f"{len(layers)} adapter layer(s)"
    found = [n for n, (a, _) in zip(names, active) if any(id(lay) in layers for lay in a.layers.values())]
    return "adapter(s) " + ", ".join(repr(n) for n in found)


def _to_initializer(entry, v: torch.Tensor) -> np.ndarray:
    arr = to_numpy(entry.to_onnx(v))
    if tuple(arr.shape) != entry.shape or arr.dtype.name != entry.raw["dtype"]:
        raise RefitError(f"{entry.param} -> {entry.initializer}: got {tuple(arr.shape)} {arr.dtype}, the weights "
                         f"map says {entry.shape} {entry.raw['dtype']}")
    return arr


def to_initializers(files: ComponentFiles, values: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """{initializer name: array in the initializer's layout and dtype}."""
    return {files.map[p].initializer: _to_initializer(files.map[p], v) for p, v in values.items()}
