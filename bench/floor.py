"""The machine's floor for effective weights, measured in the benchmark's own run.

For a set of targeted weights and the rank-r factors of a LoRA over them, the floor is

- the float32 matrix products of the same shapes (up (out, r) @ down (r, in)), each into a
  preallocated output (the best the machine's torch does for the rank-r products), plus
- one copy of the targeted weights into a preallocated buffer (one read and one write of them:
  the least any update of those weights moves).

Each part is the best of `repeats` runs (the machine is shared: the minimum is the least disturbed),
in wall-clock seconds and, beside them, in CPU seconds of this process (every thread): on a shared
machine other processes stretch the wall clock far more than the CPU time a piece of work needs, so
the CPU-time ratio is the steadier one (both are printed).
"""

from __future__ import annotations

import threading
import time

import torch


def gemm_seconds(factors, repeats: int = 3, device=None, cpu: bool = False):
    """Best time of the float32 products of [(up, down)] into preallocated outputs
    (with cpu=True: (best wall seconds, best CPU seconds))."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    pairs = [(u.to(device).float(), d.to(device).float()) for u, d in factors]
    big = max(u.shape[0] * d.shape[1] for u, d in pairs)
    out = torch.empty(big, device=device)
    best = best_cpu = float("inf")
    for _ in range(repeats):
        _sync(device)
        t, c = time.perf_counter(), time.process_time()
        for u, d in pairs:
            torch.mm(u, d, out=out[: u.shape[0] * d.shape[1]].view(u.shape[0], d.shape[1]))
        _sync(device)
        best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
    return (best, best_cpu) if cpu else best


def c_product_seconds(factors, repeats: int = 3) -> float | None:
    """Best time of the same products by our C kernels (lora_loaders.kernels.LowRank, spread over the
    same worker threads as a fuse), None where they do not run: beside torch's time, it says how
    fast the effective-weight product is on this host."""
    from lora_loaders import kernels
    from lora_loaders.weights import map_chunks

    if kernels.library() is None:
        return None
    pairs = [kernels.LowRank(u.float().contiguous(), d.float().contiguous()) for u, d in factors]
    outs = {}
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for lr in pairs:
            rows, cols = lr.up.shape[0], lr.down.shape[1]
            step = max(1, rows // max(1, torch.get_num_threads()))
            blocks = [(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]
            map_chunks(lambda bs, lr=lr, cols=cols: [lr.rows(r0, r1, _out(outs, r1 - r0, cols)) for r0, r1 in bs],
                       blocks)
        best = min(best, time.perf_counter() - t)
    return best


def _out(outs: dict, rows: int, cols: int) -> torch.Tensor:
    """A preallocated output per thread and shape."""
    key = (threading.get_ident(), rows, cols)
    if key not in outs:
        outs[key] = torch.empty(rows, cols)
    return outs[key]


def copy_seconds(weights, repeats: int = 3, cpu: bool = False):
    """Best time of copying every weight into a preallocated buffer (one read + one write)
    (with cpu=True: (best wall seconds, best CPU seconds))."""
    weights = list(weights)
    by_dtype = {}
    for w in weights:
        by_dtype[(w.dtype, w.device)] = max(by_dtype.get((w.dtype, w.device), 0), w.numel())
    bufs = {k: torch.empty(n, dtype=k[0], device=k[1]) for k, n in by_dtype.items()}
    best = best_cpu = float("inf")
    for _ in range(repeats):
        for dev in {w.device for w in weights}:
            _sync(dev)
        t, c = time.perf_counter(), time.process_time()
        for w in weights:
            bufs[(w.dtype, w.device)][: w.numel()].view(w.shape).copy_(w)
        for dev in {w.device for w in weights}:
            _sync(dev)
        best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
    return (best, best_cpu) if cpu else best


def floor(weights, factors, repeats: int = 3) -> dict:
    """{"gemm_s", "copy_s", "floor_s", "floor_cpu_s", "bytes", "gflop", "c_product_s"} for these
    weights and [(up, down)] factors (floor_cpu_s: the same in CPU seconds; c_product_s: our C
    kernels' time for the products, not part of the floor)."""
    weights = list(weights)
    g, gc = gemm_seconds(factors, repeats, weights[0].device if weights else None, cpu=True)
    c, cc = copy_seconds(weights, repeats, cpu=True)
    cpu = not weights or weights[0].device.type == "cpu"
    return {"gemm_s": g, "copy_s": c, "floor_s": g + c, "gemm_cpu_s": gc, "copy_cpu_s": cc, "floor_cpu_s": gc + cc,
            "c_product_s": c_product_seconds(factors, repeats) if cpu else None,
            "bytes": sum(2 * w.numel() * w.element_size() for w in weights),
            "gflop": sum(2 * u.shape[0] * u.shape[1] * d.shape[1] for u, d in factors) / 1e9}


def _sync(device):
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
