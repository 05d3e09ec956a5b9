"""One GPU check (issue 14), one table. Under 8 minutes on one GPU; `--cpu` is a seconds-long smoke.

    python bench/gpu_check.py            # CUDA: real SDXL UNet config (random weights), fp16
    python bench/gpu_check.py --cpu      # the tiny SDXL UNet on CPU (what the default tests run)

(a) effective weights on the device: a rank-32 LoRA over the UNet's attention / feed-forward /
    proj Linear layers (722 at the real config), the one effective-weight function into
    preallocated outputs, beside the bandwidth floor (one read + one write of those weights) and
    the float32 rank-32 products alone, measured in the same run;
(b) the torch engine over that UNet: refit x -> y -> base through `refit.Refitter`, each state's
    weights and output compared bit for bit with a fresh fuse (the mixins on a fresh copy), the
    refit time against the floor, and recompiles under torch.compile (dynamo's frame counter;
    default backend: capture only, `--inductor` for the real compiler): must be 0;
(c) where TensorRT imports: a tiny SDXL UNet built (Polygraphy), compared with ONNX Runtime,
    refit x -> y -> base against fresh builds, refit time against build time.
What it cannot run, it says in one line each.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = re.compile(r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out)$")
ROWS: list[tuple[str, str, str]] = []


def row(check: str, result: str, status: str = ""):
    ROWS.append((check, result, status))
    print(f"  [{status or '-':4s}] {check}: {result}", file=sys.stderr, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_unet(cpu: bool, device, dtype):
    from diffusers import UNet2DConditionModel

    from bench.real_models import CONFIGS

    with torch.device("meta"):
        unet = UNet2DConditionModel(**CONFIGS["tiny_sdxl" if cpu else "sdxl"])
    unet = unet.to(dtype=dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02, generator=g)
        for b in unet.buffers():
            b.zero_()
    return unet.eval().requires_grad_(False)


def write_lora(unet, path: Path, rank: int, seed: int) -> int:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and TARGETS.search(name):
            key = "lora_unet_" + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"] = (torch.randn(rank, m.in_features, generator=g) * 0.01).half()
            sd[f"{key}.lora_up.weight"] = (torch.randn(m.out_features, rank, generator=g) * 0.01).half()
            sd[f"{key}.alpha"] = torch.tensor(float(rank // 2))
    save_file(sd, str(path))
    return len(sd) // 3


def best(fn, device, repeats=3) -> float:
    t_best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        t_best = min(t_best, time.perf_counter() - t)
    return t_best


def check_effective_weights(unet, lora: Path, device) -> dict:
    from lora_loaders import read_lora
    from lora_loaders.weights import effective_weight

    adapter = read_lora(str(lora), family="sdxl")
    mods = dict(unet.named_modules())
    jobs = []
    for (_, module), layer in adapter.layers.items():
        layer.tensors = {k: v.to(device) for k, v in layer.tensors.items()}  # the adapter on the device
        w = mods[module].weight.data
        jobs.append((w, [(layer, 1.0)], torch.empty_like(w)))
    ours = best(lambda: [effective_weight(w, cs, out=o) for w, cs, o in jobs], device)
    copy = best(lambda: [o.copy_(w) for w, _, o in jobs], device)
    pairs = [(cs[0][0].tensors["up"].float() * cs[0][0].scale, cs[0][0].tensors["down"].float()) for _, cs, _ in jobs]
    big = max(u.shape[0] * d.shape[1] for u, d in pairs)
    buf = torch.empty(big, device=device)
    gemm = best(lambda: [torch.mm(u, d, out=buf[: u.shape[0] * d.shape[1]].view(u.shape[0], d.shape[1]))
                         for u, d in pairs], device)
    nbytes = sum(2 * w.numel() * w.element_size() for w, _, _ in jobs)
    res = {"modules": len(jobs), "ours_s": ours, "floor_s": copy, "gemm_s": gemm, "bytes": nbytes}
    ratio = ours / copy
    row(f"(a) effective weights, rank-32 LoRA over {len(jobs)} Linear layers",
        f"{ours * 1e3:.2f} ms; bandwidth floor (1 read + 1 write, {nbytes / 1e9:.2f} GB) {copy * 1e3:.2f} ms "
        f"({nbytes / copy / 1e9:.0f} GB/s); float32 rank-32 products alone {gemm * 1e3:.2f} ms; {ratio:.2f}x the floor",
        "ok" if ratio <= 2.0 or device.type == "cpu" else "SLOW")
    return res


def _write_files(unet, directory: Path):
    """A component directory for the Refitter over this module: weights map (identity entries) and
    base_weights.safetensors holding every mapped parameter (so no ONNX is needed), plus a stub
    model.onnx the directory layout expects (never read)."""
    import onnx
    from safetensors.torch import save_file

    from engines.weights_map import WeightsMap, make_transform
    from lora_loaders.index import targetable_parameters

    directory.mkdir(parents=True, exist_ok=True)
    params = dict(unet.named_parameters())
    names = [p for p in targetable_parameters(unet) if p in params]
    entries = {}
    for p in names:
        dt = str(params[p].dtype).removeprefix("torch.")
        entries[p] = {"param": p, **make_transform(list(params[p].shape), dt, list(params[p].shape), dt)}
    WeightsMap.new("unet", "sdxl", str(next(unet.parameters()).dtype).removeprefix("torch."), entries).save(directory)
    save_file({p: params[p].detach().cpu().contiguous() for p in names}, str(directory / "base_weights.safetensors"))
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "stub", [], [])), str(directory / "model.onnx"))


def check_torch_engine(unet_factory, loras: dict, device, inductor: bool, work: Path) -> dict:
    from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

    import lora_loaders
    import refit
    from engines.torch_engine import TorchEngine

    unet = unet_factory()
    _write_files(unet, work / "unet")
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor") if inductor else CompileCounter()
    # resident_bases: the device path (base weights kept where the engine's are) also under --cpu
    engine = TorchEngine(work / "unet", device=device, model=unet, compile={"backend": counter}, resident_bases=True)
    fresh_model = unet_factory()  # the same seed: the same base bits
    fresh = TorchEngine(work / "unet", device=device, model=fresh_model)  # uncompiled, for outputs
    rng = torch.Generator().manual_seed(3)
    cfg = unet.config
    hw = 16 if device.type == "cpu" else 64
    feeds = {"sample": torch.randn(1, cfg.in_channels, hw, hw, generator=rng),
             "timestep": torch.tensor([500.0]),
             "encoder_hidden_states": torch.randn(1, 77, cfg.cross_attention_dim, generator=rng),
             "text_embeds": torch.randn(1, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim,
                                        generator=rng),
             "time_ids": torch.tensor([[hw * 8, hw * 8, 0, 0, hw * 8, hw * 8]], dtype=torch.float32)}
    dtype_np = next(unet.parameters()).dtype
    feeds = {k: (v.to(dtype_np) if k != "timestep" and v.is_floating_point() else v).numpy() if dtype_np != torch.bfloat16
             else v.numpy() for k, v in feeds.items()}
    feeds = {k: v for k, v in feeds.items() if k in engine.input_names}
    out_name = engine.output_names[0]
    engine.infer(feeds)
    compiles = counter.frame_count
    r = refit.Refitter(engine)
    loader = None
    results = {}
    # loads include reading and binding the file; the swaps after them are the refit alone
    states = [("x (load)", lambda: r.load_lora(str(loras["x"]), adapter_name="x"), [("x", 1.0)]),
              ("y (load)", lambda: r.load_lora(str(loras["y"]), adapter_name="y"), [("y", 1.0)]),
              ("x (swap)", lambda: r.set_adapters(["x"]), [("x", 1.0)]),
              ("y (swap)", lambda: r.set_adapters(["y"]), [("y", 1.0)]),
              ("base", lambda: r.set_adapters([]), [])]
    weights_bytes = sum(2 * p.numel() * p.element_size() for n, p in unet.named_parameters()
                        if TARGETS.search(n.rsplit(".", 1)[0]))
    same_all = True
    for name, step, fused in states:
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        seconds = time.perf_counter() - t
        # a fresh fuse of the same adapters into a fresh base copy (the mixins)
        with torch.no_grad():
            for (_, p), (_, q) in zip(fresh_model.named_parameters(), unet_factory().named_parameters()):
                p.copy_(q)
        if fused:
            loader = lora_loaders.loader_for("sdxl", unet=fresh_model)
            for n, _ in fused:
                loader.load_lora_weights(str(loras[n]), adapter_name=n)
        mine, theirs = dict(unet.named_parameters()), dict(fresh_model.named_parameters())
        diff = [p for p in engine.map.entries if not torch.equal(mine[p], theirs[p])]
        out_same = bool((engine.infer(feeds)[out_name] == fresh.infer(feeds)[out_name]).all())
        same_all &= not diff and out_same
        results[name] = {"seconds": seconds, "weights_differing": len(diff), "output_equal": out_same,
                         "breakdown": dict(r.last_refit)}
        row(f"(b) torch engine refit -> {name}", f"{seconds * 1e3:.1f} ms (compute {r.last_refit['compute_s'] * 1e3:.1f}, "
            f"write {r.last_refit['write_s'] * 1e3:.1f}); {len(diff)} weights differ from a fresh fuse; "
            f"output {'==' if out_same else '!='} fresh fuse", "ok" if not diff and out_same else "FAIL")
        if loader is not None:
            loader.unload_lora_weights()
    recompiles = counter.frame_count - compiles
    row(f"(b) recompiles under torch.compile after {len(states)} refits",
        f"{recompiles} (backend {'inductor' if inductor else 'dynamo capture, eager run'}; {compiles} frame(s) at first)",
        "ok" if recompiles == 0 else "FAIL")
    floor = best(lambda: [p.data.clone() for n, p in unet.named_parameters() if TARGETS.search(n.rsplit('.', 1)[0])],
                 device, 3)
    swap = results["y (swap)"]["seconds"]
    row("(b) torch engine refit x -> y against the floor",
        f"{swap * 1e3:.1f} ms vs {floor * 1e3:.1f} ms for 1 read + 1 write of the targeted weights "
        f"({weights_bytes / 1e9:.2f} GB): {swap / floor:.1f}x", "ok" if swap / floor <= 3 or device.type == "cpu" else "SLOW")
    torch._dynamo.reset()
    return {"states": results, "recompiles": recompiles, "bit_identical": same_all, "floor_s": floor}


def _tensorrt_status() -> str:
    try:
        import tensorrt

        return f"tensorrt {tensorrt.__version__} imports"
    except Exception as e:  # noqa: BLE001
        return f"tensorrt does not import ({type(e).__name__}: {e})"


def check_tensorrt(work: Path) -> dict | None:
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # noqa: BLE001
        row("(c) TensorRT", f"not run: tensorrt does not import here ({type(e).__name__}: {e})", "skip")
        return None
    import numpy as np

    import engines
    import export
    import refit
    from export.tiny import build_tiny

    unet = build_tiny("sdxl", ["unet"], dtype=torch.float16)["unet"]
    loras = {n: work / f"trt_{n}.safetensors" for n in ("x", "y")}
    for i, (n, p) in enumerate(loras.items()):
        write_lora(unet, p, 4, 10 + i)
    builds = {}
    for state, baked in (("x", ["x"]), ("y", ["y"]), ("base", [])):
        t = time.perf_counter()
        export.export_pipeline("sdxl", model="tiny", loras=[(str(loras[n]), 1.0) for n in baked],
                               out_dir=str(work / f"trt_{state}"), dtype="fp16", components=["unet"],
                               validate=False, progress=False, tensorrt=True)
        builds[state] = time.perf_counter() - t
    manifest = json.loads((work / "trt_x" / "manifest.json").read_text())
    info = manifest["components"]["unet"].get("tensorrt", {})
    row("(c) TensorRT build (tiny SDXL UNet, fp16)", f"{builds['x']:.1f} s incl. export; TensorRT {info.get('tensorrt')}, "
        f"GPU {info.get('gpu')}, flags {info.get('flags')}, {info.get('refittable')} refittable weights", "ok")
    trt_x = engines.load_engine(work / "trt_x" / "unet", backend="tensorrt")
    ort_x = engines.load_engine(work / "trt_x" / "unet", backend="onnxruntime")
    rng = np.random.default_rng(0)
    feeds = {}
    for n, i in ort_x.input_infos().items():
        dims = [d if isinstance(d, int) else (2 if k == 0 else 16) for k, d in enumerate(i.shape)]
        if n == "encoder_hidden_states":
            dims[1] = 77
        feeds[n] = rng.standard_normal(dims).astype(i.dtype)
    o = trt_x.output_names[0]
    a, b = trt_x.infer(feeds)[o].astype(np.float32), ort_x.infer(feeds)[o].astype(np.float32)
    rel = float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))
    row("(c) TensorRT vs ONNX Runtime (same export)", f"max rel err {rel:.2e}", "ok" if rel < 2e-2 else "FAIL")
    r = refit.Refitter(trt_x)
    for state, step in (("y", lambda: r.load_lora(str(loras["y"]), adapter_name="y")), ("base", lambda: r.set_adapters([])),
                        ("x", lambda: r.set_adapters(["x"]))):
        t = time.perf_counter()
        step()
        seconds = time.perf_counter() - t
        fresh = engines.load_engine(work / f"trt_{state}" / "unet", backend="tensorrt")
        same = bool(np.array_equal(trt_x.infer(feeds)[o], fresh.infer(feeds)[o]))
        row(f"(c) TensorRT refit -> {state} vs a fresh build", f"{seconds * 1e3:.1f} ms refit vs {builds[state]:.1f} s "
            f"export + build; outputs {'==' if same else '!='}", "ok" if same else "FAIL")
    return {"builds": builds}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="tiny SDXL UNet on CPU: a smoke of every step")
    p.add_argument("--inductor", action="store_true", help="(b) with the inductor compiler (minutes on SDXL)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    ROWS.clear()
    t0 = time.perf_counter()
    out: dict = {}
    from lora_loaders import kernels

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    row("host", f"{kernels.describe_host()} (the CPU side); GPU {gpu}")
    if not args.cpu and not torch.cuda.is_available():
        why = f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})"
        row("(a) effective weights on the GPU (real SDXL UNet, rank 32)", f"not run: {why}", "skip")
        row("(b) torch engine refit x -> y -> base, recompiles", f"not run: {why}; `--cpu` runs it on the tiny UNet",
            "skip")
        row("(c) TensorRT build, ONNX Runtime comparison, refit", f"not run: {why}; {_tensorrt_status()}", "skip")
        _table()
        out["rows"] = list(ROWS)
        return out
    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda":
        row("device", torch.cuda.get_device_name(device), "")
    dtype = torch.float32 if args.cpu else torch.float16
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        unet = build_unet(args.cpu, device, dtype)
        loras = {"x": work / "x.safetensors", "y": work / "y.safetensors"}
        write_lora(unet, loras["x"], 32 if not args.cpu else 4, 1)
        write_lora(unet, loras["y"], 32 if not args.cpu else 4, 2)
        out["effective_weights"] = check_effective_weights(unet, loras["x"], device)
        del unet
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out["torch_engine"] = check_torch_engine(lambda: build_unet(args.cpu, device, dtype), loras, device,
                                                 args.inductor, work)
        if device.type == "cuda":
            out["tensorrt"] = check_tensorrt(work)
        else:
            row("(c) TensorRT", "not run: --cpu (TensorRT needs a CUDA device)", "skip")
    row("total", f"{time.perf_counter() - t0:.0f} s", "")
    _table()
    out["rows"] = list(ROWS)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return out


def _table():
    w = max(len(c) for c, _, _ in ROWS)
    print(f"| {'check':{w}s} | status | result |")
    print(f"|{'-' * (w + 2)}|--------|--------|")
    for c, r, s in ROWS:
        print(f"| {c:{w}s} | {s or '':6s} | {r} |")


if __name__ == "__main__":
    main()
