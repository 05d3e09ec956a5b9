"""LoRA files of every common format -> canonical adapters -> exact, strict diffusers-style loaders."""

from .adapter import LoraAdapter, LoraLayer
from .families import FAMILIES, FamilySpec, get_family
from .io import LoraFileError
from .mixins import *  # noqa: F401,F403 - the per-family mixins, with diffusers' names
from .mixins import LoraBaseMixin, loader_for, loader_for_pipeline
from .reader import LoraKeyError, check_against_model, read_lora
from .serialization import adapter_to_state_dict, save_state_dict
from .targets import contributions_by_module, targetable_parameters
from .weights import effective_bias, effective_weight

__all__ = [
    "LoraAdapter", "LoraLayer", "FAMILIES", "FamilySpec", "get_family", "LoraFileError", "LoraKeyError",
    "LoraBaseMixin", "loader_for", "loader_for_pipeline", "read_lora", "check_against_model",
    "adapter_to_state_dict", "save_state_dict", "contributions_by_module", "targetable_parameters",
    "effective_weight", "effective_bias",
]
