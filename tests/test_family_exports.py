"""Every exporting family, end to end on its tiny model (the registry entry is all a family adds):

`python -m export --family F --model tiny --lora x --triton-repo R` writes every component;
ONNX Runtime equals the PyTorch model with x fused by the loader mixin (independently of the
export's own fusing), for video families at two frame counts; a refit of each denoiser to y
is bit-identical to a fresh export with y;
every generated config.pbtxt parses with Triton's protobuf.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import engines
import lora_loaders as L
import refit
from engines.triton import parse_config
from export.graph import example_inputs, run_torch
from export.tiny import build_tiny
from lora_files import peft_lora
from refit_helpers import differing, initializers

ROOT = Path(__file__).resolve().parents[1]
LINEAR = re.compile(r".")  # every targetable module the writer can make factors for
FAMILIES = ["sd3", "wan", "flux", "flux2", "hidream", "qwen-image", "amused", "z-image", "auraflow", "sana", "lumina2", "cogview4",
            "cogvideox", "mochi", "ltx-video", "hunyuan-video", "skyreels-v2", "kandinsky"]


def _linear_pattern(model):
    names = [n for n, m in L.targetable_modules(model).items() if isinstance(m, torch.nn.Linear)]
    return re.compile("(" + "|".join(re.escape(n) for n in names) + ")$")


def _lora(models: dict, seed: int, offset: int) -> dict:
    sd = {}
    for c, m in models.items():
        sd.update(peft_lora({c: m}, pattern=_linear_pattern(m), seed=seed + len(sd), every=2, offset=offset))
    return sd


@pytest.fixture(scope="module", params=FAMILIES)
def family_export(request, tmp_path_factory):
    family = request.param
    spec = L.get_family(family)
    root = tmp_path_factory.mktemp(f"export_{family}")
    models = build_tiny(family)
    lora_models = {c: m for c, m in models.items() if spec.component(c).lora}
    files = {}
    for name, seed, offset in (("x", 1, 0), ("y", 2, 1)):
        files[name] = root / f"{name}.safetensors"
        save_file(_lora(lora_models, seed, offset), str(files[name]))
    out, repo = root / "out", root / "repo"
    r = subprocess.run([sys.executable, "-m", "export", "--family", family, "--model", "tiny", "--lora", str(files["x"]),
                        "--out", str(out), "--triton-repo", str(repo), "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(family=family, spec=spec, root=root, files=files, out=out, repo=repo)


def test_every_component_exported_and_equal_to_the_fused_model(family_export):
    f = family_export
    spec, family = f["spec"], f["family"]
    manifest = engines.Manifest.read(f["out"])
    assert list(manifest.components) == list(spec.exported)
    models = build_tiny(family, list(spec.exported))  # not the components exported only on request (vae_encoder)
    loader = L.loader_for(family, **{c: m for c, m in models.items() if spec.component(c).lora})
    loader.load_lora_weights(str(f["files"]["x"]), adapter_name="x")
    for comp, model in models.items():
        cspec = spec.component(comp)
        feeds = example_inputs(spec, cspec, model, torch.float32, "check", seed=5)
        ref = run_torch(cspec, model, feeds)
        got = engines.load_engine(f["out"] / comp).infer({k: v.numpy() for k, v in feeds.items()})
        for o, r in zip(cspec.outputs, ref):
            err = np.abs(got[o.name] - r).max() / max(np.abs(r).max(), 1e-12)
            assert got[o.name].shape == r.shape and err <= 1e-4, (comp, o.name, err)
        assert manifest.components[comp]["validation"]["passed"]


def test_video_denoisers_at_two_frame_counts(family_export):
    """Families with a frames axis: ONNX Runtime of each denoiser (x baked) equals the PyTorch model with x
    fused by the mixin at two frame counts: the frames axis is dynamic in the graph."""
    f = family_export
    spec, family = f["spec"], f["family"]
    if "frames" not in spec.axes:
        pytest.skip(f"{family} has no frames axis")
    frames = sorted({spec.axes["frames"].check, spec.axes["frames"].example})
    assert len(frames) == 2
    models = build_tiny(family)
    L.loader_for(family, **{c: m for c, m in models.items() if spec.component(c).lora}).load_lora_weights(
        str(f["files"]["x"]), adapter_name="x")
    for comp in spec.denoisers:
        cspec, engine = spec.component(comp), engines.load_engine(f["out"] / comp)
        for n in frames:
            feeds = example_inputs(spec, cspec, models[comp], torch.float32, "check", seed=6, frames=n)
            ref = run_torch(cspec, models[comp], feeds)
            got = engine.infer({k: v.numpy() for k, v in feeds.items()})
            for o, r in zip(cspec.outputs, ref):
                err = np.abs(got[o.name] - r).max() / max(np.abs(r).max(), 1e-12)
                assert got[o.name].shape == r.shape and err <= 1e-4, (comp, n, o.name, err)


def test_refit_to_another_adapter_is_a_fresh_export(family_export):
    import export

    f = family_export
    denoisers = list(f["spec"].denoisers)
    fresh = f["root"] / "fresh_y"
    export.export_pipeline(f["family"], "tiny", [(str(f["files"]["y"]), 0.7)], fresh, components=denoisers,
                           validate=False, progress=False)
    for comp in denoisers:
        engine = engines.load_engine(f["out"] / comp)
        r = refit.Refitter(engine)
        assert r.get_active_adapters() == ["x"]  # what the export baked
        r.load_lora(str(f["files"]["y"]), adapter_name="y")
        r.set_adapters(["y"], [0.7])
        want = initializers(fresh / comp / "model.onnx", engine.weight_names())
        assert differing(engine.get_weights(), want) == [], comp
        feeds = {k: v.numpy() for k, v in example_inputs(
            f["spec"], f["spec"].component(comp), build_tiny(f["family"], [comp])[comp], torch.float32, "check").items()}
        out = engine.infer(feeds)
        ref = engines.load_engine(fresh / comp).infer(feeds)
        for name in ref:
            np.testing.assert_array_equal(out[name], ref[name])


def test_triton_configs_parse(family_export):
    configs = sorted(family_export["repo"].glob("*/config.pbtxt"))
    assert {p.parent.name for p in configs} == set(family_export["spec"].exported)
    for p in configs:
        cfg = parse_config(p.read_text())
        assert cfg.name == p.parent.name
