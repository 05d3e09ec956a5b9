"""Prompt to picture: `engines.load_pipeline` (diffusers' pipeline over the exported engines)
against diffusers' own pipeline over the same tiny models with the same LoRA fused (same
seed, scheduler and steps), after loading, after a refit to another LoRA and back to base;
and `python -m engines.generate`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

import engines
import export
import lora_loaders as L
from export.tiny import build_tiny
from lora_files import peft_lora
from pipeline_reference import image, reference_pipeline

ROOT = Path(__file__).resolve().parents[1]
ATTN = re.compile(r"(to_q|to_v|to_out\.0|add_k_proj|q_proj|k_proj|fc2)$")


@pytest.fixture(scope="module", params=["sd", "sdxl", "sd3", "flux"])
def exported(request, tmp_path_factory):
    family = request.param
    spec = L.get_family(family)
    root = tmp_path_factory.mktemp(f"pipe_{family}")
    models = {c: m for c, m in build_tiny(family).items() if spec.component(c).lora and c in spec.exported}
    files = {}
    for name, seed in (("x", 1), ("y", 2)):
        files[name] = root / f"{name}.safetensors"
        save_file(peft_lora(models, pattern=ATTN, seed=seed), str(files[name]))
    out = root / "out"
    export.export_pipeline(family, "tiny", [(str(files["x"]), 1.0)], out, progress=False)
    return family, out, files


def test_engine_pipeline_equals_diffusers_through_refits(exported):
    family, out, files = exported
    pipe = engines.load_pipeline(out)
    assert type(pipe).__name__ == f"Engine{L.get_family(family).pipeline}"
    assert pipe.get_active_adapters() == ["x"]  # what the export baked
    got = image(pipe)
    assert got.shape == (32, 32, 3)
    np.testing.assert_allclose(got, image(reference_pipeline(family, out, [(files["x"], 1.0)])), atol=1e-3, rtol=0)
    pipe.load_lora_weights(str(files["y"]), adapter_name="y")  # y becomes the only active adapter
    pipe.set_adapters(["y"], [0.8])
    assert pipe.get_active_adapters() == ["y"]
    np.testing.assert_allclose(image(pipe, 1), image(reference_pipeline(family, out, [(files["y"], 0.8)]), 1),
                               atol=1e-3, rtol=0)
    pipe.disable_lora()
    base = image(pipe, 2)
    np.testing.assert_allclose(base, image(reference_pipeline(family, out), 2), atol=1e-3, rtol=0)
    pipe.enable_lora()
    pipe.set_adapters([])
    np.testing.assert_allclose(image(pipe, 2), base, atol=0, rtol=0)


def test_pipeline_lora_errors_leave_the_engines_alone(exported):
    family, out, files = exported
    pipe = engines.load_pipeline(out)
    before = image(pipe, 3)
    with pytest.raises(ValueError, match="not in the list of present adapters"):
        pipe.set_adapters(["nope"])
    with pytest.raises(FileNotFoundError):
        pipe.load_lora_weights(str(out / "missing.safetensors"), adapter_name="m")
    np.testing.assert_array_equal(image(pipe, 3), before)
    assert pipe.get_active_adapters() == ["x"]


def test_per_block_weights_give_the_diffusers_image(exported):
    """Per-component and per-block weights through `engines.load_pipeline` are diffusers' (a UNet's
    down / mid / up), and all-zero blocks are not weight 1."""
    family, out, files = exported
    if family not in ("sd", "sdxl"):
        pytest.skip("per-block weights are a UNet's")
    te = "text_encoder_2" if family == "sdxl" else "text_encoder"
    pipe = engines.load_pipeline(out)
    full = image(pipe, 4)
    for weights in ({"unet": {"down": 0.5, "mid": 0.0, "up": 1.5}, te: 0.7}, {"unet": {"down": 0, "mid": 0, "up": 0}}):
        pipe.set_adapters(["x"], [weights])
        ref = reference_pipeline(family, out, [(files["x"], weights)])
        got = image(pipe, 4)
        np.testing.assert_allclose(got, image(ref, 4), atol=1e-3, rtol=0, err_msg=str(weights))
        assert np.abs(got - full).max() > 1e-3, weights  # not what weight 1 gives


def _generate(*args):
    return subprocess.run([sys.executable, "-m", "engines.generate", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONWARNINGS="ignore"))


def test_generate_cli_writes_the_image_and_refuses_bad_arguments(exported, tmp_path):
    family, out, files = exported
    if family != "sd":
        pytest.skip("one family is enough for the command line")
    from PIL import Image

    png = tmp_path / "cube.png"
    r = _generate(out, "--prompt", "a red cube", "--lora", f"{files['y']}:0.8", "--steps", 2, "--seed", 3,
                  "--height", 32, "--width", 48, "--out", png)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(png).size == (48, 32)
    assert "it/s" in r.stderr or "s/it" in r.stderr  # the progress bar over the steps
    for bad, says in [(("--height", 33), "multiple"), (("--steps", 0), "steps"),
                      (("--lora", tmp_path / "no.safetensors"), "not found"), (("--prompt", " "), "empty")]:
        args = ["--prompt", "a red cube", "--steps", 2, "--out", tmp_path / "bad.png", *bad]
        r = _generate(out, *args)
        assert r.returncode == 2 and says in r.stderr, (bad, r.stderr[-500:])
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "bad.png").exists()
