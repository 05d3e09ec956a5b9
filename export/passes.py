"""Graph passes over the in-memory ONNX IR (`onnx_ir.Model`) made by torch's exporter.

- `fix_mixed_float_inputs`: torch's exporter (2.13) can emit ops whose inputs must share
  one type but do not, e.g. SDXL's added time embedding `Concat(text_embeds: float16,
  time_proj: float32)` in an fp16 export; ONNX Runtime refuses such a file. The pass casts
  the odd inputs to the type the node's output declares (torch's promoted type), for every
  op whose inputs are bound to one type parameter.
- `strip_prefix`: renames initializers of a wrapped module back to the component's own
  `state_dict` names.
- `fold_param_transposes`: folds `Transpose(param)` into one initializer named
  `<param>.T` (deterministic, readable), recording the provenance the weights map is built
  from. Run before the exporter's optimizer, which would otherwise fold them into
  anonymous `val_N` tensors.
"""

from __future__ import annotations

import logging

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
