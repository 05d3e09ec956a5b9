"""Export one component (a torch module, adapters already fused) to ONNX with its weights map.

Generic: everything family-specific comes from the component's registry entry
(`lora_loaders.families.ComponentSpec`: graph inputs and outputs over the family's axes).

Steps: torch's dynamo exporter with `optimize=False`; initializers renamed back to the
component's `state_dict` names; `Transpose(param)` folded into `<param>.T` initializers
(our own fold, so the provenance is exact and the names readable); mixed-type ops fixed;
then the exporter's usual optimizer. Anything the optimizer still folds from a targetable
parameter is traced back through its `pkg.onnxscript.optimizer.folded_from` metadata and
the pre-optimization producer chain. Each map entry is checked bit for bit against the
torch parameter before the map is written.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import onnx_ir as ir
import torch

from engines.weights_map import WEIGHTS_MAP_FILE, WeightsMap, make_transform, to_initializer
from lora_loaders.dtypes import name as dtype_name
from lora_loaders.dtypes import to_numpy
from lora_loaders.families import ComponentSpec, FamilySpec
from lora_loaders.families.spec import parse_dim
from lora_loaders.index import targetable_parameters

from . import complex_ops  # noqa: F401 - registers the exporter's missing complex-valued layout ops
from . import passes
from .graph import Wrapper, dynamic_axes, example_inputs

log = logging.getLogger(__name__)

FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # bytes of initializers above which weights go to model.onnx.data
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"

_SHAPE_OPS = {"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}


class ExportError(RuntimeError):
    """An export that cannot be completed correctly."""


def _param_chains(model: ir.Model, params: set[str]) -> dict[str, tuple[str, list]]:
    """{value name: (param, [(op, perm or None)])} for values computed from one param by layout ops."""
    chains: dict[str, tuple[str, list]] = {name: (name, []) for name in params if name in model.graph.initializers}
    for node in model.graph:
        if not node.inputs or node.inputs[0] is None or node.inputs[0].name not in chains:
            continue
        if node.op_type not in _SHAPE_OPS | {"Transpose", "Cast"}:
            continue
        param, steps = chains[node.inputs[0].name]
        perm = None
        if node.op_type == "Transpose":
            attr = node.attributes.get("perm")
            rank = len(node.inputs[0].shape)
            perm = list(attr.as_ints()) if attr is not None else list(reversed(range(rank)))
        chains[node.outputs[0].name] = (param, [*steps, (node.op_type, perm)])
    return chains


def _transform_from_chain(steps: list, param: torch.Tensor, value: ir.Value) -> dict:
    """Map-entry fields for a chain of layout ops, if it is transpose -> reshape -> cast shaped."""
    order = {"Transpose": 0, "Cast": 2, **{op: 1 for op in _SHAPE_OPS}}
    ranks = [order[op] for op, _ in steps]
    if ranks != sorted(ranks) or sum(op == "Transpose" for op, _ in steps) > 1:
        raise ExportError(f"cannot express the op chain {[op for op, _ in steps]} as a weights-map transform")
    perm = next((p for op, p in steps if op == "Transpose"), None)
    return make_transform(
        list(param.shape), dtype_name(param.dtype), [int(d) for d in value.shape],
        dtype_name(int(value.dtype)), perm,
    )


def _rename_initializer(graph: ir.Graph, old: str, new: str) -> None:
    if new in graph.initializers:
        raise ExportError(f"initializer name {new!r} already taken")
    value = graph.initializers.pop(old)
    value.name = new
    if value.const_value is not None:
        value.const_value.name = new
    graph.initializers[new] = value


def build_weights_map(
    model_ir: ir.Model, module: torch.nn.Module, params: list[str], folded: dict, chains: dict,
    component: str, family: str, dtype: str,
) -> WeightsMap:
    """Weights map from the export's provenance; every entry verified by value. Renames as it goes."""
    graph = model_ir.graph
    # every name of a tied parameter: the exporter may name its initializer after any of them (an LM head)
    state = dict(module.named_parameters(remove_duplicate=False))
    param_set = set(params)
    found: dict[str, list[tuple[str, dict]]] = {p: [] for p in params}
    for name, value in list(graph.initializers.items()):
        if name in param_set:
            t = state[name]
            found[name].append((name, make_transform(list(t.shape), dtype_name(t.dtype), list(t.shape),
                                                     dtype_name(t.dtype))))
            continue
        if name in folded:
            p, perm = folded[name]
            t = state[p]
            found[p].append((name, make_transform(list(t.shape), dtype_name(t.dtype), [int(d) for d in value.shape],
                                                  dtype_name(int(value.dtype)), perm)))
            continue
        sources = value.metadata_props.get(FOLDED_FROM)
        if not sources:
            continue
        hit = [p for p in param_set if p in sources]
        if not hit:
            continue
        if name not in chains or chains[name][0] not in hit:
            raise ExportError(
                f"initializer {name} was folded from targetable parameter(s) {hit} by an op chain "
                "the weights map cannot express")
        p, steps = chains[name]
        found[p].append((name, _transform_from_chain(steps, state[p], value)))
    entries, unused = {}, []
    for p in params:
        hits = found[p]
        if not hits:
            unused.append(p)
            continue
        if len(hits) > 1:
            raise ExportError(f"parameter {p} appears as {len(hits)} initializers {[h[0] for h in hits]}; "
                              "a weights map needs exactly one")
        name, entry = hits[0]
        steps = entry["transform"]
        new = p if steps == "identity" else (f"{p}.T" if entry.get("perm") == [1, 0] and steps == "transpose"
                                             else f"{p}.{steps.replace('+', '_')}")
        if new != name:
            _rename_initializer(graph, name, new)
            name = new
        _verify(graph.initializers[name], state[p], entry, p)
        entries[name] = {"param": p, **entry}
    if unused:  # e.g. the VAE encoder's parameters in the decoder's graph; refit refuses unmapped ones
        log.info("%s: %d targetable parameter(s) not in the graph (unused by its outputs): %s",
                 component, len(unused), unused[:5])
    wmap = WeightsMap.new(component, family, dtype, entries)
    if unused:
        wmap.data["unused_params"] = unused
    return wmap


def _as_torch(tensor) -> torch.Tensor | None:
    """The torch tensor behind an IR tensor (lazy ones evaluated), or None."""
    if isinstance(tensor, ir.LazyTensor):
        tensor = tensor.evaluate() if hasattr(tensor, "evaluate") else tensor._evaluate()
    raw = getattr(tensor, "raw", None)
    return raw if isinstance(raw, torch.Tensor) else None


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() and a.element_size() in (2, 4, 8):
        view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


def _verify(value: ir.Value, param: torch.Tensor, entry: dict, pname: str) -> None:
    tensor = value.const_value
    if tensor is None:
        raise ExportError(f"initializer {value.name} has no value")
    got_t = _as_torch(tensor)
    if got_t is not None:  # fast path: torch on both sides, bit comparison through integer views
        expected_t = to_initializer(param.detach(), entry)
        if tuple(got_t.shape) != tuple(expected_t.shape) or got_t.dtype != expected_t.dtype:
            raise ExportError(f"initializer {value.name} is {got_t.dtype}{list(got_t.shape)}, the map's transform "
                              f"of {pname} gives {expected_t.dtype}{list(expected_t.shape)}")
        if not _same_bits(got_t, expected_t):
            raise ExportError(f"initializer {value.name} does not hold the bits of {entry['transform']}({pname})")
        return
    expected = to_initializer(to_numpy(param), entry)
    got = tensor.numpy()
    if tuple(got.shape) != tuple(expected.shape) or got.dtype != expected.dtype:
        raise ExportError(f"initializer {value.name} is {got.dtype}{list(got.shape)}, the map's transform of "
                          f"{pname} gives {expected.dtype}{list(expected.shape)}")
    if got.tobytes() != expected.tobytes():
        raise ExportError(f"initializer {value.name} does not hold the bits of {entry['transform']}({pname})")


def _name_output_dims(model_ir: ir.Model, axes_of: dict) -> None:
    for out in model_ir.graph.outputs:
        axes = axes_of.get(out.name, {})
        if out.shape is None:
            continue
        dims = []
        for i, d in enumerate(out.shape):
            if i in axes:
                dims.append(axes[i])
            elif isinstance(d, int):
                dims.append(d)
            else:
                dims.append(None)
        out.shape = ir.Shape(dims)


def io_description(model_ir: ir.Model, spec: ComponentSpec, axes_of: dict) -> tuple[list, list]:
    docs = {t.name: t.doc for t in (*spec.inputs, *spec.outputs)}  # the per-config ones (caches) have none

    def describe(values):
        out = []
        for v in values:
            axes = axes_of.get(v.name, {})
            shape = [axes[i] if i in axes else (d if isinstance(d, int) else str(d)) for i, d in enumerate(v.shape)]
            out.append({"name": v.name, "dtype": dtype_name(int(v.dtype)), "shape": shape,
                        "dynamic_axes": {str(k): n for k, n in axes.items()}, "doc": docs.get(v.name, "")})
        return out

    return describe(model_ir.graph.inputs), describe(model_ir.graph.outputs)


def _nbytes(value: ir.Value) -> int:
    """Bytes of an initializer from its shape and type (without evaluating lazy tensors)."""
    t = value.const_value
    if t is None:
        return 0
    n = 1
    for d in t.shape:
        n *= int(d)
    return int(n * t.dtype.itemsize)


def _optimize(program, protected: set[str]) -> None:
    """The exporter's optimizer, with the targetable parameters (and epsilons it would drop) shielded.

    They are made graph inputs for the duration: the optimizer neither folds nodes reading
    graph inputs nor deduplicates them (it would merge small parameters that happen to be
    equal, e.g. two zero biases, leaving one of them without an initializer of its own).
    """
    graph = program.model.graph
    shield = [v for name, v in graph.initializers.items() if name in protected]
    hidden = passes.near_identity_constants(program.model)
    graph.inputs.extend([*shield, *hidden])
    quiet = logging.getLogger("onnx_ir.passes.common.initializer_deduplication")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program.optimize()
    finally:
        quiet.setLevel(level)
        graph = program.model.graph
        for v in [*shield, *hidden]:
            if v in graph.inputs:
                graph.inputs.remove(v)
        for v, tensor in hidden.items():
            v.const_value = tensor
            graph.register_initializer(v)


def _dynamic_shapes(input_names: list[str], axes_of: dict) -> tuple:
    """The exporter's dynamic shapes: axis names, or its `Dim` objects where a dimension is an axis
    times a factor (which names cannot say: a cache at twice the latent height)."""
    names = tuple(axes_of.get(n) or None for n in input_names)
    if not any("*" in d for a in axes_of.values() for d in a.values()):
        return names
    dims: dict[str, torch.export.Dim] = {}

    def dim(name: str):
        axis, factor = parse_dim(name)
        base = dims.setdefault(axis, torch.export.Dim(axis))
        return base * factor if factor != 1 else base

    return tuple({i: dim(d) for i, d in a.items()} if a else None for a in names)


_REGISTRIES: dict = {}


@contextmanager
def _reused_registry():
    """torch's exporter with its ONNX function registry built once per process and opset.

    `torch.onnx.export` rebuilds the registry from onnxscript's torch_lib on every call (it
    re-reads the source of ~500 functions: about 2 s, more than tracing a tiny text encoder);
    the export only reads it, and we pass no `custom_translation_table` (which would add to
    it). Built after `complex_ops` registered its translations, so they are in it.
    """
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry
    except ImportError:  # another torch layout: nothing to reuse
        yield
        return
    build = ONNXRegistry.__dict__["from_torchlib"]

    def cached(cls, *args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in _REGISTRIES:
            _REGISTRIES[key] = build.__func__(cls, *args, **kwargs)
        return _REGISTRIES[key]

    ONNXRegistry.from_torchlib = classmethod(cached)
    try:
        yield
    finally:
        ONNXRegistry.from_torchlib = build


def export_component(
    module: torch.nn.Module, spec: ComponentSpec, out_dir: str | os.PathLike, family: FamilySpec,
    opset: int | None = None, external_data: bool | None = None, step=lambda done: None,
) -> dict:
    """Export `module` (eval, adapters fused) to out_dir/model.onnx + weights_map.json.

    Returns the component's manifest entry (less validation).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = next(module.parameters()).dtype
    family, _ = family.bounded({spec.name: module.config})  # its own tables of positions (export_pipeline: all)
    wrapper = Wrapper(module, spec).eval()
    inputs = example_inputs(family, spec, module, dtype, "example")
    input_names = list(inputs)
    output_names = [o.name for o in spec.outputs_for(module.config)]
    axes_of = dynamic_axes(spec, module.config, family.axes)
    args = tuple(inputs.values())
    dynamic_shapes = _dynamic_shapes(input_names, axes_of)
    kwargs = {}
    if opset is not None:
        kwargs["opset_version"] = opset
    with warnings.catch_warnings(), torch.no_grad(), _reused_registry():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, args, dynamo=True, dynamic_shapes=dynamic_shapes, input_names=input_names,
            output_names=output_names, optimize=False, verbose=False, **kwargs,
        )
    step("trace")
    model_ir = program.model
    holders = list(model_ir.graph.initializers.values())  # every Value holding a torch tensor
    passes.strip_prefix(model_ir, wrapper.prefix)
    params = targetable_parameters(module)
    folded = passes.fold_param_transposes(model_ir, set(params))
    passes.fix_mixed_float_inputs(model_ir)
    chains = _param_chains(model_ir, set(params))
    _optimize(program, set(params) | set(folded))
    model_ir = program.model
    passes.fix_mixed_float_inputs(model_ir)  # the optimizer can expose new ones
    passes.drop_float64(model_ir)
    passes.bool_where_as_uint8(model_ir)
    _name_output_dims(model_ir, axes_of)
    step("optimize")
    wmap = build_weights_map(model_ir, module, params, folded, chains, spec.name, family.name, dtype_name(dtype))
    step("weights map")
    nbytes = sum(_nbytes(v) for v in model_ir.graph.initializers.values())
    if external_data is None:
        external_data = nbytes > EXTERNAL_DATA_THRESHOLD
    elif not external_data and nbytes > EXTERNAL_DATA_THRESHOLD:
        log.warning("%s: %.1f GB of weights cannot be embedded in a protobuf; writing %s", spec.name,
                    nbytes / 1e9, DATA_FILE)
        external_data = True
    model_path = out_dir / MODEL_FILE
    ir.save(model_ir, model_path, external_data=DATA_FILE if external_data else None)
    wmap.save(out_dir / WEIGHTS_MAP_FILE)
    inputs_desc, outputs_desc = io_description(model_ir, spec, axes_of)
    step("save")
    opset_used = model_ir.opset_imports.get("", None)
    # Drop the IR's references to the torch tensors: onnxscript's module-level rewrite rules
    # keep the last graph they matched on, which would hold the whole model in memory
    # during validation (and until the next export).
    for value in [*holders, *model_ir.graph.initializers.values()]:
        value.const_value = None
    model_ir.graph.initializers.clear()
    del program, model_ir
    return {
        "dir": out_dir.name,
        "model": MODEL_FILE,
        "external_data": DATA_FILE if external_data else None,
        "weights_map": WEIGHTS_MAP_FILE,
        "class": spec.class_name,
        "library": spec.library,
        "role": spec.role,
        "dtype": dtype_name(dtype),
        "opset": opset_used,
        "initializer_bytes": nbytes,
        "mapped_initializers": len(wmap),
        "inputs": inputs_desc,
        "outputs": outputs_desc,
        "export_example_shapes": {k: list(v.shape) for k, v in inputs.items()},
    }
