"""`read_lora`: any supported LoRA file -> `LoraAdapter` (parse once per file content, then bind)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from .adapter import LoraAdapter
from .bind import bind, check
from .errors import LoraError, LoraFamilyError, LoraKeyError, LoraShapeError, LoraWidthError
from .families import FAMILIES, FamilySpec, get_family, guess_family, looks_like
from .formats.parse import ParsedLora, ParseError, parse
from .index import TargetIndex
from .io import LoraFileError, load_state_dict, resolve_path

logger = logging.getLogger(__name__)

CACHE_SIZE = 16


class LruCache:
    """A small thread-safe least-recently-used cache (parsed files here, bound adapters in refit)."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_PARSED = LruCache()  # sha256 of the file -> parsed layers


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_file(source, weight_name: str | None = None, allow_pickle: bool = False,
               **hub_kwargs) -> tuple[ParsedLora, str | None, str]:
    """(parsed layers, sha256 of the file or None for a dict, description). Parsed once per content."""
    where = _describe(source, weight_name, **hub_kwargs)
    digest = None
    if not isinstance(source, dict):
        path = resolve_path(source, weight_name, **hub_kwargs)
        digest = file_sha256(path)
        cached = _PARSED.get(digest)
        if cached is not None:
            return cached, digest, where
        source, weight_name, hub_kwargs = str(path), None, {}
    state_dict, metadata = load_state_dict(source, weight_name, allow_pickle, **hub_kwargs)
    if not state_dict:
        raise LoraFileError(f"{where}: the file holds no tensors")
    try:
        parsed = parse(state_dict, metadata)
    except ParseError as e:
        raise ParseError(f"{where}: {e}") from e
    if digest is not None:
        _PARSED.put(digest, parsed)
    return parsed, digest, where


def clear_cache() -> None:
    _PARSED.clear()


def read_lora(
    source,
    family: str,
    *,
    weight_name: str | None = None,
    allow_pickle: bool = False,
    index: TargetIndex | None = None,
    remap: Mapping[str, str] | None = None,
    widen: bool = False,
    **hub_kwargs,
) -> LoraAdapter:
    """Read a LoRA (path, directory + weight_name, hub repo id + weight_name, or dict) for `family`.

    With `index` (the model's `TargetIndex`) every target is checked against the model and
    spelled as the model spells it; `remap` sends a file's component to another one.
    Raises on files with no LoRA keys, unknown keys, and files made for another family.
    `widen`: accept layers wider than a module the family lets LoRAs widen (`bind.check`).
    """
    spec = get_family(family)
    parsed, digest, where = parse_file(source, weight_name, allow_pickle, **hub_kwargs)
    return bind_parsed(parsed, spec, index, remap=remap, where=where, sha256=digest, widen=widen)


def bind_parsed(parsed: ParsedLora, spec: FamilySpec, index: TargetIndex | None = None, *, remap=None,
                where: str = "LoRA", sha256: str | None = None, widen: bool = False) -> LoraAdapter:
    """`bind` with the family hint errors of `read_lora` (a file for another family says so)."""
    try:
        adapter = bind(parsed, spec, index, remap=remap, where=where, verify=False)
        names = [f"{c}.{m}" for c, m in adapter.layers]
        other = looks_like(spec, names)
        # Markers are a guess; a file that fits every module of the model it is given is for that model.
        if other and not _fits(adapter, spec, index, widen):
            keys = [adapter.origin.get(k, "") for k in list(adapter.layers)[:3]]
            source = f", from {keys}" if keys != names[:3] else ""  # the file's keys, where they differ
            raise LoraFamilyError(f"{where} looks like a LoRA for {other}, not for {spec.name!r} "
                                  f"(targets such as {names[:3]}{source})")
        check(adapter.layers, index, where, adapter.origin, spec=spec, widen=widen)
    except LoraWidthError:
        raise  # the file is this family's: it needs a wider model (its message says which input)
    except (LoraKeyError, LoraShapeError) as e:
        other = _other_family(spec, parsed)
        if other:
            raise type(e)(f"{e}; it looks like a LoRA for {other}") from e
        raise
    if sha256:
        adapter.metadata["sha256"] = sha256
    return adapter


def _fits(adapter: LoraAdapter, spec: FamilySpec, index: TargetIndex | None, widen: bool) -> bool:
    if index is None or not set(adapter.components) <= set(index.components()):
        return False
    try:
        check(adapter.layers, index, spec=spec, widen=widen)
    except (LoraKeyError, LoraShapeError):
        return False
    return True


def _other_family(spec: FamilySpec, parsed: ParsedLora) -> str | None:
    """Which other family could read this file, for error messages."""
    for other in FAMILIES.values():
        if other.name == spec.name:
            continue
        try:
            adapter = bind(parsed, other)
        except LoraError:
            continue
        names = [f"{c}.{m}" for c, m in adapter.layers]
        if looks_like(other, names) is None and guess_family(names) == other.name:
            return other.name
    return None


def _describe(source, weight_name=None, **hub_kwargs) -> str:
    if isinstance(source, dict):
        return "LoRA state dict"
    try:
        return str(resolve_path(source, weight_name, **hub_kwargs))
    except Exception:  # noqa: BLE001 - the real error is raised when the file is read
        return str(os.fspath(source))
