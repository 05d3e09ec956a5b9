"""Weights maps: which ONNX initializer holds which LoRA-targetable torch parameter, and how.

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

Every Linear / Conv weight and bias that `lora_loaders.targets.targetable_parameters`
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
from pathlib import Path

import numpy as np

FORMAT = "lora-engines.weights_map"
VERSION = 1
WEIGHTS_MAP_FILE = "weights_map.json"
BASE_WEIGHTS_FILE = "base_weights.safetensors"
TRANSFORM_STEPS = ("transpose", "reshape", "cast")


def np_dtype(name: str):
    """numpy dtype for a dtype name ("bfloat16" via ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def dtype_name(dtype) -> str:
    """'float16' for torch.float16, np.float16, ml_dtypes.bfloat16, 'float16'."""
    s = str(dtype)
    return s.removeprefix("torch.")


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
        x = x.astype(np_dtype(entry["dtype"]))
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
        x = x.astype(np_dtype(entry["param_dtype"]))
    if "transpose" in steps:
        x = x.reshape([entry["param_shape"][i] for i in entry["perm"]]).transpose(inv)
    elif "reshape" in steps:
        x = x.reshape(entry["param_shape"])
    return np.ascontiguousarray(x)


def param_to_initializer(weights_map: dict) -> dict[str, str]:
    """{torch param name: initializer name}."""
    return {e["param"]: name for name, e in weights_map["entries"].items()}


def _map_path(path) -> Path:
    path = Path(path)
    return path / WEIGHTS_MAP_FILE if path.is_dir() else path


def load_weights_map(path: str | os.PathLike) -> dict:
    """Read a weights map (a component directory or the json file) and check its layout."""
    p = _map_path(path)
    with open(p) as f:
        data = json.load(f)
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ValueError(f"{p} is not a version-{VERSION} {FORMAT} file")
    seen = {}
    for name, e in data["entries"].items():
        transform_steps(e)
        if e["param"] in seen:
            raise ValueError(f"{p}: parameter {e['param']} maps to {seen[e['param']]} and {name}")
        seen[e["param"]] = name
    return data


def save_weights_map(weights_map: dict, path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_MAP_FILE
    with open(p, "w") as f:
        json.dump(weights_map, f, indent=1, sort_keys=False)
        f.write("\n")
    return p


def new_weights_map(component: str, family: str, dtype: str, entries: dict, model_file: str = "model.onnx") -> dict:
    return {
        "format": FORMAT, "version": VERSION, "component": component, "family": family,
        "dtype": dtype, "model": model_file, "entries": entries,
    }


def load_base_weights(path: str | os.PathLike, device: str = "cpu") -> dict:
    """{torch param name: base tensor} from a component dir or the safetensors file ({} if absent)."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / BASE_WEIGHTS_FILE
        if not p.exists():
            return {}
    return load_file(str(p), device=device)
