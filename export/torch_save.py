"""`--torch`: the component's module in its library's `save_pretrained` layout (safetensors), for
`engines.load_engine(dir, backend="torch")` (engines/torch_engine.py).

Written after the export baked its adapters, so the torch engine starts in the state of the ONNX
graph (the weights map and base_weights.safetensors then serve every engine alike).
"""

from __future__ import annotations

import json
from pathlib import Path

from engines.torch_engine import TORCH_DIR, TORCH_META
from lora_loaders import dtypes


def save_torch_component(module, comp_dir) -> dict:
    """Write <comp_dir>/torch/ (save_pretrained, safetensors + torch_model.json); returns the manifest entry."""
    out = Path(comp_dir) / TORCH_DIR
    module.save_pretrained(str(out), safe_serialization=True)
    library = type(module).__module__.split(".")[0]
    dtype = dtypes.name(next(module.parameters()).dtype)
    meta = {"library": library, "class": type(module).__name__, "dtype": dtype}
    (out / TORCH_META).write_text(json.dumps(meta, indent=1) + "\n")
    return {"dir": TORCH_DIR, **meta}
