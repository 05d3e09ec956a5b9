"""ONNX model helpers shared by the engines and the refitter (no ONNX Runtime here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lora_loaders import dtypes as dt

MODEL_FILE = "model.onnx"
_PROTO_LIMIT = 2_000_000_000  # protobuf's 2 GiB message limit, with a margin


def find_model(path) -> Path:
    """model.onnx in an engine directory, or the .onnx file itself."""
    path = Path(path)
    if path.is_dir():
        model = path / MODEL_FILE
        if not model.is_file():
            onnx_files = sorted(path.glob("*.onnx"))
            if len(onnx_files) != 1:
                raise FileNotFoundError(f"no {MODEL_FILE} in engine directory {path}")
            model = onnx_files[0]
        return model
    if not path.is_file():
        raise FileNotFoundError(f"engine not found: {path}")
    return path


def initializer_view(t: TensorProto, base_dir: Path | None = None) -> np.ndarray:
    """The value of an initializer; external data is a copy-on-write memory map (nothing is read
    until used, and nothing written to it reaches the file)."""
    if t.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    d = dt.dtype(t.data_type)
    mm = np.memmap(Path(base_dir or ".") / info["location"], dtype=d.storage, mode="c",
                   offset=int(info.get("offset", 0)), shape=tuple(t.dims))
    return mm.view(d.numpy)


def initializer_array(t: TensorProto, base_dir: Path | None = None) -> np.ndarray:
    """The value of an initializer as a new, writable array."""
    return np.array(initializer_view(t, base_dir))


class InitializerReader:
    """Lazy, name-indexed access to the initializers of an ONNX file (external data memory-mapped)."""

    def __init__(self, model_path):
        self.model_path = Path(model_path)
        self.model = onnx.load(str(self.model_path), load_external_data=False)
        self._index = {t.name: t for t in self.model.graph.initializer}

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def names(self) -> list[str]:
        return list(self._index)

    def proto(self, name: str) -> TensorProto:
        return self._index[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._index[name].dims)

    def dtype(self, name: str) -> np.dtype:
        return dt.numpy_dtype(self._index[name].data_type)

    def array(self, name: str) -> np.ndarray:
        return initializer_view(self._index[name], self.model_path.parent)


def take_initializers(model: onnx.ModelProto, names, base_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Pop the named initializers out of the main graph and return their values (graph order)."""
    wanted = set(names)
    kept, taken = [], {}
    for t in model.graph.initializer:
        if t.name in wanted:
            taken[t.name] = initializer_array(t, base_dir)
        else:
            kept.append(t)
    missing = wanted - set(taken)
    if missing:
        raise KeyError(f"initializers not in the graph: {sorted(missing)[:5]}")
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return taken


def add_inputs(model: onnx.ModelProto, arrays: dict[str, np.ndarray], elem_types: dict[str, int]) -> None:
    """Declare graph inputs for these former initializers (unless already declared)."""
    declared = {i.name for i in model.graph.input}
    for name, arr in arrays.items():
        if name not in declared:
            model.graph.input.append(helper.make_tensor_value_info(name, elem_types[name], list(arr.shape)))


def stub_external(model: onnx.ModelProto, names, location: str = "__supplied_at_session_creation__") -> None:
    """Replace the data of these initializers by a reference ONNX Runtime never reads.

    Used with SessionOptions.add_external_initializers, which supplies the values; the
    reference names a file that does not exist, so a mistake fails loudly.
    """
    wanted = set(names)
    for t in model.graph.initializer:
        if t.name not in wanted:
            continue
        nbytes = int(np.prod(t.dims, dtype=np.int64)) * dt.numpy_dtype(t.data_type).itemsize
        for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            t.ClearField(f)
        del t.external_data[:]
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", "0"), ("length", str(nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v


def serialize(model: onnx.ModelProto) -> bytes:
    if model.ByteSize() >= _PROTO_LIMIT:
        raise ValueError("model too large to serialize in memory")
    return model.SerializeToString()


def fits_in_memory_proto(model: onnx.ModelProto) -> bool:
    return model.ByteSize() < _PROTO_LIMIT


def save_with_external(model: onnx.ModelProto, path: Path, data_name: str | None = None) -> None:
    """Save a model, as external data (one file next to it) when it is too large for protobuf."""
    path = Path(path)
    if fits_in_memory_proto(model):
        onnx.save(model, str(path))
    else:
        data_name = data_name or path.name + ".data"
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data_name, size_threshold=1024)


def onnx_elem_type(model: onnx.ModelProto, names) -> dict[str, int]:
    wanted = set(names)
    return {t.name: t.data_type for t in model.graph.initializer if t.name in wanted}



# -- bfloat16 graphs as float32 copies (ONNX Runtime's CPU provider has no bfloat16 MatMul etc.) ------

_BF16, _F32 = TensorProto.BFLOAT16, TensorProto.FLOAT
_DTYPE_ATTRS = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Bernoulli": "dtype"}


def _subgraphs(nodes):
    for node in nodes:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield a.g
                yield from _subgraphs(a.g.node)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield g
                    yield from _subgraphs(g.node)


def _all_nodes(model: onnx.ModelProto):
    for g in [model.graph, *_subgraphs(model.graph.node)]:
        yield from g.node
    for f in model.functions:
        yield from f.node
        for g in _subgraphs(f.node):
            yield from g.node


def computes_in_bf16(model: onnx.ModelProto) -> bool:
    """True when the graph computes in bfloat16: a graph input or output is bfloat16, or a node casts to it.

    (A float32 graph that only stores some weights in bfloat16 and casts them up, or rounds values through
    bfloat16 and back, runs as it is.)
    """
    g = model.graph
    if any(v.type.tensor_type.elem_type == _BF16 for v in [*g.input, *g.output]):
        return True
    nodes = list(_all_nodes(model))
    rounding = _bf16_rounding(nodes, {v.name for v in g.output})
    return any(n.op_type in _DTYPE_ATTRS and id(n) not in rounding and _casts_to(n, _BF16) for n in nodes)


def _casts_to(node, dtype: int) -> bool:
    attr = _DTYPE_ATTRS.get(node.op_type)
    return any(a.name == attr and a.i == dtype for a in node.attribute)


def _bf16_rounding(nodes: list, outputs: set[str]) -> set[int]:
    """Casts to bfloat16 whose every use casts straight back to float32: a float32 graph rounding values
    (Kandinsky 5's attention rounds q and k so), which ONNX Runtime's CPU Cast kernels run exactly as torch;
    the float32 copy would drop the rounding."""
    users: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            users.setdefault(i, []).append(n)
    out = set()
    for n in nodes:
        if n.op_type == "Cast" and _casts_to(n, _BF16) and not set(n.output) & outputs:
            uses = [u for o in n.output for u in users.get(o, [])]
            if uses and all(u.op_type == "Cast" and _casts_to(u, _F32) for u in uses):
                out.add(id(n))
    return out


def _retype(tp: onnx.TypeProto) -> None:
    kind = tp.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        t = getattr(tp, kind)
        if t.elem_type == _BF16:
            t.elem_type = _F32
    elif kind == "sequence_type":
        _retype(tp.sequence_type.elem_type)
    elif kind == "optional_type":
        _retype(tp.optional_type.elem_type)
    elif kind == "map_type":
        _retype(tp.map_type.value_type)


def _tensor_to_fp32(t: TensorProto, base_dir: Path | None) -> None:
    """A bfloat16 tensor's values, in place, as float32 (exact: bfloat16 is float32's upper half)."""
    if t.data_location == TensorProto.EXTERNAL:
        if base_dir is None:
            raise ValueError(f"bfloat16 tensor {t.name!r} has external data and no base directory was given")
        bits = initializer_view(t, base_dir).view(np.uint16)
    else:
        bits = numpy_helper.to_array(t).view(np.uint16)
    values = (bits.reshape(-1).astype("<u4") << 16).view("<f4")
    for f in ("raw_data", "int32_data", "float_data"):
        t.ClearField(f)
    del t.external_data[:]
    t.data_location = TensorProto.DEFAULT
    t.data_type = _F32
    t.raw_data = values.tobytes()


def bf16_to_fp32(model: onnx.ModelProto, base_dir: Path | None = None, supplied=()) -> None:
    """Turn a bfloat16 graph, in place, into its float32 copy, for ONNX Runtime's CPU provider (which
    has no bfloat16 MatMul and other kernels): every bfloat16 graph input/output, value info,
    initializer and tensor attribute becomes float32 (values cast exactly), and Casts (and ops
    with a dtype attribute) to bfloat16 produce float32 instead; in subgraphs and functions too.

    base_dir: where external data lives (initializers still stored outside the proto are read and
    converted). supplied: initializers whose values the caller supplies itself (graph inputs,
    `SessionOptions.add_external_initializers`): only retyped, their data is never read.
    Used by engines.OrtEngine and export validation.
    """
    supplied = set(supplied)
    graphs = [model.graph, *_subgraphs(model.graph.node)]
    for f in model.functions:
        graphs.extend(_subgraphs(f.node))
        for v in getattr(f, "value_info", ()):
            _retype(v.type)
    for g in graphs:
        for v in [*g.input, *g.output, *g.value_info]:
            _retype(v.type)
        for t in g.initializer:
            if t.data_type == _BF16:
                if t.name in supplied:
                    t.data_type = _F32
                else:
                    _tensor_to_fp32(t, base_dir)
        for s in g.sparse_initializer:
            if s.values.data_type == _BF16:
                _tensor_to_fp32(s.values, base_dir)
    for node in _all_nodes(model):
        dtype_attr = _DTYPE_ATTRS.get(node.op_type)
        for a in node.attribute:
            if a.name == dtype_attr and a.type == onnx.AttributeProto.INT and a.i == _BF16:
                a.i = _F32
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == _BF16:
                _tensor_to_fp32(a.t, base_dir)
            elif a.type == onnx.AttributeProto.SPARSE_TENSOR and a.sparse_tensor.values.data_type == _BF16:
                _tensor_to_fp32(a.sparse_tensor.values, base_dir)
            elif a.type == onnx.AttributeProto.TENSORS:
                for t in a.tensors:
                    if t.data_type == _BF16:
                        _tensor_to_fp32(t, base_dir)
            elif a.type == onnx.AttributeProto.TYPE_PROTO:
                _retype(a.tp)
