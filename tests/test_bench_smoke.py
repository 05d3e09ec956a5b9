"""Small runs of the load + fuse and export benchmarks (the real-scale runs are manual or --run-slow)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_bench_load_fuse_smoke(capsys):
    import bench_load_fuse

    results = bench_load_fuse.main(["--smoke", "--in-process", "--rank", "4"])
    for side in ("ours", "diffusers"):
        assert results[side]["seconds"] > 0 and results[side]["peak"] >= results[side]["rss_before"]
    assert results["floor"]["floor_s"] > 0 and results["floor"]["floor_cpu_s"] > 0
    out = capsys.readouterr().out
    assert "speed-up:" in out and "the floor" in out and "CPU time" in out and "peak RSS" in out
    # where it was measured: the CPU, the instruction set and the kernel path
    from lora_loaders import kernels

    assert f"# {kernels.describe_host()}" in out and f"CPU {kernels.cpu_model()}" in out
    if kernels.isa():
        assert f"{kernels.isa()} + FMA" in out and "the same products by our C kernels" in out


def test_bench_export_smoke():
    from bench_export import run

    result = run("fp16", rank=4, config="tiny_sdxl")
    assert result["validation_passed"], result["validation"]
    assert result["baked_params"] > 0 and result["lora_modules"] > 0
    assert result["peak_rss_gb"] > 0 and result["weights_gb"] >= 0
    from lora_loaders import kernels

    assert result["host"] == kernels.describe_host()
