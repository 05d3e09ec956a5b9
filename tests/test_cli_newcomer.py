"""What a new user trips on, second round: --overwrite replaces only what this project wrote,
outputs get a plain mkdir's mode, a server that cannot start says which model and why, a refit
output generates and serves as its export did, adapters are checked when a repository is written,
generate names adapters by file and exits 2 on a LoRA of another family, sizes are the export's,
and --model is required."""

from __future__ import annotations

import os
import shutil
import stat

import numpy as np
import pytest

import engines
from cli_helpers import hidden, one_error_line, run, snapshot
from engines.pipeline import SizeError
from refit_helpers import exported

SD_LORA = "examples/sd_tiny_lora.safetensors"  # another family's, for SDXL exports
SDXL_LORA = "examples/sdxl_tiny_lora.safetensors"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """The README's main job: a tiny SDXL export (every component, pipeline files) with a LoRA baked."""
    out = tmp_path_factory.mktemp("newcomer") / "sdxl"
    r = run("-m", "export", "--family", "sdxl", "--model", "tiny", "--lora", f"{SDXL_LORA}:0.8", "--out", out,
            "--no-progress", "--no-validate")
    assert r.returncode == 0, r.stderr
    return out


def _mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _notes(d):
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    return snapshot(d)


@pytest.mark.parametrize("command", ["export", "refit", "triton"])
def test_overwrite_replaces_only_what_this_project_wrote(command, tmp_path, tmp_path_factory):
    out = tmp_path / "mine"
    before = _notes(out)
    sd = exported(tmp_path_factory.getbasetemp(), "sd", "x")
    args = {"export": ["-m", "export", "--family", "sd", "--model", "tiny", "--components", "text_encoder",
                       "--no-progress", "--out", out, "--overwrite"],
            "refit": ["-m", "refit", sd, "--out", out, "--overwrite"],
            "triton": ["-m", "engines.triton", "write", sd, out, "--text-encoders", "python"]}[command]
    r = run(*args)
    assert r.returncode == 2, r.stderr
    line = one_error_line(r.stderr)
    assert "notes.txt" in line and str(out) in line, line
    assert snapshot(out) == before and hidden(tmp_path) == []


def test_outputs_get_a_plain_mkdir_mode(sdxl, tmp_path):
    assert stat.S_IMODE(sdxl.stat().st_mode) == _mode()
    r = run("-m", "refit", sdxl, "--out", tmp_path / "refit")
    assert r.returncode == 0, r.stderr
    r = run("-m", "engines.triton", "write", sdxl, tmp_path / "repo", "--text-encoders", "python",
            "--text-to-image", "no")
    assert r.returncode == 0, r.stderr
    for d in (tmp_path / "refit", tmp_path / "repo"):
        assert stat.S_IMODE(d.stat().st_mode) == _mode(), d


def test_a_refit_output_generates_and_serves_as_its_export(sdxl, tmp_path):
    out = tmp_path / "y"
    r = run("-m", "refit", sdxl, "--lora", "examples/sdxl_tiny_lora_2.safetensors:0.5", "--out", out)
    assert r.returncode == 0, r.stderr
    assert (out / "model_index.json").is_file() and (out / "tokenizer_2").is_dir()  # the pipeline's files
    pipe = engines.load_pipeline(out)
    assert pipe.get_active_adapters() == ["sdxl_tiny_lora_2"]
    from engines.triton import write_repository

    assert "text_to_image" in write_repository(out, tmp_path / "repo", text_encoder_backend="python")
    (out / "model_index.json").unlink()  # an output without them (an older refit): no model that cannot load
    assert "text_to_image" not in write_repository(out, tmp_path / "repo2", text_encoder_backend="python")
    with pytest.raises(ValueError, match="model_index.json"):
        write_repository(out, tmp_path / "repo3", text_encoder_backend="python", text_to_image=True)


def test_triton_write_checks_adapters_against_the_export(sdxl, tmp_path):
    repo = tmp_path / "repo"
    r = run("-m", "engines.triton", "write", sdxl, repo, "--lora", SD_LORA, "--text-encoders", "python")
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert "sd_tiny_lora.safetensors does not fit this export" in line and "LoRA for sd" in line
    assert not repo.exists() and hidden(tmp_path) == []


def test_generate_names_adapters_by_file_and_refuses_another_family(sdxl, tmp_path):
    png = tmp_path / "a.png"
    r = run("-m", "engines.generate", sdxl, "--prompt", "a cube", "--lora", SD_LORA, "--steps", 1, "--out", png)
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert "'sd_tiny_lora'" in line and "cli_0" not in line and "looks like a LoRA for sd" in line
    targets = line.split("targets such as ", 1)[1]
    assert ", from " not in targets or targets.split(", from ")[0] not in targets.split(", from ")[1]
    assert not png.exists()


def test_the_family_hint_names_the_files_keys_only_where_they_differ(tmp_path):
    """A diffusers-format SD UNet LoRA read for SDXL: its keys are the module names, listed once."""
    from safetensors.torch import save_file

    import lora_loaders as L
    from export.tiny import build_tiny
    from lora_files import peft_lora

    sd = peft_lora({"unet": build_tiny("sd", ["unet"])["unet"]}, seed=1)
    path = tmp_path / "sd_unet.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(L.LoraError, match="looks like a LoRA for sd") as e:
        L.read_lora(str(path), "sdxl")
    assert "targets such as ['unet." in str(e.value) and "from [" not in str(e.value), str(e.value)


def test_sizes_are_the_exports(sdxl, tmp_path):
    r = run("-m", "engines.generate", sdxl, "--prompt", "a cube", "--height", 100000, "--steps", 1,
            "--out", tmp_path / "big.png", timeout=120)
    assert r.returncode == 2 and "above the export's largest" in one_error_line(r.stderr)
    assert not (tmp_path / "big.png").exists() and "\x1b" not in r.stderr
    pipe = engines.load_pipeline(sdxl)
    limits = engines.pipeline.size_limits(pipe)
    axes = engines.Manifest.read(sdxl).axes
    assert limits["height"] == min(axes["height"]["max"] * pipe.vae_scale_factor, axes["image_height"]["max"])
    with pytest.raises(SizeError, match="width"):
        pipe("a cube", num_inference_steps=1, height=64, width=limits["width"] + 8 * pipe.vae_scale_factor)
    # a TensorRT engine call checks its named dimensions against the manifest's axes (its profile) first
    model = pipe.unet
    spec, engine, entry = model._parts["forward"]
    feeds = {i["name"]: np.zeros([1] * len(i["shape"]), np.float32) for i in entry["inputs"]}
    feeds["sample"] = np.zeros((1, 4, axes["height"]["max"] + 1, 8), np.float32)
    with pytest.raises(SizeError, match="height"):
        engines.pipeline._check_sizes(spec, entry, feeds, axes)
    from engines.triton.text_to_image import TextToImageSwitcher

    sw = TextToImageSwitcher(pipe, tmp_path, {"max_height": 10 ** 6})  # never past the export
    assert sw.limits["max_height"] == limits["height"] and sw.limits["max_width"] == limits["width"]


def test_export_needs_model(tmp_path):
    r = run("-m", "export", "--family", "sd", "--out", tmp_path / "o")
    assert r.returncode == 2 and "--model" in r.stderr.splitlines()[-1]
    assert not (tmp_path / "o").exists()


def test_serve_says_which_model_did_not_load_and_why(sdxl, tmp_path):
    from engines.triton.server import pytriton_available

    ok, why = pytriton_available()
    if not ok:
        pytest.skip(f"no tritonserver: {why}")
    repo = tmp_path / "repo"
    r = run("-m", "engines.triton", "write", sdxl, repo, "--text-encoders", "python", "--text-to-image", "no")
    assert r.returncode == 0, r.stderr
    shutil.rmtree(repo / "unet" / "1" / "unet")  # the denoiser's engine is gone
    for model in ("text_encoder", "text_encoder_2", "vae_decoder"):
        shutil.rmtree(repo / model)
    r = run("-m", "engines.triton", "serve", repo, "--timeout", 300, timeout=400)
    assert r.returncode == 1
    line = one_error_line(r.stderr)
    assert "model 'unet'" in line and "FileNotFoundError" in line, line
