"""The one engine interface that ONNX Runtime and TensorRT engines implement.

An engine runs a graph (`infer`: dict of numpy arrays in, dict out, names as exported) and
exposes its refittable weights, always keyed by ONNX initializer name (the weights map's
keys). How it takes new values is declared, not probed: `weight_access()` says whether it
takes host arrays only (`set_weights`, every engine), torch tensors on a device
(`set_device_weights`, in the initializers' or the parameters' layout), and whether it
runs from host arrays a caller may write in place (`writable_weights`). Writes are atomic:
every name, shape and dtype is checked before anything is written, and if writing fails the
previous values are restored. Engines never cast: weights must already have the engine's
dtype (the refitter casts once, with the effective-weight function). Inputs are not cast
either: `infer` checks their names, dtypes, ranks and fixed sizes first (`check_feeds`) and
an input that does not fit raises `InputError` naming it, what it got and what the engine takes.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class EngineError(RuntimeError):
    """An engine could not be loaded, run or refitted."""


class WeightError(ValueError):
    """Weights given to `set_weights` that the engine cannot take (name, shape, dtype, values)."""


class InputError(EngineError, ValueError):
    """Inputs given to `infer` that the engine does not take (names, dtypes, ranks, fixed sizes)."""


@dataclass(frozen=True)
class InputInfo:
    """One graph input: its numpy dtype (None: a type numpy lacks) and shape, a dimension being
    a fixed size (int) or dynamic (its axis name, or None when unnamed)."""

    name: str
    dtype: np.dtype | None
    shape: tuple[int | str | None, ...]

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.dtype.name if self.dtype is not None else '?'} [{dims}]"


def _describe(arr: np.ndarray) -> str:
    return f"{arr.dtype.name} [{', '.join(str(d) for d in arr.shape)}]"


def check_feeds(infos: Mapping[str, InputInfo], feeds: Mapping, weights=(), where: str = "") -> dict[str, np.ndarray]:
    """`feeds` as C-contiguous arrays, or InputError naming every input that does not fit, with
    what it got and what the engine takes: an unknown or missing name, a dtype (never cast: the
    caller picks the precision), a rank, a fixed size, or one axis name with two sizes."""
    problems, arrays = [], {}
    for name in feeds:
        if name not in infos:
            why = ": a refittable weight (a Refitter sets it)" if name in weights else ""
            problems.append(f"unknown input {name!r}{why}")
    for name, info in infos.items():
        if name not in feeds:
            problems.append(f"input {name!r} is missing")
            continue
        arr = arrays[name] = np.ascontiguousarray(feeds[name])
        if (info.dtype is not None and arr.dtype != info.dtype) or arr.ndim != len(info.shape) \
                or any(isinstance(d, int) and d != n for d, n in zip(info.shape, arr.shape)):
            problems.append(f"input {name!r}: got {_describe(arr)}, the engine takes {info.describe()}")
    if not problems:  # sizes of a named axis agree across inputs (checked on well-formed inputs only)
        sizes: dict[str, tuple[int, str]] = {}
        for name, arr in arrays.items():
            for d, n in zip(infos[name].shape, arr.shape):
                first = sizes.setdefault(d, (n, name)) if isinstance(d, str) else (n, name)
                if first[0] != n:
                    problems.append(f"axis {d!r} is {first[0]} in {first[1]!r} but {n} in {name!r}")
    if problems:
        names_wrong = set(feeds) != set(infos)
        takes = ", ".join(f"{n} {i.describe()}" for n, i in infos.items())
        raise InputError(f"bad inputs{' for ' + where if where else ''}: " + "; ".join(problems)
                         + (f" (the engine takes {takes})" if names_wrong else ""))
    return arrays


@dataclass(frozen=True)
class WeightAccess:
    """How an engine takes new values for its refittable weights (keys: initializer names).

    device: None, host numpy arrays only (`set_weights`); else the torch device whose tensors
      `set_device_weights` takes (no host round trip).
    layout: of the values `set_device_weights` takes: "initializer" (the ONNX initializer's
      shape and dtype) or "parameter" (the torch parameter's).
    in_place: `writable_weights()` yields the host arrays the engine runs from.
    resident_bases: whether a refitter should keep the exact base values on `device` (None:
      on every device but the CPU, where it reads them in place from the export's files).
    """

    device: str | None = None
    layout: str = "initializer"
    in_place: bool = False
    resident_bases: bool | None = None


@dataclass(frozen=True)
class WeightInfo:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype  # numpy dtype; bfloat16 is ml_dtypes.bfloat16


class Engine(abc.ABC):
    """Base class of all engines. Subclasses implement `infer`, `_read_weights`, `_write_weights`."""

    backend: str = "?"
    directory: Path | None = None  # engine directory (model.onnx, weights_map.json, ...) if known
    model_path: Path | None = None  # the ONNX file the engine was built from, if known

    _inputs: list[str]  # graph input names (refittable weights excluded), set by subclasses
    _outputs: list[str]
    _input_infos: dict[str, InputInfo]  # the same inputs' dtypes and shapes, set by subclasses

    # -- inference ---------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def input_infos(self) -> dict[str, InputInfo]:
        """{input name: InputInfo} of the graph inputs `infer` takes, in graph order."""
        return dict(self._input_infos)

    def check_inputs(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The feeds as C-contiguous arrays; InputError (naming the input, what it got and what
        the engine takes) for an unknown or missing name, a wrong dtype, rank or fixed size."""
        return check_feeds(self._input_infos, feeds, self.weight_infos(), str(self.model_path or self.directory or ""))

    @abc.abstractmethod
    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph: {input name: array} (checked by `check_inputs` first) -> {output name: array}."""

    # -- weights -----------------------------------------------------------------------
    @abc.abstractmethod
    def weight_infos(self) -> dict[str, WeightInfo]:
        """{initializer name: WeightInfo} for every refittable weight, in graph order."""

    def weight_names(self) -> list[str]:
        return list(self.weight_infos())

    def weight_info(self, name: str) -> WeightInfo:
        try:
            return self.weight_infos()[name]
        except KeyError:
            raise WeightError(f"{name!r} is not a refittable weight of this {self.backend} engine") from None

    def get_weights(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Copies of the current values of these refittable weights (all when names is None)."""
        names = self.weight_names() if names is None else list(names)
        for n in names:
            self.weight_info(n)
        return self._read_weights(names)

    def set_weights(self, weights: Mapping[str, np.ndarray], copy: bool = True) -> None:
        """Write new values for some refittable weights, all or nothing.

        copy=False lets the engine keep the given (C-contiguous, writable) arrays as its
        storage instead of copying them: the caller hands them over and must not modify them.
        """
        if not weights:
            return
        self.check_weights(weights)
        self._write_weights(dict(weights), copy)

    def check_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Raise WeightError unless every array matches a refittable weight's shape and dtype."""
        infos = self.weight_infos()
        problems = []
        for name, arr in weights.items():
            info = infos.get(name)
            if info is None:
                problems.append(f"{name}: not a refittable weight of this engine")
                continue
            if not isinstance(arr, np.ndarray):
                problems.append(f"{name}: expected a numpy array, got {type(arr).__name__}")
                continue
            if tuple(arr.shape) != info.shape:
                problems.append(f"{name}: shape {tuple(arr.shape)} != engine shape {info.shape}")
            if arr.dtype != info.dtype:
                problems.append(f"{name}: dtype {arr.dtype} != engine dtype {info.dtype}")
        if problems:
            raise WeightError(f"cannot set {len(problems)} weight(s): " + "; ".join(problems[:8]))

    def weight_access(self) -> WeightAccess:
        """What this engine's weight writes take (see `WeightAccess`); host arrays by default."""
        return WeightAccess()

    def check_device_weights(self, values: Mapping) -> None:
        """Raise WeightError unless these torch tensors fit (`weight_access().device` engines)."""
        raise EngineError(f"the {self.backend} engine takes host arrays only (weight_access().device is None): "
                          "use set_weights")

    def set_device_weights(self, values: Mapping) -> None:
        """Write torch tensors on `weight_access().device`, in its `layout`, all or nothing."""
        self.check_device_weights(values)

    @contextlib.contextmanager
    def writable_weights(self):
        """Yield {name: the array the engine runs from} for weights that can be rewritten in place,
        with inference held off until the block ends; None (the default) where the engine has none
        (then `set_weights`). In place there is no copy to fall back on: whoever writes must put
        the previous values back itself if it fails (a Refitter recomputes them)."""
        yield None

    @abc.abstractmethod
    def _read_weights(self, names: list[str]) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def _write_weights(self, weights: dict[str, np.ndarray], copy: bool = True) -> None:
        """Write validated weights atomically (restore the previous values on failure)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
