"""The effective-weight kernels: C and torch give the same bits, and every consumer the same values.

The fused C kernels (lora_loaders/_kernels.c) replace several torch passes per row block; they
must agree with the torch reference bit for bit on every dtype, layout and value class (zeros of
both signs, subnormals, values that overflow the dtype, infinities), on each of their instruction
sets (AVX-512 where the CPU has it, AVX2 forced), and the block workers, thread counts and block
sizes must not change a bit either.
"""

from __future__ import annotations

import shutil
import threading
from fractions import Fraction

import pytest
import torch

from lora_loaders import kernels
from lora_loaders.adapter import LoraLayer
from lora_loaders.store import ParamStore
from lora_loaders.weights import effective_weight, map_chunks

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _torch_backend():
    kernels.set_backend("torch")


def _restore_default():
    kernels._LIB_TRIED = False
    kernels._LIB = None


def _values(shape, dtype, seed):
    """Weights with every value class: normal, zeros (+/-), subnormals, near overflow, infinities."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    flat = w.view(-1)
    n = flat.numel()
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, info.tiny / 4, -info.tiny / 4, info.max * 0.999, -info.max * 0.999,
                            float("inf"), -float("inf"), 1.0, -1.0, info.tiny, 3e-8])
    idx = torch.randperm(n, generator=g)[: min(n, 4 * special.numel())]
    flat[idx] = special.repeat(4)[: idx.numel()]
    return w.to(dtype)


def _delta(shape, seed, scale=1e-3):
    g = torch.Generator().manual_seed(seed + 100)
    d = torch.randn(shape, generator=g) * scale
    special = torch.tensor([0.0, -0.0, 1e30, -1e30, 1e-40, 5e-3, -5e-3])  # huge: overflow to inf
    n = min(d.numel(), special.numel())
    d.view(-1)[:n] = special[:n]
    return d


def _same(a, b) -> bool:
    return torch.equal(kernels._bits(a.contiguous()), kernels._bits(b.contiguous()))


# every C test runs on each instruction set the kernels build for (native: AVX-512 on such a CPU)
ISAS = pytest.mark.parametrize("isa", sorted(kernels.ISAS))


def _use_c(isa="native"):
    """Switch to the C kernels, or skip the test where they cannot be built (no compiler, no AVX2)."""
    try:
        kernels.set_backend("c", isa=isa)
    except RuntimeError as e:
        pytest.skip(f"C kernels unavailable here: {e}")


def _run_both(fn, isa="native"):
    """fn() under the C kernels (of `isa`) and under torch; both results."""
    _use_c(isa)
    try:
        c = fn()
        _torch_backend()
        t = fn()
    finally:
        _restore_default()
    return c, t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 53), (16, 64), (5, 1), (1, 17)])
@ISAS
def test_apply_is_torch_bit_for_bit(dtype, shape, isa):
    base = _values(shape, dtype, 1)
    d = _delta(shape, 1)

    def run():
        out = torch.empty_like(base)
        bad = kernels.apply(base, d, out)
        return out, bad

    (oc, bc), (ot, bt) = _run_both(run, isa)
    assert _same(oc, ot)
    assert bc == bt == (not bool(torch.isfinite(ot).all()))
    if base.numel() > 40:
        assert bc  # the specials (infinities, overflow) make non-finite outputs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["row_to_col", "col_to_col", "row_in_place"])
@ISAS
def test_apply_in_initializer_layouts(dtype, layout, isa):
    """A transposed initializer is written in its own layout: same bits as the torch-layout result."""
    rows, cols = 45, 70
    base = _values((rows, cols), dtype, 2)
    d = _delta((rows, cols), 2, 1e-2)
    d.view(-1)[:4] = 0.0  # finite outputs only here
    base = torch.where(base.float().isfinite(), base, torch.zeros((), dtype=dtype))
    expected = (base.float() + d).to(dtype)

    def run():
        if layout == "row_to_col":
            src = base.clone()
            out = torch.empty(cols, rows, dtype=dtype)  # the initializer (in, out)
            bad = kernels.apply(src, d, out.t())
            return out.t().contiguous(), bad
        if layout == "col_to_col":
            src = base.t().contiguous()  # the base initializer (in, out)
            out = torch.empty(cols, rows, dtype=dtype)
            bad = kernels.apply(src.t(), d, out.t())
            return out.t().contiguous(), bad
        w = base.clone()
        bad = kernels.apply(w, d, w)
        return w, bad

    (oc, bc), (ot, bt) = _run_both(run, isa)
    assert _same(oc, ot) and _same(oc, expected)
    assert bc == bt == (not bool(torch.isfinite(expected).all()))


@pytest.mark.parametrize("dtype", DTYPES)
@ISAS
def test_checked_write_and_remove_are_torch_bit_for_bit(dtype, isa):
    shape = (33, 48)
    base = _values(shape, dtype, 3)
    d = _delta(shape, 3, 5e-3)

    def run():
        w = base.clone()
        idx, vals = kernels.apply_checked(w, d, offset=1000, index_dtype=torch.int32)
        back = torch.empty_like(w)
        kernels.remove(w, d, back)
        return w, idx, vals, back

    (wc, ic, vc, bc), (wt, it, vt, bt) = _run_both(run, isa)
    assert _same(wc, wt) and torch.equal(ic, it) and _same(vc, vt) and _same(bc, bt)
    assert ic.dtype == torch.int32 and ic.numel() > 0
    # The record is exactly what an exact restore needs: remove + corrections == base.
    restored = bc.clone()
    restored.view(-1)[(ic - 1000).long()] = vc
    assert _same(restored, base)
    # and only where the plain inverse fails
    assert not bool((kernels._bits(bc).view(-1)[(ic - 1000).long()] == kernels._bits(base).view(-1)[(ic - 1000).long()]).any())


def _same_or_both_nan(a, b) -> bool:
    """Bits equal, or both NaN (NaN payloads are the one thing the paths may differ in)."""
    a, b = a.contiguous().view(-1), b.contiguous().view(-1)
    nan = a.float().isnan()
    return torch.equal(nan, b.float().isnan()) and torch.equal(kernels._bits(a)[~nan], kernels._bits(b)[~nan])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [0.0, 1e-6, 1e-3, 1.0, 1e5])
@ISAS
def test_every_16_bit_weight_value_on_both_paths(dtype, scale, isa):
    """Every one of the 65536 bit patterns (NaNs, infinities, subnormals, both zeros) as a weight,
    through apply, the checked write and remove, with deltas of one magnitude: C == torch. An odd
    row length runs the vector lanes and the scalar tail in every row."""
    base = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 1)
    base = torch.cat([base, torch.zeros(14, 1, dtype=dtype)]).reshape(-1, 23)  # 65550 = 2850 x 23
    g = torch.Generator().manual_seed(7)
    d = torch.randn(base.shape, generator=g) * scale

    def run():
        out = torch.empty_like(base)
        bad = kernels.apply(base, d, out)
        w = base.clone()
        idx, vals = kernels.apply_checked(w, d)
        back = torch.empty_like(w)
        kernels.remove(w, d, back)
        return out, bad, w, idx, vals, back

    (oc, bc, wc, ic, vc, rc), (ot, bt, wt, it, vt, rt) = _run_both(run, isa)
    assert bc == bt is True  # infinities among the weights
    assert _same_or_both_nan(oc, ot) and _same_or_both_nan(wc, wt) and _same_or_both_nan(rc, rt)
    # NaN weights may be recorded on one path and not the other (payloads): compare the rest
    keep_c, keep_t = ~base.view(-1)[ic].float().isnan(), ~base.view(-1)[it].float().isnan()
    assert torch.equal(ic[keep_c], it[keep_t]) and _same(vc[keep_c], vt[keep_t])


def _lora(out_f, in_f, rank, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return LoraLayer("lora", {"down": (torch.randn(rank, in_f, generator=g) * 0.05).to(dtype),
                              "up": (torch.randn(out_f, rank, generator=g) * 0.05).to(dtype)}, alpha=rank / 2)


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """IEEE fusedMultiplyAdd in float32 (a * b + c, rounded once), with torch ops: a * b of two
    float32 values is exact in float64; the float64 sum and its exact error (TwoSum) decide the one
    case where rounding twice (to float64, then float32) would differ from rounding once: a float64
    sum exactly halfway between two float32 values, the true sum off that midpoint."""
    x, c = a.double() * b.double(), c.double()
    s = x + c
    bb = s - x
    err = (x - (s - bb)) + (c - bb)  # x + c == s + err exactly
    r = s.float()
    up = s > r.double()
    other = torch.nextafter(r, torch.where(up, float("inf"), float("-inf")).to(torch.float32))
    tie = (s == (r.double() + other.double()) / 2) & (err != 0)
    return torch.where(tie & ((err > 0) == up), other, r)


def _sequential(cs, rows, cols):
    """The C backend's low-rank product, written with torch ops: the factors side by side, the first
    product rounded to float32, then one fused multiply-add per rank step, in order."""
    up = torch.cat([layer.tensors["up"].float().flatten(1) * (w * layer.scale) for layer, w in cs], dim=1)
    down = torch.cat([layer.tensors["down"].float().flatten(1) for layer, _ in cs], dim=0)
    acc = up[:, 0:1] * down[0:1, :]
    for k in range(1, up.shape[1]):
        acc = fma32(up[:, k:k + 1].expand(rows, cols), down[k:k + 1, :].expand(rows, cols), acc)
    return acc


def _mm(cs):
    """The torch backend's product: one torch.mm per adapter, summed."""
    total = None
    for layer, w in cs:
        d = torch.mm(layer.tensors["up"].float().flatten(1) * (w * layer.scale), layer.tensors["down"].float().flatten(1))
        total = d if total is None else total.add_(d)
    return total


@pytest.mark.parametrize("dtype", DTYPES)
@ISAS
def test_effective_weight_same_bits_on_both_paths_and_thread_counts(dtype, isa):
    """Several blocks (a weight larger than one block), two adapters: each backend gives its own
    definition bit for bit (C: the sequential float32 product, fused; torch: torch.mm), both agree
    with float64 math, and 1 thread == 2 threads."""
    rows, cols = 1100, 1000  # > BLOCK_ELEMENTS: three row blocks
    g = torch.Generator().manual_seed(5)
    base = (torch.randn(rows, cols, generator=g) * 0.02).to(dtype)
    cs = [(_lora(rows, cols, 8, 1), 1.0), (_lora(rows, cols, 4, 2, torch.bfloat16), 0.7)]
    c, t = _run_both(lambda: effective_weight(base, cs), isa)
    assert _same(c, (base.float() + _sequential(cs, rows, cols)).to(dtype))
    assert _same(t, (base.float() + _mm(cs)).to(dtype))
    ref = (base.double() + sum(w * layer.scale * (layer.tensors["up"].double() @ layer.tensors["down"].double())
                               for layer, w in cs)).to(dtype)
    for got in (c, t):
        torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_c, one_t = _run_both(lambda: effective_weight(base, cs), isa)
    finally:
        torch.set_num_threads(threads)
    assert _same(one_c, c) and _same(one_t, t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, cols", [(397, 211), (8, 1000), (1100, 1000), (3, 5)])
@ISAS
def test_effective_weight_in_initializer_layouts(dtype, rows, cols, isa):
    """A transposed initializer written in its own layout, from a torch-layout base (row -> col: the
    C kernel's tiles of 192, 8 x 8 register transposes, scalar edges) or from a transposed base
    (col -> col: the transposed product), holds the torch-layout result's bits on each backend."""
    g = torch.Generator().manual_seed(rows + cols)
    base = (torch.randn(rows, cols, generator=g) * 0.02).to(dtype)
    cs = [(_lora(rows, cols, 8, 3), 1.0), (_lora(rows, cols, 5, 4), -0.6)]

    def run():
        row = effective_weight(base, cs)
        mixed = torch.empty(cols, rows, dtype=dtype)
        effective_weight(base, cs, out=mixed.t())
        col = torch.empty(cols, rows, dtype=dtype)
        effective_weight(base.t().contiguous().t(), cs, out=col.t())
        return row, mixed.t(), col.t()

    for row, mixed, col in _run_both(run, isa):
        assert _same(mixed, row) and _same(col, row)


@pytest.mark.parametrize("rows, cols, rank", [(1, 1, 1), (5, 17, 3), (37, 53, 32), (13, 64, 7), (13, 100, 7),
                                              (7, 200, 5), (64, 1280, 32)])
@ISAS
def test_c_lowrank_product_is_the_sequential_definition(rows, cols, rank, isa):
    """Whole panels, tile remainders (rows not a multiple of 6, columns past the last panel), every
    rank: the C product equals the sequential float32 definition bit for bit, and rows computed in
    any split equal the whole."""
    _use_c(isa)
    try:
        layer = _lora(rows, cols, rank, rows + cols)
        lr = kernels.LowRank(layer.tensors["up"].float() * layer.scale, layer.tensors["down"].float())
        whole = lr.rows(0, rows, torch.empty(rows, cols))
        assert torch.equal(whole, _sequential([(layer, 1.0)], rows, cols))
        cut = rows // 2
        parts = torch.cat([lr.rows(0, cut, torch.empty(cut, cols)), lr.rows(cut, rows, torch.empty(rows - cut, cols))])
        assert torch.equal(parts, whole)
    finally:
        _restore_default()


def _round32(q) -> float:
    """A rational rounded once to float32 (nearest, ties to the even significand)."""
    import numpy as np

    r = np.float32(float(q))
    cands = [np.nextafter(r, np.float32(-np.inf)), r, np.nextafter(r, np.float32(np.inf))]
    best = min(cands, key=lambda v: (abs(Fraction(float(v)) - q), int(np.float32(v).view(np.int32)) & 1))
    return float(best)


def test_fma_reference_rounds_once():
    """The torch reference of a fused multiply-add against exact rational arithmetic, on random
    values of every magnitude and on sums that fall off a float32 midpoint by less than float64
    can hold (where rounding to float64 first gives the wrong float32)."""
    g = torch.Generator().manual_seed(11)
    a = torch.randn(4000, generator=g) * torch.exp2(torch.randint(-30, 30, (4000,), generator=g).float())
    b = torch.randn(4000, generator=g) * torch.exp2(torch.randint(-30, 30, (4000,), generator=g).float())
    c = torch.randn(4000, generator=g) * torch.exp2(torch.randint(-40, 40, (4000,), generator=g).float())
    e = 2.0 ** -18  # a * b = 2^-24 * (1 - 2^-36): 1 + 2^-23 + a * b sits just under a midpoint
    ta, tb, tc = (torch.tensor([v, v, -v], dtype=torch.float32) for v in ((1 + e) * 2.0 ** -12, (1 - e) * 2.0 ** -12,
                                                                          1 + 2.0 ** -23))
    a, b, c = torch.cat([a, ta]), torch.cat([b, tb]), torch.cat([c, tc])
    got = fma32(a, b, c)
    exact = torch.tensor([_round32(Fraction(x) * Fraction(y) + Fraction(z)) for x, y, z in
                          zip(a.double().tolist(), b.double().tolist(), c.double().tolist())], dtype=torch.float32)
    assert torch.equal(got, exact)
    assert got[-3].item() == 1 + 2.0 ** -23 and (a[-3].double() * b[-3].double() + c[-3].double()).float() != got[-3]


@ISAS
def test_c_product_rounds_each_step_once(isa):
    """The crafted sum above through the C product (rank 2, in a whole panel and in the scalar
    columns): one rounding per step, as fusedMultiplyAdd, where rounding a float64 sum would not."""
    _use_c(isa)
    try:
        e = 2.0 ** -18
        up = torch.tensor([[1.0, (1 + e) * 2.0 ** -12]] * 7)
        down = torch.tensor([[1 + 2.0 ** -23] * 67, [(1 - e) * 2.0 ** -12] * 67])
        out = kernels.LowRank(up, down).rows(0, 7, torch.empty(7, 67))
        assert bool((out == 1 + 2.0 ** -23).all())
    finally:
        _restore_default()


def test_native_kernels_use_avx512_where_the_cpu_has_it():
    flags = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    if not {"avx512f", "avx512bw", "avx512vl", "f16c", "fma"} <= flags:
        pytest.skip("this CPU has no AVX-512 (the AVX2 paths run in every other test)")
    for isa, name in (("native", "AVX-512"), ("avx2", "AVX2")):
        _use_c(isa)
        try:
            assert kernels.isa() == name
            assert f"C kernels, {name} + FMA" in kernels.describe_host()
        finally:
            _restore_default()


@ISAS
def test_param_store_exact_restore_on_both_paths(isa):
    lin = torch.nn.Linear(600, 1000, bias=False).to(torch.float16)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    base = lin.weight.detach().clone()
    a, b = _lora(1000, 600, 8, 3), _lora(1000, 600, 16, 4)

    def run():
        with torch.no_grad():
            lin.weight.copy_(base)
        store = ParamStore(lin)
        store.write("weight", [(a, 1.0)])
        after_a = lin.weight.detach().clone()
        store.write("weight", [(b, 0.5), (a, 0.25)])  # swap: exact restore in place, then the new value
        after_ab = lin.weight.detach().clone()
        assert store.residual_bytes() > 0
        assert _same(store.base("weight"), base)
        store.write("weight", [])
        return after_a, after_ab, lin.weight.detach().clone()

    def run_and_export():  # the mixins' write == the export's function, on each backend
        return (*run(), effective_weight(base, [(a, 1.0)]), effective_weight(base, [(b, 0.5), (a, 0.25)]))

    (ca, cab, cbase, ea, eab), (ta, tab, tbase, fa, fab) = _run_both(run_and_export, isa)
    assert _same(cbase, base) and _same(tbase, base)
    assert _same(ca, ea) and _same(cab, eab) and _same(ta, fa) and _same(tab, fab)


def test_map_chunks_keeps_order_and_runs_with_one_torch_thread():
    seen = []

    def fn(i):
        seen.append(torch.get_num_threads())
        return i * i

    assert map_chunks(lambda part: [fn(i) for i in part], range(23)) == [i * i for i in range(23)]
    assert set(seen) == {1}
    # torch's default for threads started later is untouched by the workers' setting
    box = []
    t = threading.Thread(target=lambda: box.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert box == [torch.get_num_threads()]


def test_kernel_build_falls_back_to_torch_without_a_compiler(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LORA_ENGINES_CACHE", str(tmp_path / "cache"))
    try:
        kernels._LIB_TRIED = False
        assert kernels.library() is None and kernels.backend() == "torch"
        base = _values((9, 20), torch.float16, 7)
        out = effective_weight(base, [(_lora(9, 20, 2, 1), 1.0)])
        assert out.dtype == torch.float16
    finally:
        _restore_default()
    assert any("could not build" in r.getMessage() for r in caplog.records)



# -- building the C library: atomic, concurrent-safe, and never an error ------------------------------

def _fresh_load(monkeypatch, tmp_path, **env):
    monkeypatch.setenv("LORA_ENGINES_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LORA_ENGINES_KERNELS", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        kernels._LIB_TRIED = False
        return kernels.library()
    finally:
        _restore_default()


def _fake_compiler(tmp_path, body: str) -> str:
    cc = tmp_path / "fake-cc"
    cc.write_text("#!/bin/sh\n" + body + "\n")
    cc.chmod(0o755)
    return str(cc)


def test_a_failing_compiler_falls_back_to_torch_with_the_reason(monkeypatch, tmp_path, caplog):
    cc = _fake_compiler(tmp_path, 'echo "fatal: cannot compile" >&2; exit 3')
    with caplog.at_level("INFO", logger="lora_loaders.kernels"):
        assert _fresh_load(monkeypatch, tmp_path, CC=cc) is None
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "could not build" in msg and "cannot compile" in msg and "exit 3" in msg
    leftovers = list((tmp_path / "cache").glob("*.tmp")) + list((tmp_path / "cache").glob("*.so"))
    assert leftovers == []  # no partial library left behind


def test_a_damaged_cached_library_is_rebuilt_or_skipped(monkeypatch, tmp_path, caplog):
    """A truncated .so in the cache (e.g. from a non-atomic writer) is never an error."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine: only the no-compiler fallback can be checked")
    monkeypatch.setenv("LORA_ENGINES_CACHE", str(tmp_path / "cache"))
    kernels._LIB_TRIED = False
    cc = kernels._compiler()
    bad = kernels._library_path(cc)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x7fELF truncated")
    with caplog.at_level("INFO", logger="lora_loaders.kernels"):
        lib = _fresh_load(monkeypatch, tmp_path)  # no exception, whatever happens
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    if lib is not None:
        assert bad.stat().st_size > 1000  # rebuilt in place, atomically


def test_a_missing_source_or_unwritable_cache_falls_back(monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    monkeypatch.setattr(kernels, "_SRC", tmp_path / "no-such-source.c")
    with caplog.at_level("WARNING", logger="lora_loaders.kernels"):
        assert _fresh_load(monkeypatch, tmp_path) is None
    monkeypatch.undo()
    monkeypatch.setenv("LORA_ENGINES_CACHE", str(blocker / "cache"))  # mkdir fails: a file is in the way
    kernels._LIB_TRIED = False
    try:
        assert kernels.library() is None
        base = _values((9, 20), torch.float16, 7)
        assert effective_weight(base, [(_lora(9, 20, 2, 1), 1.0)]).dtype == torch.float16  # the torch path works
    finally:
        _restore_default()
    assert sum("could not build or load" in r.getMessage() for r in caplog.records) >= 2


_CHILD = """
import json, os, sys, time
import torch  # the slow part of the import first, then start together
open(sys.argv[1] + ".ready", "w").close()
while not os.path.exists(sys.argv[1]):
    time.sleep(0.001)
from lora_loaders import kernels
print(json.dumps(kernels.backend()))
"""


def test_concurrent_first_use_builds_once_and_every_process_loads_it(tmp_path):
    """Two processes (as pytest-xdist -n 2 workers) start on an empty cache at the same moment."""
    import json
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "LORA_ENGINES_CACHE": str(tmp_path / "cache")}
    env.pop("LORA_ENGINES_KERNELS", None)
    go = [tmp_path / f"go{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(g)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for g in go]
    deadline = time.time() + 120
    while not all(g.with_suffix(".ready").exists() for g in go) and time.time() < deadline:
        time.sleep(0.01)
    for g in go:
        g.touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in results]
    backends = {json.loads(out.strip().splitlines()[-1]) for out, _ in results}
    cache = tmp_path / "cache"
    sos, tmps = sorted(cache.glob("*.so")) if cache.exists() else [], list(cache.glob("*.tmp")) if cache.exists() else []
    assert tmps == []  # every temporary renamed or removed
    if kernels.backend() == "c":  # this machine can use them: so could both children, from one library
        assert backends == {"c"} and len(sos) == 1
    else:
        assert backends == {"torch"}


def test_adapter_factors_cross_to_a_device_once():
    """On a device other than the CPU (here `meta`, the same code as CUDA), an adapter's factors are
    copied there once and reused by every later effective weight, and dropped with the adapter."""
    import gc

    from lora_loaders.weights import AdditiveDelta, device_copies_bytes, on_device

    meta = torch.device("meta")
    layer = _lora(64, 32, 4, 9, torch.float16)
    before = device_copies_bytes(meta)
    a, b = AdditiveDelta([(layer, 1.0)], (64, 32), meta), AdditiveDelta([(layer, 0.5)], (64, 32), meta)
    assert a._terms[0][0].device == meta and b._terms[0][1].device == meta
    held = device_copies_bytes(meta) - before
    assert held == (64 * 4 + 4 * 32) * 2  # up and down, once, in their own dtype
    assert on_device(layer.tensors["down"], meta) is on_device(layer.tensors["down"], meta)
    cpu = torch.device("cpu")
    assert on_device(layer.tensors["up"], cpu) is layer.tensors["up"]  # nothing copied on its own device
    del a, b, layer
    gc.collect()
    assert device_copies_bytes(meta) == before


def test_the_instruction_set_is_chosen_by_environment(monkeypatch, caplog):
    """LORA_ENGINES_ISA=avx2 builds the AVX2 paths (one library per choice); an unknown value says so
    in the log and builds the native ones (the kernels never make an error of their own)."""
    monkeypatch.setenv("LORA_ENGINES_ISA", "AVX2")
    assert kernels._isa_choice() == "avx2"
    monkeypatch.setenv("LORA_ENGINES_ISA", "sse9")
    with caplog.at_level("WARNING", logger="lora_loaders.kernels"):
        assert kernels._isa_choice() == "native"
    assert "LORA_ENGINES_ISA=sse9 is not one of native, avx2" in caplog.text
    cc = kernels._compiler() or ["cc"]
    assert kernels._library_path(cc, "avx2") != kernels._library_path(cc, "native")
    with pytest.raises(ValueError, match="unknown instruction set 'sse9'"):
        kernels.set_backend("c", isa="sse9")
    _restore_default()
