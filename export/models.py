"""Where an export's components come from: "tiny", a local diffusers directory, a hub id,
a {component: module} dict, or a factory. Also their module index from meta-device models
(no weights), so LoRAs bind before anything is loaded."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from lora_loaders.families import FamilySpec
from lora_loaders.index import TargetIndex

from .tiny import build_component, cast, component_class, tiny_config, tiny_seed

log = logging.getLogger(__name__)


class ModelSource:
    def __init__(self, model, family: FamilySpec, components: list[str], seed: int = 0, hub_kwargs=None):
        self.model, self.family, self.components, self.seed = model, family, components, seed
        self.hub_kwargs = dict(hub_kwargs or {})
        self.root: Path | None = None
        if callable(model) and not isinstance(model, (str, os.PathLike)):
            self.kind = "factory"  # model(component, dtype) -> module; dropped after each export
            return
        if isinstance(model, dict):
            self.kind = "modules"
            missing = [c for c in components if c not in model]
            if missing:
                raise ValueError(f"model dict lacks component(s) {missing}")
            return
        model = str(model)
        self.variant = None  # `tiny:<variant>`: the family's Variant (Flux Fill, Wan I2V)
        if model == "tiny" or model.startswith("tiny:"):
            self.kind = "tiny"
            if model != "tiny":
                self.variant = family.variant(model.partition(":")[2])
        elif Path(model).is_dir():
            self.kind, self.root = "dir", Path(model)
        elif Path(model).exists() or model.startswith((".", "/")) or model.count("/") != 1:
            raise FileNotFoundError(f"model {model!r} is not 'tiny', a diffusers directory or a hub repo id")
        else:
            self.kind = "hub"

    def describe(self) -> str:
        return f"<{self.kind}>" if self.kind in ("modules", "factory") else str(self.model)

    def ensure_root(self) -> Path | None:
        if self.kind == "hub" and self.root is None:
            from huggingface_hub import snapshot_download

            patterns = ["model_index.json", "scheduler/*", "tokenizer*/*"]
            for c in self.components:
                patterns += [f"{c}/*.json", f"{c}/*.safetensors"]
            try:
                self.root = Path(snapshot_download(str(self.model), allow_patterns=patterns, **self.hub_kwargs))
            except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth...
                raise FileNotFoundError(f"model {self.model!r} is not a local directory and could not be fetched "
                                        f"from the Hugging Face hub: {type(e).__name__}: {e}") from e
        return self.root

    def present(self, component: str) -> bool:
        """False for an optional component the model does not have (Wan 2.1's transformer_2)."""
        if self.kind == "tiny":
            return self.variant is None or component not in self.variant.lacks
        if self.kind == "factory":
            return True
        if self.kind == "modules":
            return component in self.model
        return (self.ensure_root() / self.family.component(component).folder).is_dir()

    def _subfolder(self, component: str) -> Path:
        sub = self.ensure_root() / component
        if not sub.is_dir():
            raise FileNotFoundError(f"{self.model}: no {component}/ subfolder (diffusers save_pretrained layout)")
        return sub

    def load(self, component: str, dtype: torch.dtype) -> torch.nn.Module:
        spec = self.family.component(component)
        if self.kind == "modules":
            return cast(self.model[component], dtype).eval()
        if self.kind == "factory":
            return cast(self.model(component, dtype), dtype).eval()
        if self.kind == "tiny":
            torch.manual_seed(self.seed + tiny_seed(self.family, component))
            return self._marked(component, build_component(spec, self.tiny_config(component), dtype))
        sub = self._subfolder(spec.folder)
        cls = component_class(spec)
        kw = {"torch_dtype": dtype} if spec.library == "diffusers" else {"dtype": dtype}
        return self._marked(component, cast(cls.from_pretrained(sub, **kw), dtype).eval())

    def marks(self, component: str) -> dict:
        """The config fields the model's variant sets on this component (`Variant.marks`): a tiny
        variant's, or that of the variant whose pipeline class a directory's model_index.json names."""
        variant = getattr(self, "variant", None)
        if variant is None and self.kind in ("dir", "hub") and self.family.variants:
            path = self.ensure_root() / "model_index.json"
            name = json.loads(path.read_text()).get("_class_name") if path.is_file() else None
            variant = self.family.variant_of(name)
        return dict(variant.marks.get(component, {})) if variant is not None else {}

    def _marked(self, component: str, model: torch.nn.Module) -> torch.nn.Module:
        """The model with its variant's marks in its config (saved with it, read by the graphs' `when`)."""
        for key, value in self.marks(component).items():
            if hasattr(model, "register_to_config"):  # diffusers
                model.register_to_config(**{key: value})
            else:
                setattr(model.config, key, value)
        return model

    def config(self, component: str):
        """The component's config (defaults filled, as `model.config`) without its weights; None
        for a factory (known once it builds the model)."""
        if self.kind == "factory":
            return None
        if self.kind == "modules":
            return self.model[component].config
        with torch.device("meta"):
            return self._marked(component, self._meta(component)).config

    def index(self) -> TargetIndex | None:
        """Targetable modules (names and shapes) of the LoRA components, from meta-device models."""
        if self.kind == "factory":
            return None
        modules = {}
        for c in self.components:
            spec = self.family.component(c)
            if not spec.lora:
                continue
            if self.kind == "modules":
                modules[c] = self.model[c]
                continue
            with torch.device("meta"):
                modules[c] = self._meta(c)
        return TargetIndex.from_models(modules)

    def tiny_config(self, component: str):
        """The tiny model's config of a component, with its variant's changes."""
        overrides = self.variant.tiny.get(component) if self.variant else None
        return tiny_config(self.family.component(component), overrides)

    def _meta(self, component: str) -> torch.nn.Module:
        spec = self.family.component(component)
        cls = component_class(spec)
        if spec.library == "diffusers":
            config = self.tiny_config(component) if self.kind == "tiny" else cls.load_config(self._subfolder(spec.folder))
            return cls.from_config(config)
        cfg = self.tiny_config(component) if self.kind == "tiny" else cls.config_class.from_pretrained(self._subfolder(spec.folder))
        return cls(cfg)

