"""Real-scale export (slow: ~5 GB of weights, minutes on CPU). Run with --run-slow, alone."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.slow
def test_real_sdxl_unet_fp16_export_loads_and_runs_in_ort():
    from bench_export import run

    result = run("fp16", rank=16, lora=True)
    print(result)
    assert result["validation_passed"]
    assert result["external_data"] == "model.onnx.data"
    assert result["baked_params"] > 0
