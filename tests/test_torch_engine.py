"""The torch engine (backend="torch"): export --torch, infer like ONNX Runtime, refit in place.

Refits through `refit.Refitter` must leave the module's parameters bit-identical to a fresh fuse
of the same adapters into a fresh base module (the mixins), and a torch.compile'd module must not
be recompiled by them (counted with dynamo's CompileCounter backend, which runs the graph eagerly).

The component is the tiny SDXL text encoder (CLIP): the same engine code as a UNet, with an export
and a dynamo trace of seconds instead of minutes (bench/gpu_check.py --cpu, test_gpu_check_cpu_smoke,
marked slow, runs the tiny UNet). Adapters x and y target different layers of it (y is no subset of x).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from refit_helpers import lora_files

import engines
import refit

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

COMPONENT = "text_encoder"


@pytest.fixture(scope="module")
def torch_export(tmp_path_factory):
    import export

    root = tmp_path_factory.mktemp("torch_engine")
    loras = lora_files(root, "sdxl")
    out = root / "sdxl_x"
    export.export_pipeline("sdxl", model="tiny", loras=[(str(loras["x"]), 1.0)], out_dir=str(out),
                           components=[COMPONENT], validate=False, progress=False, torch=True)
    return out, loras


def _fresh(loras, names_weights):
    """A fresh tiny base component (the export's seed) with these adapters fused by the mixins."""
    import lora_loaders
    from export.tiny import build_tiny

    module = build_tiny("sdxl", [COMPONENT])[COMPONENT]
    if names_weights:
        loader = lora_loaders.loader_for("sdxl", **{COMPONENT: module})
        for name, _ in names_weights:
            loader.load_lora_weights(str(loras[name]), adapter_name=name)
        loader.set_adapters([n for n, _ in names_weights], [w for _, w in names_weights])
    return module


def _feeds(engine, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, info in engine.input_infos().items():
        dims = [d if isinstance(d, int) else (16 if name == "sample" and k >= 2 else (2 if k == 0 else 8))
                for k, d in enumerate(info.shape)]
        if name == "timestep":
            out[name] = np.full(dims, 500.0, dtype=info.dtype)
        elif np.issubdtype(info.dtype, np.integer):  # token ids
            out[name] = rng.integers(0, engine.model.config.vocab_size, dims).astype(info.dtype)
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
    tdir = out / COMPONENT / "torch"
    assert (tdir / "config.json").is_file() and any(tdir.glob("*.safetensors")) and (tdir / "torch_model.json").is_file()
    te = engines.load_engine(out / COMPONENT, backend="torch")
    ort = engines.load_engine(out / COMPONENT, backend="onnxruntime")
    assert te.input_names == ort.input_names and te.output_names[0] == ort.output_names[0]
    assert set(te.weight_names()) == set(ort.weight_names())
    feeds = _feeds(te)
    a, b = te.infer(feeds), ort.infer(feeds)
    name = te.output_names[0]
    np.testing.assert_allclose(a[name], b[name], rtol=1e-3, atol=1e-4)


def test_refit_in_place_is_a_fresh_fuse(torch_export):
    out, loras = torch_export
    engine = engines.load_engine(out / COMPONENT, backend="torch")
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
    engine = engines.load_engine(out / COMPONENT, backend="torch")
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
    engine = engines.load_engine(out / COMPONENT, backend="torch")
    inits = engine.weight_names()[:3]
    names = [engine._by_init[n] for n in inits]
    params = dict(engine.model.named_parameters())
    before = {p: params[p].detach().clone() for p in names}
    values = {n: before[p] + 1 for n, p in zip(inits, names)}  # by initializer name, in the parameter's layout
    calls = {"n": 0}
    real_copy = torch.Tensor.copy_

    def flaky(self, src, *a, **k):  # the third write fails
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected device fault")
        return real_copy(self, src, *a, **k)

    monkeypatch.setattr(torch.Tensor, "copy_", flaky)
    with pytest.raises(engines.EngineError, match="restored"):
        engine.set_device_weights(values)
    monkeypatch.undo()
    assert all(torch.equal(params[p], before[p]) for p in names)


def test_compiled_module_is_not_recompiled_by_refits(torch_export):
    from torch._dynamo.testing import CompileCounter

    out, loras = torch_export
    torch._dynamo.reset()
    counter = CompileCounter()
    engine = engines.load_engine(out / COMPONENT, backend="torch", compile={"backend": counter})
    plain = engines.load_engine(out / COMPONENT, backend="torch")
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


def _gpu_check():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the output of a machine without CUDA")
def test_gpu_check_without_cuda_says_what_it_cannot_run(capsys):
    """bench/gpu_check.py on a machine without CUDA: one line per check it cannot run, and a clean exit."""
    out = _gpu_check().main([])
    assert out["rows"][0][0] == "host" and "CPU " in out["rows"][0][1]  # where it ran, first
    assert [r[0][:3] for r in out["rows"][1:]] == ["(a)", "(b)", "(c)"]
    assert all(status == "skip" and result.startswith("not run: no CUDA device") for _, result, status in out["rows"][1:])
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + 4 and all(line.startswith("|") for line in table)


@pytest.mark.slow  # about 30 CPU-seconds (the tiny UNet traced by dynamo, five refits, five fresh fuses)
def test_gpu_check_cpu_smoke():
    """bench/gpu_check.py --cpu: every step of the CUDA run on the CPU (the engine on the device path:
    resident base weights); refits are fresh fuses and nothing recompiles."""
    out = _gpu_check().main(["--cpu"])
    assert out["torch_engine"]["bit_identical"] and out["torch_engine"]["recompiles"] == 0
    assert all(status in ("ok", "skip", "") for _, _, status in out["rows"])


def test_device_resident_path_on_cpu(torch_export):
    """The path a CUDA engine takes, run on the CPU: base weights kept on the engine's device
    (read from the export once), effective weights computed there and handed over as torch tensors
    on that device (no numpy, no host copy); the same bits as a fresh fuse."""
    out, loras = torch_export
    engine = engines.load_engine(out / COMPONENT, backend="torch", resident_bases=True)
    handed = []
    write = engine.set_device_weights
    assert engine.weight_access() == engines.WeightAccess(device="cpu", layout="parameter", resident_bases=True)

    def spy(values):
        handed.extend((type(v).__name__, v.device) for v in values.values())
        return write(values)

    engine.set_device_weights = spy
    r = refit.Refitter(engine)
    r.load_lora(str(loras["y"]), adapter_name="y")
    assert _mapped_differences(engine, _fresh(loras, [("y", 1.0)])) == []
    bases = r.files._device_bases[engine.device]  # the resident base values
    assert bases.nbytes() > 0 and all(t.device == engine.device for t in bases._values.values())
    r.set_adapters(["x", "y"], [0.5, 1.0])
    assert _mapped_differences(engine, _fresh(loras, [("x", 0.5), ("y", 1.0)])) == []
    r.set_adapters([])
    assert _mapped_differences(engine, _fresh(loras, [])) == []
    assert handed and set(handed) == {("Tensor", engine.device)}


def test_cli_export_torch_then_load_engine(tmp_path):
    """`python -m export ... --torch` (the command line's main) writes the torch layout next to the ONNX."""
    from export.__main__ import main

    out = tmp_path / "cli"
    rc = main(["--family", "sdxl", "--model", "tiny", "--components", COMPONENT, "--torch", "--no-validate",
               "--no-progress", "--out", str(out)])
    assert rc in (0, None)
    meta = (out / COMPONENT / "torch" / "torch_model.json").read_text()
    assert '"class": "CLIPTextModel"' in meta and '"library": "transformers"' in meta
    engine = engines.load_engine(out / COMPONENT, backend="torch")
    assert isinstance(engine, engines.TorchEngine) and engine.weight_names()
