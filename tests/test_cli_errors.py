"""What a new user trips on, through the commands: bad input fails fast with one `error:` line and
exit code 2, failures while working exit 1, nothing is ever half-written (Triton repositories,
exports under SIGTERM or Ctrl-C), a previous export is never silently replaced, and a normal
export prints no information-free warnings while `-v` says what each step did and took.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import export
from engines.manifest import Manifest
from lora_loaders.io import parse_lora_arg
from cli_helpers import hidden, one_error_line, run, snapshot
from refit_helpers import exported, lora_files

ROOT = Path(__file__).resolve().parents[1]
SD_LORA = ROOT / "examples" / "sd_tiny_lora.safetensors"


@pytest.fixture(scope="module")
def sd_x(tmp_path_factory):
    """The tiny SD export (unet + text_encoder) with adapter x baked; shared with the refit tests."""
    root = tmp_path_factory.getbasetemp()
    return exported(root, "sd", "x"), lora_files(root, "sd")


# --- 15.1: python -m engines.triton write / serve ------------------------------------------------


def test_triton_write_missing_lora_writes_nothing(sd_x, tmp_path):
    export_dir, _ = sd_x
    repo = tmp_path / "repo"
    r = run("-m", "engines.triton", "write", export_dir, repo, "--lora", tmp_path / "nope.safetensors")
    assert r.returncode == 2
    assert "nope.safetensors" in one_error_line(r.stderr) and r.stderr.startswith("error:")
    assert not repo.exists() and hidden(tmp_path) == []


def test_triton_write_missing_export_dir(tmp_path):
    r = run("-m", "engines.triton", "write", tmp_path / "no_export", tmp_path / "repo")
    assert r.returncode == 2 and "export directory not found" in one_error_line(r.stderr)
    assert not (tmp_path / "repo").exists()


def test_triton_write_failure_leaves_repo_and_lora_dir_as_they_were(sd_x, tmp_path, monkeypatch):
    """A failure after some models were written changes neither an existing repository nor lora_dir."""
    from engines.triton import repository
    from engines.triton.repository import write_repository

    export_dir, loras = sd_x
    repo, ldir = tmp_path / "repo", tmp_path / "server_loras"
    write_repository(export_dir, repo, components=["text_encoder"])
    (repo / "other" / "1").mkdir(parents=True)
    (repo / "other" / "config.pbtxt").write_text('name: "other"\n')
    before = snapshot(repo)
    real = repository._Writer._denoiser

    def fail_late(*args, **kwargs):
        real(*args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(repository._Writer, "_denoiser", fail_late)
    with pytest.raises(OSError, match="disk full"):
        write_repository(export_dir, repo, lora_dir=ldir, loras=[loras["y"]])
    assert snapshot(repo) == before and not ldir.exists() and hidden(tmp_path) == []
    def no_space(*args):
        raise OSError("no space")

    monkeypatch.setattr(repository, "_copy_adapters", no_space)
    with pytest.raises(OSError, match="no space"):
        write_repository(export_dir, repo, loras=[loras["y"]])
    assert snapshot(repo) == before and hidden(tmp_path) == []


def test_triton_write_replaces_its_models_and_keeps_others(sd_x, tmp_path):
    from engines.triton.repository import write_repository

    export_dir, loras = sd_x
    repo = tmp_path / "repo"
    (repo / "other").mkdir(parents=True)
    (repo / "other" / "config.pbtxt").write_text('name: "other"\n')
    (repo / "unet" / "stale").mkdir(parents=True)
    written = write_repository(export_dir, repo, loras=[loras["y"]], text_encoder_backend="python")
    assert sorted(written) == ["text_encoder", "unet"] and all(p.is_file() for p in written.values())
    assert (repo / "other" / "config.pbtxt").is_file() and not (repo / "unet" / "stale").exists()
    assert sorted(p.name for p in (repo / "unet" / "loras").iterdir()) == ["x.safetensors", "y.safetensors"]
    assert hidden(tmp_path) == [] and hidden(repo) == []


def test_triton_serve_errors_are_one_line(tmp_path):
    r = run("-m", "engines.triton", "serve", tmp_path)
    assert r.returncode == 2 and "is not a model repository" in one_error_line(r.stderr)


def test_pytriton_hint_names_numpy_below_2(monkeypatch):
    import importlib.util

    from engines.triton import server

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(server.TritonUnavailable, match=r"nvidia-pytriton==0\.7\.0 'numpy<2'"):
        server.pytriton_server_dir()


# --- 15.2: a previous export is not replaced without --overwrite ----------------------------------


def test_export_refuses_a_previous_export_without_overwrite(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    Manifest.new(family="sdxl").write(out)
    before = snapshot(out)
    args = ("-m", "export", "--family", "sd", "--model", "tiny", "--components", "text_encoder", "--out", out,
            "--no-progress")
    r = run(*args)
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert "holds a previous export" in line and "--overwrite" in line and "overwrite=True" not in line
    assert snapshot(out) == before
    with pytest.raises(export.OutputExistsError, match=r"overwrite=True"):
        export.export_pipeline("sd", "tiny", [], out, components=["text_encoder"], progress=False)
    assert snapshot(out) == before
    # --overwrite replaces it; -v says what each step did and how long it took; no noise on the way
    r = run(*args, "--overwrite", "-v")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "manifest.json").read_text())["family"] == "sd" and hidden(tmp_path) == []
    for done in ("built or loaded the model", "no LoRA touches it", "ran PyTorch for reference outputs",
                 "traced it to ONNX", "optimized the graph", "built and verified the weights map",
                 "wrote the ONNX model", "compared ONNX Runtime with PyTorch"):
        assert any(line.startswith("INFO export.pipeline: text_encoder: " + done) and line.endswith(" s")
                   for line in r.stderr.splitlines()), (done, r.stderr)
    assert not [line for line in r.stderr.splitlines() if line.startswith("WARNING") or "torchvision" in line]


# --- 15.3: PATH[:SCALE] -------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["abc", "nan", "inf", "-inf", "1e999", ""])
def test_a_scale_that_is_not_a_finite_number_is_an_error(scale):
    with pytest.raises(ValueError, match=f"scale '{scale}' is not a"):
        parse_lora_arg(f"x.safetensors:{scale}")
    assert export.parse_lora_arg is parse_lora_arg  # the commands and the Python API share it


def test_paths_with_colons(tmp_path):
    odd = tmp_path / "a:b.safetensors"
    odd.write_bytes(b"x")
    assert parse_lora_arg(str(odd)) == (str(odd), 1.0)  # exists: taken whole
    assert parse_lora_arg(f"{odd}:0.25") == (str(odd), 0.25)
    assert parse_lora_arg("x.safetensors:-0.5") == ("x.safetensors", -0.5)
    assert parse_lora_arg("C:/loras/x.safetensors") == ("C:/loras/x.safetensors", 1.0)


@pytest.mark.parametrize("command", ["export", "refit"])
def test_cli_bad_scale_is_one_line_before_any_model(command, sd_x, tmp_path):
    spec = f"{SD_LORA}:abc"
    args = (["--family", "sd", "--model", "tiny", "--lora", spec] if command == "export"
            else [sd_x[0] / "text_encoder", "--lora", spec])
    t0 = time.perf_counter()
    r = run("-m", command, *args, "--out", tmp_path / "o")
    assert r.returncode == 2 and time.perf_counter() - t0 < 60
    line = one_error_line(r.stderr)
    assert "scale 'abc' is not a number" in line and "not found" not in line
    assert not (tmp_path / "o").exists()


# --- 15.4: LoRAs are bound before any model is built ------------------------------------------------


def test_bad_lora_fails_in_seconds_without_building_models(tmp_path, monkeypatch, capsys):
    from export.__main__ import main
    from export.models import ModelSource

    sd = load_file(str(SD_LORA))
    a = next(k for k in sd if k.startswith("unet.") and k.endswith("lora_A.weight"))
    bad = {**sd, "unet.down_blocks.7.attentions.0.proj_in.lora_A.weight": sd[a].clone(),
           "unet.down_blocks.7.attentions.0.proj_in.lora_B.weight": sd[a.replace("lora_A", "lora_B")].clone()}
    save_file(bad, str(tmp_path / "bad.safetensors"))

    def no_models(*args, **kwargs):
        raise AssertionError("a model was built before the LoRA was checked")

    monkeypatch.setattr(ModelSource, "load", no_models)
    t0 = time.perf_counter()
    code = main(["--family", "sd", "--model", "tiny", "--lora", str(tmp_path / "bad.safetensors"),
                 "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2 and time.perf_counter() - t0 < 10
    line = one_error_line(capsys.readouterr().err)
    assert "bad.safetensors" in line and "match no module" in line
    assert not (tmp_path / "o").exists() and hidden(tmp_path) == []


# --- 15.5: interrupts leave nothing behind ---------------------------------------------------------


@pytest.mark.parametrize("sig, code, message", [(signal.SIGTERM, 143, None),
                                                (signal.SIGINT, 130, "error: interrupted; nothing was written")])
def test_interrupted_export_leaves_nothing(tmp_path, sig, code, message):
    out = tmp_path / "o"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.Popen([sys.executable, "-m", "export", "--family", "sd", "--model", "tiny", "--lora", str(SD_LORA),
                          "--out", str(out), "-v"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        # Interrupt at a known point, never after a guessed delay: when the export says it has built the
        # first component's model (its trace, two more components and the pipeline files are still ahead)
        seen = []
        for line in p.stderr:
            seen.append(line)
            if "unet: built or loaded the model" in line:
                break
        assert p.poll() is None, "".join(seen)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == code, err
    assert "Traceback" not in err, err
    if message:
        assert err.strip().splitlines()[-1] == message
    assert not out.exists() and hidden(tmp_path) == []


# --- 15.11: exit codes and help ----------------------------------------------------------------------


def test_failure_while_working_exits_1(tmp_path, monkeypatch, capsys):
    import export.validate as V
    from export.__main__ import main

    monkeypatch.setitem(V.TOLERANCE, "float32", -1.0)
    code = main(["--family", "sd", "--model", "tiny", "--components", "text_encoder", "--out", str(tmp_path / "o"),
                 "--no-progress"])
    assert code == 1 and "beyond the float32 tolerance" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_refit_bad_input_exits_2(sd_x, tmp_path):
    r = run("-m", "refit", sd_x[0] / "text_encoder", "--lora", tmp_path / "missing.safetensors", "--out", tmp_path / "o")
    assert r.returncode == 2 and "LoRA file not found" in one_error_line(r.stderr)
    r = run("-m", "refit", tmp_path / "nothing", "--out", tmp_path / "o")
    assert r.returncode == 2 and "no such engine directory" in one_error_line(r.stderr)


def test_refit_help_names_its_arguments():
    r = run("-m", "refit", "--help")
    assert r.returncode == 0
    assert "DIR2" not in r.stdout and "None: back to base" not in r.stdout
    assert "SRC" in r.stdout and "--out DST" in r.stdout and "leave out for the base model" in r.stdout


# --- 15.10: information-free warnings are dropped, real ones kept ------------------------------------


class _Records(logging.Handler):
    """Collects the records of one logger (whatever its propagation and levels elsewhere)."""

    def __init__(self, name: str):
        super().__init__(logging.DEBUG)
        self.logger, self.records = logging.getLogger(name), []

    def emit(self, record):
        self.records.append(record.getMessage())

    def __enter__(self):
        self.logger.addHandler(self)
        return self.records

    def __exit__(self, *exc):
        self.logger.removeHandler(self)


def test_tiny_fp16_cast_is_quiet_but_real_fp32_lists_still_warn():
    from export.tiny import build_tiny

    with _Records("diffusers.models.modeling_utils") as records:
        unet = build_tiny("sd", ["unet"], dtype=torch.float16)["unet"]
    assert {p.dtype for p in unet.parameters()} == {torch.float16}
    assert not [m for m in records if "kept in float32" in m]  # diffusers' warning listing no module: "[]"
    with _Records("diffusers.models.modeling_utils") as records:
        build_tiny("wan", ["transformer"], dtype=torch.float16)
    assert [m for m in records if "kept in float32: ['rope'" in m]  # a list that says something stays


def test_noise_filter_drops_only_known_messages():
    import export  # noqa: F401 - importing export installs the filters

    name = "torch.onnx._internal.exporter._registration"
    with _Records(name) as records:
        logging.getLogger(name).warning("torchvision is not installed. Skipping %s", "torchvision::nms")
        logging.getLogger(name).warning("a real problem with %s", "something")
    assert records == ["a real problem with something"]
