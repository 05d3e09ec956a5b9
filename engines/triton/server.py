"""Run a real `tritonserver` on this machine, from the `nvidia-pytriton` wheel, no Docker.

The wheel bundles Triton's server binary (2.51), its Python backend and the backend stubs
for Python 3.8-3.13, but no `onnxruntime` or `tensorrt` backend: on such a server, serve
the repository written with ``text_encoder_backend="python"``. What the binary needs:

- ``PATH`` starting with the bin folder of the Python environment the models run in (the
  stub's embedded interpreter takes ``sys.executable``, hence its site-packages, from
  ``PATH``; ``PYTHONPATH`` is ignored); that environment needs numpy < 2 (with numpy 2
  the Python backend returns empty output tensors);
- ``LD_LIBRARY_PATH`` with that Python's libpython folder and the wheel's
  ``nvidia_pytriton.libs``;
- a backend folder ``python/`` holding ``libtriton_python.so``,
  ``triton_python_backend_utils.py`` and the stub for the Python version.

`TritonServer` sets all of that up in a private temporary folder (the wheel's files are
never modified), binds HTTP and gRPC to loopback on free ports, waits until the server
is ready, and stops it (terminate, then kill) on `stop()` or when the `with` block ends.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path


class TritonUnavailable(RuntimeError):
    """The nvidia-pytriton wheel (tritonserver binary + Python backend) is not installed."""


# numpy<2 with it: the wheel's Python backend returns empty output tensors under numpy 2
INSTALL_HINT = "pip install nvidia-pytriton==0.7.0 'numpy<2'"


class TritonServerError(RuntimeError):
    """tritonserver did not start, or died."""


# tritonserver's line for a model that did not load: failed to load 'unet' version 1: Internal: <why>\n<traceback>
_FAILED = re.compile(r"failed to load '([^']+)' version \d+: (?:Internal: )?(.+?)(?:\\n|\"$)", re.M)


def pytriton_server_dir(python: str | os.PathLike | None = None) -> Path:
    """The wheel's `pytriton/tritonserver` folder, in this or another Python environment."""
    if python is None or Path(python) == Path(sys.executable):
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise TritonUnavailable(f"nvidia-pytriton is not installed ({INSTALL_HINT})")
        root = Path(list(spec.submodule_search_locations)[0])
    else:
        out = subprocess.run(
            [str(python), "-c", "import pytriton, os; print(os.path.dirname(pytriton.__file__))"],
            capture_output=True, text=True, timeout=120,
        )
        if out.returncode != 0:
            raise TritonUnavailable(f"nvidia-pytriton is not installed in {python} ({python} -m {INSTALL_HINT})")
        root = Path(out.stdout.strip())
    server = root / "tritonserver"
    if not (server / "bin" / "tritonserver").is_file():
        raise TritonUnavailable(f"no tritonserver binary under {server}")
    return server


def pytriton_available() -> tuple[bool, str]:
    """(True, "") when a tritonserver can be started from this Python, else (False, why)."""
    try:
        pytriton_server_dir()
    except TritonUnavailable as e:
        return False, str(e)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return False, "numpy is not installed"
    if int(np.__version__.split(".")[0]) >= 2:
        return False, (f"numpy {np.__version__} is installed: Triton's Python backend (2.51) "
                       "returns empty outputs under numpy 2; install numpy<2 in this environment")
    return True, ""


def _python_version(python: Path) -> str:
    if python == Path(sys.executable):
        return f"{sys.version_info.major}.{sys.version_info.minor}"
    out = subprocess.run([str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _python_libdir(python: Path) -> str:
    if python == Path(sys.executable):
        return sysconfig.get_config_var("LIBDIR") or ""
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')"],
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


def server_environment(python: str | os.PathLike, libs_dir: str | os.PathLike,
                       base: dict | None = None) -> dict:
    """The environment tritonserver needs to run Python-backend models in that Python."""
    python = Path(python)
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(python.parent), env.get("PATH", "/usr/bin:/bin")])
    libdirs = [_python_libdir(python), str(libs_dir), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(d for d in libdirs if d)
    env.pop("PYTHONHOME", None)
    return env


class TritonServer:
    """A tritonserver process serving `model_repository` on 127.0.0.1.

    ``models``: names to load (explicit model control); None loads every model.
    ``http_port`` / ``grpc_port``: fixed ports (default: free ones, picked at start).
    ``python``: the interpreter whose environment runs the Python-backend models (default:
    this one). Readiness is polled on HTTP; `start` raises TritonServerError with the log
    tail if the server exits or is not ready in ``start_timeout`` seconds.
    """

    def __init__(self, model_repository: str | os.PathLike, *, models: list[str] | None = None,
                 host: str = "127.0.0.1", start_timeout: float = 180.0, log_verbose: int = 0,
                 extra_args: list[str] | None = None, python: str | os.PathLike | None = None,
                 http_port: int | None = None, grpc_port: int | None = None):
        self._ports = (http_port, grpc_port)
        self.python = Path(python) if python else Path(sys.executable)
        self.model_repository = Path(model_repository).resolve()
        self.models = models
        self.host = host
        self.start_timeout = start_timeout
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args or [])
        self.http_port = self.grpc_port = None
        self.proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.log_path: Path | None = None

    # -- urls --------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    # -- lifecycle ---------------------------------------------------------------------
    def _backend_dir(self, server_dir: Path, root: Path) -> Path:
        ver = _python_version(self.python)
        stub = server_dir / "python_backend_stubs" / ver / "triton_python_backend_stub"
        if not stub.is_file():
            raise TritonUnavailable(f"the wheel has no Python backend stub for Python {ver}")
        backends = root / "backends"
        py = backends / "python"
        py.mkdir(parents=True)
        for f in (server_dir / "backends" / "python").iterdir():
            if f.is_file():
                shutil.copy2(f, py / f.name)
        shutil.copy2(stub, py / stub.name)
        return backends

    def start(self) -> TritonServer:
        if self.proc is not None:
            raise TritonServerError("already started")
        try:
            server_dir = pytriton_server_dir(self.python)
        except TritonUnavailable:
            if self.python == Path(sys.executable):
                raise
            server_dir = pytriton_server_dir()  # the binary from here, the models' Python from there
        libs = server_dir.parent.parent / "nvidia_pytriton.libs"
        self._tmp = tempfile.TemporaryDirectory(prefix="tritonserver-")
        root = Path(self._tmp.name)
        backends = self._backend_dir(server_dir, root)
        self.http_port = self._ports[0] or free_port(self.host)
        self.grpc_port = self._ports[1] or free_port(self.host)
        while self.grpc_port == self.http_port and not self._ports[1]:
            self.grpc_port = free_port(self.host)
        args = [
            str(server_dir / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--cache-directory={server_dir / 'caches'}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false", "--allow-sagemaker=false", "--allow-vertex-ai=false",
            "--model-control-mode=explicit",
            # a private shared-memory prefix: servers started concurrently do not collide
            f"--backend-config=python,shm-region-prefix-name=lora{uuid.uuid4().hex[:12]}_",
            "--exit-timeout-secs=10",
            f"--log-verbose={self.log_verbose}",
        ]
        args += [f"--load-model={m}" for m in (self.models or ["*"])]
        args += self.extra_args
        env = server_environment(self.python, libs)
        self.log_path = root / "tritonserver.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL, start_new_session=True, cwd=root)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except (OSError, AttributeError):
            return ""

    def failures(self) -> list[str]:
        """Why models did not load, one line each ("model 'unet': FileNotFoundError: ..."), from the
        server's own log; else its last error line."""
        log = self.log_tail(200000)
        found = [f"model '{m}': {why.split(chr(92) + 'n')[0]}" for m, why in _FAILED.findall(log)]
        if found:
            return list(dict.fromkeys(found))
        errors = [line.strip() for line in log.splitlines() if line.startswith(("E", "error:"))]
        return errors[-1:]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TritonServerError(f"tritonserver exited with code {self.proc.returncode}: "
                                        + ("; ".join(self.failures()) or "(nothing in its log)")
                                        + f"\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        raise TritonServerError(f"tritonserver not ready after {self.start_timeout:.0f} s: "
                                + ("; ".join(self.failures()) or "no model failed (raise --timeout?)")
                                + f"\n{self.log_tail()}")

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL of its process group after `timeout`)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(timeout=10)
            self._log.close()
        if self._tmp is not None:
            self.last_log = self.log_tail(20000)
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
