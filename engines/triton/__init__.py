"""Triton Inference Server: a model repository with per-request LoRA switching.

    from engines.triton import write_repository
    write_repository("out/sdxl", "repo")            # denoiser: Python backend + engine + Refitter

See `engines.triton.repository` (layout, options), `engines.triton.serving` (the ``loras``
request parameter, grouping, safety) and `engines.triton.server` (run the PyPI
tritonserver on loopback). Deployment notes: the README, section Triton.
"""

from .repository import make_config, parse_config, write_repository
from .serving import APPLIED_OUTPUT, LORAS_PARAMETER, LoraRequestError, LoraSwitcher, parse_loras

__all__ = ["APPLIED_OUTPUT", "LORAS_PARAMETER", "LoraRequestError", "LoraSwitcher", "make_config", "parse_config",
           "parse_loras", "write_repository"]
