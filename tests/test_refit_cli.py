"""`python -m refit DIR --lora y:S --out DIR2`: a new engine directory, bit-identical weights to an export."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import engines
import refit
from lora_loaders.io import parse_lora_arg as parse_lora
from refit.__main__ import main
from refit_helpers import differing, exported, initializers, lora_files

FAMILY, COMPONENT = "sd", "text_encoder"


def test_parse_lora():
    assert parse_lora("a/b.safetensors:0.8") == ("a/b.safetensors", 0.8)
    assert parse_lora("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_lora("C:/x/y.safetensors") == ("C:/x/y.safetensors", 1.0)


def test_cli_stack_matches_export(tmp_path_factory, tmp_path):
    root = tmp_path_factory.getbasetemp()
    files = lora_files(root, FAMILY)
    src = exported(root, FAMILY, "x", [COMPONENT]) / COMPONENT
    out = tmp_path / "xy" / COMPONENT
    rc = main([str(src), "--lora", f"{files['x']}:1.0", "--lora", f"{files['y']}:0.5", "--out", str(out)])
    assert rc == 0
    ref = exported(root, FAMILY, "xy", [COMPONENT]) / COMPONENT
    a, b = initializers(out / "model.onnx"), initializers(ref / "model.onnx")
    assert set(a) == set(b) and differing(a, b) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(m["name"], m["scale"]) for m in manifest["adapters"]] == [("x", 1.0), ("y", 0.5)]
    assert (out / "weights_map.json").read_bytes() == (src / "weights_map.json").read_bytes()
    # The new directory is itself refittable: back to base from it matches the base export.
    engine = engines.load_engine(out)
    refit.Refitter(engine).set_adapters([])
    base = initializers(exported(root, FAMILY, "base", [COMPONENT]) / COMPONENT / "model.onnx")
    assert differing(engine.get_weights(), base, engine.weight_names()) == []


def test_cli_to_base_subprocess(tmp_path_factory, tmp_path):
    root = tmp_path_factory.getbasetemp()
    src = exported(root, FAMILY, "x", [COMPONENT]) / COMPONENT
    out = tmp_path / "base"
    res = subprocess.run([sys.executable, "-m", "refit", str(src), "--out", str(out)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    a = initializers(out / "model.onnx")
    b = initializers(exported(root, FAMILY, "base", [COMPONENT]) / COMPONENT / "model.onnx")
    assert differing(a, b) == []
    assert not (out / "base_weights.safetensors").exists()


def test_cli_errors_leave_nothing(tmp_path_factory, tmp_path, capsys):
    root = tmp_path_factory.getbasetemp()
    src = exported(root, FAMILY, "x", [COMPONENT]) / COMPONENT
    out = tmp_path / "o"
    assert main([str(src), "--lora", str(tmp_path / "missing.safetensors"), "--out", str(out)]) == 2  # bad input
    assert "not found" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert main([str(src), "--lora", str(bad), "--out", str(out)]) == 2
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]
    with pytest.raises(SystemExit):
        main([str(src)])


def test_cli_pipeline_directory(tmp_path_factory, tmp_path):
    """DIR may be a whole export (manifest + component dirs): every component is refitted."""
    root = tmp_path_factory.getbasetemp()
    files = lora_files(root, FAMILY)
    src = exported(root, FAMILY, "x")
    out = tmp_path / "y_half"
    assert main([str(src), "--lora", f"{files['x']}:1.0", "--lora", f"{files['y']}:0.5", "--out", str(out)]) == 0
    ref = exported(root, FAMILY, "xy")
    for component in ("unet", "text_encoder"):
        a, b = initializers(out / component / "model.onnx"), initializers(ref / component / "model.onnx")
        assert set(a) == set(b) and differing(a, b) == [], component
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["components"]) == {"unet", "text_encoder"}
    assert [a["scale"] for a in manifest["adapters"]] == [1.0, 0.5]
    baked = json.loads((ref / "manifest.json").read_text())["components"]["unet"]["baked_params"]
    assert sorted(manifest["components"]["unet"]["baked_params"]) == sorted(baked)
