"""Export of tiny sd / sdxl with baked LoRAs: ORT == PyTorch fused, exact weights maps, base weights, CLI.

Each export of a tiny model takes 10-40 s on two cores, so exports are module-scoped fixtures
shared by the checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import load_file, save_file

import export
import lora_loaders as L
from engines.weights_map import from_initializer, load_weights_map, to_initializer
from export.graph import example_inputs, run_torch
from export.tiny import build_tiny
from lora_files import peft_lora
from lora_loaders.families import get_family
from lora_loaders.targets import targetable_parameters

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CONV_AND_PROJ = r"(conv1|conv2|proj_in|proj_out|fc1|fc2|time_emb_proj)$"


# --- helpers -------------------------------------------------------------------------------------


def initializers(model_path: Path) -> dict[str, np.ndarray]:
    m = onnx.load(str(model_path))
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def fused_models(family: str, loras: list[tuple[Path, float]], components=None, dtype=torch.float32) -> dict:
    """The tiny models with the adapters fused by the loader mixin (diffusers API), independent of export."""
    spec = get_family(family)
    models = build_tiny(family, list(components or spec.exported), dtype=dtype)
    if loras:
        loader = L.loader_for(family, **{c: m for c, m in models.items() if spec.component(c).lora})
        names = []
        for i, (path, _) in enumerate(loras):
            loader.load_lora_weights(str(path), adapter_name=f"a{i}")
            names.append(f"a{i}")
        loader.set_adapters(names, [s for _, s in loras])
        loader.fuse_lora()
    return models


def ort_outputs(model_path: Path, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def feeds_for(family: str, comp: str, model, dtype=torch.float32, seed=7, **sizes) -> dict:
    """Seeded graph inputs for one component (the family's example sizes, `sizes` overriding)."""
    spec = get_family(family)
    return example_inputs(spec, spec.component(comp), model, dtype, seed=seed, **sizes)


def torch_ref(family: str, comp: str, model, feeds: dict) -> list[np.ndarray]:
    return run_torch(get_family(family).component(comp), model, feeds)


def check_ort_equals_torch(out_dir: Path, family: str, models: dict, tol=1e-4):
    manifest = json.loads((out_dir / "manifest.json").read_text())
    for comp, entry in manifest["components"].items():
        spec = get_family(family).component(comp)
        model = models[comp]
        feeds = feeds_for(family, comp, model)
        ref = torch_ref(family, comp, model, feeds)
        outs = ort_outputs(out_dir / comp / "model.onnx", feeds)
        assert [o["name"] for o in entry["outputs"]] == [o.name for o in spec.outputs]
        for o, r, name in zip(outs, ref, [o.name for o in spec.outputs]):
            assert o.shape == tuple(r.shape), (comp, name)
            assert rel_err(o, r) <= tol, (comp, name, rel_err(o, r))


def check_weights_map(comp_dir: Path, model: torch.nn.Module):
    """Every targetable parameter maps to exactly one initializer whose bits its transform reproduces."""
    wmap = load_weights_map(comp_dir)
    unused = set(wmap.data.get("unused_params", []))  # e.g. the VAE encoder's, in the decoder's graph
    params = [p for p in targetable_parameters(model) if p not in unused]
    mapped = [e["param"] for e in wmap.data["entries"].values()]
    assert len(mapped) == len(set(mapped))
    assert sorted(mapped) == sorted(params)
    inits = initializers(comp_dir / "model.onnx")
    state = dict(model.named_parameters())
    transforms = set()
    for name, e in wmap.data["entries"].items():
        assert name in inits, name
        assert name in (e["param"], e["param"] + ".T") or name.startswith(e["param"] + "."), name  # readable
        torch_value = state[e["param"]].detach().numpy()
        want = to_initializer(torch_value, e)
        assert want.dtype == inits[name].dtype and want.shape == inits[name].shape, name
        assert want.tobytes() == inits[name].tobytes(), f"{name}: transform does not reproduce the initializer"
        assert from_initializer(inits[name], e).tobytes() == torch_value.tobytes()
        # torch-side helper gives the same bits
        assert to_initializer(state[e["param"]].detach(), e).numpy().tobytes() == want.tobytes()
        transforms.add(e["transform"])
    return transforms


def check_base_weights(out_dir: Path, family: str, manifest: dict):
    base_models = build_tiny(family)
    for comp, entry in manifest["components"].items():
        path = out_dir / comp / "base_weights.safetensors"
        if not entry["baked_params"]:
            assert entry["base_weights"] is None and not path.exists()
            continue
        base = load_file(str(path))
        assert sorted(base) == sorted(entry["baked_params"])
        state = dict(base_models[comp].named_parameters())
        wmap = load_weights_map(out_dir / comp)
        mapped = {e["param"] for e in wmap.data["entries"].values()}
        for k, v in base.items():
            assert k in mapped
            assert v.dtype == state[k].dtype and torch.equal(v, state[k].detach()), k


def run_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "export", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


# --- exports (module-scoped) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_lora(tmp_path_factory) -> dict[str, Path]:
    """A second adapter per family, diffusers/PEFT keys, hitting convs and biases too."""
    d = tmp_path_factory.mktemp("loras")
    out = {}
    for family in ("sd", "sdxl"):
        models = build_tiny(family)
        sd = peft_lora(models, pattern=__import__("re").compile(CONV_AND_PROJ), rank=2, seed=11, bias=True)
        assert any(k.endswith("lora_B.bias") for k in sd) and any(".conv1." in k for k in sd)
        out[family] = d / f"{family}_second.safetensors"
        save_file(sd, str(out[family]))
    return out


@pytest.fixture(scope="module")
def sd_one(tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "sd_one"
    loras = [(EXAMPLES / "sd_tiny_lora.safetensors", 1.0)]
    manifest = export.export_pipeline("sd", "tiny", loras, out, progress=False)
    return out, manifest, loras


@pytest.fixture(scope="module")
def sd_two(tmp_path_factory, second_lora):
    out = tmp_path_factory.mktemp("exports") / "sd_two"
    loras = [(EXAMPLES / "sd_tiny_lora.safetensors", 0.7), (second_lora["sd"], 0.5)]
    manifest = export.export_pipeline("sd", "tiny", [(str(p), s) for p, s in loras], out, progress=False)
    return out, manifest, loras


@pytest.fixture(scope="module")
def sdxl_cli(tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "sdxl_cli"
    r = run_cli("--family", "sdxl", "--model", "tiny", "--lora", "examples/sdxl_tiny_lora.safetensors",
                "--out", out, "--triton-repo", out.parent / "sdxl_cli_triton")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads((out / "manifest.json").read_text()), [(EXAMPLES / "sdxl_tiny_lora.safetensors", 1.0)]


@pytest.fixture(scope="module")
def sdxl_two(tmp_path_factory, second_lora):
    out = tmp_path_factory.mktemp("exports") / "sdxl_two"
    loras = [(EXAMPLES / "sdxl_tiny_lora.safetensors", 0.8), (second_lora["sdxl"], 1.2)]
    manifest = export.export_pipeline("sdxl", "tiny", [f"{p}:{s}" for p, s in loras], out, progress=False,
                                      components="unet,text_encoder_2")
    return out, manifest, loras


EXPORTS = ["sd_one", "sd_two", "sdxl_cli", "sdxl_two"]


# --- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", EXPORTS)
def test_ort_equals_pytorch_fused(which, request):
    out, manifest, loras = request.getfixturevalue(which)
    family = manifest["family"]
    models = fused_models(family, loras, components=list(manifest["components"]))
    check_ort_equals_torch(out, family, models)
    for comp, errs in manifest["validation_errors"].items():
        assert all(e <= 1e-4 for e in errs.values()), (comp, errs)


@pytest.mark.parametrize("which", EXPORTS)
def test_weights_map_exact_and_complete(which, request):
    out, manifest, loras = request.getfixturevalue(which)
    family = manifest["family"]
    models = fused_models(family, loras, components=list(manifest["components"]))
    for comp in manifest["components"]:
        transforms = check_weights_map(out / comp, models[comp])
        assert "identity" in transforms
        assert "transpose" in transforms  # Linear weights of 3-D activations


@pytest.mark.parametrize("which", EXPORTS)
def test_base_weights_and_manifest(which, request):
    out, manifest, loras = request.getfixturevalue(which)
    family = manifest["family"]
    check_base_weights(out, family, manifest)
    assert [a["scale"] for a in manifest["adapters"]] == [s for _, s in loras]
    for a, (path, _) in zip(manifest["adapters"], loras):
        import hashlib

        assert a["sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime"}
    for comp, entry in manifest["components"].items():
        spec = get_family(family).component(comp)
        assert [i["name"] for i in entry["inputs"]] == [t.name for t in spec.inputs]
        assert entry["inputs"][0]["shape"][0] == "batch"
        assert entry["validation"]["passed"]
    if "unet" in manifest["components"]:
        sample = manifest["components"]["unet"]["inputs"][0]
        assert sample["name"] == "sample" and sample["shape"][2:] == ["height", "width"]
        assert manifest["components"]["unet"]["outputs"][0]["name"] == "out_sample"
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert not leftovers


def test_two_adapters_stack(sd_one, sd_two):
    """The two-adapter export bakes the union of targets, biases included."""
    _, m1, _ = sd_one
    _, m2, _ = sd_two
    b1, b2 = set(m1["components"]["unet"]["baked_params"]), set(m2["components"]["unet"]["baked_params"])
    assert b1 < b2 and any(p.endswith(".bias") for p in b2) and any(".conv1." in p for p in b2)


def test_other_adapter_changes_only_mapped_initializers(sd_one, sd_two):
    (o1, m1, _), (o2, m2, _) = sd_one, sd_two
    for comp in m1["components"]:
        a, b = initializers(o1 / comp / "model.onnx"), initializers(o2 / comp / "model.onnx")
        assert set(a) == set(b), comp  # deterministic names
        changed = {n for n in a if a[n].tobytes() != b[n].tobytes()}
        if not get_family(m1["family"]).component(comp).lora:
            assert not changed, comp  # a component that takes no LoRA (the VAE) is the same in both
            continue
        mapped = set(load_weights_map(o1 / comp).data["entries"])
        assert changed and changed <= mapped, sorted(changed - mapped)[:5]
        # only parameters some adapter touched, and all that only the second export's adapters touch
        b1, b2 = set(m1["components"][comp]["baked_params"]), set(m2["components"][comp]["baked_params"])
        params_changed = {load_weights_map(o1 / comp).data["entries"][n]["param"] for n in changed}
        assert params_changed <= b1 | b2 and (b2 - b1) <= params_changed, comp


def test_cli_progress_and_summary(sdxl_cli):
    out, manifest, _ = sdxl_cli
    assert (out.parent / "sdxl_cli_triton" / "unet" / "config.pbtxt").is_file()  # --triton-repo
    assert list(manifest["components"]) == list(get_family("sdxl").exported)  # the VAE decoder too
    te2 = manifest["components"]["text_encoder_2"]
    assert [o["name"] for o in te2["outputs"]] == ["text_embeds", "hidden_states"]
    assert manifest["adapters"][0]["name"] == "sdxl_tiny_lora"


def test_fp16_sdxl_unet_loads_and_runs_in_ort(tmp_path):
    """torch's exporter emits Concat(float16, float32) in SDXL's added time embedding; the pass fixes it."""
    out = tmp_path / "fp16"
    manifest = export.export_pipeline("sdxl", "tiny", [(EXAMPLES / "sdxl_tiny_lora.safetensors", 1.0)], out,
                                      dtype="fp16", components=["unet"], progress=False)
    entry = manifest["components"]["unet"]
    assert entry["validation"]["passed"] and entry["dtype"] == "float16"
    m = onnx.load(str(out / "unet" / "model.onnx"))
    onnx.checker.check_model(m, full_check=True)  # type-checks every node: no mixed-type Concat
    wmap = load_weights_map(out / "unet")
    assert {e["dtype"] for e in wmap.data["entries"].values()} == {"float16"}
    models = fused_models("sdxl", [(EXAMPLES / "sdxl_tiny_lora.safetensors", 1.0)], ["unet"], torch.float16)
    unet = models["unet"]
    check_weights_map(out / "unet", unet)
    feeds = feeds_for("sdxl", "unet", unet, torch.float16, seed=3, batch=3, height=24, width=16)
    o = ort_outputs(out / "unet" / "model.onnx", feeds)[0]
    r = torch_ref("sdxl", "unet", unet, feeds)[0]
    assert o.dtype == np.float16 and o.shape == (3, 4, 24, 16)
    assert rel_err(o, r) < 2e-2


def test_bf16_export_graph_types_and_values(tmp_path):
    out = tmp_path / "bf16"
    manifest = export.export_pipeline("sdxl", "tiny", [], out, dtype="bf16", components=["text_encoder_2"],
                                      progress=False, external_data=True)
    assert manifest["components"]["text_encoder_2"]["external_data"] == "model.onnx.data"
    assert (out / "text_encoder_2" / "model.onnx.data").stat().st_size > 100_000
    v = manifest["components"]["text_encoder_2"]["validation"]
    assert v["passed"]
    assert set(v["graph_float_types"]["outputs"].values()) == {"bfloat16"}
    assert "bfloat16" in v["graph_float_types"]["initializers"]
    wmap = load_weights_map(out / "text_encoder_2")
    assert {e["dtype"] for e in wmap.data["entries"].values()} == {"bfloat16"}
    model = build_tiny("sdxl", ["text_encoder_2"], dtype=torch.bfloat16)["text_encoder_2"]
    check_weights_map_bf16(out / "text_encoder_2", model)


def check_weights_map_bf16(comp_dir, model):
    import onnx_ir as ir

    m = ir.load(comp_dir / "model.onnx")
    wmap = load_weights_map(comp_dir)
    state = dict(model.named_parameters())
    for name, e in wmap.data["entries"].items():
        got = m.graph.initializers[name].const_value.numpy()
        want = to_initializer(state[e["param"]].detach(), e)
        assert want.dtype == torch.bfloat16
        assert got.tobytes() == want.view(torch.int16).numpy().tobytes(), name


def test_mixed_float_pass_unit():
    import onnx_ir as ir
    import onnxruntime as ort

    from export.passes import fix_mixed_float_inputs

    a = ir.Value(name="a", type=ir.TensorType(ir.DataType.FLOAT16), shape=ir.Shape([2, 3]))
    b = ir.Value(name="b", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3]))
    node = ir.node("Concat", [a, b], attributes={"axis": 1}, name="cat")
    node.outputs[0].name, node.outputs[0].dtype, node.outputs[0].shape = "y", ir.DataType.FLOAT, ir.Shape([2, 6])
    graph = ir.Graph([a, b], node.outputs, nodes=[node], opset_imports={"": 18})
    model = ir.Model(graph, ir_version=10)
    with pytest.raises(Exception, match="bound to different types"):
        ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString())
    assert fix_mixed_float_inputs(model) == 1
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString())
    x = np.ones((2, 3), np.float16)
    y = sess.run(None, {"a": x, "b": np.full((2, 3), 2, np.float32)})[0]
    assert y.dtype == np.float32 and (y == np.array([[1, 1, 1, 2, 2, 2]] * 2)).all()


def test_weights_map_helpers_roundtrip():
    from engines.weights_map import make_transform

    w = torch.randn(5, 3)
    e = make_transform([5, 3], "float32", [3, 5], "float16", perm=[1, 0])
    assert e["transform"] == "transpose+cast"
    v = to_initializer(w, e)
    assert v.shape == (3, 5) and v.dtype == torch.float16
    assert torch.equal(from_initializer(v, e), w.T.half().T.float())
    vn = to_initializer(w.numpy(), e)
    assert vn.tobytes() == v.numpy().tobytes()
    conv = make_transform([4, 2, 3, 3], "float32", [4, 18], "float32")
    assert conv["transform"] == "reshape"
    assert torch.equal(from_initializer(to_initializer(torch.ones(4, 2, 3, 3), conv), conv), torch.ones(4, 2, 3, 3))


# --- errors: clear, and nothing left behind -------------------------------------------------------


def _nothing_left(out: Path):
    assert not out.exists()
    if out.parent.exists():
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_unknown_family(tmp_path):
    with pytest.raises(ValueError, match="unknown family 'sd99'"):
        export.export_pipeline("sd99", "tiny", [], tmp_path / "o", progress=False)
    _nothing_left(tmp_path / "o")


def test_missing_lora(tmp_path):
    with pytest.raises(FileNotFoundError, match="LoRA file not found: .*nope.safetensors"):
        export.export_pipeline("sd", "tiny", [tmp_path / "nope.safetensors"], tmp_path / "o", progress=False)
    _nothing_left(tmp_path / "o")


def test_unreadable_lora(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01 not a safetensors file at all")
    with pytest.raises(ValueError, match="bad.safetensors"):
        export.export_pipeline("sd", "tiny", [bad], tmp_path / "o", progress=False)
    _nothing_left(tmp_path / "o")


def test_lora_of_another_family(tmp_path):
    with pytest.raises((ValueError, KeyError), match="sdxl_tiny_lora.safetensors"):
        export.export_pipeline("sd", "tiny", [EXAMPLES / "sdxl_tiny_lora.safetensors"], tmp_path / "o",
                               progress=False)
    _nothing_left(tmp_path / "o")


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(export.ExportError, match="not writable"):
        export.export_pipeline("sd", "tiny", [], blocker / "o", progress=False)


def test_non_export_dir_is_not_overwritten(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(export.ExportError, match="not empty"):
        export.export_pipeline("sd", "tiny", [], out, progress=False)
    assert (out / "precious.txt").read_text() == "keep"


def test_validation_failure_leaves_no_output(tmp_path, monkeypatch):
    import export.validate as V

    monkeypatch.setitem(V.TOLERANCE, "float32", -1.0)
    with pytest.raises(export.ExportValidationError, match="beyond the float32 tolerance"):
        export.export_pipeline("sd", "tiny", [], tmp_path / "o", components=["text_encoder"], progress=False)
    _nothing_left(tmp_path / "o")


def test_cli_errors(tmp_path):
    r = run_cli("--family", "nope", "--model", "tiny", "--out", tmp_path / "o")
    assert r.returncode == 2 and "unknown family 'nope'" in r.stderr
    r = run_cli("--family", "sd", "--model", "tiny", "--lora", tmp_path / "missing.safetensors:0.5",
                "--out", tmp_path / "o")
    assert r.returncode == 2 and "LoRA file not found" in r.stderr
    assert not (tmp_path / "o").exists()


def test_parse_lora_arg():
    assert export.parse_lora_arg("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert export.parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert export.parse_lora_arg("C:/x/a.safetensors") == ("C:/x/a.safetensors", 1.0)


def test_tensorrt_profiles_and_clear_error_without_tensorrt(tmp_path, sd_one):
    from export.tensorrt import profiles_for

    _, manifest, _ = sd_one
    unet = manifest["components"]["unet"]
    axes = get_family("sd").axes
    assert manifest["axes"] == {n: {"min": a.min, "opt": a.opt, "max": a.max} for n, a in axes.items()}
    p = profiles_for(unet, manifest["axes"])
    b, h, w = axes["batch"], axes["height"], axes["width"]
    assert p["sample"] == tuple((getattr(b, k), 4, getattr(h, k), getattr(w, k)) for k in ("min", "opt", "max"))
    assert p["timestep"] == ((b.min,), (b.opt,), (b.max,))
    assert p["encoder_hidden_states"][2] == (b.max, 77, 32)
    try:
        from engines.tensorrt import tensorrt_available

        if tensorrt_available():
            pytest.skip("TensorRT is available here")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="TensorRT"):
        export.export_pipeline("sd", "tiny", [], tmp_path / "o", tensorrt=True, progress=False)
    _nothing_left(tmp_path / "o")


def test_local_diffusers_directory(tmp_path):
    """--model <dir> (save_pretrained layout, one subfolder per component); kohya names resolve on meta models."""
    models = build_tiny("sd")
    for comp, m in models.items():
        m.save_pretrained(tmp_path / "model" / comp)
    out = tmp_path / "o"
    loras = [(EXAMPLES / "sd_tiny_lora.safetensors", 0.6)]
    manifest = export.export_pipeline("sd", str(tmp_path / "model"), loras, out, components=["text_encoder"],
                                      progress=False)
    assert manifest["model"] == str(tmp_path / "model")
    fused = fused_models("sd", loras, components=["text_encoder"])
    check_ort_equals_torch(out, "sd", fused)
    check_weights_map(out / "text_encoder", fused["text_encoder"])


def test_missing_model_dir_component(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(FileNotFoundError, match="no text_encoder/ subfolder"):
        export.export_pipeline("sd", str(tmp_path / "model"), [], tmp_path / "o", components=["text_encoder"],
                               progress=False)
    _nothing_left(tmp_path / "o")


def test_component_manifest_lists_its_adapters(sd_two):
    _, manifest, _ = sd_two
    for comp, entry in manifest["components"].items():
        names = [a["name"] for a in entry["adapters"]]
        assert names == [a["name"] for a in manifest["adapters"] if comp in a["components"]]
        assert all(set(a) >= {"name", "sha256", "scale"} for a in entry["adapters"])


def test_refit_of_an_export_matches_the_export_of_the_same_adapters(sd_one, sd_two):
    """Contract with engines/ + refit/: weights map + base weights let a refit reach any export's bits."""
    engines = pytest.importorskip("engines")
    refit = pytest.importorskip("refit")
    (o1, _, loras1), (o2, _, _) = sd_one, sd_two
    feeds = {k: v.numpy() for k, v in feeds_for("sd", "unet", build_tiny("sd", ["unet"])["unet"], seed=9).items()}
    want = engines.load_engine(o1 / "unet").infer(feeds)["out_sample"]
    engine = engines.load_engine(o2 / "unet")
    r = refit.Refitter(engine)
    r.load_lora(str(loras1[0][0]), adapter_name="a")
    r.set_adapters(["a"], [loras1[0][1]])
    got = engine.infer(feeds)["out_sample"]
    assert np.array_equal(got, want)
    r.set_adapters([])
    base = fused_models("sd", [], ["unet"])["unet"]
    ref = torch_ref("sd", "unet", base, {k: torch.from_numpy(v) for k, v in feeds.items()})[0]
    assert rel_err(engine.infer(feeds)["out_sample"], ref) <= 1e-4


def test_hub_model_id_from_local_cache(tmp_path):
    """--model <hub id>: snapshot_download of the component subfolders (served offline from a local cache)."""
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-sd"
    snap = repo / "snapshots" / ("0" * 40)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    build_tiny("sd", ["text_encoder"], seed=1)["text_encoder"].save_pretrained(snap / "text_encoder")
    manifest = export.export_pipeline("sd", "someone/tiny-sd", [], tmp_path / "o", components=["text_encoder"],
                                      progress=False, hub_kwargs={"cache_dir": str(cache), "local_files_only": True})
    assert manifest["model"] == "someone/tiny-sd" and manifest["components"]["text_encoder"]["validation"]["passed"]
    check_weights_map(tmp_path / "o" / "text_encoder", build_tiny("sd", ["text_encoder"], seed=1)["text_encoder"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_verify_catches_one_flipped_bit(dtype):
    import onnx_ir as ir
    from torch.onnx._internal.exporter._core import TorchTensor

    from export.onnx_export import ExportError, _verify
    from export.passes import _TransposedTensor
    from engines.weights_map import make_transform

    w = torch.randn(6, 4).to(dtype)
    name = str(dtype).removeprefix("torch.")
    entry = make_transform([6, 4], name, [4, 6], name, perm=[1, 0])
    lazy = ir.LazyTensor(_TransposedTensor(TorchTensor(w), (1, 0)), dtype=TorchTensor(w).dtype, shape=ir.Shape([4, 6]))
    value = ir.Value(name="w.T", const_value=lazy)
    _verify(value, w, entry, "w")  # exact
    bad = w.clone()
    bits = bad.view({4: torch.int32, 2: torch.int16}[bad.element_size()])
    bits[2, 1] ^= 1
    with pytest.raises(ExportError, match="does not hold the bits"):
        _verify(value, bad, entry, "w")
    with pytest.raises(ExportError, match="does not hold the bits"):  # numpy path, eager tensor
        _verify(ir.Value(name="w", const_value=ir.tensor(torch_to_np(w.T.contiguous()))), bad.T.contiguous(),
                make_transform([4, 6], name, [4, 6], name), "w")


def torch_to_np(t):
    from lora_loaders.dtypes import to_numpy

    return to_numpy(t)
