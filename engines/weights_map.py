"""The weights map (read, write, validate): which ONNX initializer holds which LoRA-targetable torch parameter, and how.

One `weights_map.json` per exported component directory, next to `model.onnx`. Layout
(version 1)::

    {
      "format": "lora-engines.weights_map",
      "version": 1,
      "component": "unet",
      "family": "sdxl",
      "dtype": "float16",              # export dtype (of the torch parameters)
      "model": "model.onnx",
      "entries": {
        "<initializer name>": {
          "param": "down_blocks.1.attentions.0.proj_in.weight",   # torch state_dict name
          "transform": "transpose",   # identity | transpose | reshape | cast, "+"-joined
          "perm": [1, 0],             # only with transpose
          "shape": [640, 640],        # initializer shape
          "dtype": "float16",         # initializer dtype
          "param_shape": [640, 640],  # torch parameter shape
          "param_dtype": "float16"    # torch parameter dtype
        }, ...
      }
    }

Every Linear / Conv / norm weight and bias that `lora_loaders.targetable_parameters`
lists for the component appears as the "param" of exactly one entry. The transform is
applied in this fixed order: transpose (by "perm"), reshape (to "shape"), cast (to
"dtype"); "identity" means the initializer holds the parameter's bits unchanged. Dtype
names are torch's without the prefix ("float32", "float16", "bfloat16").

Initializer names are deterministic: the parameter name itself for "identity", and
`<param>.T` for a 2-D transposed copy (the exporter's folded `MatMul` operand).

`base_weights.safetensors` (only when adapters were baked): key = torch parameter name,
value = the base (adapter-free) tensor in torch layout and dtype, for every mapped
parameter an adapter targeted. Refit computes `effective_weight(base, ...)` from it, then
`to_initializer(..., entry)`.

The helpers take and return torch tensors or numpy arrays (bfloat16 as
`ml_dtypes.bfloat16`), whichever they are given.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lora_loaders.dtypes import numpy_dtype, torch_dtype
from lora_loaders.io import atomic_path

FORMAT = "lora-engines.weights_map"
VERSION = 1
WEIGHTS_MAP_FILE = "weights_map.json"
BASE_WEIGHTS_FILE = "base_weights.safetensors"
TRANSFORM_STEPS = ("transpose", "reshape", "cast")


def transform_steps(entry: dict) -> list[str]:
    t = entry.get("transform", "identity")
    if t == "identity":
        return []
    steps = t.split("+")
    bad = [s for s in steps if s not in TRANSFORM_STEPS]
    if bad:
        raise ValueError(f"unknown transform step(s) {bad} in {t!r}")
    return steps


def make_transform(param_shape, param_dtype: str, shape, dtype: str, perm=None) -> dict:
    """Entry fields (less "param") for a parameter and the initializer made from it."""
    steps = []
    cur = list(param_shape)
    if perm is not None and list(perm) != list(range(len(perm))):
        steps.append("transpose")
        cur = [cur[i] for i in perm]
    if list(shape) != cur:
        steps.append("reshape")
    if dtype != param_dtype:
        steps.append("cast")
    entry = {"transform": "+".join(steps) or "identity"}
    if "transpose" in steps:
        entry["perm"] = list(perm)
    entry.update(shape=list(shape), dtype=dtype, param_shape=list(param_shape), param_dtype=param_dtype)
    return entry


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def to_initializer(tensor, entry: dict):
    """The initializer value for a torch-layout parameter value (torch tensor or numpy array)."""
    steps = transform_steps(entry)
    x = tensor
    if _is_torch(x):
        if "transpose" in steps:
            x = x.permute(*entry["perm"])
        if "reshape" in steps:
            x = x.reshape(entry["shape"])
        if "cast" in steps:
            x = x.to(torch_dtype(entry["dtype"]))
        return x.contiguous()
    x = np.asarray(x)
    if "transpose" in steps:
        x = x.transpose(entry["perm"])
    if "reshape" in steps:
        x = x.reshape(entry["shape"])
    if "cast" in steps:
        x = x.astype(numpy_dtype(entry["dtype"]))
    return np.ascontiguousarray(x)


def from_initializer(value, entry: dict):
    """Inverse of `to_initializer`: the torch-layout parameter value (dtype cast back)."""
    steps = transform_steps(entry)
    x = value
    inv = None
    if "transpose" in steps:
        inv = list(np.argsort(entry["perm"]))
    if _is_torch(x):
        if "cast" in steps:
            x = x.to(torch_dtype(entry["param_dtype"]))
        if "transpose" in steps:
            x = x.reshape([entry["param_shape"][i] for i in entry["perm"]]).permute(*inv)
        elif "reshape" in steps:
            x = x.reshape(entry["param_shape"])
        return x.contiguous()
    x = np.asarray(x)
    if "cast" in steps:
        x = x.astype(numpy_dtype(entry["param_dtype"]))
    if "transpose" in steps:
        x = x.reshape([entry["param_shape"][i] for i in entry["perm"]]).transpose(inv)
    elif "reshape" in steps:
        x = x.reshape(entry["param_shape"])
    return np.ascontiguousarray(x)


# -- the typed map ------------------------------------------------------------------------------


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
        return torch_dtype(self.raw["param_dtype"])

    def to_onnx(self, t):
        """The transform: torch-layout value -> the initializer's layout and dtype."""
        return to_initializer(t, self.raw)

    def to_torch(self, t):
        """Inverse transform (exact except where the map has a narrowing cast)."""
        return from_initializer(t, self.raw)


_ENTRY_KEYS = ("param", "transform", "shape", "dtype", "param_shape", "param_dtype")


class WeightsMap:
    """{torch param: MapEntry} for one exported component, plus lookups by initializer."""

    def __init__(self, data: Mapping, path: Path | None = None):
        self.data = dict(data)
        self.path = path
        where = path or "weights map"
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"{where} is not a version-{VERSION} {FORMAT} file")
        if not isinstance(data.get("entries"), dict):
            raise ValueError(f"{where}: no entries")
        self.entries: dict[str, MapEntry] = {}
        for name, e in data["entries"].items():
            missing = [k for k in _ENTRY_KEYS if k not in e]
            if missing:
                raise ValueError(f"{where}: entry {name} lacks {missing}")
            transform_steps(e)
            if e["param"] in self.entries:
                raise ValueError(f"{where}: parameter {e['param']} maps to {self.entries[e['param']].initializer} "
                                 f"and {name}")
            self.entries[e["param"]] = MapEntry(e["param"], name, e)
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

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {p: e.param_shape for p, e in self.entries.items()}

    @classmethod
    def new(cls, component: str, family: str, dtype: str, entries: dict, model_file: str = "model.onnx") -> WeightsMap:
        return cls({"format": FORMAT, "version": VERSION, "component": component, "family": family,
                    "dtype": dtype, "model": model_file, "entries": entries})

    @classmethod
    def load(cls, path) -> WeightsMap:
        path = Path(path)
        if path.is_dir():
            path = path / WEIGHTS_MAP_FILE
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls(data, path)

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        if p.is_dir():
            p = p / WEIGHTS_MAP_FILE
        with atomic_path(p) as tmp:
            tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        self.path = p
        return p


def load_weights_map(path) -> WeightsMap | None:
    """The weights map of an engine directory (or file), None when there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_MAP_FILE
    if not path.is_file():
        return None
    return WeightsMap.load(path)
