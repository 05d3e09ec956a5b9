"""Triton Inference Server: a model repository with per-request LoRA switching.

    from engines.triton import write_repository
    write_repository("out/sdxl", "repo")            # denoiser: Python backend + engine + Refitter

See `engines.triton.repository` (layout, `RepositoryOptions`), `engines.triton.requests` (the
``loras`` request parameter, grouping, safety), `engines.triton.serving` and
`engines.triton.text_to_image` (the Python-backend models) and `engines.triton.server` (run the
PyPI tritonserver on loopback). Deployment notes: the README, section Triton.
"""

from .layout import make_config, parse_config
from .repository import RepositoryOptions, write_repository
from .requests import LORAS_PARAMETER, LoraRequestError, LoraSwitcher, parse_loras
from .serving import APPLIED_OUTPUT

__all__ = ["APPLIED_OUTPUT", "LORAS_PARAMETER", "LoraRequestError", "LoraSwitcher", "RepositoryOptions",
           "make_config", "parse_config", "parse_loras", "write_repository"]
