"""Export: family specs, ONNX export with LoRAs baked in, weights maps, base weights, TensorRT build.

    manifest = export.export_pipeline("sdxl", model="tiny", loras=[("x.safetensors", 1.0)],
                                      out_dir="out/sdxl", dtype="fp16")

See `export.pipeline` (output layout, manifest), `export.weights_map` (weights map format
and transform helpers) and `export.specs` (graph input / output names per family).
"""

from .onnx_export import ExportError, export_component
from .pipeline import MANIFEST_FILE, export_pipeline, parse_lora_arg
from .specs import FAMILIES, ComponentSpec, FamilySpec, family_spec
from .validate import ExportValidationError
from .weights_map import (BASE_WEIGHTS_FILE, WEIGHTS_MAP_FILE, from_initializer, load_base_weights,
                          load_weights_map, to_initializer)

__all__ = [
    "export_pipeline", "export_component", "parse_lora_arg", "ExportError", "ExportValidationError",
    "FAMILIES", "ComponentSpec", "FamilySpec", "family_spec", "MANIFEST_FILE", "WEIGHTS_MAP_FILE",
    "BASE_WEIGHTS_FILE", "load_weights_map", "load_base_weights", "to_initializer", "from_initializer",
]
