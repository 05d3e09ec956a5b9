"""Graph passes over the in-memory ONNX IR (`onnx_ir.Model`) made by torch's exporter.

- `fix_mixed_float_inputs`: torch's exporter (2.13) can emit ops whose inputs must share
  one type but do not, e.g. SDXL's added time embedding `Concat(text_embeds: float16,
  time_proj: float32)` in an fp16 export; ONNX Runtime refuses such a file. The pass casts
  the odd inputs to the type the node's output declares (torch's promoted type), for every
  op whose inputs are bound to one type parameter.
- `drop_float64`: computes in float32 what a graph computes in float64 (diffusers' RoPE for
  Flux and Wan): strongly typed TensorRT refuses DOUBLE tensors.
- `bool_where_as_uint8`: ONNX Runtime's CPU provider has no bool `Where`; computes it in uint8.
- `near_identity_constants`: scalar constants the exporter's optimizer would drop as no-ops
  (`x + 1e-15`), made initializers for the export to shield from it.
- `strip_prefix`: renames initializers of a wrapped module back to the component's own
  `state_dict` names.
- `fold_param_transposes`: folds `Transpose(param)` into one initializer named
  `<param>.T` (deterministic, readable), recording the provenance the weights map is built
  from. Run before the exporter's optimizer, which would otherwise fold them into
  anonymous `val_N` tensors.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_ir as ir

log = logging.getLogger(__name__)

# op -> indices of the inputs bound to the same type parameter (None: all inputs)
_SAME_TYPE_INPUTS: dict[str, tuple[int, ...] | None] = {
    "Concat": None, "Add": None, "Sub": None, "Mul": None, "Div": None, "Sum": None, "Mean": None,
    "Max": None, "Min": None, "Equal": None, "Less": None, "Greater": None, "LessOrEqual": None,
    "GreaterOrEqual": None, "Where": (1, 2), "MatMul": None, "Gemm": (0, 1, 2), "Pow": None,
    "Mod": None, "PRelu": None,
}
_FLOATS = {ir.DataType.FLOAT16: 1, ir.DataType.BFLOAT16: 1, ir.DataType.FLOAT: 2, ir.DataType.DOUBLE: 3}


def _promote(types: set) -> ir.DataType:
    """torch-like promotion among float types (float16 with bfloat16 gives float32)."""
    best = max(types, key=lambda t: _FLOATS[t])
    if _FLOATS[best] == 1 and len(types) > 1:
        return ir.DataType.FLOAT
    return best


def _all_nodes(graph: ir.Graph):
    for node in ir.traversal.RecursiveGraphIterator(graph):
        yield node


def fix_mixed_float_inputs(model: ir.Model) -> int:
    """Insert Casts where a same-type op has float inputs of different types. Returns how many."""
    fixed = 0
    for node in list(_all_nodes(model.graph)):
        if node.domain not in ("", "ai.onnx") or node.op_type not in _SAME_TYPE_INPUTS:
            continue
        idx = _SAME_TYPE_INPUTS[node.op_type]
        positions = [i for i in (range(len(node.inputs)) if idx is None else idx) if i < len(node.inputs)]
        vals = [(i, node.inputs[i]) for i in positions if node.inputs[i] is not None]
        types = {v.dtype for _, v in vals if v.dtype is not None}
        if len(types) < 2 or not types <= set(_FLOATS):
            continue
        out_t = node.outputs[0].dtype if node.outputs else None
        target = out_t if out_t in _FLOATS and node.op_type not in ("Equal", "Less", "Greater") else _promote(types)
        for i, v in vals:
            if v.dtype == target:
                continue
            cast = ir.node("Cast", inputs=[v], attributes={"to": target}, name=f"{node.name}_cast_in{i}")
            cast.outputs[0].name = f"{v.name}_as_{target.name.lower()}_{node.name}"
            cast.outputs[0].dtype = target
            cast.outputs[0].shape = v.shape
            node.graph.insert_before(node, cast)
            node.replace_input_with(i, cast.outputs[0])
            fixed += 1
        log.debug("cast inputs of %s %s to %s", node.op_type, node.name, target)
    if fixed:
        log.info("inserted %d Cast(s) for mixed-type inputs", fixed)
    return fixed


_DOUBLE, _FLOAT = ir.DataType.DOUBLE, ir.DataType.FLOAT


def drop_float64(model: ir.Model) -> int:
    """Make every float64 tensor of the graph float32 (casts, constants, initializers, values).

    float64 is only ever internal here (the graph's inputs and outputs are the family's), and
    float32 keeps the result within the export's tolerance. Returns how many tensors changed.
    """
    changed = 0
    io = [v.name for v in (*model.graph.inputs, *model.graph.outputs) if v.dtype == _DOUBLE]
    if io:
        raise ValueError(f"graph inputs / outputs {io} are float64")
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.dtype == _DOUBLE and value.const_value is not None:
                value.const_value = ir.tensor(value.const_value.numpy().astype(np.float32), name=value.name)
                value.type = ir.TensorType(_FLOAT)
                changed += 1
    for node in _all_nodes(model.graph):
        for name, attr in list(node.attributes.items()):
            if name in ("to", "dtype") and attr.type == ir.AttributeType.INT and attr.as_int() == _DOUBLE:
                node.attributes[name] = ir.AttrInt64(name, _FLOAT)
                changed += 1
            elif attr.type == ir.AttributeType.TENSOR and attr.as_tensor().dtype == _DOUBLE:
                node.attributes[name] = ir.AttrTensor(name, ir.tensor(attr.as_tensor().numpy().astype(np.float32)))
                changed += 1
        for out in node.outputs:
            if out.dtype == _DOUBLE:
                out.type = ir.TensorType(_FLOAT)
    if changed:
        log.info("computed %d float64 tensor(s) in float32", changed)
    return changed



_BOOL, _UINT8 = ir.DataType.BOOL, ir.DataType.UINT8


def bool_where_as_uint8(model: ir.Model) -> int:
    """Compute `Where` over bool values in uint8 (ONNX Runtime's CPU provider has no bool `Where`:
    torch's `masked_fill` on a bool mask, HunyuanVideo's). Returns how many nodes changed."""
    changed = 0
    for node in list(_all_nodes(model.graph)):
        if node.op_type != "Where" or node.domain not in ("", "ai.onnx") or node.outputs[0].dtype != _BOOL:
            continue
        for i in (1, 2):
            cast = ir.node("Cast", inputs=[node.inputs[i]], attributes={"to": _UINT8}, name=f"{node.name}_u8_in{i}")
            cast.outputs[0].name = f"{node.name}_u8_in{i}"
            cast.outputs[0].dtype, cast.outputs[0].shape = _UINT8, node.inputs[i].shape
            node.graph.insert_before(node, cast)
            node.replace_input_with(i, cast.outputs[0])
        out = node.outputs[0]
        users = list(out.uses())
        graph_out = [i for i, v in enumerate(node.graph.outputs) if v is out]
        back = ir.node("Cast", inputs=[out], attributes={"to": _BOOL}, name=f"{node.name}_bool")
        back.outputs[0].dtype, back.outputs[0].shape = _BOOL, out.shape
        node.graph.insert_after(node, back)
        for user, index in users:
            user.replace_input_with(index, back.outputs[0])
        for i in graph_out:
            node.graph.outputs[i] = back.outputs[0]
        back.outputs[0].name, out.name = out.name, f"{out.name}_u8"
        out.dtype = _UINT8
        changed += 1
    if changed:
        log.info("computed %d bool Where node(s) in uint8", changed)
    return changed

def near_identity_constants(model: ir.Model) -> dict[ir.Value, ir.TensorProtocol]:
    """Scalar float constants within onnxscript's no-op tolerance of 0 or 1, taken out of the graph.

    Its `x + 0`, `x - 0`, `x * 1`, `x / 1` rules match any constant within 1e-8 absolute /
    1e-5 relative, initializers included: `x / (s + 1e-15)` (Sana's linear attention) would
    lose its epsilon and give 0 / 0 = NaN where s is 0. Each such constant becomes a value
    without contents (the caller makes it a graph input while the optimizer runs, then an
    initializer again); returns {value: its tensor}.
    """
    def near(tensor) -> bool:
        arr = tensor.numpy() if tensor is not None else None
        if arr is None or arr.size != 1 or arr.dtype.kind != "f":
            return False
        x = float(arr.reshape(-1)[0])
        return (x != 0 and math.isclose(x, 0, abs_tol=1e-8)) or (x != 1 and math.isclose(x, 1, rel_tol=1e-5))

    graph = model.graph
    found = {}
    for name, value in list(graph.initializers.items()):
        if near(value.const_value) and not value.is_graph_input():
            found[value] = value.const_value
            graph.initializers.pop(name)
            value.const_value = None
    for node in list(graph):
        attr = node.attributes.get("value") if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if attr is None or attr.type != ir.AttributeType.TENSOR or not near(attr.as_tensor()):
            continue
        out, tensor = node.outputs[0], attr.as_tensor()
        if out.is_graph_output():
            continue
        value = ir.Value(name=f"{out.name}_kept", shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
        out.replace_all_uses_with(value)
        graph.remove(node, safe=True)
        found[value] = tensor
    return found


def strip_prefix(model: ir.Model, prefix: str) -> None:
    """Rename initializers `<prefix>x` to `x` (the wrapped component's own names)."""
    graph = model.graph
    for name in list(graph.initializers):
        if name.startswith(prefix):
            value = graph.initializers.pop(name)
            value.name = name[len(prefix):]
            if value.const_value is not None:
                value.const_value.name = value.name
            graph.initializers[value.name] = value


class _TransposedTensor:
    """Computes param.T on demand (so a large model is not held twice in memory)."""

    def __init__(self, tensor, perm):
        self.tensor, self.perm = tensor, tuple(perm)

    def __call__(self):
        raw = getattr(self.tensor, "raw", None)
        if raw is not None and type(raw).__module__.startswith("torch"):
            try:  # torch transposes (multi-threaded, any dtype) and keeps the exporter's tensor type
                from torch.onnx._internal.exporter._core import TorchTensor

                return TorchTensor(raw.detach().permute(*self.perm).contiguous())
            except ImportError:
                pass
        arr = self.tensor.numpy()
        return ir.tensor(np.ascontiguousarray(arr.transpose(self.perm)))


def fold_param_transposes(model: ir.Model, params: set[str]) -> dict[str, tuple[str, list[int]]]:
    """Fold `Transpose(p)` for initializers p in `params` into initializers `<p>.T`.

    Only where every consumer of p is a Transpose with the same perm (so p keeps exactly
    one initializer). Returns {new initializer name: (param name, perm)}.
    """
    graph = model.graph
    folded = {}
    for name in list(graph.initializers):
        if name not in params:
            continue
        value = graph.initializers[name]
        uses = list(value.uses())
        if not uses or any(u.node.op_type != "Transpose" or u.node.domain not in ("", "ai.onnx") for u in uses):
            continue
        perms = set()
        for u in uses:
            attr = u.node.attributes.get("perm")
            perm = tuple(attr.as_ints()) if attr is not None else tuple(reversed(range(len(value.shape))))
            perms.add(perm)
        if len(perms) != 1:
            continue
        perm = perms.pop()
        src = value.const_value
        shape = ir.Shape([value.shape[i] for i in perm])
        new_name = f"{name}.T" if perm == (1, 0) else f"{name}.perm{''.join(map(str, perm))}"
        lazy = ir.LazyTensor(_TransposedTensor(src, perm), dtype=value.dtype, shape=shape, name=new_name)
        new_value = ir.Value(name=new_name, shape=shape, type=ir.TensorType(value.dtype), const_value=lazy)
        graph.register_initializer(new_value)
        for u in uses:
            node = u.node
            out = node.outputs[0]
            out.replace_all_uses_with(new_value)
            if out.is_graph_output():
                raise RuntimeError(f"transposed parameter {name} is a graph output")
            graph.remove(node, safe=True)
        graph.initializers.pop(name)
        folded[new_name] = (name, list(perm))
    log.debug("folded %d parameter transposes", len(folded))
    return folded
