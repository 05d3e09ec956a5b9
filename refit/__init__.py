"""Runtime refit of built engines: swap, stack and rescale LoRAs without re-export.

    r = refit.Refitter("out/sdxl")                 # one adapter state over the export's engines
    r.load_lora("y.safetensors", adapter_name="y"); r.set_adapters(["y"], [0.8]); r.set_adapters([])
    r = refit.Refitter(engines.load_engine("out/sdxl/unet"))   # or over one component's engine

`python -m refit DIR --lora y.safetensors:0.8 --out DIR2` writes a new engine directory.
"""

from .core import check_adapter, clear_cache, read_adapter
from .refitter import Refitter
from .store import AdapterError, ComponentFiles, RefitError

__all__ = ["AdapterError", "ComponentFiles", "RefitError", "Refitter", "check_adapter", "clear_cache", "read_adapter"]
