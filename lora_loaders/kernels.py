"""Row-block kernels of the effective-weight function: torch reference, and fused C on CPU.

Each operation works on one block of output rows whose float32 delta `d` (rows, cols) has
just been computed (it is in cache):

- `apply(base, d, out)`: out = cast(float32(base) + d), in base's dtype;
- `apply_checked(w, d)`: the same in place, returning where cast(float32(new) - d) would not
  give the old bits back (what an exact restore must store);
- `remove(cur, d, out)`: out = cast(float32(cur) - d) (the first step of that restore).

Two implementations with the same bits (IEEE float32 add or subtract, then one
round-to-nearest-even cast; only NaN payloads may differ): torch ops, used on every device
and as the reference, and `_kernels.c`, one pass per block instead of the several casts,
adds, copies and compares torch needs. The C file is built with the machine's C compiler on
first use (a second, about) into a per-user cache and used on CPUs with AVX-512 or AVX2, each
with F16C and FMA (x86-64 since about 2013); without a compiler, or with
`LORA_ENGINES_KERNELS=torch`, everything runs the torch path. The build is
atomic (a temporary name, then a rename) under a lock file, so processes that start together
(pytest-xdist workers) compile once; any failure to build or load it logs why and falls back to
torch, never an error.
tests/test_weights_perf.py checks the two paths against each other bit for bit.

The C library also computes the low-rank product itself (`lora_product`): the first product
rounded to float32, then one fused multiply-add per rank step, in order (FMA: the host's full
multiply-add rate, as a vendor BLAS runs). Fused with the operations above
(`apply_op(...).fused` and the others), it works 6 rows at a time, so a block's float32 delta
never leaves L1 / L2. Its bits are its own definition (torch.mm's summation differs), the same in
every thread, tile, block and vector width (AVX-512, AVX2 and the scalar edges compute each
element alike); the torch path keeps torch.mm. Every consumer on a machine uses the same
backend, so exports, refits and in-place writes still agree bit for bit.

`LORA_ENGINES_ISA=avx2` builds the AVX2 paths on a CPU with AVX-512 (same bits; for comparing
the two); `describe_host()` names the CPU, the instruction set and the path in use, which the
benchmarks print beside their figures.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BLOCK_ELEMENTS = 1 << 20  # float32 elements per row block on CPU (2 MiB): cache-sized, measured

_SRC = Path(__file__).with_name("_kernels.c")
_LIB = None
_LIB_TRIED = False
_LIB_LOCK = threading.Lock()
_SUFFIX = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}
_VP, _I64 = ctypes.c_void_p, ctypes.c_int64
# -ffp-contract=off: the low-rank product says where it fuses a multiply and an add (explicit FMA);
# a compiler contracting other expressions would change their bits.
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-std=gnu11"]
# LORA_ENGINES_ISA: the vector paths to build ("native": the best the CPU has)
ISAS = {"native": [], "avx2": ["-mno-avx512f"]}
_ISA_NAMES = {512: "AVX-512", 256: "AVX2"}


class Scratch:
    """Reusable block buffers: a fresh multi-MiB tensor per block costs page faults, measured."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, key: str, shape, dtype=torch.float32, device=None) -> torch.Tensor:
        shape = torch.Size(shape)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        buf = self._buffers.get((key, dtype, dev))
        if buf is None or buf.numel() < shape.numel():
            buf = torch.empty(max(shape.numel(), BLOCK_ELEMENTS if dev.type == "cpu" else 0), dtype=dtype, device=dev)
            self._buffers[(key, dtype, dev)] = buf
        return buf[: shape.numel()].view(shape)


_TLS = threading.local()


def scratch() -> Scratch:
    """This thread's block buffers."""
    s = getattr(_TLS, "scratch", None)
    if s is None:
        s = _TLS.scratch = Scratch()
    return s


# -- the C library ---------------------------------------------------------------------------

def _cache_dir() -> Path:
    root = os.environ.get("LORA_ENGINES_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lora_engines")
    return Path(root)


def _cpu_key() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name", "Features")):
                flags += line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        flags = platform.processor()
    return flags


def _compiler() -> list[str] | None:
    """The C compiler command ($CC, which may carry words such as `ccache gcc`, else cc / gcc / clang)."""
    env = os.environ.get("CC", "").strip()
    if env:
        return shlex.split(env)
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [cc] if cc else None


def _isa_choice() -> str:
    """The LORA_ENGINES_ISA choice (unknown values: native, with a warning; the kernels never raise)."""
    isa = os.environ.get("LORA_ENGINES_ISA", "native").strip().lower() or "native"
    if isa not in ISAS:
        logger.warning("effective-weight kernels: LORA_ENGINES_ISA=%s is not one of %s; using native", isa,
                       ", ".join(ISAS))
        return "native"
    return isa


def _flags(isa: str) -> list[str]:
    return [*_FLAGS, *ISAS[isa]]


def _compile(cc: list[str], out: Path, isa: str = "native") -> None:
    """Build the library into `out` atomically: compile to a unique temporary name in the same
    directory, then rename over `out` (readers see the old file, no file, or the whole new one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        cmd = [*cc, *_flags(isa), "-o", tmp, str(_SRC)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise OSError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)  # mkstemp makes it 0600: a cache shared between users must stay loadable
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class _BuildLock:
    """An advisory lock file beside the library while one process compiles it: concurrent first
    uses (pytest-xdist workers, several servers) compile once and the others wait, then load it.
    Best effort: where locking is not possible, each process compiles to its own temporary name and
    the renames are atomic anyway."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def __enter__(self):
        try:
            import fcntl

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except (OSError, ImportError) as e:
            logger.debug("effective-weight kernels: no build lock (%s)", e)
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
        return False


def _bind(lib) -> None:
    for s in _SUFFIX.values():
        f = getattr(lib, f"le_apply_{s}")
        f.argtypes, f.restype = [_VP, _I64, _VP, _I64, _VP, _I64, _I64, _I64], ctypes.c_int
        f = getattr(lib, f"le_remove_{s}")
        f.argtypes, f.restype = [_VP, _VP, _VP, _I64], None
        f = getattr(lib, f"le_check_{s}")
        f.argtypes, f.restype = [_VP, _VP, _I64, _I64, _VP, _VP], _I64
        lora = [_VP, _I64, _VP, _I64, _VP, _I64]  # up, ldu, down, ldd, packed down, rank
        f = getattr(lib, f"le_lora_apply_{s}")
        f.argtypes, f.restype = [_VP, _I64, *lora, _VP, _I64, _I64, _I64, _VP], ctypes.c_int
        f = getattr(lib, f"le_lora_apply_t_{s}")
        f.argtypes, f.restype = [_VP, _I64, *lora, _VP, _I64, _I64, _I64, _VP, _VP], ctypes.c_int
        f = getattr(lib, f"le_lora_remove_{s}")
        f.argtypes, f.restype = [_VP, *lora, _VP, _I64, _I64, _VP], None
        f = getattr(lib, f"le_lora_check_{s}")
        f.argtypes, f.restype = [_VP, *lora, _I64, _I64, _I64, _VP, _VP, _VP], _I64
    for s in ("16", "32"):
        f = getattr(lib, f"le_transpose_{s}")
        f.argtypes, f.restype = [_VP, _I64, _VP, _I64, _I64, _I64], None
    lib.le_lora_product.argtypes, lib.le_lora_product.restype = [_VP, _I64, _VP, _I64, _VP, _I64, _VP, _I64, _I64,
                                                                   _I64], None
    lib.le_lora_pack.argtypes, lib.le_lora_pack.restype = [_VP, _I64, _I64, _I64, _VP], None
    lib.le_lora_panel.argtypes, lib.le_lora_panel.restype = [], _I64


def _open(path: Path):
    lib = ctypes.CDLL(str(path))
    lib.le_isa.restype = ctypes.c_int
    _bind(lib)  # every symbol present (a stale or damaged file fails here, not later)
    return lib


def _library_path(cc: list[str], isa: str = "native") -> Path:
    """The cached library for this source, CPU, compiler and flags."""
    key = hashlib.sha256(_SRC.read_bytes() + _cpu_key().encode() + " ".join(cc + _flags(isa)).encode()).hexdigest()
    return _cache_dir() / f"kernels-{key[:20]}.so"


def _build_and_open(cc: list[str], isa: str = "native"):
    """Compile (at most once per source, CPU, compiler and ISA) and open the library; raises on failure."""
    path = _library_path(cc, isa)
    if path.is_file():
        try:
            return _open(path)
        except (OSError, AttributeError) as e:  # damaged (e.g. a partial write by an older version): rebuild
            logger.info("effective-weight kernels: rebuilding %s (%s)", path, e)
    with _BuildLock(path.with_name(path.name + ".lock")):
        if path.is_file():  # another process built it while this one waited for the lock
            try:
                return _open(path)
            except (OSError, AttributeError):
                pass
        _compile(cc, path, isa)
        return _open(path)


def _load(isa: str | None = None):
    """The C library, or None with the reason logged. Never raises: any failure means the torch path."""
    mode = os.environ.get("LORA_ENGINES_KERNELS", "auto").lower()
    if mode in ("0", "torch", "off", "no"):
        logger.info("effective-weight kernels: torch (LORA_ENGINES_KERNELS=%s)", mode)
        return None
    if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform == "win32":
        logger.info("effective-weight kernels: torch (the C kernels need x86-64 with AVX-512 or AVX2; this is %s on %s)",
                    platform.machine(), sys.platform)
        return None
    cc = _compiler()
    if cc is None:
        logger.info("effective-weight kernels: torch (no C compiler found: set CC or install cc / gcc / clang)")
        return None
    isa = isa or _isa_choice()
    try:
        lib = _build_and_open(cc, isa)
        width = lib.le_isa()
    except Exception as e:  # noqa: BLE001 - a missing source, an unwritable cache, a broken compiler...
        logger.warning("effective-weight kernels: torch (could not build or load %s with %s: %s: %s)",
                       _SRC.name, " ".join(cc), type(e).__name__, e)
        return None
    if width not in _ISA_NAMES:
        logger.info("effective-weight kernels: torch (this CPU or compiler has neither AVX-512 nor AVX2, with F16C "
                    "and FMA)")
        return None
    logger.debug("effective-weight kernels: C, %s (%s)", _ISA_NAMES[width], getattr(lib, "_name", "?"))
    return lib


def library():
    """The loaded C kernels, or None (torch path)."""
    global _LIB, _LIB_TRIED
    if not _LIB_TRIED:
        with _LIB_LOCK:
            if not _LIB_TRIED:
                _LIB = _load()
                _LIB_TRIED = True
    return _LIB


def set_backend(name: str, isa: str | None = None) -> None:
    """"c" (build / load the C kernels for `isa`, one of ISAS, default LORA_ENGINES_ISA; raise if they
    cannot be used) or "torch". For tests and benchmarks."""
    global _LIB, _LIB_TRIED
    with _LIB_LOCK:
        if name == "torch":
            _LIB, _LIB_TRIED = None, True
        elif name == "c":
            old = os.environ.pop("LORA_ENGINES_KERNELS", None)
            try:
                if isa is not None and isa not in ISAS:
                    raise ValueError(f"unknown instruction set {isa!r}: one of {', '.join(ISAS)}")
                _LIB = _load(isa)
            finally:
                if old is not None:
                    os.environ["LORA_ENGINES_KERNELS"] = old
            _LIB_TRIED = True
            if _LIB is None:
                raise RuntimeError("the C kernels cannot be used here (see the log)")
        else:
            raise ValueError(f"unknown kernel backend {name!r}")


def backend() -> str:
    return "c" if library() is not None else "torch"


def isa() -> str | None:
    """The vector instruction set of the C kernels in use ("AVX-512", "AVX2"), None on the torch path."""
    lib = library()
    return _ISA_NAMES.get(lib.le_isa()) if lib is not None else None


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo (or the platform) gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_host() -> str:
    """One line saying where effective weights are computed: CPU, threads, kernel path, instruction set."""
    path = (f"C kernels, {isa()} + FMA" if library() is not None
            else f"torch {torch.__version__.split('+')[0]}")
    return f"CPU {cpu_model()}, {torch.get_num_threads()} threads; effective weights: {path}"


def describe(device=None) -> dict:
    """What computes effective weights on this device, as manifests record it: the C kernels (and
    their source's version) or torch (its version and the device type). Exports and refits with
    equal records give the same bits; with different ones each is exact, but the bits may differ."""
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cpu" and library() is not None:
        return {"backend": "c", "version": hashlib.sha256(_SRC.read_bytes()).hexdigest()[:12]}
    return {"backend": "torch", "version": torch.__version__.split("+")[0], "device": dev.type}


def _fast(*tensors) -> bool:
    return all(t.device.type == "cpu" for t in tensors) and tensors[0].dtype in _SUFFIX and library() is not None


def _rowmajor(t: torch.Tensor) -> bool:
    return t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] == 1) and (t.stride(0) >= t.shape[1] or t.shape[0] == 1)


def colmajor(t: torch.Tensor) -> bool:
    return t.dim() == 2 and (t.stride(0) == 1 or t.shape[0] == 1) and (t.stride(1) >= t.shape[0] or t.shape[1] == 1)


def _ld(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _ldt(t: torch.Tensor) -> int:  # leading dimension of a column-major 2-D view
    return t.stride(1) if t.shape[1] > 1 else t.shape[0]


# -- the operations --------------------------------------------------------------------------

def apply(base: torch.Tensor, d: torch.Tensor, out: torch.Tensor) -> bool:
    """out = cast(float32(base) + d) (out may be base). Returns True if some output is Inf or NaN.

    base and out: (rows, cols) views in one dtype, each row-major or column-major (a transposed
    initializer); d: contiguous float32 (rows, cols).
    """
    rows, cols = d.shape
    if _fast(base, d, out) and base.dtype == out.dtype and d.is_contiguous():
        lib, s = library(), _SUFFIX[base.dtype]
        fn = getattr(lib, f"le_apply_{s}")
        if _rowmajor(base) and _rowmajor(out):
            return bool(fn(base.data_ptr(), _ld(base), d.data_ptr(), cols, out.data_ptr(), _ld(out), rows, cols))
        tr = getattr(lib, "le_transpose_32" if base.element_size() == 4 else "le_transpose_16")
        if _rowmajor(base) and colmajor(out):  # the sum row-major in cache, then transposed into place
            tmp = scratch().get("apply_t", (rows, cols), base.dtype)
            bad = fn(base.data_ptr(), _ld(base), d.data_ptr(), cols, tmp.data_ptr(), cols, rows, cols)
            tr(tmp.data_ptr(), cols, out.data_ptr(), _ldt(out), rows, cols)
            return bool(bad)
        if colmajor(base) and colmajor(out):  # d transposed in cache, then the sum column by column
            dt = scratch().get("delta_t", (cols, rows))
            lib.le_transpose_32(d.data_ptr(), cols, dt.data_ptr(), rows, rows, cols)
            return bool(fn(base.data_ptr(), _ldt(base), dt.data_ptr(), rows, out.data_ptr(), _ldt(out), cols, rows))
    return _apply_torch(base, d, out)


def _apply_torch(base, d, out) -> bool:
    _add_torch(base, d, out)
    return not bool(torch.isfinite(out).all())


def _add_torch(base, d, out):
    if base.dtype == torch.float32 and out.dtype == torch.float32:
        torch.add(base, d, out=out)
    elif base.device.type == "cpu":  # on CPU torch casts in separate passes: through a float32 buffer
        work = scratch().get("work", d.shape, device=d.device)
        out.copy_(work.copy_(base).add_(d))
    else:  # elsewhere the casts happen inside the one kernel (float32 math, one cast on store)
        torch.add(d, base, out=out)


def _sub_torch(cur, d, out):
    if cur.dtype == torch.float32 or cur.device.type != "cpu":
        torch.sub(cur, d, out=out)
    else:
        work = scratch().get("work", d.shape, device=d.device)
        out.copy_(work.copy_(cur).sub_(d))


def remove(cur: torch.Tensor, d: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = cast(float32(cur) - d); cur, d, out contiguous blocks of the same shape."""
    if _fast(cur, d, out) and cur.is_contiguous() and out.is_contiguous() and d.is_contiguous():
        getattr(library(), f"le_remove_{_SUFFIX[cur.dtype]}")(cur.data_ptr(), d.data_ptr(), out.data_ptr(), d.numel())
        return out
    _sub_torch(cur, d, out)
    return out


# -- the operations bound to one weight, called once per row block ----------------------------
# A weight of the SDXL UNet has a few to a few dozen row blocks and the model thousands of them:
# per block, the generic functions above cost tens of microseconds of Python (checks, slicing,
# buffer lookups), as much as the work itself in a small block. These bind the pointers, leading
# dimensions and C function once per weight; the torch functions remain the fallback (same bits).

def _same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:  # the C kernels trust the pointers they are given
        raise ValueError(f"row operation on a {tuple(a.shape)} weight into a {tuple(b.shape)} output")


def apply_op(base: torch.Tensor, out: torch.Tensor):
    """op(r0, r1, d) = apply(base[r0:r1], d, out[r0:r1]) for the row blocks of one weight."""
    _same_shape(base, out)
    if _fast(base, out) and base.dtype == out.dtype and _rowmajor(base) and _rowmajor(out):
        fn, es = getattr(library(), f"le_apply_{_SUFFIX[base.dtype]}"), base.element_size()
        bp, bld, op_, old, cols = base.data_ptr(), _ld(base), out.data_ptr(), _ld(out), base.shape[1]

        fused_fn = getattr(library(), f"le_lora_apply_{_SUFFIX[base.dtype]}")

        def run(r0, r1, d):
            return bool(fn(bp + r0 * bld * es, bld, d.data_ptr(), cols, op_ + r0 * old * es, old, r1 - r0, cols))

        def fused(r0, r1, lr):
            return bool(fused_fn(bp + r0 * bld * es, bld, *lr.args(r0), op_ + r0 * old * es, old, r1 - r0, cols,
                                 _tmp(cols)))
        run.fused = fused
        return run

    def run(r0, r1, d):
        return apply(base[r0:r1], d, out[r0:r1])
    if _fast(base, out) and base.dtype == out.dtype and _rowmajor(base) and colmajor(out):
        # a transposed initializer from a torch-layout base: moved into place by the fused kernel
        fn_t, es = getattr(library(), f"le_lora_apply_t_{_SUFFIX[base.dtype]}"), base.element_size()
        bp, bld, op_, old, cols = base.data_ptr(), _ld(base), out.data_ptr(), _ldt(out), base.shape[1]

        def fused_t(r0, r1, lr):
            return bool(fn_t(bp + r0 * bld * es, bld, *lr.args(r0), op_ + r0 * es, old, r1 - r0, cols, _tmp(_TW),
                             _wide(base.dtype)))
        run.fused = fused_t
    return run


def remove_op(cur: torch.Tensor, out: torch.Tensor):
    """op(r0, r1, d) = remove(cur[r0:r1], d, out[r0:r1]) (cur and out contiguous)."""
    _same_shape(cur, out)
    if _fast(cur, out) and cur.dtype == out.dtype and cur.is_contiguous() and out.is_contiguous():
        fn, row = getattr(library(), f"le_remove_{_SUFFIX[cur.dtype]}"), cur[0].numel() * cur.element_size()
        cp, op_, cols = cur.data_ptr(), out.data_ptr(), cur[0].numel()

        fused_fn = getattr(library(), f"le_lora_remove_{_SUFFIX[cur.dtype]}")

        def run(r0, r1, d):
            fn(cp + r0 * row, d.data_ptr(), op_ + r0 * row, (r1 - r0) * cols)

        def fused(r0, r1, lr):
            fused_fn(cp + r0 * row, *lr.args(r0), op_ + r0 * row, r1 - r0, cols, _tmp(cols))
        run.fused = fused
        return run
    return lambda r0, r1, d: remove(cur[r0:r1], d, out[r0:r1])


def checked_op(w: torch.Tensor, index_dtype=torch.int64):
    """op(r0, r1, d) = apply_checked(w[r0:r1], d, r0 * cols, index_dtype), None where nothing is
    recorded (w contiguous, 2-D)."""
    cols = w.shape[1]
    if _fast(w) and w.is_contiguous():
        fn, row, wp = getattr(library(), f"le_check_{_SUFFIX[w.dtype]}"), cols * w.element_size(), w.data_ptr()
        dtype = w.dtype

        fused_fn = getattr(library(), f"le_lora_check_{_SUFFIX[w.dtype]}")

        def run(r0, r1, d):
            n = (r1 - r0) * cols
            idx, val = _records(n, dtype)
            c = fn(wp + r0 * row, d.data_ptr(), n, r0 * cols, idx.data_ptr(), val.data_ptr())
            return (idx[:c].to(index_dtype, copy=True), val[:c].clone()) if c else None

        def fused(r0, r1, lr):
            idx, val = _records((r1 - r0) * cols, dtype)
            c = fused_fn(wp + r0 * row, *lr.args(r0), r1 - r0, cols, r0 * cols, idx.data_ptr(), val.data_ptr(),
                         _tmp(cols))
            return (idx[:c].to(index_dtype, copy=True), val[:c].clone()) if c else None
        run.fused = fused
        return run

    def run(r0, r1, d):
        idx, val = apply_checked(w[r0:r1], d, r0 * cols, index_dtype)
        return (idx, val) if idx.numel() else None
    return run


class LowRank:
    """The float32 factors of a delta up (rows, R) @ down (R, cols) for the C product: down also in
    the panels its tiles stream (see _kernels.c)."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor):
        self.up, self.down = up.contiguous(), down.contiguous()
        rank, cols = self.down.shape
        panel = library().le_lora_panel()
        self.packed = torch.empty(rank * (cols // panel) * panel if panel else 0)
        library().le_lora_pack(self.down.data_ptr(), cols, rank, cols, self.packed.data_ptr())
        self._up, self._ldu, self._rank = self.up.data_ptr(), self.up.stride(0), rank

    def args(self, r0: int) -> tuple:
        """The C arguments for rows from r0: up, ldu, down, ldd, packed, rank."""
        return (self._up + 4 * r0 * self._ldu, self._ldu, self.down.data_ptr(), self.down.shape[1],
                self.packed.data_ptr(), self._rank)

    def rows(self, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        """out = rows r0:r1 of the product (out contiguous float32 (r1 - r0, cols))."""
        library().le_lora_product(*self.args(r0), out.data_ptr(), out.shape[1], r1 - r0, out.shape[1])
        return out


def lowrank_ok(*tensors) -> bool:
    """Whether the C product serves these factors (float32 on CPU, 2-D)."""
    return library() is not None and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 2
                                         for t in tensors)


def _tmp(cols: int) -> int:
    """This thread's product buffer of the fused kernels (LE_GROUP = 6 rows; its address)."""
    return scratch().get("lora_tmp", (6, cols)).data_ptr()


_TW = 192  # LE_TW in _kernels.c: the tiles of the transposed apply


def _wide(dtype) -> int:
    """This thread's tile of the transposed apply (LE_TW x LE_TW in the weight's dtype; its address)."""
    return scratch().get("lora_wide", (_TW, _TW), dtype).data_ptr()


def _records(n: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's buffers for up to n records (positions, old values) of one block."""
    sc = scratch()
    return sc.get("check_idx", (n,), torch.int64), sc.get("check_val", (n,), dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64, 1: torch.int8}[t.element_size()])


def apply_checked(w: torch.Tensor, d: torch.Tensor, offset: int = 0,
                  index_dtype=torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: w = cast(float32(w) + d). Returns (flat positions + offset, old values) of the
    elements where cast(float32(new) - d) differs in bits from the old value. w, d contiguous."""
    n = d.numel()
    if _fast(w, d) and w.is_contiguous() and d.is_contiguous():
        sc = scratch()
        idx = sc.get("check_idx", (n,), torch.int64)
        val = sc.get("check_val", (n,), w.dtype)
        c = getattr(library(), f"le_check_{_SUFFIX[w.dtype]}")(w.data_ptr(), d.data_ptr(), n, offset,
                                                               idx.data_ptr(), val.data_ptr())
        return idx[:c].to(index_dtype, copy=True), val[:c].clone()
    sc = scratch()
    new = sc.get("new", d.shape, w.dtype, w.device)
    back = sc.get("back", d.shape, w.dtype, w.device)
    _add_torch(w, d, new)
    _sub_torch(new, d, back)
    if w.device.type == "cpu":  # numpy's compare and nonzero are several times faster than torch's here
        import numpy as np

        bad = torch.from_numpy(np.flatnonzero(_bits(back).numpy().reshape(-1) != _bits(w).numpy().reshape(-1)))
    else:
        bad = (_bits(back) != _bits(w)).view(-1).nonzero().view(-1)
    vals = w.reshape(-1)[bad]
    w.copy_(new)
    return (bad + offset).to(index_dtype), vals

