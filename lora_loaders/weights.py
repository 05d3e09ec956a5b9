"""The one effective-weight function.

Every consumer (torch modules, ONNX export, ONNX Runtime and TensorRT refit) calls these,
so an engine refitted to a set of adapters holds the same bits as an export of them.
Math is float32; the result is cast once to the weight's dtype.

Additive adapters (LoRA, LoHa, LoKr, full deltas) are applied in blocks of output rows that
fit in cache: a low-rank delta is never materialised whole. Per block, the float32 delta rows
come from one matrix product (`AdditiveDelta.rows`), then one fused pass adds them to the
base rows and casts (`kernels.apply`; `kernels.apply_checked` for the in-place writes of the
mixins, which also records what an exact restore needs). The blocking is part of the
definition (same blocks, same products, same bits) for every caller. On CPU the blocks of a
weight are spread over `torch.get_num_threads()` worker threads that each run torch with one
thread (`for_blocks`): every consumer computes every block the same way, in any thread.
On other devices (CUDA) a block is the whole weight and the work stays on the device.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from . import kernels
from .adapter import LoraLayer
from .kernels import BLOCK_ELEMENTS, Scratch  # noqa: F401 - re-exported

# (layer, weight): weight is the user's adapter weight times any fuse-time lora_scale.
Contribution = tuple[LoraLayer, float]

_EPS = torch.finfo(torch.float32).eps


def weight_delta(layer: LoraLayer, base: torch.Tensor, weight: float) -> torch.Tensor:
    """What one adapter adds to a whole float32 base weight, at the given weight."""
    if layer.kind == "ia3":
        # LyCORIS IA3: W * (1 + w * s), s per output row, or per input column with on_input.
        s = layer.tensors["weight"].float().reshape(-1)
        shape = [1] * base.dim()
        shape[1 if layer.on_input else 0] = s.numel()
        return base * (weight * s.reshape(shape))
    if layer.kind == "replace":
        # The file's value replaces the weight (BFL Control norms); weight 0 keeps the base.
        return (layer.tensors["weight"].float().reshape(base.shape) - base) if weight else torch.zeros_like(base)
    delta = layer.delta(base.shape)
    if layer.magnitude is not None:
        # PEFT DoRA: renormalise each output row of (W + s*BA) to the learned magnitude.
        combined = base + weight * delta
        norm = combined.flatten(1).norm(dim=1)
        factor = layer.magnitude.float().reshape(-1) / norm
        return factor.reshape(-1, *[1] * (base.dim() - 1)) * combined - base
    if layer.dora_scale is not None:
        # LyCORIS DoRA: Wc = W + delta renormalised to dora_scale (per output row for an (out, 1)
        # scale, per input column for (1, in)) at full strength, then blended with the base by
        # the weight m, as ComfyUI and A1111 apply it: W' = W + m * (Wc * s - W). (LyCORIS' own
        # multiplier keeps the direction change at m = 0; equal at m = 1.)
        combined = base + delta
        scale = layer.dora_scale.float()
        if scale.numel() == base.shape[0] and scale.shape[0] == base.shape[0]:
            norm = combined.flatten(1).norm(dim=1).reshape(-1, *[1] * (base.dim() - 1))
        else:
            norm = combined.transpose(0, 1).flatten(1).norm(dim=1)
            norm = norm.reshape(1, -1, *[1] * (base.dim() - 2))
        return weight * (combined * (scale.reshape(norm.shape) / (norm + _EPS)) - base)
    return weight * delta


def is_additive(contributions: Sequence[Contribution]) -> bool:
    return all(layer.is_additive for layer, _ in contributions)


def row_blocks(shape, device=None) -> list[tuple[int, int]]:
    """The row blocks of a weight: cache-sized on CPU, the whole weight elsewhere."""
    rows = shape[0] if len(shape) else 1
    if device is not None and torch.device(device).type != "cpu":
        return [(0, rows)]
    rest = max(1, torch.Size(shape[1:]).numel())
    step = max(1, BLOCK_ELEMENTS // rest)
    return [(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]


# -- worker threads (CPU) ------------------------------------------------------------------------

_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()
_IN_WORKER = threading.local()


def _init_worker(barrier: threading.Barrier):
    _IN_WORKER.yes = True
    torch.get_num_threads()  # torch's lazy per-thread init first: it would later reapply the global default
    torch.set_num_threads(1)  # this thread's OpenMP / MKL: one worker per core
    barrier.wait()


def _pool() -> ThreadPoolExecutor | None:
    global _POOL, _POOL_SIZE
    n = torch.get_num_threads()  # also initialises this thread's torch threading first
    if n <= 1:
        return None
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE != n:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            barrier = threading.Barrier(n + 1)
            pool = ThreadPoolExecutor(n, thread_name_prefix="lora-weights")
            for _ in range(n):  # start every worker now, each with one torch thread
                pool.submit(_init_worker, barrier)
            barrier.wait()
            # torch.set_num_threads also sets the default that threads started later begin with:
            # put it back (from a throwaway thread, so no live thread's own setting changes).
            t = threading.Thread(target=torch.set_num_threads, args=(n,))
            t.start()
            t.join()
            _POOL, _POOL_SIZE = pool, n
        return _POOL


def in_worker() -> bool:
    return getattr(_IN_WORKER, "yes", False)


def map_chunks(fn: Callable, items: Sequence, device=None) -> list:
    """fn(items[lo:hi]) for contiguous chunks of items spread over the worker threads (CPU),
    concatenated in order (fn returns a list per chunk).

    Runs inline for one item (a weight of one block: handing it over costs more than it saves,
    and on a loaded machine much more), when the caller is a worker already (nested: e.g. refit
    computing several weights at once), and on other devices. The products of a block do not
    depend on the thread count (tests/test_weights_perf.py checks 1 against 2 threads).
    """
    items = list(items)
    if len(items) <= 1 or in_worker() or (device is not None and torch.device(device).type != "cpu"):
        return list(fn(items))
    pool = _pool()
    if pool is None:
        return list(fn(items))
    n = min(_POOL_SIZE, len(items))
    bounds = [len(items) * i // n for i in range(n + 1)]
    futures = [pool.submit(fn, items[bounds[i]:bounds[i + 1]]) for i in range(n)]
    out = []
    for f in futures:
        out.extend(f.result())
    return out


def for_blocks(delta: "AdditiveDelta", op: Callable) -> list:
    """[op(r0, r1, d) for every row block of delta], d the block's float32 delta rows (valid
    during the call), the blocks spread over the worker threads (CPU)."""
    fused = getattr(op, "fused", None)
    if fused is not None and delta.lowrank is not None:  # the product and the operation in one C pass
        lr = delta.lowrank
        return map_chunks(lambda blocks: [fused(r0, r1, lr) for r0, r1 in blocks], delta.blocks(), delta.device)
    return map_chunks(lambda blocks: [op(r0, r1, d) for r0, r1, d in delta.each(blocks)], delta.blocks(),
                      delta.device)


def map_items(fn: Callable, items: Sequence, elements: int | None = None) -> list:
    """[fn(item) for item in items] on the worker threads, one item per task (independent weights).

    elements: the total work in weight elements; under four blocks' worth it runs inline.
    """
    items = list(items)
    small = elements is not None and elements < 4 * BLOCK_ELEMENTS
    pool = None if (len(items) <= 1 or small or in_worker()) else _pool()
    if pool is None:
        return [fn(it) for it in items]
    return list(pool.map(fn, items))


# -- adapter factors on the device -----------------------------------------------------------

_DEVICE_COPIES: dict[tuple[int, torch.device], tuple] = {}
_DEVICE_LOCK = threading.Lock()


def on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device`: t itself when it is there; else a copy made once per (tensor, device) and kept
    while t lives, so an adapter's factors cross to a GPU once, not at every refit (on an H200 the
    SDXL rank-32 factors take longer to upload than the whole effective-weight update)."""
    if t.device == device:
        return t
    key = (id(t), device)
    with _DEVICE_LOCK:
        hit = _DEVICE_COPIES.get(key)
        if hit is not None and hit[0]() is t:
            return hit[1]
    copy = t.to(device)
    ref = weakref.ref(t, lambda _r, key=key: _DEVICE_COPIES.pop(key, None))
    with _DEVICE_LOCK:
        _DEVICE_COPIES[key] = (ref, copy)
    return copy


def device_copies_bytes(device=None) -> int:
    """Memory held by `on_device` copies (on one device, or all)."""
    with _DEVICE_LOCK:
        return sum(c.numel() * c.element_size() for (_, dev), (_, c) in _DEVICE_COPIES.items()
                   if device is None or dev == torch.device(device))


# -- the additive delta ------------------------------------------------------------------------

class AdditiveDelta:
    """sum_i w_i * delta_i for additive adapters, by blocks of output rows (float32, 2-D)."""

    def __init__(self, contributions: Sequence[Contribution], shape, device=None, transpose: bool = False):
        """transpose=True: the delta's transpose where it can be (a 2-D low-rank delta on the C
        backend; `self.transposed` says), by row blocks of (cols, rows), for a weight stored
        column-major (a transposed initializer) written in its own row order. Same bits: each
        element is the same products (they commute) summed in the same order over the rank."""
        self.shape = torch.Size(shape)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        cols = self.cols = self.shape[1:].numel()  # 1 for a 1-D weight (norms)
        self._terms = []
        for layer, weight in contributions:
            if layer.kind == "lora":  # keep it low-rank: (up * w * s)[rows] @ down
                up = on_device(layer.tensors["up"], self.device).float().flatten(1) * (weight * layer.scale)
                self._terms.append((up, on_device(layer.tensors["down"], self.device).float().flatten(1)))
            else:
                d = weight * layer.delta(self.shape).reshape(self.shape[0], cols)
                self._terms.append((None, d.to(self.device)))
        # Low-rank terms only, on the C backend: the factors side by side, one product over the
        # whole rank (the C definition), fused with the row operations.
        self.lowrank, self.transposed = None, False
        if self._terms and all(up is not None for up, _ in self._terms) and kernels.lowrank_ok(self._terms[0][0]):
            ups, downs = zip(*self._terms)
            up, down = (torch.cat(ups, dim=1) if len(ups) > 1 else ups[0]), (torch.cat(downs) if len(downs) > 1
                                                                             else downs[0])
            if transpose and len(self.shape) == 2:
                self.shape, self.cols, self.transposed = torch.Size((self.shape[1], self.shape[0])), self.shape[0], True
                up, down = down.t().contiguous(), up.t().contiguous()
                self._terms = [(up, down)]
            self.lowrank = kernels.LowRank(up, down)
        self._blocks = row_blocks(self.shape, self.device)

    def rows(self, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        """Rows r0:r1 of the float32 delta, into `out` ((r1 - r0, cols), contiguous)."""
        if self.lowrank is not None:
            return self.lowrank.rows(r0, r1, out)
        for i, (up, rhs) in enumerate(self._terms):
            if i == 0:
                torch.mm(up[r0:r1], rhs, out=out) if up is not None else out.copy_(rhs[r0:r1])
            else:
                out.add_(up[r0:r1] @ rhs if up is not None else rhs[r0:r1])
        return out

    def each(self, blocks):
        """(r0, r1, rows r0:r1 of the delta) for each block, computed in this thread's scratch
        buffer (overwritten by the next)."""
        if not blocks:
            return
        buf = kernels.scratch().get("delta", (max(r1 - r0 for r0, r1 in blocks), self.cols), device=self.device)
        if self.lowrank is None and len(self._terms) == 1 and self._terms[0][0] is not None:  # one torch product
            up, down = self._terms[0]
            for r0, r1 in blocks:
                d = buf[: r1 - r0]
                torch.mm(up[r0:r1], down, out=d)
                yield r0, r1, d
            return
        for r0, r1 in blocks:
            yield r0, r1, self.rows(r0, r1, buf[: r1 - r0])

    def blocks(self) -> list[tuple[int, int]]:
        return self._blocks


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A weight (or a transposed initializer view of one) as a 2-D (out rows, rest) view."""
    if t.dim() == 2:
        return t
    if t.dim() < 2:
        return t.reshape(t.shape[0] if t.dim() else 1, 1)
    return t.reshape(t.shape[0], -1)


def effective_weight(base: torch.Tensor, contributions: Sequence[Contribution], out: torch.Tensor | None = None,
                     check_finite: bool = False):
    """W_base + sum_i w_i * s_i * delta_i (DoRA renormalisation on top), cast to base's dtype.

    out: where to write it (default: a new tensor like base); may be base itself, or a 2-D view
    with other strides (a transposed initializer). With check_finite=True returns
    (out, whether every value is finite).
    """
    finite = True
    if not contributions:
        if out is None:
            out = torch.empty(base.shape, dtype=base.dtype, device=base.device).copy_(base.detach())
        else:
            out.copy_(base.detach().reshape(out.shape) if out.shape != base.shape else base.detach())
    elif not is_additive(contributions):
        base = base.detach()
        w0 = base.float()
        total = None
        for layer, weight in contributions:
            d = weight_delta(layer, w0, weight)
            total = d if total is None else total + d
        new = (w0 + total).to(base.dtype)
        if out is None:
            out = new
        else:
            out.copy_(new.reshape(out.shape))
        finite = not check_finite or bool(torch.isfinite(new).all())
    else:
        base = base.detach()
        if out is None:
            out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
        b, o = as_rows(base), as_rows(out)
        transpose = kernels.colmajor(b) and kernels.colmajor(o)
        delta = AdditiveDelta(contributions, base.shape, base.device, transpose=transpose)
        if delta.transposed:
            b, o = b.t(), o.t()  # in the storage's own row order
        finite = not any(for_blocks(delta, kernels.apply_op(b, o)))
    return (out, finite) if check_finite else out


def effective_bias(base: torch.Tensor | None, contributions: Sequence[Contribution]) -> torch.Tensor | None:
    deltas = [(layer.bias_delta(), weight) for layer, weight in contributions if layer.bias is not None]
    if not deltas:
        return None if base is None else base.clone()
    if base is None:
        raise ValueError("an adapter has a bias delta for a module without bias")
    total = None
    for d, weight in deltas:
        total = weight * d if total is None else total + weight * d
    return (base.detach().float() + total).to(base.dtype)
