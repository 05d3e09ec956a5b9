"""Export: ONNX export with LoRAs baked in, weights maps, base weights, TensorRT build.

    manifest = export.export_pipeline("sdxl", model="tiny", loras=[("x.safetensors", 1.0)],
                                      out_dir="out/sdxl", dtype="fp16")

Everything family-specific (graph inputs and outputs, axes, tiny configs) comes from the
registry (`lora_loaders.families`); see `export.pipeline` (output layout), `export.graph`
(wrapper, example inputs) and `engines.weights_map` / `engines.manifest` (file formats).
"""

from engines import noise

from .onnx_export import ExportError, export_component
from .pipeline import OutputExistsError, export_pipeline, parse_lora_arg
from .tiny import build_tiny
from .validate import ExportValidationError

noise.install()  # drops only records that carry no information (see engines.noise)

__all__ = ["export_pipeline", "export_component", "parse_lora_arg", "build_tiny", "ExportError",
           "ExportValidationError", "OutputExistsError"]
