"""LoRA files of every common layout -> canonical adapters -> exact, strict diffusers-style loaders.

    adapter = lora_loaders.read_lora("x.safetensors", family="sdxl")    # parse, then bind
    loader = lora_loaders.loader_for("sdxl", unet=unet, text_encoder=te, text_encoder_2=te2)
    loader.load_lora_weights("x.safetensors", adapter_name="x")
"""

from .adapter import LoraAdapter, LoraLayer
from .bind import bind, check
from .errors import LoraError, LoraFamilyError, LoraFileError, LoraKeyError, LoraShapeError, LoraWidthError, ParseError
from .families import FAMILIES, FamilySpec, get_family
from .formats import ParsedLora, parse
from .index import TargetIndex, targetable_modules, targetable_parameters
from .mixins import *  # noqa: F401,F403 - the per-family mixins, with diffusers' names
from .mixins import LoraBaseMixin, loader_for, loader_for_pipeline
from .reader import bind_parsed, parse_file, read_lora
from .serialization import adapter_to_state_dict, save_state_dict
from .state import LoraState
from .targets import contributions_by_module, param_contributions, params_of
from .weights import effective_bias, effective_weight

__all__ = [
    "LoraAdapter", "LoraLayer", "FAMILIES", "FamilySpec", "get_family", "LoraError", "LoraFileError", "LoraKeyError",
    "LoraShapeError", "LoraWidthError", "LoraFamilyError",
    "ParseError", "ParsedLora", "TargetIndex", "LoraState", "LoraBaseMixin", "loader_for", "loader_for_pipeline",
    "read_lora", "parse", "parse_file", "bind", "bind_parsed", "check", "adapter_to_state_dict", "save_state_dict",
    "contributions_by_module", "param_contributions", "params_of", "targetable_modules", "targetable_parameters",
    "effective_weight", "effective_bias",
]
