"""`Refitter`: the diffusers LoRA API over a built engine (ONNX Runtime or TensorRT).

    r = refit.Refitter(engine)
    r.load_lora("y.safetensors", adapter_name="y")     # y becomes the only active adapter
    r.set_adapters(["x", "y"], [1.0, 0.5])             # stack / rescale
    r.set_adapters([])                                 # back to the exact base weights
    r.disable_lora(); r.enable_lora(); r.delete_adapters("y"); r.unload_lora_weights()

Every change recomputes the engine's weights from base for the union of the previous and
the new targets (so nothing of a previous adapter, including one baked at export,
remains), with the one effective-weight function, casts once to the engine's dtype,
applies the weights-map transform, validates everything (finite, shapes, dtypes), and only
then writes, atomically (`engine.set_weights`). On any error the engine and the Refitter's
state stay as they were, and the error says why.

Adapters baked at export are listed in `baked_adapters` (from the manifest) but are not
registered as loaded adapters: load them by name like any other to combine or rescale them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

from engines.base import Engine
from lora_loaders.adapter import LoraAdapter, adapter_name_list

from . import core
from .store import ComponentFiles, RefitError


class Refitter:
    """LoRA adapter management over one engine (one exported component)."""

    def __init__(self, engine: Engine, directory=None, family: str | None = None, component: str | None = None):
        self.engine = engine
        directory = directory or engine.directory
        if directory is None:
            raise RefitError("the engine does not know its directory; pass directory= (the exported component dir)")
        self.files = ComponentFiles(directory, getattr(engine, "model_path", None))
        if family is not None:
            self.files.family = family
        if component is not None:
            self.files.component = component
        if self.files.family is None:
            raise RefitError(f"cannot tell the family of {directory}: no family in its weights map or manifest; "
                             "pass family=")
        refittable = set(engine.weight_names())
        unmapped = [e.initializer for e in self.files.map.entries.values() if e.initializer not in refittable]
        self._not_refittable = set(unmapped)
        self._adapters: dict[str, LoraAdapter] = {}
        self._hashes: dict[str, str | None] = {}
        self._active: list[str] = []
        self._weights: dict[str, float] = {}
        self._enabled = True
        # Parameters whose engine value differs from base: at first, those baked at export.
        self._dirty: set[str] = set(self.files.baked_params()) & set(self.files.map.entries)
        self._lock = threading.RLock()
        self.baked_adapters: list[dict] = self.files.baked_adapters()
        self.last_refit: dict[str, float] = {}

    family = property(lambda self: self.files.family)
    component = property(lambda self: self.files.component)

    # -- diffusers-style API ------------------------------------------------------------
    def load_lora(self, source, adapter_name: str | None = None, **kwargs) -> str:
        """Read a LoRA (path, hub id + weight_name, state dict or LoraAdapter) and make it the only active one.

        Returns the adapter name. Raises (engine unchanged) for a LoRA of another family or
        component, one touching weights the engine does not map, or one whose values are bad.
        """
        with self._lock:
            if adapter_name is None:
                adapter_name = f"default_{len(self._adapters)}"
            if adapter_name in self._adapters:
                raise ValueError(f"Adapter name {adapter_name!r} already in use")
            component = self.files.component
            try:
                adapter, digest = core.read_adapter(source, self.files.family,
                                                    module_names={component: self.files.map.modules()}, **kwargs)
            except RefitError:
                raise
            except Exception as e:
                raise RefitError(f"cannot read LoRA {adapter_name!r} for {self.files.family} {component}: {e}") from e
            core.check_adapter(adapter, self.files, adapter_name)
            self._check_refittable(adapter, adapter_name)
            self._adapters[adapter_name] = adapter
            self._hashes[adapter_name] = digest
            try:
                self._transition([adapter_name], {adapter_name: 1.0}, self._enabled)
            except Exception:
                del self._adapters[adapter_name]
                del self._hashes[adapter_name]
                raise
            return adapter_name

    load_lora_weights = load_lora  # the mixins' name

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """Activate these adapters with weights (float, per-adapter list, or {component: float} dicts).

        `set_adapters([])` returns the engine to its base weights.
        """
        with self._lock:
            names = adapter_name_list(adapter_names, self._adapters)
            weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
            if len(weights) != len(names):
                raise ValueError(f"Length of adapter names {len(names)} is not equal to the length of the weights "
                                 f"{len(weights)}")
            resolved = {}
            for n, w in zip(names, weights):
                if isinstance(w, Mapping):
                    w = w.get(self.files.component)
                    if isinstance(w, Mapping):
                        raise ValueError("per-block weights are not supported by the refitter; give one float "
                                         "per component")
                resolved[n] = 1.0 if w is None else float(w)
            self._transition(names, resolved, self._enabled)

    def disable_lora(self) -> None:
        """Run the base weights, keeping the adapters and their settings."""
        with self._lock:
            self._transition(self._active, self._weights, False)

    def enable_lora(self) -> None:
        with self._lock:
            self._transition(self._active, self._weights, True)

    def delete_adapters(self, adapter_names) -> None:
        with self._lock:
            names = adapter_name_list(adapter_names, self._adapters)
            active = [n for n in self._active if n not in names]
            self._transition(active, {n: self._weights[n] for n in active}, self._enabled)
            for n in names:
                del self._adapters[n]
                self._hashes.pop(n, None)

    def unload_lora_weights(self) -> None:
        """Drop every adapter and return the engine to its base weights."""
        with self._lock:
            self._transition([], {}, True)
            self._adapters.clear()
            self._hashes.clear()

    def get_active_adapters(self) -> list[str]:
        return list(self._active)

    def get_list_adapters(self) -> dict[str, list[str]]:
        return {self.files.component: list(self._adapters)} if self._adapters else {}

    def get_adapter_weights(self) -> dict[str, float]:
        return {n: self._weights[n] for n in self._active}

    @property
    def enabled(self) -> bool:
        return self._enabled

    # -- machinery ------------------------------------------------------------------------
    def _check_refittable(self, adapter: LoraAdapter, name: str) -> None:
        if not self._not_refittable:
            return
        bad = []
        for module, layer in adapter.for_component(self.files.component).items():
            for kind in ("weight", "bias") if layer.bias is not None else ("weight",):
                init = self.files.map[f"{module}.{kind}"].initializer
                if init in self._not_refittable:
                    bad.append(init)
        if bad:
            raise RefitError(f"adapter {name!r} touches {len(bad)} weight(s) this engine was built without as "
                             f"refittable: {bad[:5]}")

    def _transition(self, active: list[str], weights: Mapping[str, float], enabled: bool) -> None:
        """Compute, validate and write the weights for a new state; commit the state only on success."""
        t0 = time.perf_counter()
        pairs = [(self._adapters[n], float(weights[n])) for n in active] if enabled else []
        names = list(active) if enabled else []
        targets, arrays = core.compute(self.files, pairs, self._dirty, names, to_onnx=True)
        t1 = time.perf_counter()
        self.engine.check_weights(arrays)
        t2 = time.perf_counter()
        try:
            self.engine.set_weights(arrays, copy=False)
        except Exception as e:
            raise RefitError(f"writing {len(arrays)} weight(s) into the {self.engine.backend} engine failed; "
                             f"its previous weights were kept: {e}") from e
        t3 = time.perf_counter()
        self._active = list(active)
        self._weights = {n: float(weights[n]) for n in active}
        self._enabled = enabled
        self._dirty = targets
        self.last_refit = {"compute_s": t1 - t0, "check_s": t2 - t1, "write_s": t3 - t2,
                           "total_s": t3 - t0, "weights": len(arrays)}

    def __repr__(self):
        return (f"Refitter({self.engine!r}, family={self.family!r}, component={self.component!r}, "
                f"active={self._active}, enabled={self._enabled})")


