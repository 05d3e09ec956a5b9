"""One dtype table: every spelling of a tensor element type the project meets, and the conversions.

The project's own name is torch's without the prefix ("float32", "float16", "bfloat16", ...):
weights maps, manifests and engines write it. `dtype()` also reads the export's short names
("fp16"), torch and numpy dtypes (bfloat16 is `ml_dtypes.bfloat16`, numpy has none),
ONNX element types (ints), safetensors codes ("F16") and ONNX Runtime type strings
("tensor(float16)"). Every layer above converts through here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DType:
    name: str  # the project's name (torch's, no prefix)
    torch: torch.dtype
    onnx: int  # onnx.TensorProto element type
    safetensors: str
    short: str | None = None  # the export's --dtype spelling

    @property
    def numpy(self) -> np.dtype:
        if self.name == "bfloat16":
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(self.name)

    @property
    def storage(self) -> np.dtype:
        """A numpy dtype of the same width that holds the bits (bfloat16 as uint16)."""
        return np.dtype(np.uint16) if self.name == "bfloat16" else self.numpy


TABLE = (
    DType("float32", torch.float32, 1, "F32", "fp32"),
    DType("float16", torch.float16, 10, "F16", "fp16"),
    DType("bfloat16", torch.bfloat16, 16, "BF16", "bf16"),
    DType("float64", torch.float64, 11, "F64"),
    DType("int64", torch.int64, 7, "I64"),
    DType("int32", torch.int32, 6, "I32"),
    DType("int16", torch.int16, 5, "I16"),
    DType("int8", torch.int8, 3, "I8"),
    DType("uint8", torch.uint8, 2, "U8"),
    DType("uint16", torch.uint16, 4, "U16"),
    DType("uint32", torch.uint32, 12, "U32"),
    DType("uint64", torch.uint64, 13, "U64"),
    DType("bool", torch.bool, 9, "BOOL"),
)
FLOATS = ("float32", "float16", "bfloat16")  # what an export may be made in

_BY: dict = {}
for _d in TABLE:
    for _k in (_d.name, _d.torch, _d.onnx, _d.safetensors, f"tensor({_d.name})", f"torch.{_d.name}"):
        _BY[_k] = _d
    if _d.short:
        _BY[_d.short] = _d
_BY.update({"tensor(float)": _BY["float32"], "tensor(double)": _BY["float64"]})  # ONNX Runtime's C names


def dtype(x) -> DType:
    """The table entry for any spelling (see module doc); ValueError for one it lacks."""
    if isinstance(x, np.dtype) or (isinstance(x, type) and issubclass(x, np.generic)):
        x = np.dtype(x).name
    try:
        found = _BY.get(x)
    except TypeError:
        found = None
    if found is None:
        raise ValueError(f"unknown dtype {x!r}; known: {', '.join(d.name for d in TABLE)}")
    return found


def name(x) -> str:
    return dtype(x).name


def torch_dtype(x) -> torch.dtype:
    return dtype(x).torch


def numpy_dtype(x) -> np.dtype:
    return dtype(x).numpy


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy array with the tensor's bits (bfloat16 as ml_dtypes.bfloat16)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(numpy_dtype("bfloat16"))
    return t.numpy()


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """A tensor over the array's memory (made contiguous first), bfloat16 included."""
    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)
