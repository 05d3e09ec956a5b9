"""Validation of an exported component: ONNX Runtime against the PyTorch model it came from.

Error metric per output: `rel_err = max|onnx - torch| / max|torch|` over seeded random
inputs (at a shape other than the export example's, so the dynamic axes are exercised).
Tolerances by dtype: `TOLERANCE`. bfloat16: ONNX Runtime on CPU lacks most bfloat16
kernels, so the graph's float types are checked to be bfloat16, then the graph is cast to
float32 (exact for the weights) and compared with the torch model cast to float32.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lora_loaders import dtypes

log = logging.getLogger(__name__)

TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-2}


class ExportValidationError(RuntimeError):
    """ONNX Runtime disagrees with PyTorch beyond the dtype's tolerance."""


def compare(onnx_outputs: list, torch_outputs: list, names: list[str], tol: float) -> dict:
    result = {"tolerance": tol, "outputs": {}, "passed": True}
    for name, o, r in zip(names, onnx_outputs, torch_outputs):
        o = np.asarray(o, dtype=np.float32)
        r = np.asarray(r, dtype=np.float32)
        if o.shape != r.shape:
            result["outputs"][name] = {"error": f"shape {list(o.shape)} vs torch {list(r.shape)}"}
            result["passed"] = False
            continue
        finite = bool(np.isfinite(o).all())
        max_abs = float(np.abs(o - r).max()) if o.size else 0.0
        scale = float(np.abs(r).max()) if r.size else 0.0
        rel = max_abs / max(scale, 1e-12)
        ok = finite and rel <= tol
        result["outputs"][name] = {"max_abs_err": max_abs, "rel_err": rel, "ref_max_abs": scale, "finite": finite,
                                   "passed": ok}
        result["passed"] &= ok
    return result


def float_types(model_path: Path) -> dict:
    """{"inputs": {name: dtype}, "outputs": ..., "initializers": {dtype: count}} of float tensors."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    name = dtypes.name
    inits: dict[str, int] = {}
    for t in m.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            k = name(t.data_type)
            inits[k] = inits.get(k, 0) + 1
    return {
        "inputs": {i.name: name(i.type.tensor_type.elem_type) for i in m.graph.input},
        "outputs": {o.name: name(o.type.tensor_type.elem_type) for o in m.graph.output},
        "initializers": inits,
    }


def _bf16_to_fp32_model(model_path: Path, work_dir: Path) -> Path:
    """A float32 copy of a bfloat16 graph (weights cast exactly), for ONNX Runtime on CPU: the
    conversion engines.OrtEngine runs bfloat16 exports with on CPU (`engines.onnx_utils.bf16_to_fp32`)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor

    from engines.onnx_utils import bf16_to_fp32

    model = onnx.load(str(model_path), load_external_data=False)  # external data read tensor by tensor
    bf16_to_fp32(model, base_dir=model_path.parent)
    for t in model.graph.initializer:  # the float32 ones left: inline (the copy is saved elsewhere)
        if t.data_location == onnx.TensorProto.EXTERNAL:
            load_external_data_for_tensor(t, str(model_path.parent))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
    out = work_dir / "model.fp32-check.onnx"
    onnx.save(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=out.name + ".data",
              size_threshold=1024)
    return out


def run_onnxruntime(model_path: Path, feeds: dict) -> list:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # Keep memory at about one copy of the weights: no prepacked duplicates, no layout
    # transforms or fp16->fp32 weight copies from the extended / layout optimizers (at
    # ORT_ENABLE_ALL a real fp16 UNet costs ~5x its weights on CPU, at BASIC ~1x).
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.enable_cpu_mem_arena = False
    # fp16 MatMul / Conv run through inserted Casts on CPU; the default order runs every
    # Cast(weight) first (they only depend on initializers), holding all fp32 copies at once.
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    so.add_session_config_entry("session.disable_prepacking", "1")
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    try:
        return sess.run(None, feeds)
    finally:
        del sess


def validate_onnx(model_path: Path, dtype: str, feeds: dict, torch_outputs: list, output_names: list[str],
                  work_dir: Path) -> dict:
    """Compare ONNX Runtime's outputs with torch's; returns the manifest's validation entry."""
    tol = TOLERANCE[dtype]
    result: dict = {}
    path = model_path
    tmp = None
    if dtype == "bfloat16":
        types = float_types(model_path)
        result["graph_float_types"] = types
        wrong = [n for n, t in types["outputs"].items() if t != "bfloat16"]
        wrong += [k for k in types["initializers"] if k not in ("bfloat16", "float32")]
        if wrong:
            raise ExportValidationError(f"{model_path}: bfloat16 export has non-bfloat16 tensors: {wrong}")
        tmp = work_dir / "_check"
        tmp.mkdir(exist_ok=True)
        path = _bf16_to_fp32_model(model_path, tmp)
        feeds = {k: (v.astype(np.float32) if v.dtype.name == "bfloat16" else v) for k, v in feeds.items()}
        result["compared_as"] = "float32 copy of the bfloat16 graph vs torch model cast to float32"
    try:
        outs = run_onnxruntime(path, feeds)
    finally:
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    result.update(compare(outs, torch_outputs, output_names, tol))
    result["input_shapes"] = {k: list(v.shape) for k, v in feeds.items()}
    return result
