"""The export manifest (read, write, validate): what an export directory holds.

`manifest.json` sits in an export directory (one subdirectory per component) or, for a
single refitted component, in the component directory itself. Layout (version 2)::

    {"format": "lora-engines.export", "version": 2, "family": "sdxl", "dtype": "fp16",
     "model": "tiny" | "<dir>" | "<hub id>",
     "axes": {"batch": {"min", "opt", "max"}, "height": ...},        # the family's dynamic axes
     "components": {"unet": {
         "dir": "unet", "model": "model.onnx", "external_data": null | "model.onnx.data",
         "weights_map": "weights_map.json", "base_weights": null | "base_weights.safetensors",
         "class": "UNet2DConditionModel", "library": "diffusers", "role": "denoiser", "dtype": "float16",
         "opset": 20, "inputs": [{"name", "dtype", "shape": [int | axis name], "dynamic_axes": {"0": "batch"},
         "doc"}], "outputs": [...], "baked_params": [...], "adapters": [{"name", "path", "sha256", "scale"}],
         "validation": {"passed", "tolerance", "outputs": {name: {"rel_err", ...}}, "input_shapes"},
         "tensorrt": {"plan", "profiles", "version", "gpu", "flags"}}, ...},
     "adapters": [{"name", "path", "sha256", "scale", "format", "targets", "components"}],
     "pipeline": {"class", "files": [...]},                               # what generation needs besides engines
     "validation_errors": {component: {output: rel_err}}, "versions": {...}, "created": "..."}

Version 1 files (no axes) are read as well.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

from lora_loaders.io import atomic_path

MANIFEST_FILE = "manifest.json"
PIPELINE_STATE_FILE = "pipeline_state.safetensors"  # a component's tensors outside its graph that a pipeline reads
FORMAT = "lora-engines.export"
VERSION = 2
_READABLE = (1, 2)


_COMPONENT_KEYS = ("name", "path", "sha256", "scale")


def adapter_record(name: str, path, sha256: str | None, scale: float, adapter) -> dict:
    """One baked adapter as a manifest lists it (`adapter`: the bound LoraAdapter)."""
    return {"name": name, "path": str(path), "sha256": sha256, "scale": float(scale), "format": adapter.format,
            "targets": len(adapter.layers), "components": adapter.components}


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or not of this project's layout."""


class Manifest(Mapping):
    """A validated manifest; reads like the JSON object it is (`m["components"]`), plus typed helpers."""

    def __init__(self, data: Mapping, path: Path | None = None):
        self.path = Path(path) if path else None
        where = self.path or "manifest"
        if not isinstance(data, Mapping):
            raise ManifestError(f"{where} is not a JSON object")
        if data.get("format") != FORMAT or data.get("version") not in _READABLE:
            raise ManifestError(f"{where} is not a {FORMAT} manifest (version {'/'.join(map(str, _READABLE))})")
        comps = data.get("components")
        if not isinstance(comps, Mapping) or not all(isinstance(e, Mapping) for e in comps.values()):
            raise ManifestError(f"{where}: 'components' must map component names to objects")
        adapters = data.get("adapters", [])
        if not isinstance(adapters, list) or not all(isinstance(a, Mapping) and "name" in a for a in adapters):
            raise ManifestError(f"{where}: 'adapters' must be a list of objects with a name")
        self._data = dict(data)

    # -- Mapping -------------------------------------------------------------------------
    def __getitem__(self, key):
        return self._data[key]

    def __setitem__(self, key, value):  # the writer (export, refit) fills in fields
        self._data[key] = value

    def __iter__(self) -> Iterator:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def to_dict(self) -> dict:
        return self._data

    # -- typed views -----------------------------------------------------------------------
    family = property(lambda self: self._data.get("family"))
    dtype = property(lambda self: self._data.get("dtype"))

    @property
    def components(self) -> dict[str, dict]:
        return self._data["components"]

    @property
    def adapters(self) -> list[dict]:
        return list(self._data.get("adapters", []))

    @property
    def axes(self) -> dict[str, dict]:
        return dict(self._data.get("axes") or {})

    @property
    def root(self) -> Path | None:
        return self.path.parent if self.path else None

    def component_dir(self, component: str) -> Path:
        entry = self.components[component]
        return (self.root or Path(".")) / (entry.get("dir") or component)

    def entry_for(self, component: str | None, directory: Path) -> tuple[str | None, dict]:
        """(name, entry) of the component whose directory this is ((None, {}) if none)."""
        if component in self.components:
            return component, self.components[component]
        directory = Path(directory).resolve()
        for name, entry in self.components.items():
            if (self.root is not None and (self.root / entry.get("dir", name)).resolve() == directory) \
                    or entry.get("dir") == directory.name:
                return name, entry
        return None, {}

    def record_adapters(self, records: list[dict]) -> None:
        """Set the baked adapters (`adapter_record`s): all of them at the top, and in each component's
        entry those with layers there ({name, path, sha256, scale})."""
        self._data["adapters"] = [dict(r) for r in records]
        for component, entry in self.components.items():
            entry["adapters"] = [{k: r[k] for k in _COMPONENT_KEYS} for r in records
                                 if component in r.get("components", ())]

    # -- files ---------------------------------------------------------------------------
    @classmethod
    def read(cls, path) -> Manifest:
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_FILE
        if not path.is_file():
            raise ManifestError(f"{path.parent} is not an export directory (no {MANIFEST_FILE})")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"{path} cannot be read: {e}") from e
        return cls(data, path)

    @classmethod
    def holds(cls, directory) -> bool:
        """Whether a directory is an export (or a refit output): a manifest of this project in it."""
        try:
            cls.read(directory)
            return True
        except ManifestError:
            return False

    @classmethod
    def find(cls, component_dir) -> Manifest | None:
        """The manifest describing a component directory: its own, or its export directory's."""
        d = Path(component_dir)
        for p in (d / MANIFEST_FILE, d.parent / MANIFEST_FILE):
            if p.is_file():
                try:
                    return cls.read(p)
                except ManifestError:
                    continue
        return None

    def write(self, directory) -> Path:
        """Write `directory/manifest.json` (to a temporary name, then renamed)."""
        p = Path(directory) / MANIFEST_FILE
        with atomic_path(p) as tmp:
            tmp.write_text(json.dumps(self._data, indent=2) + "\n")
        self.path = p
        return p

    @classmethod
    def new(cls, **fields) -> Manifest:
        return cls({"format": FORMAT, "version": VERSION, "components": {}, "adapters": [], **fields})
