"""Per-request LoRAs, server-independent: the `loras` request parameter, the adapter directory,
and `LoraSwitcher`, which groups a batch of requests by adapter set over one `refit.Refitter`.

Request parameter ``loras`` (a string holding a JSON object ``{"name": weight, ...}``):

- absent: the adapters baked at export, with their export scales;
- ``{}``: the base model;
- names are file stems of ``*.safetensors`` files directly inside the adapter directory; a
  name with ``/``, ``\\`` or ``..``, or one not present there, a malformed value, or a weight
  that is not a finite number is an error for that request alone. Files are looked up by
  listing the directory (never by joining a client string to a path), and a file whose real
  path leaves it (a symlink pointing elsewhere) is not offered.

Request parameter ``loras_2`` (Wan 2.2, as ``--lora-2``): the same, for adapters loaded into
its second denoiser (`transformer_2`); they join the request's adapter set as ``name@transformer_2``.

Both Triton models (the denoiser, `serving`, and the text-to-image model, `text_to_image`) are
thin over `LoraSwitcher.run`: read the requests, then for each adapter set activate it
(`Refitter.activate`: at most one refit, each file read once) and run its requests.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

LORAS_PARAMETER = "loras"
SECOND_PARAMETER = "loras_2"
SECOND = "@transformer_2"  # an adapter of Wan 2.2's second denoiser in an adapter set ("@": no file stem has it)
LORA_SUFFIX = ".safetensors"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+\-]{0,127}$")
MAX_ADAPTERS_PER_REQUEST = 16

Key = tuple  # ((name, weight), ...) sorted by name


class LoraRequestError(ValueError):
    """A request's ``loras`` value is invalid; the request gets an error, nothing else changes."""


@dataclass(frozen=True)
class PerDenoiser:
    """A request's ``loras`` and ``loras_2`` values (Wan 2.2: adapters of each denoiser)."""

    first: object
    second: object


# -- request parsing -------------------------------------------------------------------------


def check_adapter_name(name) -> str:
    if not isinstance(name, str) or not name:
        raise LoraRequestError(f"adapter names must be non-empty strings, got {name!r}")
    if "/" in name or "\\" in name or ".." in name or "\x00" in name:
        raise LoraRequestError(f"adapter name {name!r} is not allowed: names are file stems in the adapter "
                               "directory (no '/', '\\' or '..')")
    if not _NAME.match(name):
        raise LoraRequestError(f"adapter name {name!r} is not allowed: use letters, digits and _ . + -")
    return name


def parse_loras(value) -> Key | None:
    """The ``loras`` parameter -> sorted ((name, weight), ...); None when absent.

    Accepts the JSON text (as sent) or an already-decoded mapping. Raises LoraRequestError.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise LoraRequestError("parameter 'loras' is not UTF-8") from None
    if isinstance(value, str):
        try:
            value = json.loads(value, parse_constant=_reject_constant)
        except LoraRequestError:
            raise
        except (json.JSONDecodeError, RecursionError) as e:
            raise LoraRequestError(f"parameter 'loras' is not valid JSON: {e}") from None
    if not isinstance(value, Mapping):
        raise LoraRequestError(f"parameter 'loras' must be a JSON object name -> weight, got "
                               f"{type(value).__name__}")
    if len(value) > MAX_ADAPTERS_PER_REQUEST:
        raise LoraRequestError(f"at most {MAX_ADAPTERS_PER_REQUEST} adapters per request, got {len(value)}")
    out = {}
    for name, weight in value.items():
        check_adapter_name(name)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise LoraRequestError(f"weight of adapter {name!r} must be a number, got {weight!r}")
        w = float(weight)
        if not math.isfinite(w):
            raise LoraRequestError(f"weight of adapter {name!r} must be finite, got {weight!r}")
        out[name] = w
    return tuple(sorted(out.items()))


def _reject_constant(c):
    raise LoraRequestError(f"weight {c} is not a finite number")


def key_json(key: Key) -> str:
    return json.dumps(dict(key), sort_keys=True)


# -- the adapter directory --------------------------------------------------------------------


class LoraDirectory:
    """The only place adapters are read from: ``<root>/<name>.safetensors``, by listing."""

    def __init__(self, root):
        self.root = Path(os.path.realpath(root))

    def available(self) -> dict[str, Path]:
        """{stem: real path} of the adapter files directly in the directory."""
        out = {}
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return out
        for e in entries:
            if not e.name.endswith(LORA_SUFFIX):
                continue
            stem = e.name[: -len(LORA_SUFFIX)]
            if not _NAME.match(stem) or ".." in stem:
                continue
            real = Path(os.path.realpath(e.path))
            if real.parent != self.root or not real.is_file():
                continue  # a link leaving the directory (or a folder): not offered
            out[stem] = real
        return out

    def resolve(self, name: str) -> Path:
        check_adapter_name(name)
        path = self.available().get(name)
        if path is None:
            raise LoraRequestError(f"adapter {name!r} is not in the server's adapter directory")
        return path


# -- grouping requests by adapter set ---------------------------------------------------------------


class LoraSwitcher:
    """Adapter sets per request over one Refitter (an export's engines, or one component's).

    What a request without ``loras`` gets is what the Refitter held when the switcher was made
    (the adapters baked at export). preload="all" reads every adapter in the directory now
    (registered, not applied); otherwise each is read when first named.
    """

    def __init__(self, refitter, lora_dir, preload: str = "baked"):
        self.refitter = refitter
        self.lora_dir = LoraDirectory(lora_dir)
        self.baked_key: Key = refitter.adapter_set()
        self._lock = threading.RLock()
        if preload == "all":
            for name, path in sorted(self.lora_dir.available().items()):
                refitter.preload(name, str(path))

    @property
    def current(self) -> Key:
        """The adapter set the engines hold."""
        return self.refitter.adapter_set()

    @property
    def refits(self) -> int:
        return self.refitter.refits

    def request_key(self, loras_value) -> Key:
        """A request's ``loras`` value (or `PerDenoiser`) -> its adapter set (absent: the baked one). Raises
        LoraRequestError."""
        second = ()
        if isinstance(loras_value, PerDenoiser):
            if "transformer_2" not in self.refitter.components:
                raise LoraRequestError(f"parameter {SECOND_PARAMETER!r}: this model has no second denoiser "
                                       "(transformer_2: Wan 2.2)")
            second = tuple((f"{n}{SECOND}", w) for n, w in parse_loras(loras_value.second) or ())
            loras_value = loras_value.first
        key = parse_loras(loras_value)
        available = self.lora_dir.available()
        for name, _ in (*(key or ()), *second):
            if name.removesuffix(SECOND) not in available:
                raise LoraRequestError(f"adapter {name.removesuffix(SECOND)!r} is not in the server's adapter "
                                       "directory")
        return tuple(sorted((*(self.baked_key if key is None else key), *second)))

    def _resolve(self, name: str):
        """An adapter's file; one named `x@transformer_2`: x's file, loaded into the second denoiser."""
        if name.endswith(SECOND):
            return self.lora_dir.resolve(name.removesuffix(SECOND)), {"load_into_transformer_2": True}
        return self.lora_dir.resolve(name)

    def activate(self, key: Key) -> bool:
        """Make the engines hold this adapter set (reading new adapters from the directory); False when
        they already do."""
        with self._lock:
            return self.refitter.activate(dict(key), resolve=self._resolve)

    def run(self, items: Sequence[tuple[object, object]], runner: Callable[[list], list]) -> list:
        """items: [(payload or an Exception, loras value)] -> [(output, key) or Exception], in order.

        Requests are grouped by adapter set; the group the engines hold runs first, then one
        activation per other group, whose requests go to `runner` ([payload] -> [output or
        Exception]) together. Errors stay with their request(s)."""
        results: list = [None] * len(items)
        groups: dict[Key, list[int]] = {}
        for i, (payload, loras) in enumerate(items):
            try:
                if isinstance(payload, Exception):
                    raise payload
                groups.setdefault(self.request_key(loras), []).append(i)
            except Exception as e:  # noqa: BLE001 - the request's own error
                results[i] = e
        with self._lock:
            current = self.current
            for key in sorted(groups, key=lambda k: k != current):
                idx = groups[key]
                try:
                    self.activate(key)
                except Exception as e:  # noqa: BLE001 - the group's requests get the error
                    err = e if isinstance(e, LoraRequestError) else LoraRequestError(
                        f"cannot apply adapters {key_json(key)}: {e}")
                    for i in idx:
                        results[i] = err
                    continue
                for i, out in zip(idx, runner([items[i][0] for i in idx])):
                    results[i] = out if isinstance(out, Exception) else (out, key)
        return results


# -- one engine call for several requests ---------------------------------------------------------


def run_batched(engine, feeds_list: list[Mapping[str, np.ndarray]], concat: bool = True) -> list:
    """[outputs or Exception] per feeds: one engine call over the requests stacked along the batch
    axis where they stack, else one call each."""
    if concat and len(feeds_list) > 1 and _stackable(feeds_list):
        try:
            big = engine.infer({n: np.concatenate([f[n] for f in feeds_list], axis=0) for n in feeds_list[0]})
            splits = np.cumsum([next(iter(f.values())).shape[0] for f in feeds_list])[:-1]
            parts = {n: np.split(v, splits, axis=0) for n, v in big.items()}
            return [{n: parts[n][j] for n in big} for j in range(len(feeds_list))]
        except Exception:  # noqa: BLE001 - fall back to one request at a time
            log.exception("batched inference failed; running requests one by one")
    out = []
    for f in feeds_list:
        try:
            out.append(engine.infer(f))
        except Exception as e:  # noqa: BLE001
            out.append(RuntimeError(f"inference failed: {e}"))
    return out


def _stackable(feeds_list) -> bool:
    first = feeds_list[0]
    for f in feeds_list:
        if set(f) != set(first):
            return False
        sizes = {a.shape[0] if a.ndim else None for a in f.values()}
        if len(sizes) != 1 or None in sizes:
            return False
        for n, a in f.items():
            if a.shape[1:] != first[n].shape[1:] or a.dtype != first[n].dtype:
                return False
    return True
