"""Runtime refit of built engines: swap, stack and rescale LoRAs without re-export.

    engine = engines.load_engine("out/sdxl/unet")
    r = refit.Refitter(engine)
    r.load_lora("y.safetensors", adapter_name="y"); r.set_adapters(["y"], [0.8]); r.set_adapters([])

`python -m refit DIR --lora y.safetensors:0.8 --out DIR2` writes a new engine directory.
"""

from .core import clear_cache, read_adapter
from .refitter import Refitter
from .store import ComponentFiles, RefitError

__all__ = ["ComponentFiles", "RefitError", "Refitter", "clear_cache", "read_adapter"]
