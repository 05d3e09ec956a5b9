"""Refit benchmark: swap a LoRA in a built ONNX Runtime engine vs re-export + new session.

Real-config SD 1.5 UNet (random weights: built on the meta device, then materialized), a
rank-32 LoRA over every attention projection and feed-forward layer. In one run:

- re-export: load + fuse adapter A with the mixins, export the UNet to ONNX (weights map
  included), then create a new ONNX Runtime session (what a swap costs without refit);
- swap A -> B in each `OrtEngine` weight mode (`inputs`: in place; `session`: new session),
  through `refit.Refitter` (effective weights from base, transform, validate, write);
- inference (batch 2, 64x64 latents, 77 tokens) of the refittable engines vs the baked graph
  in a plain session.

Prints the times and the ratios. `--smoke` runs the same on the tiny SD UNet in seconds.

    python bench/bench_refit.py [--smoke] [--runs 2] [--workdir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
ATTN_FF = re.compile(r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)$")


def build_unet(smoke: bool):
    from diffusers import UNet2DConditionModel

    if smoke:
        from lora_loaders.families import get_family

        config = dict(get_family("sd").component("unet").tiny)
    else:
        config = SD15_UNET
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet = unet.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.01, generator=g)
            elif p.dim() == 1:  # norm scales
                p.fill_(1.0)
            else:
                fan_in = p[0].numel()
                p.normal_(0, fan_in ** -0.5, generator=g)
        for _, b in unet.named_buffers():
            b.zero_()
    return unet.eval()


def write_lora(unet, path: Path, rank: int, seed: int) -> int:
    from safetensors.torch import save_file
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in unet.named_modules():
        if isinstance(m, nn.Linear) and ATTN_FF.search(name):
            sd[f"unet.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * m.in_features ** -0.5
            sd[f"unet.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.01
    save_file(sd, str(path))
    return len(sd) // 2


def export_with(unet, lora: Path, out_dir: Path) -> float:
    """Fuse `lora` into the UNet (mixins), export with the weights map, write base weights. Returns seconds."""
    from safetensors.torch import save_file

    from export.onnx_export import export_component
    from lora_loaders import get_family, loader_for

    from torch import nn

    targets = [f"{n}.weight" for n, m in unet.named_modules() if isinstance(m, nn.Linear) and ATTN_FF.search(n)]
    params = dict(unet.named_parameters())
    base = {p: params[p].detach().clone() for p in targets}  # what export writes as base weights
    t0 = time.perf_counter()
    loader = loader_for("sd", unet=unet)
    loader.load_lora_weights(str(lora), adapter_name="a")
    loader.fuse_lora()
    export_component(unet, get_family("sd").component("unet"), out_dir, get_family("sd"))
    elapsed = time.perf_counter() - t0
    save_file(base, str(out_dir / "base_weights.safetensors"))
    del base
    return elapsed


def make_feeds(smoke: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    hw, ctx = (16, 32) if smoke else (64, 768)
    return {"sample": rng.standard_normal((2, 4, hw, hw)).astype(np.float32),
            "timestep": np.array([500.0, 500.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, ctx)).astype(np.float32)}


def timed_infer(run, feeds, runs: int) -> tuple[float, dict]:
    out = run(feeds)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = run(feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> int:
    """Reset the kernel's high-water mark to the current RSS (Linux); returns that RSS (0 elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _vm("VmRSS")
    except OSError:
        return 0


def _rss_peak_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def phase_export(args, work: Path, rank: int) -> dict:
    res = {}
    t0 = time.perf_counter()
    unet = build_unet(args.smoke)
    res["params"] = sum(p.numel() for p in unet.parameters())
    res["build_s"] = time.perf_counter() - t0
    res["lora_modules"] = write_lora(unet, work / "a.safetensors", rank, 1)
    write_lora(unet, work / "b.safetensors", rank, 2)
    res["model_bytes"] = sum(p.numel() * p.element_size() for p in unet.parameters())
    res["reexport_s"] = export_with(unet, work / "a.safetensors", work / "unet_a")
    res["export_peak_rss_gb"] = _rss_peak_gb()
    return res


def phase_baked(args, work: Path, rank: int) -> dict:
    import onnxruntime as ort

    feeds = make_feeds(args.smoke)
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(work / "unet_a" / "model.onnx"), providers=["CPUExecutionProvider"])
    res = {"new_session_s": time.perf_counter() - t0}
    res["infer_baked_s"], _ = timed_infer(lambda f: sess.run(None, f), feeds, args.runs)
    res["baked_peak_rss_gb"] = _rss_peak_gb()
    return res


def phase_mode(args, work: Path, rank: int, mode: str) -> dict:
    import engines
    import refit

    feeds = make_feeds(args.smoke)
    res = {}
    t0 = time.perf_counter()
    engine = engines.OrtEngine(work / "unet_a", mode=mode)
    res[f"{mode}_load_s"] = time.perf_counter() - t0
    r = refit.Refitter(engine)
    t0 = time.perf_counter()
    r.load_lora(str(work / "b.safetensors"), adapter_name="b")  # first load: parse the file + swap A -> B
    res[f"{mode}_load_lora_s"] = time.perf_counter() - t0
    r.load_lora(str(work / "a.safetensors"), adapter_name="a")  # B -> A
    swaps, cpus = [], []
    rss0 = _reset_peak()
    for _ in range(args.swaps):
        t0, c0 = time.perf_counter(), time.process_time()
        r.set_adapters(["b"])  # A -> B, adapters parsed: the swap itself
        swaps.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        res[f"{mode}_swap_breakdown"] = dict(r.last_refit)
        r.set_adapters(["a"])
    res[f"{mode}_swap_extra_rss_gb"] = (_vm("VmHWM") - rss0) / 1e9 if rss0 else None  # what the swaps added
    res[f"{mode}_swap_s"] = min(swaps)
    res[f"{mode}_swaps_s"] = swaps
    res[f"{mode}_swap_cpu_s"] = min(cpus)
    res[f"{mode}_load_avg"] = os.getloadavg()[0]
    if mode == "inputs":  # the floor, in the same process: rank-r products + one copy of the targeted weights
        from safetensors.torch import load_file

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from bench.floor import floor

        sd = load_file(str(work / "b.safetensors"))
        modules = {k[len("unet."):-len(".lora_A.weight")] for k in sd if k.endswith(".lora_A.weight")}
        entries = r.files.map.by_initializer
        arrays = engine.get_weights([n for n in engine.weight_names()
                                     if entries[n].module in modules and entries[n].kind == "weight"])
        weights = [torch.from_numpy(a) for a in arrays.values()]
        factors = [(sd[k.replace("lora_A", "lora_B")], sd[k]) for k in sd if k.endswith("lora_A.weight")]
        res.update({f"floor_{k}": v for k, v in floor(weights, factors).items()})
        del arrays, weights
    res[f"infer_{mode}_s"], _ = timed_infer(engine.infer, feeds, args.runs)
    res[f"{mode}_peak_rss_gb"] = _rss_peak_gb()
    return res


PHASES = ("export", "baked", "inputs", "session")


def run_phase(args, work: Path, rank: int) -> dict:
    if args.phase == "export":
        return phase_export(args, work, rank)
    if args.phase == "baked":
        return phase_baked(args, work, rank)
    return phase_mode(args, work, rank, args.phase)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny UNet, rank 4: seconds, for tests")
    ap.add_argument("--runs", type=int, default=2, help="timed inference runs per engine (after one warm-up)")
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--swaps", type=int, default=3, help="timed A -> B swaps per weight mode (the best is reported)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--in-process", action="store_true",
                    help="run every phase in this process (faster start; peak RSS per phase is then cumulative)")
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # internal: one phase per process
    args = ap.parse_args(argv)
    rank = args.rank or (4 if args.smoke else 32)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_refit_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.phase:
        torch.set_num_threads(torch.get_num_threads())
        res = run_phase(args, work, rank)
        (work / f"{args.phase}.json").write_text(json.dumps(res))
        return res

    # Each phase in its own process: clean memory, and peak RSS per phase.
    import subprocess

    from lora_loaders import kernels

    res: dict = {"model": "tiny sd unet" if args.smoke else "SD 1.5 UNet (real config, random weights)",
                 "rank": rank, "threads": torch.get_num_threads(), "host": kernels.describe_host()}
    try:
        for phase in PHASES:
            if args.in_process:  # the smoke: no interpreter start-up per phase (seconds each); RSS not separated
                res.update(run_phase(argparse.Namespace(**{**vars(args), "phase": phase}), work, rank))
                print(f"[{phase}] done (in process)", file=sys.stderr)
                continue
            cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--workdir", str(work),
                   "--runs", str(args.runs), "--rank", str(rank), "--swaps", str(args.swaps)] \
                + (["--smoke"] if args.smoke else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"bench phase {phase} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
            res.update(json.loads((work / f"{phase}.json").read_text()))
            print(f"[{phase}] done, peak RSS {res.get(phase + '_peak_rss_gb', 0):.1f} GB", file=sys.stderr)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    redo = res["reexport_s"] + res["new_session_s"]
    res["reexport_plus_session_s"] = redo
    res["floor_s"] = res.get("floor_floor_s")
    res["floor_cpu_s"] = res.get("floor_floor_cpu_s")
    for mode in ("inputs", "session"):
        res[f"speedup_{mode}_vs_reexport"] = redo / res[f"{mode}_swap_s"]
        if res["floor_s"]:
            res[f"{mode}_swap_x_floor"] = res[f"{mode}_swap_s"] / res["floor_s"]
            res[f"{mode}_swap_cpu_x_floor"] = res[f"{mode}_swap_cpu_s"] / res["floor_cpu_s"]
        res[f"infer_ratio_{mode}_vs_baked"] = res[f"infer_{mode}_s"] / res["infer_baked_s"]
    _print(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


def _print(res):
    print(f"# {res['model']}: {res['params'] / 1e6:.0f} M params, LoRA rank {res['rank']} on "
          f"{res['lora_modules']} Linear modules, {res['threads']} threads")
    print(f"# {res['host']}")
    if res.get("floor_s"):
        print(f"floor                            {res['floor_s']:8.3f} s   (float32 rank-{res['rank']} products "
              f"{res['floor_gemm_s']:.3f} s, {res['floor_gflop']:.1f} GFLOP + copy of the targeted weights "
              f"{res['floor_copy_s']:.3f} s, {res['floor_bytes'] / 1e9:.2f} GB moved)")
        print(f"floor in CPU time                {res['floor_cpu_s']:8.3f} s")
        if res.get("floor_c_product_s"):
            print(f"  (the same products by our C kernels: {res['floor_c_product_s']:.3f} s)")
    x = (lambda s: f" = {s / res['floor_s']:.2f}x the floor") if res.get("floor_s") else (lambda s: "")
    print(f"re-export (fuse + export)        {res['reexport_s']:8.2f} s{x(res['reexport_s'])}")
    print(f"new ORT session                  {res['new_session_s']:8.2f} s")
    print(f"re-export + new session          {res['reexport_plus_session_s']:8.2f} s{x(res['reexport_plus_session_s'])}"
          "   (the alternative to a refit swap)")
    for mode in ("inputs", "session"):
        cpu = (f"; CPU time {res[f'{mode}_swap_cpu_s']:.3f} s = {res[f'{mode}_swap_cpu_x_floor']:.2f}x the floor's"
               if res.get("floor_cpu_s") else "")
        extra = res.get(f"{mode}_swap_extra_rss_gb")
        mem = (f"; RSS added by the swaps {extra:.2f} GB = {100 * extra * 1e9 / res['model_bytes']:.1f}% of the "
               f"model ({res['model_bytes'] / 1e9:.2f} GB)" if extra is not None else "")
        print(f"swap A->B, mode={mode:8s}        {res[f'{mode}_swap_s']:8.3f} s{x(res[f'{mode}_swap_s'])}   "
              f"({res[f'speedup_{mode}_vs_reexport']:.0f}x faster than re-export + session; "
              f"first load incl. parse {res[f'{mode}_load_lora_s']:.2f} s{cpu}{mem}; "
              f"load average {res.get(f'{mode}_load_avg', 0):.1f}); all swaps: "
              + ", ".join(f"{t:.3f}" for t in res[f"{mode}_swaps_s"]))
    print(f"inference baked                  {res['infer_baked_s']:8.3f} s")
    for mode in ("inputs", "session"):
        print(f"inference mode={mode:8s}         {res[f'infer_{mode}_s']:8.3f} s   "
              f"(x{res[f'infer_ratio_{mode}_vs_baked']:.3f} of baked)")
    print("peak RSS GB: " + ", ".join(f"{p} {res.get(p + '_peak_rss_gb', 0):.1f}" for p in PHASES))


if __name__ == "__main__":
    main()
