"""The one engine interface that ONNX Runtime and TensorRT engines implement.

An engine runs a graph (`infer`: dict of numpy arrays in, dict out, names as exported) and
exposes its refittable weights by ONNX initializer name. `set_weights` is atomic: every
name, shape and dtype is checked before anything is written, and if writing fails the
previous values are restored. Engines never cast: weights must already have the engine's
dtype (the refitter casts once, with the effective-weight function).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class EngineError(RuntimeError):
    """An engine could not be loaded, run or refitted."""


class WeightError(ValueError):
    """Weights given to `set_weights` that the engine cannot take (name, shape, dtype, values)."""


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

    # -- inference ---------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    @abc.abstractmethod
    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

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
