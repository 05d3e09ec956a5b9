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
first use (a second, about) into a per-user cache and used on CPUs with AVX-512; without a
compiler, or with `LORA_ENGINES_KERNELS=torch`, everything runs the torch path. The build is
atomic (a temporary name, then a rename) under a lock file, so processes that start together
(pytest-xdist workers) compile once; any failure to build or load it logs why and falls back to
torch, never an error.
tests/test_weights_perf.py checks the two paths against each other bit for bit.
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

BLOCK_ELEMENTS = 1 << 19  # float32 elements per row block on CPU (2 MiB): cache-sized, measured

_SRC = Path(__file__).with_name("_kernels.c")
_LIB = None
_LIB_TRIED = False
_LIB_LOCK = threading.Lock()
_SUFFIX = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}
_VP, _I64 = ctypes.c_void_p, ctypes.c_int64


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


def _compile(cc: list[str], out: Path) -> None:
    """Build the library into `out` atomically: compile to a unique temporary name in the same
    directory, then rename over `out` (readers see the old file, no file, or the whole new one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        cmd = [*cc, "-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11", "-o", tmp, str(_SRC)]
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
    for s in ("16", "32"):
        f = getattr(lib, f"le_transpose_{s}")
        f.argtypes, f.restype = [_VP, _I64, _VP, _I64, _I64, _I64], None


def _open(path: Path):
    lib = ctypes.CDLL(str(path))
    lib.le_isa.restype = ctypes.c_int
    _bind(lib)  # every symbol present (a stale or damaged file fails here, not later)
    return lib


def _build_and_open(cc: list[str]):
    """Compile (at most once per source, CPU and compiler) and open the library; raises on failure."""
    key = hashlib.sha256(_SRC.read_bytes() + _cpu_key().encode() + " ".join(cc).encode()).hexdigest()[:20]
    path = _cache_dir() / f"kernels-{key}.so"
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
        _compile(cc, path)
        return _open(path)


def _load():
    """The C library, or None with the reason logged. Never raises: any failure means the torch path."""
    mode = os.environ.get("LORA_ENGINES_KERNELS", "auto").lower()
    if mode in ("0", "torch", "off", "no"):
        logger.info("effective-weight kernels: torch (LORA_ENGINES_KERNELS=%s)", mode)
        return None
    if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform == "win32":
        logger.info("effective-weight kernels: torch (the C kernels need x86-64 with AVX-512; this is %s on %s)",
                    platform.machine(), sys.platform)
        return None
    cc = _compiler()
    if cc is None:
        logger.info("effective-weight kernels: torch (no C compiler found: set CC or install cc / gcc / clang)")
        return None
    try:
        lib = _build_and_open(cc)
        isa = lib.le_isa()
    except Exception as e:  # noqa: BLE001 - a missing source, an unwritable cache, a broken compiler...
        logger.warning("effective-weight kernels: torch (could not build or load %s with %s: %s: %s)",
                       _SRC.name, " ".join(cc), type(e).__name__, e)
        return None
    if isa != 512:
        logger.info("effective-weight kernels: torch (this CPU or compiler has no AVX-512)")
        return None
    logger.debug("effective-weight kernels: C (%s)", getattr(lib, "_name", "?"))
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


def set_backend(name: str) -> None:
    """"c" (build / load the C kernels, raise if they cannot be used) or "torch". For tests and benchmarks."""
    global _LIB, _LIB_TRIED
    with _LIB_LOCK:
        if name == "torch":
            _LIB, _LIB_TRIED = None, True
        elif name == "c":
            old = os.environ.pop("LORA_ENGINES_KERNELS", None)
            try:
                _LIB = _load()
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


def _fast(*tensors) -> bool:
    return all(t.device.type == "cpu" for t in tensors) and tensors[0].dtype in _SUFFIX and library() is not None


def _rowmajor(t: torch.Tensor) -> bool:
    return t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] == 1) and (t.stride(0) >= t.shape[1] or t.shape[0] == 1)


def _colmajor(t: torch.Tensor) -> bool:
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
        if _rowmajor(base) and _colmajor(out):  # the sum row-major in cache, then transposed into place
            tmp = scratch().get("apply_t", (rows, cols), base.dtype)
            bad = fn(base.data_ptr(), _ld(base), d.data_ptr(), cols, tmp.data_ptr(), cols, rows, cols)
            tr(tmp.data_ptr(), cols, out.data_ptr(), _ldt(out), rows, cols)
            return bool(bad)
        if _colmajor(base) and _colmajor(out):  # d transposed in cache, then the sum column by column
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

