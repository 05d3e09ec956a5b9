"""Every exporting family, end to end on its tiny model (the registry entry is all a family adds):

`python -m export --family F --model tiny --lora x --triton-repo R` writes every component (the
command's `main`, run in this process: a new interpreter per family would import torch, diffusers and
the exporter again, for about 10 s each; tests/test_cli_errors.py runs the command as a process);
ONNX Runtime equals the PyTorch model with x fused by the loader mixin (independently of the
export's own fusing), for video families at two frame counts; a refit of each denoiser to y
is bit-identical to a fresh export with y;
every generated config.pbtxt parses with Triton's protobuf.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import engines
import lora_loaders as L
import refit
from engines.triton import parse_config
from engines.triton.text_to_image import model_name
from export.graph import example_inputs, run_torch
from export.tiny import build_tiny
from lora_files import peft_lora
from refit_helpers import differing, initializers

LINEAR = re.compile(r".")  # every targetable module the writer can make factors for
# Three modules share these tests (this one, test_family_exports_more.py, test_family_exports_video.py)
# so that `--dist loadfile` spreads the families' exports over the workers.
FAMILIES = ["sd3", "flux", "flux2", "auraflow", "sana", "lumina2", "cogview4"]


def _linear_pattern(model):
    names = [n for n, m in L.targetable_modules(model).items() if isinstance(m, torch.nn.Linear)]
    return re.compile("(" + "|".join(re.escape(n) for n in names) + ")$")


def _lora(models: dict, seed: int, offset: int) -> dict:
    sd = {}
    for c, m in models.items():
        sd.update(peft_lora({c: m}, pattern=_linear_pattern(m), seed=seed + len(sd), every=2, offset=offset))
    return sd


def export_fixture(families):
    """The module fixture of one module's families: each family exported once."""
    @pytest.fixture(scope="module", params=families)
    def family_export(request, tmp_path_factory):
        return _export(request.param, tmp_path_factory)

    return family_export


def _export(family, tmp_path_factory):
    spec = L.get_family(family)
    root = tmp_path_factory.mktemp(f"export_{family}")
    models = build_tiny(family)
    lora_models = {c: m for c, m in models.items() if spec.component(c).lora}
    files = {}
    for name, seed, offset in (("x", 1, 0), ("y", 2, 1)):
        files[name] = root / f"{name}.safetensors"
        save_file(_lora(lora_models, seed, offset), str(files[name]))
    out, repo = root / "out", root / "repo"
    from export.__main__ import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["--family", family, "--model", "tiny", "--lora", str(files["x"]), "--out", str(out),
                   "--triton-repo", str(repo), "--no-progress"])
    assert rc == 0, stderr.getvalue()[-3000:]
    assert set(json.loads(stdout.getvalue())["components"]) == set(spec.exported)  # the command's summary
    # the reference: the tiny model with x fused by the loader mixin, independently of the export's own fusing
    L.loader_for(family, **lora_models).load_lora_weights(str(files["x"]), adapter_name="x")
    return dict(family=family, spec=spec, root=root, files=files, out=out, repo=repo, fused=models)


family_export = export_fixture(FAMILIES)


def test_every_component_exported_and_equal_to_the_fused_model(family_export):
    f = family_export
    spec = f["spec"]
    manifest = engines.Manifest.read(f["out"])
    assert list(manifest.components) == list(spec.exported)
    for comp in spec.exported:  # not the components exported only on request (vae_encoder)
        cspec, model = spec.component(comp), f["fused"][comp]
        feeds = example_inputs(spec, cspec, model, torch.float32, "check", seed=5)
        ref = run_torch(cspec, model, feeds)
        got = engines.load_engine(f["out"] / comp).infer({k: v.numpy() for k, v in feeds.items()})
        for o, r in zip(cspec.outputs, ref):
            err = np.abs(got[o.name] - r).max() / max(np.abs(r).max(), 1e-12)
            assert got[o.name].shape == r.shape and err <= 1e-4, (comp, o.name, err)
        assert manifest.components[comp]["validation"]["passed"]
        assert not _float64(f["out"] / comp / "model.onnx"), comp  # strongly typed TensorRT refuses float64


def _float64(path) -> list[str]:
    """Names of the graph's float64 tensors and casts to float64."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    double = onnx.TensorProto.DOUBLE
    found = [t.name for t in g.initializer if t.data_type == double]
    found += [v.name for v in [*g.input, *g.output, *g.value_info] if v.type.tensor_type.elem_type == double]
    found += [n.name for n in g.node if n.op_type == "Cast" and any(a.name == "to" and a.i == double for a in n.attribute)]
    return found


def test_video_denoisers_at_two_frame_counts(family_export):
    """Families with a frames axis: ONNX Runtime of each denoiser (x baked) equals the PyTorch model with x
    fused by the mixin at two frame counts: the frames axis is dynamic in the graph."""
    f = family_export
    spec, family = f["spec"], f["family"]
    if "frames" not in spec.axes:
        pytest.skip(f"{family} has no frames axis")
    frames = sorted({spec.axes["frames"].check, spec.axes["frames"].example})
    assert len(frames) == 2
    models = f["fused"]
    for comp in spec.denoisers:
        cspec, engine = spec.component(comp), engines.load_engine(f["out"] / comp)
        for n in frames:
            feeds = example_inputs(spec, cspec, models[comp], torch.float32, "check", seed=6, frames=n)
            ref = run_torch(cspec, models[comp], feeds)
            got = engine.infer({k: v.numpy() for k, v in feeds.items()})
            for o, r in zip(cspec.outputs, ref):
                err = np.abs(got[o.name] - r).max() / max(np.abs(r).max(), 1e-12)
                # float32 sums in another order than torch's
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
            f["spec"], f["spec"].component(comp), f["fused"][comp], torch.float32, "check").items()}
        out = engine.infer(feeds)
        ref = engines.load_engine(fresh / comp).infer(feeds)
        for name in ref:
            np.testing.assert_array_equal(out[name], ref[name])


def _generates(out) -> bool:
    info = engines.Manifest.read(out).get("pipeline") or {}
    return bool(info) and not info.get("missing")


def test_engine_pipeline_makes_the_picture_diffusers_makes(family_export):
    """Every family's export holds what its diffusers pipeline needs (VAE decoder, scheduler,
    tokenizers): `engines.load_pipeline` over the engines makes the image (video families: the
    video, at two frame counts) diffusers' pipeline makes over the same tiny models with the same
    adapter fused by diffusers + PEFT: x as baked, then y after a refit (videos: at the longer count)."""
    from pipeline_reference import outputs, reference_pipeline

    f = family_export
    assert _generates(f["out"]), engines.Manifest.read(f["out"]).get("pipeline")
    pipe = engines.load_pipeline(f["out"])
    pipe.set_progress_bar_config(disable=True)
    for got, want in zip(outputs(pipe, f["family"]),
                         outputs(reference_pipeline(f["family"], f["out"], [(f["files"]["x"], 1.0)]), f["family"])):
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    pipe.load_lora_weights(str(f["files"]["y"]), adapter_name="y")
    pipe.set_adapters(["y"], [0.7])
    refitted = outputs(pipe, f["family"], seed=1, both=False)  # videos: the frame count of several chunks
    for got, want in zip(refitted, outputs(reference_pipeline(f["family"], f["out"], [(f["files"]["y"], 0.7)]),
                                           f["family"], seed=1, both=False)):
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    pipe.set_adapters([], [])
    assert np.abs(outputs(pipe, f["family"], seed=1, both=False)[0] - refitted[0]).max() > 1e-3  # y changes it


def test_video_vae_decodes_as_diffusers_over_several_chunks(family_export):
    """The engine VAE's `decode` of 7 latent frames (Wan: 7 chunks with caches; CogVideoX: 3 + 2 + 2;
    HunyuanVideo / Kandinsky: overlapping windows; Mochi, LTX: one pass) equals diffusers' `vae.decode`."""
    f = family_export
    if "frames" not in f["spec"].axes:
        pytest.skip(f"{f['family']} makes images")
    vae = build_tiny(f["family"], ["vae_decoder"])["vae_decoder"]
    config = vae.config
    g = torch.Generator().manual_seed(5)
    z = torch.randn(1, config.get("latent_channels") or config["z_dim"], 7, 4, 6, generator=g)
    args = (z, torch.full((1,), 0.05)) if config.get("timestep_conditioning") else (z,)
    with torch.no_grad():
        want = vae.decode(*args).sample
    got = engines.load_pipeline(f["out"]).vae.decode(*args).sample
    assert got.shape == want.shape and float((got - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()))


def test_generate_writes_the_picture_or_video(family_export, tmp_path):
    """`python -m engines.generate` (its `main`, in this process) on the tiny export: a PNG of the asked size,
    or for a video family an MP4 that decodes to the asked frames and size."""
    from engines.generate import main
    from pipeline_reference import frame_counts

    f = family_export
    video = "frames" in f["spec"].axes
    out = tmp_path / ("v.mp4" if video else "i.png")
    pipe = engines.load_pipeline(f["out"])
    frames = frame_counts(pipe)[1] if video else None  # 4k + 1 video frames, as the video pipelines make them
    args = [str(f["out"]), "--prompt", "a red cube", "--steps", "2", "--height", "32", "--width", "32",
            "--out", str(out), *(["--frames", str(frames)] if video else [])]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        assert main(args) == 0, err.getvalue()[-2000:]
    if video:
        import imageio.v3 as iio

        assert iio.imread(out).shape == (frames, 32, 32, 3)
        return
    from PIL import Image

    pipe.set_progress_bar_config(disable=True)
    want = pipe(prompt="a red cube", num_inference_steps=2, height=32, width=32,  # FLUX.2 takes `image` first
                generator=torch.Generator().manual_seed(0)).images[0]  # generate's defaults: seed 0, no negative
    with Image.open(out) as im:
        assert im.format == "PNG" and np.array_equal(np.asarray(im), np.asarray(want))
    # the asked size, but where the pipeline sizes by area (HiDream: its default area at the asked aspect)
    assert want.size == (32, 32) or f["family"] == "hidream", want.size


def test_triton_configs_parse(family_export):
    configs = sorted(family_export["repo"].glob("*/config.pbtxt"))
    t2i = {model_name(family_export["family"])} if _generates(family_export["out"]) else set()
    assert {p.parent.name for p in configs} == set(family_export["spec"].exported) | t2i
    for p in configs:
        cfg = parse_config(p.read_text())
        assert cfg.name == p.parent.name
