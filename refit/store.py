"""What a refit reads from an exported component directory, lazily.

- `weights_map.json`: torch parameter -> initializer + transform (required);
- `base_weights.safetensors`: exact base values of the parameters the baked adapters
  changed (torch layout), memory-mapped with `safe_open`, read one tensor at a time;
- `model.onnx`: every other mapped parameter's base value is its initializer there (the
  original file, never the engine's current, possibly refitted, value);
- the manifest (the component directory's or the export directory above it): family,
  component and the adapters baked at export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engines.manifest import Manifest
from engines.onnx_utils import InitializerReader, find_model
from engines.weights_map import BASE_WEIGHTS_FILE, WeightsMap, load_weights_map
from lora_loaders.dtypes import from_numpy
from lora_loaders.index import TargetIndex


class RefitError(RuntimeError):
    """A refit that cannot be done; the engine keeps its previous weights."""


class AdapterError(RefitError, ValueError):
    """An adapter that does not fit the export (another family or component, modules or shapes it
    does not have, weights it keeps constant, NaN or Inf values): bad input, not a failure of the engine."""


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
        self.manifest = Manifest.find(self.directory)
        self.family = wmap.family or (self.manifest.family if self.manifest else None)
        component, entry = (None, {})
        if self.manifest is not None:
            component, entry = self.manifest.entry_for(wmap.component, self.directory)
        self.component = wmap.component or component or self.directory.name
        self.component_manifest = entry
        self.base_path = self.directory / BASE_WEIGHTS_FILE
        self._safe = None
        self._base_keys: set[str] | None = None
        self._onnx: InitializerReader | None = None
        self._index: TargetIndex | None = None

    @property
    def index(self) -> TargetIndex:
        """What adapters bind to: the mapped modules with their shapes."""
        if self._index is None:
            # modules a baked LoRA widened (Flux Control): narrower adapters are padded to fit them
            widened = {m: w["from"] for m, w in (self.component_manifest.get("widened") or {}).items()}
            self._index = TargetIndex.from_params(self.component, self.map.param_shapes(), widened,
                                                  inert=self.map.data.get("unused_params", ()))
        return self._index

    @property
    def export_dir(self) -> Path:
        """The directory the manifest is in (the export), or the component directory."""
        return self.manifest.root if self.manifest is not None and self.manifest.root else self.directory

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

    def reader(self) -> InitializerReader:
        """The exported model.onnx's initializers (the export's values, never an engine's current ones)."""
        if self._onnx is None:
            self._onnx = InitializerReader(self.model_path)
        return self._onnx

    def base(self, param: str) -> torch.Tensor:
        """Exact base value of a mapped parameter, torch layout and dtype."""
        entry = self.map[param]
        if param in self.baked_params():
            t = self._safetensors().get_tensor(param)
        else:
            t = from_numpy(np.array(entry.to_torch(self.reader().array(entry.initializer))))
        if tuple(t.shape) != entry.param_shape or t.dtype != entry.param_dtype:
            raise RefitError(f"{self.directory}: base value of {param} has shape {tuple(t.shape)} {t.dtype}, "
                             f"the weights map says {entry.param_shape} {entry.param_dtype}")
        return t

    def prepare(self) -> None:
        """Open the lazy readers now (before using them from several threads)."""
        self.baked_params()
        self.reader()

    def baked_adapters(self) -> list[dict]:
        """The adapters baked into this component at export, as the manifest lists them; RefitError
        for a manifest that names two of them alike (which state would the engine be in?)."""
        if self.component_manifest:
            records = list(self.component_manifest.get("adapters", []))
        else:
            records = self.manifest.adapters if self.manifest is not None else []
        names = [r.get("name") for r in records]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise RefitError(f"{self.manifest.path if self.manifest else self.directory} lists the baked adapter(s) "
                             f"{twice} twice; re-export or refit it with distinct names")
        return records

    @property
    def effective_weights(self) -> dict:
        """What computed the exported weights (`kernels.describe()`, recorded by export and refit)."""
        return dict((self.manifest or {}).get("effective_weights") or {})

    def close(self):
        self._safe = None
        self._onnx = None
