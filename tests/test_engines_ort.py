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


def _bf16_bits(t):
    """A torch bfloat16 tensor as an ml_dtypes bfloat16 array (same bits)."""
    import ml_dtypes
    import torch

    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)


@pytest.mark.parametrize("mode", ["inputs", "session"])
def test_bf16_graph_runs_as_an_exact_float32_copy_on_cpu(tmp_path, mode, caplog):
    """A bf16 graph (bf16 input, output, weights) on the CPU provider, which has no bf16 kernels: the engine
    runs its float32 copy, declares bf16 inputs, takes and returns bf16 weights (bits kept), and rounds the
    outputs to bf16 to nearest even, as torch does: y = x * w * s is exact in float32, so torch's bf16 result."""
    import logging

    import ml_dtypes
    import torch

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 4, generator=g).bfloat16(), torch.randn(4, generator=g).bfloat16()
    s = torch.tensor([0.5, 2.0, 4.0, -1.0]).bfloat16()  # a constant (not refittable), exact scale
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["h"]), helper.make_node("Mul", ["h", "s"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["batch", 4])],
        [numpy_helper.from_array(_bf16_bits(w), "w"), numpy_helper.from_array(_bf16_bits(s), "s")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    p = tmp_path / "bf16.onnx"
    onnx.save(m, str(p))
    with caplog.at_level(logging.INFO, logger="engines.ort"):
        e = OrtEngine(p, mode=mode, weights=["w"])
    assert e.fp32_copy and sum("exact float32 copy" in r.getMessage() for r in caplog.records) == 1
    bf16 = np.dtype(ml_dtypes.bfloat16)
    assert e.input_infos()["x"].dtype == bf16 and e.weight_info("w").dtype == bf16
    with pytest.raises(engines.InputError, match=r"input 'x': got float32 \[3, 4\], the engine takes bfloat16"):
        e.infer({"x": _bf16_bits(x).astype(np.float32)})
    want = (x.float() * w.float() * s.float()).bfloat16()
    assert ((x.float() * w.float()).view(torch.int32) & 0xFFFF).any()  # rounding happens (not truncation)
    y = e.infer({"x": _bf16_bits(x)})["y"]
    assert y.dtype == bf16 and y.tobytes() == _bf16_bits(want).tobytes()
    w2 = (w.float() * 3 + 1).bfloat16()
    with pytest.raises(WeightError, match="dtype"):
        e.set_weights({"w": _bf16_bits(w2).astype(np.float32)})
    e.set_weights({"w": _bf16_bits(w2)})
    got = e.get_weights(["w"])["w"]
    assert got.dtype == bf16 and got.tobytes() == _bf16_bits(w2).tobytes()
    want = (x.float() * w2.float() * s.float()).bfloat16()
    assert e.infer({"x": _bf16_bits(x)})["y"].tobytes() == _bf16_bits(want).tobytes()


def test_bf16_export_loads_infers_and_refits_on_cpu(tmp_path):
    """A bf16 export (tiny SD text encoder, LoRA x baked) loads on ONNX Runtime's CPU provider in both weight
    modes, agrees with the PyTorch bf16 model with x fused (the export validation's bf16 tolerance), and after
    a refit to LoRA y holds the bits of a fresh bf16 export with y and gives that export's outputs exactly."""
    import ml_dtypes
    import torch
    from refit_helpers import X_PATTERN, Y_PATTERN, differing, initializers, write_lora
    from safetensors.torch import load_file

    import export
    import refit
    from export.tiny import build_tiny
    from export.validate import TOLERANCE, compare

    models = build_tiny("sd", ["text_encoder"])
    x = write_lora(tmp_path / "x.safetensors", models, X_PATTERN, seed=11)
    y = write_lora(tmp_path / "y.safetensors", models, Y_PATTERN, seed=22)
    export.export_pipeline("sd", "tiny", loras=[(str(x), 1.0)], out_dir=tmp_path / "x", dtype="bf16",
                           components=["text_encoder"], progress=False)
    export.export_pipeline("sd", "tiny", loras=[(str(y), 1.0)], out_dir=tmp_path / "y", dtype="bf16",
                           components=["text_encoder"], validate=False, progress=False)

    # PyTorch reference: the tiny bf16 text encoder with x fused by hand (W + up @ down, scale 1).
    te = build_tiny("sd", ["text_encoder"], dtype=torch.bfloat16)["text_encoder"].eval()
    lora = load_file(str(x))
    with torch.no_grad():
        for k, down in lora.items():
            if k.endswith(".lora_A.weight"):
                name = k[len("text_encoder."):-len(".lora_A.weight")]
                if not hasattr(te, "text_model"):  # LoRA files keep CLIP's text_model level (see lora_files.pick)
                    name = name.removeprefix("text_model.")
                mod = te.get_submodule(name)
                up = lora[k.replace("lora_A", "lora_B")]
                mod.weight.copy_((mod.weight.float() + up.float() @ down.float()).bfloat16())
    ids = np.random.default_rng(5).integers(0, 1000, size=(2, 77)).astype(np.int64)
    with torch.no_grad():
        ref = te(torch.from_numpy(ids))
    names = ["last_hidden_state", "pooler_output"]
    ref = [ref.last_hidden_state.float().numpy(), ref.pooler_output.float().numpy()]

    bf16 = np.dtype(ml_dtypes.bfloat16)
    for mode in ("inputs", "session"):
        e = engines.load_engine(tmp_path / "x" / "text_encoder", mode=mode)
        assert isinstance(e, OrtEngine) and e.fp32_copy and e.output_names == names
        assert {i.dtype for i in e.weight_infos().values()} == {bf16}
        out = e.infer({"input_ids": ids})
        assert {o.dtype for o in out.values()} == {bf16}
        result = compare([out[n] for n in names], ref, names, TOLERANCE["bfloat16"])
        assert result["passed"], result
        refit.Refitter(e).load_lora(str(y), adapter_name="y")
        fresh = tmp_path / "y" / "text_encoder"
        want = initializers(fresh / "model.onnx", e.weight_names())
        assert differing(e.get_weights(), want) == []
        fresh_out = engines.load_engine(fresh, mode=mode).infer({"input_ids": ids})
        for n in names:
            assert out[n].tobytes() != fresh_out[n].tobytes()  # the refit changed something
            assert e.infer({"input_ids": ids})[n].tobytes() == fresh_out[n].tobytes(), (mode, n)


def test_a_bf16_round_trip_is_rounding_not_a_bf16_graph(tmp_path):
    """A float32 graph that rounds through bfloat16 and back (Kandinsky 5's attention) runs as it is, rounding
    as torch does; a graph that computes on the bfloat16 values is a bfloat16 graph."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from engines.onnx_utils import computes_in_bf16

    def graph(second: str):
        nodes = [helper.make_node("Cast", ["x"], ["b"], to=TensorProto.BFLOAT16)]
        nodes += ([helper.make_node("Cast", ["b"], ["y"], to=TensorProto.FLOAT)] if second == "cast" else
                  [helper.make_node("Add", ["b", "b"], ["c"]), helper.make_node("Cast", ["c"], ["y"], to=TensorProto.FLOAT)])
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])

    rounding, computing = graph("cast"), graph("add")
    assert not computes_in_bf16(rounding) and computes_in_bf16(computing)
    x = torch.randn(64)
    sess = ort.InferenceSession(rounding.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy()})[0]
    np.testing.assert_array_equal(got, x.bfloat16().float().numpy())
    assert not np.array_equal(got, x.numpy())
    onnx.checker.check_model(rounding)
