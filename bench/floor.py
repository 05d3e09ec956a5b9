"""The machine's floor for effective weights, measured in the benchmark's own run.

For a set of targeted weights and the rank-r factors of a LoRA over them, the floor is

- the float32 matrix products of the same shapes (up (out, r) @ down (r, in)), each into a
  preallocated output (the best the machine's torch does for the rank-r products), plus
- one copy of the targeted weights into a preallocated buffer (one read and one write of them:
  the least any update of those weights moves).

Each part is the best of `repeats` runs (the machine is shared: the minimum is the least disturbed).
"""

from __future__ import annotations

import time

import torch


def gemm_seconds(factors, repeats: int = 3, device=None) -> float:
    """Best time of the float32 products of [(up, down)] into preallocated outputs."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    pairs = [(u.to(device).float(), d.to(device).float()) for u, d in factors]
    big = max(u.shape[0] * d.shape[1] for u, d in pairs)
    out = torch.empty(big, device=device)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        for u, d in pairs:
            torch.mm(u, d, out=out[: u.shape[0] * d.shape[1]].view(u.shape[0], d.shape[1]))
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def copy_seconds(weights, repeats: int = 3) -> float:
    """Best time of copying every weight into a preallocated buffer (one read + one write)."""
    weights = list(weights)
    by_dtype = {}
    for w in weights:
        by_dtype[(w.dtype, w.device)] = max(by_dtype.get((w.dtype, w.device), 0), w.numel())
    bufs = {k: torch.empty(n, dtype=k[0], device=k[1]) for k, n in by_dtype.items()}
    best = float("inf")
    for _ in range(repeats):
        for dev in {w.device for w in weights}:
            _sync(dev)
        t = time.perf_counter()
        for w in weights:
            bufs[(w.dtype, w.device)][: w.numel()].view(w.shape).copy_(w)
        for dev in {w.device for w in weights}:
            _sync(dev)
        best = min(best, time.perf_counter() - t)
    return best


def floor(weights, factors, repeats: int = 3) -> dict:
    """{"gemm_s", "copy_s", "floor_s", "bytes"} for these weights and [(up, down)] factors."""
    weights = list(weights)
    g = gemm_seconds(factors, repeats, weights[0].device if weights else None)
    c = copy_seconds(weights, repeats)
    return {"gemm_s": g, "copy_s": c, "floor_s": g + c,
            "bytes": sum(2 * w.numel() * w.element_size() for w in weights),
            "gflop": sum(2 * u.shape[0] * u.shape[1] * d.shape[1] for u, d in factors) / 1e9}


def _sync(device):
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
