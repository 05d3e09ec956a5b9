"""Load + fuse of a rank-32 kohya LoRA into an SDXL UNet: ours against diffusers + PEFT, one run.

The LoRA covers every attention, feed-forward, proj_in and proj_out Linear (722 modules,
2.2 B targeted parameters at the real SDXL config). Each side runs in its own process on the
same file, so peak resident memory is measured cleanly (the kernel's high-water mark is reset
after the model is built). A third process measures the machine's floor for the same work in
the same run (bench/floor.py: the float32 rank-r products of the same shapes into preallocated
outputs, plus one copy of the targeted weights). Prints the floor, both times as multiples of
it, the ratio and the memory overheads; --repeat N runs the three N times, interleaved.

    python bench/bench_load_fuse.py            # real SDXL config, fp16 (about 2 minutes)
    python bench/bench_load_fuse.py --repeat 3 # three interleaved runs
    python bench/bench_load_fuse.py --smoke    # tiny SDXL, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = re.compile(r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out)$")


def build_unet(smoke: bool, dtype):
    if smoke:
        from export.tiny import build_tiny

        return build_tiny("sdxl", ["unet"], dtype=dtype)["unet"]
    from bench.real_models import real_unet

    return real_unet("sdxl", dtype=dtype)


def write_lora(unet, path: Path, rank: int, dtype):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    sd = {}
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and TARGETS.search(name):
            key = "lora_unet_" + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"] = (torch.randn(rank, m.in_features, generator=g) * 0.01).to(dtype)
            sd[f"{key}.lora_up.weight"] = (torch.randn(m.out_features, rank, generator=g) * 0.01).to(dtype)
            sd[f"{key}.alpha"] = torch.tensor(float(rank // 2))
    save_file(sd, path)
    return len(sd) // 3


def _rss() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _reset_peak():
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _floor(unet, lora: Path) -> dict:
    from safetensors.torch import load_file

    from bench.floor import floor

    sd = load_file(str(lora))
    modules = {"lora_unet_" + n.replace(".", "_"): m for n, m in unet.named_modules()}
    weights, factors = [], []
    for key in sd:
        if key.endswith(".lora_down.weight"):
            stem = key[: -len(".lora_down.weight")]
            weights.append(modules[stem].weight.data)
            factors.append((sd[f"{stem}.lora_up.weight"], sd[key]))
    return floor(weights, factors)


def run_side(side: str, smoke: bool, lora: Path, dtype) -> dict:
    unet = build_unet(smoke, dtype)
    model_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    if side == "floor":
        return {"side": side, "model_bytes": model_bytes, **_floor(unet, lora)}
    _reset_peak()
    rss0, _ = _rss()
    extra = {}
    t, c = time.perf_counter(), time.process_time()
    if side == "ours":
        import lora_loaders
        from lora_loaders import kernels

        loader = lora_loaders.loader_for("sdxl", unet=unet)
        loader.load_lora_weights(str(lora), adapter_name="x")
        loader.fuse_lora(components=["unet"])
        seconds, cpu_s = time.perf_counter() - t, time.process_time() - c
        extra = {"host": kernels.describe_host(), "residual_bytes": loader._stores["unet"].residual_bytes()}
        t = time.perf_counter()
        loader.unfuse_lora(components=["unet"])
        loader.set_adapters(["x"], 0.0)  # the exact base weights again
        extra["restore_s"] = time.perf_counter() - t
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from reference import diffusers_loader

        pipe = diffusers_loader("sdxl", {"unet": unet})
        pipe.load_lora_weights(str(lora), adapter_name="x")
        pipe.fuse_lora(components=["unet"])
        seconds, cpu_s = time.perf_counter() - t, time.process_time() - c
    _, peak = _rss()
    return {"side": side, "seconds": seconds, "cpu_s": cpu_s, "model_bytes": model_bytes, "rss_before": rss0,
            "peak": peak, "load_avg": os.getloadavg()[0], **extra}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, for CI")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--repeat", type=int, default=1, help="interleaved runs of floor, ours and diffusers")
    p.add_argument("--in-process", action="store_true", help="every side in this process (for the smoke)")
    p.add_argument("--side", choices=["floor", "ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--lora", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    dtype = torch.float32 if args.smoke else torch.float16
    if args.side:  # a child process: one side, JSON on stdout
        print(json.dumps(run_side(args.side, args.smoke, args.lora, dtype)))
        return 0
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        lora = Path(tmp) / "lora.safetensors"
        unet = build_unet(args.smoke, dtype)
        n = write_lora(unet, lora, args.rank, dtype)
        del unet
        for i in range(args.repeat):
            results = {}
            for side in ("floor", "ours", "diffusers"):
                if args.in_process:  # the smoke: no interpreter start-ups (memory figures then less clean)
                    results[side] = run_side(side, args.smoke, lora, dtype)
                    continue
                cmd = [sys.executable, __file__, "--side", side, "--lora", str(lora), "--rank", str(args.rank)]
                out = subprocess.run(cmd + (["--smoke"] if args.smoke else []), check=True, capture_output=True,
                                     text=True)
                results[side] = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append(results)
            _report(results, n, args, dtype, i)
            sys.stdout.flush()
    results = runs[-1]
    if args.repeat > 1:
        import statistics

        med = statistics.median
        print(f"median of {args.repeat} runs: ours {med(r['ours']['seconds'] / r['floor']['floor_s'] for r in runs):.2f}x "
              f"the floor, diffusers {med(r['diffusers']['seconds'] / r['floor']['floor_s'] for r in runs):.2f}x, "
              f"speed-up {med(r['diffusers']['seconds'] / r['ours']['seconds'] for r in runs):.2f}x; in CPU time: "
              f"ours {med(r['ours']['cpu_s'] / r['floor']['floor_cpu_s'] for r in runs):.2f}x, diffusers "
              f"{med(r['diffusers']['cpu_s'] / r['floor']['floor_cpu_s'] for r in runs):.2f}x")
    results["runs"] = runs
    return results


def _report(results, n, args, dtype, i):
    fl, ours, ref = results["floor"], results["ours"], results["diffusers"]
    gb = 1 << 30
    if i == 0:
        print(f"# {ours['host']}")
    print(f"run {i + 1}: load + fuse of a rank-{args.rank} kohya LoRA over {n} Linear modules "
          f"({'tiny' if args.smoke else 'real SDXL'} UNet, {str(dtype).removeprefix('torch.')}, "
          f"{ours['model_bytes'] / gb:.2f} GiB of weights)")
    print(f"  floor      {fl['floor_s']:8.2f} s   = float32 rank-{args.rank} products {fl['gemm_s']:.2f} s "
          f"({fl['gflop']:.0f} GFLOP, {fl['gflop'] / fl['gemm_s']:.0f} GFLOP/s) + copy of the targeted weights "
          f"{fl['copy_s']:.2f} s ({fl['bytes'] / fl['copy_s'] / 1e9:.0f} GB/s); CPU time {fl['floor_cpu_s']:.2f} s")
    if fl.get("c_product_s"):
        print(f"             (the same products by our C kernels: {fl['c_product_s']:.2f} s, "
              f"{fl['gflop'] / fl['c_product_s']:.0f} GFLOP/s)")
    for r in (ours, ref):
        over = (r["peak"] - r["rss_before"]) / r["model_bytes"]
        print(f"  {r['side']:10s} {r['seconds']:8.2f} s = {r['seconds'] / fl['floor_s']:5.2f}x the floor "
              f"(CPU time {r['cpu_s']:.2f} s = {r['cpu_s'] / fl['floor_cpu_s']:.2f}x the floor's)   "
              f"peak RSS {r['peak'] / gb:6.2f} GiB (+{100 * over:5.1f}% of the model over the RSS before loading; "
              f"limit +10%: {'ok' if over <= 0.10 else 'OVER'})   load average {r['load_avg']:.1f}")
    if "residual_bytes" in ours:
        print(f"  ours: exact-restore residual {ours['residual_bytes'] / 2**20:.0f} MiB "
              f"({100 * ours['residual_bytes'] / ours['model_bytes']:.1f}% of the model), "
              f"unfuse (exact restore) {ours['restore_s']:.2f} s")
    print(f"  speed-up: {ref['seconds'] / ours['seconds']:.2f}x")


if __name__ == "__main__":
    main()
