"""Our TensorRT call plan, checked against a RECORDING TEST DOUBLE of the `tensorrt` module.

Nothing here is a TensorRT result: `FakeTensorRT` is a stand-in object injected as `tensorrt`
that records the calls our code makes (builder flags by TensorRT major version, the initializers
marked refittable, the order of refit calls on failure and rollback). Real TensorRT runs in
tests/test_engines_tensorrt.py and bench/gpu_check.py where a GPU and TensorRT are present.
"""

from __future__ import annotations

import sys
import threading
import types

import numpy as np
import pytest
import torch

from engines import tensorrt as trt_engine
from engines.base import EngineError, WeightError, WeightInfo


class FakeTensorRT(types.ModuleType):
    """TEST DOUBLE of the tensorrt module: records calls, builds nothing."""

    def __init__(self, major: int):
        super().__init__("tensorrt")
        self.__version__ = f"{major}.0.0-test-double"
        flags = ["REFIT", "STRIP_PLAN", "REFIT_IDENTICAL", "REFIT_INDIVIDUAL", "TF32"]
        if major < 11:
            flags += ["FP16", "BF16", "INT8"]  # weak typing: gone in TensorRT 11
        self.BuilderFlag = types.SimpleNamespace(**{f: f for f in flags})
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED="STRONGLY_TYPED")
        self.TensorLocation = types.SimpleNamespace(DEVICE="DEVICE", HOST="HOST")
        self.DataType = types.SimpleNamespace(**{n: n for n in ("FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64",
                                                                 "BOOL", "UINT8")})
        self.calls: list = []

    def Weights(self, dtype, ptr, count):
        self.calls.append(("Weights", dtype, count))
        return ("weights", dtype, ptr, count)


class FakeNetwork:
    """TEST DOUBLE of INetworkDefinition: names it accepts as weights, and what was marked."""

    def __init__(self, weights):
        self.weights, self.marked = set(weights), []

    def mark_weights_refittable(self, name):
        self.marked.append(name)
        return name in self.weights


def test_refit_flags_individual_where_available():
    fake = FakeTensorRT(10)
    net = FakeNetwork(["a.weight.T", "b.weight"])
    flags, marked = trt_engine.refit_flags(fake, net, ["a.weight.T", "b.weight", "folded"])
    assert flags == ["REFIT_INDIVIDUAL"]
    assert net.marked == ["a.weight.T", "b.weight", "folded"]  # every mapped initializer, in map order
    assert marked == ["a.weight.T", "b.weight"]  # the folded one could not be marked


def test_refit_flags_fall_back_to_refit_without_individual():
    fake = FakeTensorRT(10)
    del fake.BuilderFlag.REFIT_INDIVIDUAL  # TensorRT < 10.2
    net = FakeNetwork(["a"])
    flags, marked = trt_engine.refit_flags(fake, net, ["a", "b"])
    assert flags == ["REFIT"] and net.marked == [] and marked == ["a", "b"]


@pytest.mark.parametrize("major", [10, 11])
def test_flags_are_looked_up_by_name_per_major(monkeypatch, major):
    fake = FakeTensorRT(major)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    assert trt_engine.trt_major() == major
    assert trt_engine.builder_flag("REFIT_INDIVIDUAL") == "REFIT_INDIVIDUAL"
    assert trt_engine.builder_flag("STRIP_PLAN") == "STRIP_PLAN"
    if major >= 11:
        with pytest.raises(EngineError, match="no BuilderFlag.FP16"):
            trt_engine.builder_flag("FP16")
    else:
        assert trt_engine.builder_flag("FP16") == "FP16"


class FakeRefitter:
    """TEST DOUBLE of trt.Refitter: records set_named_weights / refit calls; can fail the first refit."""

    def __init__(self, log, fail_first_refit=False, reject=()):
        self.log, self.fail, self.reject = log, fail_first_refit, set(reject)

    def set_named_weights(self, name, weights, location):  # a rejected name is rejected once
        self.log.append(("set", name, location, weights[3]))
        if name in self.reject:
            self.reject.discard(name)
            return False
        return True

    def get_missing_weights(self):
        return []

    def refit_cuda_engine_async(self, stream):
        self.log.append(("refit",))
        if self.fail:
            self.fail = False
            return False
        return True


class FakeStream:
    cuda_stream = 0

    def synchronize(self):
        pass


def _engine(monkeypatch, refitter):
    fake = FakeTensorRT(11)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    e = object.__new__(trt_engine.TensorRTEngine)  # no plan, no GPU: only the weight plumbing
    e.device = torch.device("cpu")
    e._lock = threading.RLock()
    e._refitter = refitter
    e._stream = FakeStream()
    e._infos = {"a": WeightInfo("a", (2, 3), np.dtype(np.float16)), "b": WeightInfo("b", (4,), np.dtype(np.float16))}
    e._device_values = {"a": torch.zeros(2, 3, dtype=torch.float16), "b": torch.zeros(4, dtype=torch.float16)}
    e.model_path = None
    return e


def test_refit_failure_sets_the_previous_values_again(monkeypatch):
    log = []
    e = _engine(monkeypatch, FakeRefitter(log, fail_first_refit=True))
    old_a, old_b = e._device_values["a"], e._device_values["b"]
    new = {"a": torch.ones(2, 3, dtype=torch.float16), "b": torch.ones(4, dtype=torch.float16)}
    with pytest.raises(EngineError, match="previous weights restored"):
        e.set_device_weights(new)
    # rollback order: the new values, a refit (fails), the previous values, a refit
    assert [c[0] for c in log] == ["set", "set", "refit", "set", "set", "refit"]
    assert [c[1] for c in log if c[0] == "set"] == ["a", "b", "a", "b"]
    assert all(c[2] == "DEVICE" for c in log if c[0] == "set")
    assert e._device_values["a"] is old_a and e._device_values["b"] is old_b  # still the old ones
    log.clear()
    e.set_device_weights(new)
    assert [c[0] for c in log] == ["set", "set", "refit"] and e._device_values["a"] is new["a"]


def test_rejected_weights_and_wrong_dtypes_leave_the_engine_unchanged(monkeypatch):
    log = []
    e = _engine(monkeypatch, FakeRefitter(log, reject={"b"}))
    with pytest.raises(WeightError, match="float32"):
        e.set_device_weights({"a": torch.ones(2, 3)})  # float32 for a float16 weight: refused before any call
    assert log == []
    new = {"a": torch.ones(2, 3, dtype=torch.float16), "b": torch.ones(4, dtype=torch.float16)}
    with pytest.raises(EngineError, match="restored"):
        e.set_device_weights(new)
    # b rejected: no refit with the new values; the previous ones are set again and refitted
    assert [c[:2] for c in log] == [("set", "a"), ("set", "b"), ("set", "a"), ("set", "b"), ("refit",)]
    assert e._device_values["a"] is not new["a"]


def test_build_plan_records_flags_with_polygraphy(monkeypatch, tmp_path):
    """build_plan composes Polygraphy's loaders; their TensorRT calls are replaced by recording doubles."""
    import polygraphy.backend.trt as pt

    fake = FakeTensorRT(11)
    fake.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    net = FakeNetwork(["w1", "w2"])
    seen = {}

    class FakeNetworkFromOnnxPath:  # TEST DOUBLE of the Polygraphy loader
        def __init__(self, path, strongly_typed=None):
            seen["onnx"], seen["strongly_typed"] = path, strongly_typed

        def __call__(self):
            return "builder", net, "parser"

    class FakeProfile(dict):
        def add(self, name, lo, opt, hi):
            self[name] = (lo, opt, hi)
            return self

    class FakeConfigObj:
        def __init__(self):
            self.flags = []

        def set_flag(self, f):
            self.flags.append(f)

    def fake_create_config(**kw):
        seen["config_kwargs"] = kw
        return lambda builder, network: FakeConfigObj()

    def fake_postprocess(config, func):
        def make(builder, network):
            c = config(builder, network)
            func(builder, network, c)
            seen["flags"] = c.flags
            return c
        return make

    class FakeEngineBytes:
        def __init__(self, network, config=None, save_timing_cache=None):
            seen["cache"] = save_timing_cache
            self.network, self.config = network, config

        def __call__(self):
            self.config(self.network[0], self.network[1])
            return b"plan-bytes-from-a-test-double"

    monkeypatch.setattr(pt, "NetworkFromOnnxPath", FakeNetworkFromOnnxPath)
    monkeypatch.setattr(pt, "CreateConfig", fake_create_config)
    monkeypatch.setattr(pt, "PostprocessConfig", fake_postprocess)
    monkeypatch.setattr(pt, "EngineBytesFromNetwork", FakeEngineBytes)
    monkeypatch.setattr(pt, "Profile", FakeProfile)
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"")
    plan = trt_engine.build_plan(onnx_path, refittable=["w1", "w2"], profiles={"sample": ((1, 4), (2, 4), (4, 4))},
                                 strip_plan=True, timing_cache=tmp_path / "timing.cache")
    assert plan.read_bytes() == b"plan-bytes-from-a-test-double"
    assert seen["strongly_typed"] is True and net.marked == ["w1", "w2"]
    assert seen["flags"] == ["REFIT_INDIVIDUAL"]
    assert seen["config_kwargs"]["strip_plan"] is True
    assert seen["config_kwargs"]["profiles"][0] == {"sample": ((1, 4), (2, 4), (4, 4))}
    assert seen["cache"] == str(tmp_path / "timing.cache")
    info = trt_engine.build_plan.last_info
    assert info["tensorrt"].startswith("11.") and "STRIP_PLAN" in info["flags"] and info["refittable"] == 2
    with pytest.raises(EngineError, match="could not be refitted"):
        trt_engine.build_plan(onnx_path, refittable=["w1", "folded_away"])


class FakeOnnxParserRefitter:
    """TEST DOUBLE of trt.OnnxParserRefitter: records which file it was asked to read weights from."""

    def __init__(self, refitter, logger):
        self.refitter = refitter
        refitter.log.append(("OnnxParserRefitter", logger))

    def refit_from_file(self, path):
        self.refitter.log.append(("refit_from_file", path))
        return True


def test_stripped_plan_is_filled_from_its_onnx_before_use(monkeypatch, tmp_path):
    log = []
    e = _engine(monkeypatch, FakeRefitter(log))
    sys.modules["tensorrt"].OnnxParserRefitter = FakeOnnxParserRefitter
    e._logger, e.directory = "logger", tmp_path
    e.model_path = tmp_path / "model.onnx"
    e._fill_stripped()
    # every refittable weight read from the ONNX the plan was built from, then one refit
    assert log == [("OnnxParserRefitter", "logger"), ("refit_from_file", str(tmp_path / "model.onnx")), ("refit",)]
    e.model_path = None
    with pytest.raises(EngineError, match="STRIP_PLAN.*model.onnx"):
        e._fill_stripped()
    del sys.modules["tensorrt"].OnnxParserRefitter  # an old TensorRT: a clear error, not an AttributeError
    e.model_path = tmp_path / "model.onnx"
    with pytest.raises(EngineError, match="no OnnxParserRefitter"):
        e._fill_stripped()


def test_plan_info_comes_from_the_manifest(tmp_path):
    """The flags the export recorded (STRIP_PLAN among them) are what the engine reads back."""
    from engines.manifest import Manifest

    comp = tmp_path / "unet"
    comp.mkdir()
    m = Manifest.new(family="sdxl", dtype="fp16", model="tiny", axes={}, adapters=[], validation_errors={},
                     versions={}, created="now")
    m.components["unet"] = {"dir": "unet", "model": "model.onnx", "inputs": [],
                            "tensorrt": {"plan": "model.plan", "tensorrt": "10.9.0", "gpu": "H200",
                                         "flags": ["REFIT_INDIVIDUAL", "STRIP_PLAN", "STRONGLY_TYPED"]}}
    m.write(tmp_path)
    e = object.__new__(trt_engine.TensorRTEngine)
    e.directory = comp
    info = e._plan_info()
    assert info["flags"] == ["REFIT_INDIVIDUAL", "STRIP_PLAN", "STRONGLY_TYPED"] and info["gpu"] == "H200"


def test_build_engines_records_plan_profiles_and_flags_in_the_manifest(monkeypatch, tmp_path):
    """export --tensorrt [--strip-plan]: one build per component, profiles from the family's axes, and
    the manifest entry records what the build reports (build_plan replaced by a recording double)."""
    import engines.tensorrt as et
    import export.tensorrt as xt
    from engines.manifest import Manifest
    from lora_loaders.families import get_family

    calls = []

    def recording_build_plan(onnx_path, profiles=None, strip_plan=False, timing_cache=None, **kw):  # TEST DOUBLE
        calls.append({"onnx": onnx_path, "profiles": profiles, "strip_plan": strip_plan, "cache": timing_cache})
        et.build_plan.last_info = {"tensorrt": "10.9.0-test-double", "gpu": "test-double GPU",
                                   "flags": ["REFIT_INDIVIDUAL", "STRIP_PLAN", "STRONGLY_TYPED"], "refittable": 7,
                                   "timing_cache": str(timing_cache)}
        return onnx_path.with_name("model.plan")

    monkeypatch.setattr(xt, "check_available", lambda: None)
    monkeypatch.setattr(et, "build_plan", recording_build_plan)
    family = get_family("sd")
    axes = {n: {"min": a.min, "opt": a.opt, "max": a.max} for n, a in family.axes.items()}
    m = Manifest.new(family="sd", dtype="fp16", model="tiny", axes=axes, adapters=[], validation_errors={},
                     versions={}, created="now")
    m.components["unet"] = {"dir": "unet", "model": "model.onnx",
                            "inputs": [{"name": "sample", "shape": ["batch", 4, "height", "width"]},
                                       {"name": "timestep", "shape": ["batch"]}]}
    xt.build_engines(tmp_path, m, family, strip_plan=True)
    assert len(calls) == 1 and calls[0]["strip_plan"] is True and calls[0]["onnx"] == tmp_path / "unet" / "model.onnx"
    b, h = family.axes["batch"], family.axes["height"]
    assert calls[0]["profiles"]["sample"][2] == (b.max, 4, h.max, family.axes["width"].max)
    rec = m.components["unet"]["tensorrt"]
    assert rec["plan"] == "model.plan" and rec["tensorrt"] == "10.9.0-test-double" and rec["gpu"] == "test-double GPU"
    assert "STRIP_PLAN" in rec["flags"] and rec["refittable"] == 7 and "timing_cache" not in rec
    assert rec["profiles"]["timestep"] == [[b.min], [b.opt], [b.max]]
