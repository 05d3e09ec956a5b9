"""`load_engine`: an engine directory (or file) -> the engine that runs it, by what is there or `backend=`."""

from __future__ import annotations

from pathlib import Path

from .base import Engine, EngineError
from .ort import OrtEngine
from .tensorrt import PLAN_FILE  # importing it never needs TensorRT

BACKENDS = ("onnxruntime", "tensorrt", "torch")
_ALIASES = {"ort": "onnxruntime", "onnxruntime": "onnxruntime", "trt": "tensorrt", "tensorrt": "tensorrt",
            "torch": "torch", "pytorch": "torch"}


def load_engine(path, backend: str | None = None, **opts) -> Engine:
    """Load an engine from an engine directory (model.onnx / model.plan + weights map) or file.

    backend: "onnxruntime" | "ort" | "tensorrt" | "trt" | "torch" | None. None picks TensorRT when the
    directory has a model.plan and TensorRT with a CUDA device is usable, else ONNX Runtime.
    Extra options go to the engine (OrtEngine: mode="inputs"|"session", providers, ...).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"engine not found: {path}")
    if backend is not None:
        try:
            backend = _ALIASES[backend.lower()]
        except KeyError:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}") from None
    else:
        plan = path if path.suffix in (".plan", ".engine") else path / PLAN_FILE
        backend = "onnxruntime"
        if plan.is_file():
            from .tensorrt import tensorrt_available

            if tensorrt_available():
                backend = "tensorrt"
            elif not (path.is_dir() and any(path.glob("*.onnx"))):
                raise EngineError(f"{path} holds only a TensorRT plan, and TensorRT with CUDA is not available")
    if backend == "tensorrt":
        from .tensorrt import TensorRTEngine

        return TensorRTEngine(path, **opts)
    if backend == "torch":  # an export made with --torch: the module in <dir>/torch (device=, compile=)
        from .torch_engine import TorchEngine

        return TorchEngine(path, **opts)
    return OrtEngine(path, **opts)


