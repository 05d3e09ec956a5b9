"""Runtimes behind one interface (ONNX Runtime, TensorRT, torch), and the deployment's face.

    engine = engines.load_engine("out/sdxl/unet")          # ORT or TensorRT, by what is there
    out = engine.infer({"sample": ..., "timestep": ..., "encoder_hidden_states": ...})
    pipe = engines.load_pipeline("out/sdxl")              # the family's diffusers pipeline over them

The runtimes (`base`, `ort`, `tensorrt`, `torch_engine`, `load`, `weights_map`, `manifest`) sit
below `refit` and `export`; `load_pipeline` (`engines.pipeline`), `engines.generate` and
`engines.triton` sit on top of them and of `refit`. This package's face names both: the
deployment is imported when first used, so importing `engines` pulls in no upper layer.
"""

from __future__ import annotations

from .base import Engine, EngineError, InputError, InputInfo, WeightAccess, WeightError, WeightInfo
from .load import BACKENDS, PLAN_FILE, load_engine
from .manifest import Manifest, ManifestError
from .ort import DEFAULT_MODE, MODES, OrtEngine
from .weights_map import MapEntry, WeightsMap, load_weights_map


def __getattr__(name):
    if name == "TensorRTEngine":  # gated: importing engines never needs tensorrt
        from .tensorrt import TensorRTEngine

        return TensorRTEngine
    if name == "TorchEngine":
        from .torch_engine import TorchEngine

        return TorchEngine
    if name in ("load_pipeline", "for_task"):  # the deployment layer, on top of refit (see the module doc)
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)


__all__ = [
    "BACKENDS", "DEFAULT_MODE", "MODES", "PLAN_FILE", "Engine", "EngineError", "InputError", "InputInfo", "MapEntry",
    "Manifest", "ManifestError", "OrtEngine", "WeightAccess", "WeightError", "WeightInfo", "WeightsMap",
    "for_task", "load_engine", "load_pipeline", "load_weights_map",
]
