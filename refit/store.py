"""What a refit reads from an exported component directory, lazily.

- `weights_map.json`: torch parameter -> initializer + transform (required);
- `base_weights.safetensors`: exact base values of the parameters the baked adapters
  changed (torch layout), memory-mapped with `safe_open`, read one tensor at a time;
- `model.onnx`: every other mapped parameter's base value is its initializer there (the
  original file, never the engine's current, possibly refitted, value);
- `manifest.json` (the component directory's or the pipeline directory above it): family,
  component, dtype and the adapters baked at export.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from engines.mapping import BASE_WEIGHTS, WeightsMap, from_numpy, load_weights_map
from engines.onnx_utils import InitializerReader, find_model

MANIFEST = "manifest.json"


class RefitError(RuntimeError):
    """A refit that cannot be done; the engine keeps its previous weights."""


def find_manifest(directory: Path) -> tuple[Path | None, dict]:
    """(path, data) of the manifest describing this component directory ({} if none)."""
    for p in (directory / MANIFEST, directory.parent / MANIFEST):
        if p.is_file():
            try:
                with open(p) as f:
                    return p, json.load(f)
            except (OSError, json.JSONDecodeError):
                continue
    return None, {}


def manifest_component(manifest: dict, component: str | None, directory: Path) -> dict:
    """The manifest's entry for this component ({} if it has none)."""
    comps = manifest.get("components")
    if isinstance(comps, dict):
        if component in comps:
            return comps[component] or {}
        for name, entry in comps.items():
            if isinstance(entry, dict) and entry.get("dir") == directory.name:
                return entry
    return {}


class ComponentFiles:
    """Lazy reader of one exported component directory (see module doc)."""

    def __init__(self, directory, model_path=None):
        self.directory = Path(directory)
        wmap = load_weights_map(self.directory)
        if wmap is None:
            raise RefitError(
                f"{self.directory} has no weights_map.json: this engine was not exported for refit "
                "(export it with `python -m export`)"
            )
        self.map: WeightsMap = wmap
        self.model_path = Path(model_path) if model_path else find_model(self.directory)
        self.manifest_path, self.manifest = find_manifest(self.directory)
        self.family = wmap.family or self.manifest.get("family")
        self.component = wmap.component or self.directory.name
        self.component_manifest = manifest_component(self.manifest, self.component, self.directory)
        self.base_path = self.directory / BASE_WEIGHTS
        self._safe = None
        self._base_keys: set[str] | None = None
        self._onnx: InitializerReader | None = None

    # -- base values ------------------------------------------------------------------
    def _safetensors(self):
        if self._safe is None and self.base_path.is_file():
            from safetensors import safe_open

            self._safe = safe_open(str(self.base_path), framework="pt")
        return self._safe

    def baked_params(self) -> set[str]:
        """Torch parameters whose exported value is not the base (those in base_weights)."""
        if self._base_keys is None:
            f = self._safetensors()
            self._base_keys = set(f.keys()) if f is not None else set()
        return self._base_keys

    def _reader(self) -> InitializerReader:
        if self._onnx is None:
            self._onnx = InitializerReader(self.model_path)
        return self._onnx

    def base(self, param: str) -> torch.Tensor:
        """Exact base value of a mapped parameter, torch layout and dtype."""
        entry = self.map[param]
        if param in self.baked_params():
            t = self._safetensors().get_tensor(param)
        else:
            t = from_numpy(np.array(entry.to_torch(self._reader().array(entry.initializer))))
        if tuple(t.shape) != entry.param_shape or t.dtype != entry.param_dtype:
            raise RefitError(f"{self.directory}: base value of {param} has shape {tuple(t.shape)} {t.dtype}, "
                             f"the weights map says {entry.param_shape} {entry.param_dtype}")
        return t

    def prepare(self) -> None:
        """Open the lazy readers now (before using them from several threads)."""
        self.baked_params()
        self._reader()

    def baked_adapters(self) -> list[dict]:
        """The adapters baked at export, as the manifest lists them."""
        for src in (self.component_manifest, self.manifest):
            for key in ("adapters", "loras"):
                if isinstance(src.get(key), list):
                    return src[key]
        return []

    def close(self):
        self._safe = None
        self._onnx = None
