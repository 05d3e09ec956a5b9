"""bench/bench_refit.py --smoke: the benchmark runs end to end on the tiny UNet (phases in one process:
the real run gives each phase its own process for clean peak-memory figures)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def test_bench_refit_smoke(tmp_path):
    path = Path(__file__).resolve().parent.parent / "bench" / "bench_refit.py"
    spec = importlib.util.spec_from_file_location("bench_refit", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--smoke", "--in-process", "--runs", "1", "--workdir", str(tmp_path / "w"),
                    "--json", str(tmp_path / "r.json")])
    for key in ("reexport_s", "new_session_s", "inputs_swap_s", "session_swap_s", "infer_baked_s",
                "infer_inputs_s", "infer_session_s", "speedup_inputs_vs_reexport", "infer_ratio_inputs_vs_baked"):
        assert res[key] > 0, key
    assert res["inputs_swap_s"] < res["reexport_plus_session_s"]
    assert res["floor_s"] > 0 and res["floor_cpu_s"] > 0 and res["inputs_swap_cpu_x_floor"] > 0
    assert (tmp_path / "r.json").is_file()
    from lora_loaders import kernels

    assert res["host"] == kernels.describe_host() and res["host"].startswith("CPU ")
