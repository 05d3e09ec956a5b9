"""The torch engine (backend="torch"): export --torch, infer like ONNX Runtime, refit in place.

Refits through `refit.Refitter` must leave the module's parameters bit-identical to a fresh fuse
of the same adapters into a fresh base module (the mixins), and a torch.compile'd module must not
be recompiled by them (counted with dynamo's CompileCounter backend, which runs the graph eagerly).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import engines
import refit
from refit_helpers import lora_files

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def torch_export(tmp_path_factory):
    import export

    root = tmp_path_factory.mktemp("torch_engine")
    loras = lora_files(root, "sdxl")
    out = root / "sdxl_x"
    export.export_pipeline("sdxl", model="tiny", loras=[(str(loras["x"]), 1.0)], out_dir=str(out),
                           components=["unet"], validate=False, progress=False, torch=True)
    return out, loras


def _fresh(loras, names_weights):
    """A fresh tiny base UNet (the export's seed) with these adapters fused by the mixins."""
    import lora_loaders
    from export.tiny import build_tiny

    unet = build_tiny("sdxl", ["unet"])["unet"]
    if names_weights:
        loader = lora_loaders.loader_for("sdxl", unet=unet)
        for name, _ in names_weights:
            loader.load_lora_weights(str(loras[name]), adapter_name=name)
        loader.set_adapters([n for n, _ in names_weights], [w for _, w in names_weights])
    return unet


def _feeds(engine, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, info in engine.input_infos().items():
        dims = [d if isinstance(d, int) else (16 if name == "sample" and k >= 2 else (2 if k == 0 else 8))
                for k, d in enumerate(info.shape)]
        if name == "timestep":
            out[name] = np.full(dims, 500.0, dtype=info.dtype)
        else:
            out[name] = rng.standard_normal(dims).astype(info.dtype)
    return out


def _mapped_differences(engine, module) -> list[str]:
    params = dict(module.named_parameters())
    mine = dict(engine.model.named_parameters())
    return [p for p in engine.map.entries
            if not torch.equal(mine[p].detach().view(-1).view(torch.int32 if mine[p].element_size() == 4
                                                                 else torch.int16),
                               params[p].detach().view(-1).view(torch.int32 if params[p].element_size() == 4
                                                                  else torch.int16))]


def test_export_torch_writes_save_pretrained_layout_and_infers_like_ort(torch_export):
    out, _ = torch_export
    tdir = out / "unet" / "torch"
    assert (tdir / "config.json").is_file() and any(tdir.glob("*.safetensors")) and (tdir / "torch_model.json").is_file()
    te = engines.load_engine(out / "unet", backend="torch")
    ort = engines.load_engine(out / "unet", backend="onnxruntime")
    assert te.input_names == ort.input_names and te.output_names[0] == ort.output_names[0]
    assert set(te.weight_names()) == set(ort.weight_names())
    feeds = _feeds(te)
    a, b = te.infer(feeds), ort.infer(feeds)
    name = te.output_names[0]
    np.testing.assert_allclose(a[name], b[name], rtol=1e-3, atol=1e-4)


def test_refit_in_place_is_a_fresh_fuse(torch_export):
    out, loras = torch_export
    engine = engines.load_engine(out / "unet", backend="torch")
    assert _mapped_differences(engine, _fresh(loras, [("x", 1.0)])) == []  # the export's state
    ptrs = {n: p.data_ptr() for n, p in engine.model.named_parameters()}
    r = refit.Refitter(engine)
    assert r.get_active_adapters() == ["x"]
    r.load_lora(str(loras["y"]), adapter_name="y")
    assert _mapped_differences(engine, _fresh(loras, [("y", 1.0)])) == []
    r.set_adapters(["x", "y"], [0.5, 1.0])
    assert _mapped_differences(engine, _fresh(loras, [("x", 0.5), ("y", 1.0)])) == []
    r.set_adapters([])
    assert _mapped_differences(engine, _fresh(loras, [])) == []
    assert {n: p.data_ptr() for n, p in engine.model.named_parameters()} == ptrs  # in place
    assert r.last_refit["weights"] > 0


def test_numpy_set_weights_is_atomic_and_in_the_initializer_layout(torch_export):
    out, _ = torch_export
    engine = engines.load_engine(out / "unet", backend="torch")
    names = engine.weight_names()[:3]
    before = engine.get_weights(names)
    new = {n: (a + 1).astype(a.dtype) for n, a in before.items()}
    bad = dict(new)
    bad[names[-1]] = bad[names[-1]][..., :1]  # wrong shape: nothing may be written
    with pytest.raises(engines.WeightError):
        engine.set_weights(bad)
    assert all(np.array_equal(engine.get_weights([n])[n], before[n]) for n in names)
    engine.set_weights(new)
    assert all(np.array_equal(engine.get_weights([n])[n], new[n]) for n in names)


def test_rollback_on_a_failing_write(torch_export, monkeypatch):
    out, _ = torch_export
    engine = engines.load_engine(out / "unet", backend="torch")
    names = [engine._by_init[n] for n in engine.weight_names()[:3]]
    params = dict(engine.model.named_parameters())
    before = {p: params[p].detach().clone() for p in names}
    values = {p: before[p] + 1 for p in names}
    calls = {"n": 0}
    real_copy = torch.Tensor.copy_

    def flaky(self, src, *a, **k):  # the third write fails
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected device fault")
        return real_copy(self, src, *a, **k)

    monkeypatch.setattr(torch.Tensor, "copy_", flaky)
    with pytest.raises(engines.EngineError, match="restored"):
        engine.set_torch_weights(values)
    monkeypatch.undo()
    assert all(torch.equal(params[p], before[p]) for p in names)


def test_compiled_module_is_not_recompiled_by_refits(torch_export):
    from torch._dynamo.testing import CompileCounter

    out, loras = torch_export
    torch._dynamo.reset()
    counter = CompileCounter()
    engine = engines.load_engine(out / "unet", backend="torch", compile={"backend": counter})
    plain = engines.load_engine(out / "unet", backend="torch")
    feeds = _feeds(engine, 1)
    name = engine.output_names[0]
    first = engine.infer(feeds)[name]
    compiled = counter.frame_count
    assert compiled >= 1
    r, rp = refit.Refitter(engine), refit.Refitter(plain)
    for step in (lambda x: x.load_lora(str(loras["y"]), adapter_name="y"), lambda x: x.set_adapters(["x", "y"], [1.0, 0.5]),
                 lambda x: x.set_adapters([])):
        step(r)
        step(rp)
        got = engine.infer(feeds)[name]
        assert np.array_equal(got, plain.infer(feeds)[name])  # the compiled graph sees the new weights
        assert not np.array_equal(got, first)
    assert counter.frame_count == compiled  # refits did not recompile
    torch._dynamo.reset()


def test_gpu_check_cpu_smoke():
    """bench/gpu_check.py --cpu: every step runs; refits are fresh fuses and nothing recompiles."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--cpu"])
    assert out["torch_engine"]["bit_identical"] and out["torch_engine"]["recompiles"] == 0
    assert all(status in ("ok", "skip", "") for _, _, status in out["rows"])
