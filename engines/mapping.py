"""Reading an export's `weights_map.json`: torch parameter -> ONNX initializer + transform.

The layout and the transform functions belong to `export.weights_map` (issue 3); this
module wraps them for the engines and the refitter, so a refitted initializer gets exactly
the bits an export gives it (same `to_initializer`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export import weights_map as _wm

WEIGHTS_MAP = _wm.WEIGHTS_MAP_FILE
BASE_WEIGHTS = _wm.BASE_WEIGHTS_FILE


@dataclass(frozen=True)
class MapEntry:
    param: str  # torch parameter name (module path + ".weight"/".bias")
    initializer: str  # ONNX initializer name
    raw: Mapping  # the weights-map entry (transform, perm, shape, dtype, param_shape, param_dtype)

    @property
    def module(self) -> str:
        return self.param.rsplit(".", 1)[0]

    @property
    def kind(self) -> str:
        return self.param.rsplit(".", 1)[1]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.raw["shape"])

    @property
    def param_shape(self) -> tuple[int, ...]:
        return tuple(self.raw["param_shape"])

    @property
    def param_dtype(self) -> torch.dtype:
        return _wm.torch_dtype(self.raw["param_dtype"])

    def to_onnx(self, t: torch.Tensor) -> torch.Tensor:
        """The transform: torch-layout value -> the initializer's layout and dtype."""
        return _wm.to_initializer(t, self.raw)

    def to_torch(self, t):
        """Inverse transform (exact except where the map has a narrowing cast)."""
        return _wm.from_initializer(t, self.raw)


class WeightsMap:
    """{torch param: MapEntry} for one exported component, plus lookups by initializer."""

    def __init__(self, data: Mapping, path: Path | None = None):
        self.data = data
        self.path = path
        self.entries = {e["param"]: MapEntry(e["param"], name, e) for name, e in data["entries"].items()}
        self.by_initializer = {e.initializer: e for e in self.entries.values()}

    family = property(lambda self: self.data.get("family"))
    component = property(lambda self: self.data.get("component"))
    dtype = property(lambda self: self.data.get("dtype"))

    def __contains__(self, param: str) -> bool:
        return param in self.entries

    def __getitem__(self, param: str) -> MapEntry:
        return self.entries[param]

    def __len__(self):
        return len(self.entries)

    def modules(self) -> list[str]:
        return sorted({e.module for e in self.entries.values()})

    def initializers(self) -> list[str]:
        return list(self.by_initializer)

    @classmethod
    def load(cls, path) -> WeightsMap:
        path = Path(path)
        if path.is_dir():
            path = path / WEIGHTS_MAP
        return cls(_wm.load_weights_map(path), path)


def load_weights_map(path) -> WeightsMap | None:
    """The weights map of an engine directory (or file), None when there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_MAP
    if not path.is_file():
        return None
    return WeightsMap.load(path)


# -- numpy <-> torch, bfloat16 included ---------------------------------------------------

def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def from_numpy(a: np.ndarray) -> torch.Tensor:
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))
