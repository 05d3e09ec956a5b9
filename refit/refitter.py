"""`Refitter`: the diffusers LoRA API over a built engine (ONNX Runtime, TensorRT or torch).

    r = refit.Refitter(engine)                         # knows the adapters the export baked
    r.get_active_adapters()                            # ["x"]: what the engine holds
    r.load_lora("y.safetensors", adapter_name="y")     # y becomes the only active adapter
    r.set_adapters(["x", "y"], [1.0, 0.5])             # stack / rescale (per-block weights too)
    r.set_adapters([])                                 # back to the exact base weights
    r.disable_lora(); r.enable_lora(); r.delete_adapters("y"); r.unload_lora_weights()

Which adapters are active at which weights is the mixins' state machine
(`lora_loaders.state`). Every change recomputes the engine's weights from base for the
union of the previous and the new targets (so nothing of a previous adapter, including one
baked at export, remains), with the one effective-weight function, casts once to the
engine's dtype, applies the weights-map transform and validates everything (finite, shapes,
dtypes). Where the engine runs from host arrays it can expose (`engine.writable_weights`:
ONNX Runtime `inputs` mode on the CPU) the weights are computed straight into them, in their
own layout, with inference held off meanwhile: no second copy of the weights in memory. If
anything fails there, the previous values are put back: recomputed from base for the state
the engine was in (the same function, the same bits), or copied from the exported file for
weights this Refitter never wrote. Other engines get the new values validated first and
written atomically (`engine.set_weights`). On any error the engine and the Refitter's
state stay as they were, and the error says why.

Adapters baked at export are registered from the manifest (name, file hash, scale): their
files are looked up where the manifest recorded them, next to the export, and in
`lora_dir` (a Triton adapter directory), by content hash. One that is not found stays
listed and active (the engine holds it) until a change needs its weights; then the error
says where it was looked for, and `load_lora(path, adapter_name=name)` supplies it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from engines.base import Engine
from lora_loaders.adapter import LoraAdapter
from lora_loaders.bind import resolve_fused
from lora_loaders.families import get_family
from lora_loaders.reader import file_sha256
from lora_loaders.state import LoraState
from lora_loaders.targets import params_of

from . import core
from .store import ComponentFiles, RefitError


class _Missing(LoraAdapter):
    """A baked adapter whose file was not found: known by name, hash and scale only."""

    def __init__(self, record: dict, searched: list[Path]):
        super().__init__({}, format="missing")
        self.record, self.searched = record, searched


class Refitter:
    """LoRA adapter management over one engine (one exported component)."""

    def __init__(self, engine: Engine, directory=None, family: str | None = None, component: str | None = None,
                 lora_dir=None):
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
        self._spec = get_family(self.files.family)
        self.lora_dir = Path(lora_dir) if lora_dir else None
        refittable = set(engine.weight_names())
        self._not_refittable = {e.initializer for e in self.files.map.entries.values()
                                if e.initializer not in refittable}
        self._hashes: dict[str, str | None] = {}
        # Parameters whose engine value differs from base: at first, those baked at export.
        self._dirty: set[str] = set(self.files.baked_params()) & set(self.files.map.entries)
        self._written: set[str] = set()  # parameters this Refitter has written (the rest hold the export's values)
        self._lock = threading.RLock()
        self.baked_adapters: list[dict] = self.files.baked_adapters()
        self.last_refit: dict[str, float] = {}
        self._state = LoraState()
        self._register_baked()

    def _base_of(self, component: str, param: str):
        # DoRA over a fused original layer is computed from the exact base weights, as at export
        return self.files.base(param)

    family = property(lambda self: self.files.family)
    component = property(lambda self: self.files.component)

    # -- baked adapters ---------------------------------------------------------------------
    def _candidates(self, record: dict) -> list[Path]:
        name, recorded = record.get("name", ""), Path(record.get("path", ""))
        dirs = [self.files.export_dir, self.files.export_dir / "loras", self.files.directory]
        if self.lora_dir is not None:
            dirs.insert(0, self.lora_dir)
        out = [recorded] if record.get("path") else []
        for d in dirs:
            out += [d / f"{name}.safetensors", d / recorded.name]
        return list(dict.fromkeys(p for p in out if str(p) not in ("", ".")))

    def _register_baked(self) -> None:
        for record in self.baked_adapters:
            name, digest = record.get("name"), record.get("sha256")
            searched = self._candidates(record)
            found = next((p for p in searched if p.is_file() and (not digest or file_sha256(p) == digest)), None)
            if found is None:
                adapter = _Missing(record, searched)
            else:
                adapter, _ = core.read_adapter(str(found), self.files, name)
                adapter = resolve_fused(adapter, self._base_of)
            self._state.add(name, adapter)
            self._hashes[name] = digest
        if self.baked_adapters:
            names = [r["name"] for r in self.baked_adapters]
            self._state.set_adapters(names, [float(r.get("scale", 1.0)) for r in self.baked_adapters],
                                     [self.component])

    # -- diffusers-style API ------------------------------------------------------------
    def load_lora(self, source, adapter_name: str | None = None, **kwargs) -> str:
        """Read a LoRA (path, hub id + weight_name, state dict or LoraAdapter) and make it the only active one.

        Naming a baked adapter whose file was not found supplies that file (its content hash
        must match the export's): nothing is rewritten. Returns the adapter name. Raises
        (engine unchanged) for a LoRA of another family or component, one touching weights
        the engine does not map, or one whose values are bad.
        """
        with self._lock:
            state = self._state
            if adapter_name is None:
                adapter_name = f"default_{len(state.adapters)}"
            missing = state.adapters.get(adapter_name)
            if adapter_name in state.adapters and not isinstance(missing, _Missing):
                raise ValueError(f"Adapter name {adapter_name!r} already in use")
            adapter, digest = core.read_adapter(source, self.files, adapter_name, **kwargs)
            core.check_adapter(adapter, self.files, adapter_name)
            adapter = resolve_fused(adapter, self._base_of)
            self._check_refittable(adapter, adapter_name)
            if isinstance(missing, _Missing):
                expected = missing.record.get("sha256")
                if expected and digest != expected:
                    raise RefitError(f"{source} is not the adapter {adapter_name!r} baked at export "
                                     f"(sha256 {str(digest)[:12]} != {expected[:12]})")
                state.adapters[adapter_name] = adapter  # the engine already holds it
                self._hashes[adapter_name] = digest
                return adapter_name
            new = state.copy()
            new.add(adapter_name, adapter)
            self._transition(new)
            self._hashes[adapter_name] = digest
            return adapter_name

    load_lora_weights = load_lora  # the mixins' name

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """Activate these adapters with weights: a float, one per adapter, {component: float} dicts,
        or diffusers' per-block dicts for a UNet. `set_adapters([])` returns to the base weights."""
        with self._lock:
            new = self._state.copy()
            new.set_adapters(adapter_names, adapter_weights, [self.component], self._expand)
            self._transition(new)

    def _expand(self, component: str, scales: dict) -> dict:
        cspec = self._spec.components.get(component)
        if cspec is None or cspec.block_weights is None:
            raise ValueError(f"per-block weights are not supported for {component!r}")
        return cspec.block_weights(scales, self.files.map.modules())

    def disable_lora(self) -> None:
        """Run the base weights, keeping the adapters and their settings."""
        with self._lock:
            new = self._state.copy()
            new.set_enabled(False)
            self._transition(new)

    def enable_lora(self) -> None:
        with self._lock:
            new = self._state.copy()
            new.set_enabled(True)
            self._transition(new)

    def delete_adapters(self, adapter_names) -> None:
        with self._lock:
            new = self._state.copy()
            new.delete(adapter_names)
            self._transition(new)

    def unload_lora_weights(self) -> None:
        """Drop every adapter and return the engine to its base weights."""
        with self._lock:
            self._transition(LoraState())

    def get_active_adapters(self) -> list[str]:
        return self._state.active_in(self.component)

    def get_list_adapters(self) -> dict[str, list[str]]:
        return {self.component: list(self._state.adapters)} if self._state.adapters else {}

    def get_adapter_weights(self) -> dict[str, float]:
        """{active adapter: its weight on this component} (what `enable_lora` applies while disabled)."""
        return {n: self._state.module_weight(n, self.component, "") for n in self._state.active_in(self.component)}

    @property
    def enabled(self) -> bool:
        return self._state.enabled

    @property
    def missing_adapters(self) -> dict[str, list[str]]:
        """{baked adapter whose file was not found: where it was looked for}."""
        return {n: [str(p) for p in a.searched] for n, a in self._state.adapters.items() if isinstance(a, _Missing)}

    # -- machinery ------------------------------------------------------------------------
    def _check_refittable(self, adapter: LoraAdapter, name: str) -> None:
        if not self._not_refittable:
            return
        bad = []
        for module, layer in adapter.for_component(self.component).items():
            for kind in ("weight", "bias") if layer.bias is not None else ("weight",):
                init = self.files.map[f"{module}.{kind}"].initializer
                if init in self._not_refittable:
                    bad.append(init)
        if bad:
            raise RefitError(f"adapter {name!r} touches {len(bad)} weight(s) this engine was built without as "
                             f"refittable: {bad[:5]}")

    def _contributions(self, state: LoraState) -> tuple[dict, dict[int, str]]:
        """({module: [(layer, weight)]} the new state puts on this component, {id(layer): adapter})."""
        if not state.enabled:
            return {}, {}
        owners, modules = {}, set()
        for n in state.active_in(self.component):
            a = state.adapters[n]
            if isinstance(a, _Missing):
                raise RefitError(
                    f"adapter {n!r} was baked at export, and this change needs its weights, but its file "
                    f"(sha256 {str(a.record.get('sha256'))[:12]}) was not found; looked in: "
                    + ", ".join(str(p) for p in a.searched)
                    + f". Pass it with load_lora(path, adapter_name={n!r}), or leave it out of the active set")
            for module, layer in a.for_component(self.component).items():
                owners[id(layer)] = n
                modules.add(module)
        return {m: state.contributions(self.component, m) for m in sorted(modules)}, owners

    def _transition(self, new: LoraState) -> None:
        """Compute, validate and write the weights for a new state; commit the state only on success."""
        t0 = time.perf_counter()
        by_module, owners = self._contributions(new)
        device = getattr(self.engine, "torch_weights_device", None)
        with self.engine.writable_weights() as held:
            if device is not None:  # torch tensors computed where the engine's weights are (torch / TensorRT)
                onnx_layout = getattr(self.engine, "torch_weights_layout", "torch") == "onnx"
                targets, arrays = core.compute(self.files, by_module, self._dirty, owners, to_onnx=onnx_layout,
                                               device=device, as_numpy=False,
                                               resident=getattr(self.engine, "torch_weights_resident", None))
                check, write = self.engine.check_torch_weights, self.engine.set_torch_weights
            else:
                # Into the engine's own arrays where it has them (no second copy of the weights);
                # on any failure below they are recomputed for the state the engine was in.
                try:
                    targets, arrays = core.compute(self.files, by_module, self._dirty, owners, to_onnx=True,
                                                   into=held)
                except Exception:
                    self._put_back(held, by_module)
                    raise
                check, write = self.engine.check_weights, lambda a: self.engine.set_weights(a, copy=False)
            t1 = time.perf_counter()
            try:
                check(arrays)
            except Exception:
                self._put_back(held, by_module)
                raise
            t2 = time.perf_counter()
            try:
                write(arrays)
            except Exception as e:
                self._put_back(held, by_module)
                raise RefitError(f"writing {len(arrays)} weight(s) into the {self.engine.backend} engine failed; "
                                 f"its previous weights were kept: {e}") from e
            t3 = time.perf_counter()
        params = set(targets) | self._dirty
        self._state = new
        self._dirty = targets
        self._written |= params
        self.last_refit = {"compute_s": t1 - t0, "check_s": t2 - t1, "write_s": t3 - t2,
                           "total_s": t3 - t0, "weights": len(params)}

    def _put_back(self, held, by_module) -> None:
        """After a failed transition that wrote into the engine's arrays: their previous values."""
        if not held:
            return
        params = set(params_of(dict(by_module))) | self._dirty
        try:
            old = self._contributions(self._state)[0] if self._written else {}
            core.restore(self.files, params, old, held, exported=self.files.baked_params() - self._written)
        except Exception as e:  # noqa: BLE001 - the engine can no longer be trusted: say so
            raise RefitError(f"a refit failed and putting the previous weights back failed too ({e}); "
                             "reload the engine") from e

    def __repr__(self):
        return (f"Refitter({self.engine!r}, family={self.family!r}, component={self.component!r}, "
                f"active={self.get_active_adapters()}, enabled={self.enabled})")
