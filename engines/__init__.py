"""Runtimes behind one interface: ONNX Runtime (`OrtEngine`) and TensorRT (`TensorRTEngine`).

    engine = engines.load_engine("out/sdxl/unet")          # ORT or TensorRT, by what is there
    out = engine.infer({"sample": ..., "timestep": ..., "encoder_hidden_states": ...})
    engine.set_weights({initializer_name: array})         # atomic; used by refit.Refitter
"""

from __future__ import annotations

from pathlib import Path

from .base import Engine, EngineError, InputError, InputInfo, WeightError, WeightInfo
from .manifest import Manifest, ManifestError
from .weights_map import MapEntry, WeightsMap, load_weights_map
from .ort import DEFAULT_MODE, MODES, OrtEngine

PLAN_FILE = "model.plan"
BACKENDS = ("onnxruntime", "tensorrt", "torch")
_ALIASES = {"ort": "onnxruntime", "onnxruntime": "onnxruntime", "trt": "tensorrt", "tensorrt": "tensorrt",
            "torch": "torch", "pytorch": "torch"}


def __getattr__(name):
    if name == "TensorRTEngine":  # gated: importing engines never needs tensorrt
        from .tensorrt import TensorRTEngine

        return TensorRTEngine
    if name == "TorchEngine":
        from .torch_engine import TorchEngine

        return TorchEngine
    if name == "load_pipeline":  # engines.pipeline sits on top (it refits through `refit`)
        from .pipeline import load_pipeline

        return load_pipeline
    raise AttributeError(name)


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


__all__ = [
    "BACKENDS", "DEFAULT_MODE", "MODES", "Engine", "EngineError", "InputError", "InputInfo", "MapEntry", "Manifest",
    "ManifestError", "OrtEngine", "WeightError", "WeightInfo", "WeightsMap", "load_engine", "load_weights_map",
]
