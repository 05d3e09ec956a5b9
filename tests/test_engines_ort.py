"""OrtEngine on a hand-built graph: both weight modes, atomic set_weights, external data, load_engine."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import engines
from engines import EngineError, OrtEngine, WeightError

RNG = np.random.default_rng(0)
W = RNG.standard_normal((8, 6)).astype(np.float32)  # MatMul operand (in, out): a transposed Linear weight
B = RNG.standard_normal(6).astype(np.float32)
K = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)  # Conv weight
N = RNG.standard_normal(6).astype(np.float32)  # not refittable (a norm, say)


def make_dir(tmp_path, external=False):
    nodes = [
        helper.make_node("MatMul", ["x", "lin.weight.T"], ["h"]),
        helper.make_node("Add", ["h", "lin.bias"], ["h2"]),
        helper.make_node("Mul", ["h2", "norm"], ["y"]),
        helper.make_node("Conv", ["img", "conv.weight"], ["z"], pads=[1, 1, 1, 1]),
    ]
    inits = [numpy_helper.from_array(W, "lin.weight.T"), numpy_helper.from_array(B, "lin.bias"),
             numpy_helper.from_array(N, "norm"), numpy_helper.from_array(K, "conv.weight")]
    g = helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
                           helper.make_tensor_value_info("img", TensorProto.FLOAT, ["batch", 3, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6]),
                           helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4, 5, 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    d = tmp_path / "comp"
    d.mkdir()
    if external:
        onnx.save(m, str(d / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx.data", size_threshold=0)
    else:
        onnx.save(m, str(d / "model.onnx"))

    def entry(param, transform, shape, pshape, perm=None):
        e = {"param": param, "transform": transform, "shape": shape, "dtype": "float32", "param_shape": pshape,
             "param_dtype": "float32"}
        if perm:
            e["perm"] = perm
        return e

    wmap = {"format": "lora-engines.weights_map", "version": 1, "component": "unet", "family": "sd",
            "dtype": "float32", "model": "model.onnx", "entries": {
                "lin.weight.T": entry("lin.weight", "transpose", [8, 6], [6, 8], [1, 0]),
                "lin.bias": entry("lin.bias", "identity", [6], [6]),
                "conv.weight": entry("conv.weight", "identity", [4, 3, 3, 3], [4, 3, 3, 3])}}
    (d / "weights_map.json").write_text(json.dumps(wmap))
    return d


def feeds(batch=2):
    return {"x": RNG.standard_normal((batch, 8)).astype(np.float32),
            "img": RNG.standard_normal((batch, 3, 5, 5)).astype(np.float32)}


def expected(f, w=W, b=B, k=K):
    import torch

    y = (f["x"] @ w + b) * N
    z = torch.nn.functional.conv2d(torch.from_numpy(f["img"]), torch.from_numpy(k), padding=1).numpy()
    return y, z


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("mode", ["inputs", "session"])
@pytest.mark.parametrize("external", [False, True])
def test_modes_infer_and_swap(tmp_path, mode, external):
    d = make_dir(tmp_path, external)
    before = {p.name: digest(p) for p in d.iterdir()}
    e = engines.load_engine(d, mode=mode)
    assert isinstance(e, OrtEngine) and e.mode == mode
    assert e.input_names == ["x", "img"] and e.output_names == ["y", "z"]
    assert e.weight_names() == ["lin.weight.T", "lin.bias", "conv.weight"]  # graph order, norm excluded
    f = feeds()
    out = e.infer(f)
    y, z = expected(f)
    np.testing.assert_allclose(out["y"], y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["z"], z, rtol=1e-5, atol=1e-5)
    w2, k2 = (W * 2).astype(np.float32), (K - 1).astype(np.float32)
    session = e.session
    e.set_weights({"lin.weight.T": w2, "conv.weight": k2})
    assert (e.session is session) == (mode == "inputs")  # inputs mode: no new session
    out = e.infer(f)
    y, z = expected(f, w=w2, k=k2)
    np.testing.assert_allclose(out["y"], y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["z"], z, rtol=1e-5, atol=1e-5)
    w2[:] = 0  # set_weights copied the caller's array
    np.testing.assert_allclose(e.infer(f)["y"], y, rtol=1e-5, atol=1e-5)
    w2 = (W * 2).astype(np.float32)
    got = e.get_weights(["lin.weight.T", "lin.bias"])
    assert np.array_equal(got["lin.weight.T"], w2) and np.array_equal(got["lin.bias"], B)
    got["lin.bias"][:] = 0  # get_weights returns copies
    assert np.array_equal(e.get_weights(["lin.bias"])["lin.bias"], B)
    # Variable batch still works after a swap.
    assert e.infer(feeds(batch=1))["y"].shape == (1, 6)
    # The files on disk were never modified.
    assert {p.name: digest(p) for p in d.iterdir()} == before


def test_set_weights_validates_everything_first(tmp_path):
    e = engines.load_engine(make_dir(tmp_path))
    f = feeds()
    out = e.infer(f)
    for bad, msg in [
        ({"lin.weight.T": W * 2, "norm": N}, "not a refittable"),
        ({"lin.weight.T": W * 2, "lin.bias": np.zeros(7, np.float32)}, "shape"),
        ({"lin.weight.T": W * 2, "lin.bias": B.astype(np.float16)}, "dtype"),
        ({"lin.weight.T": W * 2, "lin.bias": list(B)}, "numpy"),
    ]:
        with pytest.raises(WeightError, match=msg):
            e.set_weights(bad)
        np.testing.assert_array_equal(e.infer(f)["y"], out["y"])


def test_infer_input_errors(tmp_path):
    e = engines.load_engine(make_dir(tmp_path))
    with pytest.raises(EngineError, match="missing"):
        e.infer({"x": feeds()["x"]})
    with pytest.raises(EngineError, match="unknown"):
        e.infer({**feeds(), "lin.weight.T": W})  # weights are not user inputs


def test_explicit_weights_and_errors(tmp_path):
    d = make_dir(tmp_path)
    e = OrtEngine(d / "model.onnx", weights=["norm"])
    assert e.weight_names() == ["norm"]
    with pytest.raises(EngineError, match="not among"):
        OrtEngine(d, weights=["nope"])
    with pytest.raises(ValueError, match="weight mode"):
        OrtEngine(d, mode="fast")
    with pytest.raises(ValueError, match="backend"):
        engines.load_engine(d, backend="tvm")
    with pytest.raises(FileNotFoundError):
        engines.load_engine(tmp_path / "nowhere")


def test_plan_only_directory_without_tensorrt(tmp_path):
    from engines.tensorrt import tensorrt_available

    if tensorrt_available():
        pytest.skip("TensorRT is available here")
    d = tmp_path / "plan_only"
    d.mkdir()
    (d / "model.plan").write_bytes(b"not a plan")
    with pytest.raises(EngineError, match="TensorRT"):
        engines.load_engine(d)
    # With the ONNX next to it, ONNX Runtime is used.
    d2 = make_dir(tmp_path)
    (d2 / "model.plan").write_bytes(b"not a plan")
    assert engines.load_engine(d2).backend == "onnxruntime"


def test_linear_only_weights(tmp_path):
    e = OrtEngine(make_dir(tmp_path), weights="linear")
    assert e.weight_names() == ["lin.weight.T", "lin.bias"]
    with pytest.raises(ValueError, match="weights="):
        OrtEngine(tmp_path / "comp", weights="convs")


@pytest.mark.parametrize("mode", ["inputs", "session"])
def test_bfloat16_weights(tmp_path, mode):
    """bf16 weights (no numpy dtype of its own: ml_dtypes) are read, validated and swapped."""
    import ml_dtypes

    w = RNG.standard_normal((2, 3)).astype(ml_dtypes.bfloat16)
    g = helper.make_graph(
        [helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT), helper.make_node("Add", ["x", "wf"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    p = tmp_path / "bf16.onnx"
    onnx.save(m, str(p))
    e = OrtEngine(p, mode=mode, weights=["w"])
    x = np.zeros((2, 3), np.float32)
    np.testing.assert_array_equal(e.infer({"x": x})["y"], w.astype(np.float32))
    assert e.weight_info("w").dtype == np.dtype(ml_dtypes.bfloat16)
    w2 = (w.astype(np.float32) * 2 + 1).astype(ml_dtypes.bfloat16)
    with pytest.raises(WeightError, match="dtype"):
        e.set_weights({"w": w2.astype(np.float32)})
    e.set_weights({"w": w2})
    np.testing.assert_array_equal(e.infer({"x": x})["y"], w2.astype(np.float32))
    assert e.get_weights(["w"])["w"].tobytes() == w2.tobytes()


def typed_dir(tmp_path):
    """A graph like a text encoder + timestep: int64 ids [batch, 4], float32 t [batch] -> y [batch, 4]."""
    nodes = [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["t", "axes"], ["t2"]),
             helper.make_node("Mul", ["f", "t2"], ["y"])]
    g = helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4]),
                           helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
                          [numpy_helper.from_array(np.array([1], np.int64), "axes")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    d = tmp_path / "typed"
    d.mkdir()
    onnx.save(m, str(d / "model.onnx"))
    return d


@pytest.mark.parametrize("mode", ["inputs", "session"])
def test_infer_checks_dtypes_ranks_and_sizes_first(tmp_path, mode):
    """A wrong input is named with what it got and what the engine takes (not ONNX Runtime's
    "Unexpected input data type", which names no input)."""
    e = engines.load_engine(typed_dir(tmp_path), mode=mode)
    infos = e.input_infos()
    assert [(n, i.dtype, i.shape) for n, i in infos.items()] == [("ids", np.dtype(np.int64), ("batch", 4)),
                                                                 ("t", np.dtype(np.float32), ("batch",))]
    ids, t = np.arange(8, dtype=np.int64).reshape(2, 4), np.array([1.0, 2.0], np.float32)
    np.testing.assert_array_equal(e.infer({"ids": ids, "t": t})["y"], ids * t[:, None])
    cases = [
        ({"ids": ids, "t": t.astype(np.float16)}, r"input 't': got float16 \[2\], the engine takes float32 \[batch\]"),
        ({"ids": ids.astype(np.int32), "t": t}, r"input 'ids': got int32 \[2, 4\], the engine takes int64 \[batch, 4\]"),
        ({"ids": ids[None], "t": t}, r"input 'ids': got int64 \[1, 2, 4\], the engine takes int64 \[batch, 4\]"),
        ({"ids": ids[:, :3], "t": t}, r"input 'ids': got int64 \[2, 3\], the engine takes int64 \[batch, 4\]"),
        ({"ids": ids, "t": t[:1]}, r"axis 'batch' is 2 in 'ids' but 1 in 't'"),
        ({"ids": ids}, r"input 't' is missing \(the engine takes ids int64 \[batch, 4\], t float32 \[batch\]\)"),
        ({"ids": ids, "t": t, "x": t}, r"unknown input 'x'"),
    ]
    for feeds, msg in cases:
        with pytest.raises(engines.InputError, match=msg) as err:
            e.infer(feeds)
        assert isinstance(err.value, EngineError) and isinstance(err.value, ValueError)
        assert "Unexpected input data type" not in str(err.value)


def test_tensorrt_inputs_are_described_from_the_plan_and_the_manifest(tmp_path):
    """TensorRTEngine's input check (shared with ORT) without a GPU: dtypes and sizes from the plan,
    the names of its dynamic (-1) dimensions from the export's manifest."""
    from types import SimpleNamespace

    from engines.base import check_feeds
    from engines.manifest import Manifest
    from engines.tensorrt import TensorRTEngine

    comp = tmp_path / "text_encoder"
    comp.mkdir()
    Manifest.new(family="sd", components={"text_encoder": {
        "dir": "text_encoder", "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", 77]}]}}).write(tmp_path)
    plan = SimpleNamespace(get_tensor_dtype=lambda n: SimpleNamespace(name="INT64"), get_tensor_shape=lambda n: (-1, 77))
    fake = SimpleNamespace(directory=comp, _inputs=["input_ids"], _engine=plan)
    infos = TensorRTEngine._describe_inputs(fake)
    assert [(i.name, i.dtype, i.shape) for i in infos.values()] == [("input_ids", np.dtype(np.int64), ("batch", 77))]
    with pytest.raises(engines.InputError, match=r"input 'input_ids': got int32 \[1, 77\], the engine takes int64 \[batch, 77\]"):
        check_feeds(infos, {"input_ids": np.zeros((1, 77), np.int32)})
