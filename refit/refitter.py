"""`Refitter`: the diffusers LoRA API over an export's engines, with ONE adapter state.

    r = refit.Refitter("out/sdxl")                     # the export: its LoRA-capable components
    r = refit.Refitter({"unet": unet, "text_encoder": te})   # engines already loaded
    r = refit.Refitter(engine)                         # one exported component
    r.get_active_adapters()                            # ["x"]: what the engines hold (baked at export)
    r.load_lora("y.safetensors", adapter_name="y")     # y becomes the only active adapter
    r.set_adapters(["x", "y"], [1.0, 0.5])             # stack / rescale
    r.set_adapters(["y"], [{"unet": {"down": 0.5, "up": 1.0}, "text_encoder": 0.8}])  # per component, per block
    r.set_adapters([])                                 # back to the exact base weights
    r.disable_lora(); r.enable_lora(); r.delete_adapters("y"); r.unload_lora_weights()
    r.activate({"y": 0.8}, resolve=lambda name: path)  # a server's request: load what is missing, one refit

Which adapters are active at which weights is the mixins' state machine
(`lora_loaders.state.LoraState`), one for the whole export. A LoRA file is read and hashed once
and bound once over all the components' weights maps (a key that matches nothing in any of
them is an error). Every change recomputes, from base, the weights of the union of the
previous and the new targets (so nothing of a previous adapter, including one baked at
export, remains), with the one effective-weight function, casts once to the engine's dtype,
applies the weights-map transform and validates everything (finite, shapes, dtypes). A
change that leaves every component's contributions as they are writes nothing.

How each engine takes weights is what it declares (`Engine.weight_access`): computed straight
into the host arrays it runs from (ONNX Runtime `inputs` mode on the CPU: no second copy of the
weights, inference held off meanwhile), as torch tensors on its device (TensorRT, the torch
engine), or as host arrays (`set_weights`). A transition computes and checks every component,
then writes; if anything fails, every component that was changed gets its previous values
back (recomputed from base for the state it was in: the same function, the same bits; or
copied from the exported file for weights never written since the export), and the error
says why. The adapter state changes only when every component was written.

Adapters baked at export are registered from the manifest (name, file hash, scale): their
files are looked up where the manifest recorded them, next to the export, and in `lora_dir`
(a Triton adapter directory), by content hash. One that is not found stays listed and
active (the engines hold it) until a change needs its weights; then the error says where it
was looked for, and `load_lora(path, adapter_name=name)` supplies it. The manifest records
what computed the exported weights (`kernels.describe()`); a component refitted with other
kernels (another machine, a GPU) is recomputed by its first transition, so a refitted engine
equals a fresh export made where it is refitted.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from engines.base import Engine
from engines.load import load_engine
from engines.manifest import MANIFEST_FILE, Manifest
from engines.weights_map import WEIGHTS_MAP_FILE
from lora_loaders import kernels
from lora_loaders.adapter import LoraAdapter
from lora_loaders.bind import resolve_fused
from lora_loaders.families import get_family
from lora_loaders.reader import file_sha256
from lora_loaders.state import LoraState
from lora_loaders.targets import params_of

from . import core
from .store import AdapterError, ComponentFiles, RefitError

log = logging.getLogger(__name__)


class _Missing(LoraAdapter):
    """A baked adapter whose file was not found: known by name, hash and scale only."""

    def __init__(self, record: dict, searched: list[Path]):
        super().__init__({}, format="missing")
        self.record, self.searched = record, searched


class _Unit:
    """One component: its engine, its exported files, and what its weights hold."""

    def __init__(self, engine: Engine, files: ComponentFiles):
        self.engine, self.files, self.component = engine, files, files.component
        self.access = engine.weight_access()
        refittable = set(engine.weight_names())
        self.not_refittable = {e.initializer for e in files.map.entries.values() if e.initializer not in refittable}
        # parameters whose engine value differs from base: at first, those baked at export
        self.dirty: set[str] = set(files.baked_params()) & set(files.map.entries)
        self.written: set[str] = set()  # parameters written since the export (the rest hold its values)
        here = kernels.describe(self.access.device)
        recorded = files.effective_weights
        self.foreign = bool(recorded) and recorded != here  # recomputed by the first transition
        if self.foreign:
            log.info("%s: exported with %s effective weights, refitted with %s: its first refit recomputes every "
                     "baked weight", self.component, recorded, here)

    def base_of(self, component: str, param: str):
        return self.files.base(param)

    def check_refittable(self, adapter: LoraAdapter, name: str) -> None:
        bad = [self.files.map[f"{module}.{kind}"].initializer
               for module, layer in adapter.for_component(self.component).items()
               for kind in (("weight", "bias") if layer.bias is not None else ("weight",))]
        bad = [b for b in bad if b in self.not_refittable]
        if bad:
            raise AdapterError(f"adapter {name!r} touches {len(bad)} weight(s) the {self.component} engine was built "
                               f"without as refittable: {bad[:5]}")

    def expand(self, scales: dict) -> dict:
        cspec = get_family(self.files.family).components.get(self.component)
        if cspec is None or cspec.block_weights is None:
            raise ValueError(f"per-block weights are not supported for {self.component!r}")
        return cspec.block_weights(scales, self.files.map.modules())

    # -- weights ----------------------------------------------------------------------------
    def compute(self, by_module: dict, params: set[str], held, owners=None, exported=()) -> dict:
        """The values of `params` as this engine takes them (computed into `held`, the engine's own
        arrays, where it has them); returns what is left to write."""
        a = self.access
        if a.device is not None:
            return core.compute(self.files, by_module, params, owners=owners, to_onnx=a.layout == "initializer",
                                device=a.device, as_numpy=False, resident=a.resident_bases, exported=exported)
        return core.compute(self.files, by_module, params, owners=owners, into=held, exported=exported)

    def check(self, values: dict) -> None:
        (self.engine.check_device_weights if self.access.device is not None else self.engine.check_weights)(values)

    def write(self, values: dict) -> None:
        try:
            if self.access.device is not None:
                self.engine.set_device_weights(values)
            else:
                self.engine.set_weights(values, copy=False)
        except Exception as e:
            raise RefitError(f"writing {len(values)} weight(s) into the {self.component} {self.engine.backend} "
                             f"engine failed: {e}") from e

    def put_back(self, old: dict, params: set[str], held, wrote: bool) -> None:
        """The values the weights had before a failed transition (in the engine's arrays, and through
        a write where one was made): recomputed for the old state, or the exported ones for weights
        never written since the export."""
        values = self.compute(old, params, held, exported=(self.files.baked_params() - self.written) & params)
        if wrote:
            self.write(values)


class Refitter:
    """One adapter state over the LoRA-capable engines of an export (see module doc)."""

    def __init__(self, target, *, lora_dir=None, backend: str | None = None, family: str | None = None,
                 component: str | None = None, directory=None, **engine_opts):
        units = _units(target, backend, family, component, directory, engine_opts)
        self.units: dict[str, _Unit] = units
        families = {u.files.family for u in units.values()}
        if None in families:
            raise RefitError(f"cannot tell the family of {[str(u.files.directory) for u in units.values()]}: no "
                             "family in the weights map or manifest; pass family=")
        if len(families) > 1:
            raise RefitError(f"the engines are of different families {sorted(families)}")
        self.family: str = families.pop()
        self._spec = get_family(self.family)
        self.lora_dir = Path(lora_dir) if lora_dir else None
        self._lock = threading.RLock()
        self._state = LoraState()
        self.refits = 0  # transitions that wrote weights
        self.refit_counts: dict[str, int] = dict.fromkeys(units, 0)  # per component
        self.last_refit: dict = {}
        self.baked_adapters: list[dict] = self._baked_records()
        self._register_baked()

    # -- what it is over -----------------------------------------------------------------------
    @property
    def components(self) -> list[str]:
        return list(self.units)

    @property
    def engines(self) -> dict[str, Engine]:
        return {c: u.engine for c, u in self.units.items()}

    def _single(self) -> _Unit:
        if len(self.units) != 1:
            raise AttributeError(f"this Refitter is over {len(self.units)} components {self.components}; "
                                 "use .engines / .units[component]")
        return next(iter(self.units.values()))

    engine = property(lambda self: self._single().engine)
    files = property(lambda self: self._single().files)
    component = property(lambda self: self._single().component)

    # -- baked adapters ---------------------------------------------------------------------
    def _baked_records(self) -> list[dict]:
        """The export's baked adapters ({name, path, sha256, scale}), each once, over the components."""
        out: dict[str, dict] = {}
        for u in self.units.values():
            for r in u.files.baked_adapters():
                seen = out.setdefault(r.get("name"), r)
                if seen.get("sha256") != r.get("sha256"):
                    raise RefitError(f"the export names two different baked adapters {r.get('name')!r}")
        return list(out.values())

    def _candidates(self, record: dict) -> list[Path]:
        name, recorded = record.get("name", ""), Path(record.get("path", ""))
        files = next(iter(self.units.values())).files
        dirs = [files.export_dir, files.export_dir / "loras", *(u.files.directory for u in self.units.values())]
        if self.lora_dir is not None:
            dirs.insert(0, self.lora_dir)
        out = [recorded] if record.get("path") else []
        for d in dirs:
            out += [d / f"{name}.safetensors", d / recorded.name]
        return list(dict.fromkeys(p for p in out if str(p) not in ("", ".")))

    def _register_baked(self) -> None:
        if not self.baked_adapters:
            return
        state = LoraState()
        for record in self.baked_adapters:
            name, digest = record.get("name"), record.get("sha256")
            searched = self._candidates(record)
            found = next((p for p in searched if p.is_file() and (not digest or file_sha256(p) == digest)), None)
            adapter = _Missing(record, searched) if found is None else self._read(str(found), name)[0]
            state.add(name, adapter)
        state.set_adapters([r["name"] for r in self.baked_adapters],
                           [float(r.get("scale", 1.0)) for r in self.baked_adapters], self.components)
        self._state = state

    def _read(self, source, name: str, remap=None, **kwargs) -> tuple[LoraAdapter, str | None]:
        """Read (once), bind over every component, keep the layers of the components here, resolve fused layers."""
        files = [u.files for u in self.units.values()]
        adapter, digest = core.read_adapter(source, files, name, remap=remap, **kwargs)
        adapter = core.check_adapter(adapter, self.family, self.components, name)
        for u in self.units.values():
            u.check_refittable(adapter, name)
        unit_of = {c: u for c, u in self.units.items()}
        return resolve_fused(adapter, lambda c, p: unit_of[c].base_of(c, p)), digest

    def _remap(self, kwargs: dict) -> dict | None:
        """The family's load options (Wan 2.2's `load_into_transformer_2=True`), as the mixins take them."""
        remap = None
        for option, mapping in self._spec.load_options.items():
            if kwargs.pop(option, False):
                remap = {**(remap or {}), **mapping}
        return remap

    # -- diffusers-style API ------------------------------------------------------------
    def load_lora(self, source, adapter_name: str | None = None, **kwargs) -> str:
        """Read a LoRA (path, hub id + weight_name, state dict or LoraAdapter) and make it the only
        active one of the components it has layers for.

        Naming a baked adapter whose file was not found supplies that file (its content hash
        must match the export's): nothing is rewritten. Returns the adapter name. Raises
        (engines unchanged) for a LoRA of another family, one with no layers here, one touching
        weights the engines do not map, or one whose values are bad.
        """
        with self._lock:
            state = self._state
            if adapter_name is None:
                adapter_name = f"default_{len(state.adapters)}"
            known = state.adapters.get(adapter_name)
            if known is not None and not isinstance(known, _Missing):
                raise ValueError(f"Adapter name {adapter_name!r} already in use")
            new = state.copy()
            remap = self._remap(kwargs)
            if isinstance(known, _Missing):  # the engines already hold it: nothing to write
                self._register(new, adapter_name, source, remap, **kwargs)
                self._state = new
                return adapter_name
            new.add(adapter_name, self._read(source, adapter_name, remap, **kwargs)[0])
            self._transition(new)
            return adapter_name

    load_lora_weights = load_lora  # the mixins' name

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """Activate these adapters with weights: a float, one per adapter, {component: float | per-block
        dict} dicts (diffusers' per-block weights for a UNet). `set_adapters([])` returns to base."""
        self._change(lambda s: self._with_adapters(s, adapter_names, adapter_weights))

    def _with_adapters(self, new: LoraState, names, weights) -> LoraState:
        new.set_adapters(names, weights, self.components, lambda c, s: self.units[c].expand(s),
                         self._spec.lora_components)
        return new

    def activate(self, adapters: Mapping[str, object], resolve: Callable[[str], object] | None = None) -> bool:
        """Make the engines hold exactly these {adapter: weight}, reading the ones not loaded yet from
        `resolve(name)` (a path, or (path, load options) such as Wan 2.2's `load_into_transformer_2`); one
        refit at most. Returns whether weights were written."""
        with self._lock:
            new = self._state.copy()
            for name in adapters:
                known = new.adapters.get(name)
                if known is not None and not isinstance(known, _Missing):
                    continue
                if resolve is None:
                    if known is None:
                        raise ValueError(f"Adapter name(s) [{name!r}] not in the list of present adapters: "
                                         f"{sorted(new.adapters)}")
                    continue
                try:
                    source = resolve(name)
                except Exception:
                    if known is None:
                        raise
                    continue  # a baked adapter without its file: an error only if a change needs its weights
                source, options = source if isinstance(source, tuple) else (source, {})
                self._register(new, name, source, remap=self._remap(dict(options)))
            if not new.enabled:
                new.set_enabled(True)
            return self._transition(self._with_adapters(new, list(adapters), list(adapters.values())))

    def preload(self, name: str, source) -> None:
        """Read an adapter now and register it under `name` without applying it (nothing is written)."""
        with self._lock:
            new = self._state.copy()
            if name not in new.adapters or isinstance(new.adapters[name], _Missing):
                self._register(new, name, source)
                self._state = new

    def _register(self, state: LoraState, name: str, source, remap=None, **kwargs) -> None:
        """Read `source` into `state` as adapter `name`, not active (a baked one's file must be the export's)."""
        adapter, digest = self._read(source, name, remap, **kwargs)
        known = state.adapters.get(name)
        expected = known.record.get("sha256") if isinstance(known, _Missing) else None
        if expected and digest != expected:
            raise RefitError(f"{source} is not the adapter {name!r} baked at export "
                             f"(sha256 {str(digest)[:12]} != {expected[:12]})")
        state.register(name, adapter)

    def disable_lora(self) -> None:
        """Run the base weights, keeping the adapters and their settings."""
        self._change(lambda s: s.set_enabled(False))

    def enable_lora(self) -> None:
        self._change(lambda s: s.set_enabled(True))

    def delete_adapters(self, adapter_names) -> None:
        self._change(lambda s: s.delete(adapter_names))

    def unload_lora_weights(self) -> None:
        """Drop every adapter and return the engines to their base weights."""
        self._change(lambda s: s.unload())

    def _change(self, change) -> bool:
        """Apply `change` to a copy of the state, then make the engines hold it (or raise, unchanged)."""
        with self._lock:
            new = self._state.copy()
            change(new)
            return self._transition(new)

    def get_active_adapters(self) -> list[str]:
        return self._state.active_names()

    def get_list_adapters(self) -> dict[str, list[str]]:
        """{component: the adapters with layers there} (a baked adapter whose file is missing: every component)."""
        out = {}
        for c in self.components:
            names = [n for n, a in self._state.adapters.items() if isinstance(a, _Missing) or c in a.components]
            if names:
                out[c] = names
        return out

    def get_adapter_weights(self) -> dict[str, object]:
        """{active adapter: its weight}, a float where it is the same on every component, else
        {component: weight} (what `enable_lora` applies while disabled)."""
        out = {}
        for n in self.get_active_adapters():
            per = {c: self._state.module_weight(n, c, "") for c in self.components if n in self._state.active_in(c)}
            values = set(per.values())
            out[n] = values.pop() if len(values) == 1 else per
        return out

    def adapter_set(self) -> tuple:
        """What the engines hold, as a server keys it: sorted ((adapter, weight), ...); () for base."""
        if not self._state.enabled:
            return ()
        return tuple(sorted((n, w if isinstance(w, float) else tuple(sorted(w.items())))
                            for n, w in self.get_adapter_weights().items()))

    @property
    def enabled(self) -> bool:
        return self._state.enabled

    @property
    def missing_adapters(self) -> dict[str, list[str]]:
        """{baked adapter whose file was not found: where it was looked for}."""
        return {n: [str(p) for p in a.searched] for n, a in self._state.adapters.items() if isinstance(a, _Missing)}

    # -- machinery ------------------------------------------------------------------------
    def _contributions(self, state: LoraState, component: str) -> tuple[dict, dict[int, str]]:
        """({module: [(layer, weight)]} the state puts on one component, {id(layer): adapter})."""
        if not state.enabled:
            return {}, {}
        owners, modules = {}, set()
        for n in state.active_in(component):
            a = state.adapters[n]
            if isinstance(a, _Missing):
                raise RefitError(
                    f"adapter {n!r} was baked at export, and this change needs its weights, but its file "
                    f"(sha256 {str(a.record.get('sha256'))[:12]}) was not found; looked in: "
                    + ", ".join(str(p) for p in a.searched)
                    + f". Pass it with load_lora(path, adapter_name={n!r}), or leave it out of the active set")
            for module, layer in a.for_component(component).items():
                owners[id(layer)] = n
                modules.add(module)
        return {m: state.contributions(component, m) for m in sorted(modules)}, owners

    def _plan(self, new: LoraState) -> dict[str, tuple[dict, dict, set]]:
        """{component: (by_module, owners, params to compute)} for the components whose weights change."""
        plan = {}
        for c, u in self.units.items():
            if not u.foreign and _signature(new, c) == _signature(self._state, c):
                continue  # the same adapters at the same weights: the engine holds exactly this
            by_module, owners = self._contributions(new, c)
            if not u.foreign and _same(by_module, self._held_contributions(c)):
                continue
            plan[c] = (by_module, owners, set(params_of(dict(by_module))) | u.dirty)
        return plan

    def _held_contributions(self, component: str) -> dict:
        try:
            return self._contributions(self._state, component)[0]
        except RefitError:  # a baked adapter without its file: the engine holds it, we cannot say more
            return {None: None}

    def _transition(self, new: LoraState) -> bool:
        """Compute, check and write the weights of a new state on every component, or none; commit
        the state only on success. Returns whether any weights were written."""
        t0 = time.perf_counter()
        plan = self._plan(new)
        if not plan:
            self._state = new
            return False
        staged, changed = {}, {}  # changed: {component: whether it was written} of engines no longer as they were
        with contextlib.ExitStack() as stack:
            held = {c: stack.enter_context(self.units[c].engine.writable_weights()) for c in plan}
            try:
                for c, (by_module, owners, params) in plan.items():
                    if held[c]:
                        changed[c] = False  # computing writes into the engine's own arrays
                    staged[c] = self.units[c].compute(by_module, params, held[c], owners)
                    self.units[c].check(staged[c])
                t1 = time.perf_counter()
                for c, values in staged.items():
                    self.units[c].write(values)
                    changed[c] = True
            except BaseException:
                self._put_back(changed, plan, held)
                raise
            t2 = time.perf_counter()
        for c, (by_module, _, params) in plan.items():
            u = self.units[c]
            u.dirty = set(params_of(dict(by_module)))
            u.written |= params
            u.foreign = False
            self.refit_counts[c] += 1
        self._state = new
        self.refits += 1
        self.last_refit = {"compute_s": t1 - t0, "write_s": t2 - t1, "total_s": t2 - t0,
                           "weights": sum(len(p) for _, _, p in plan.values()), "components": list(plan)}
        return True

    def _put_back(self, changed: dict[str, bool], plan: dict, held: dict) -> None:
        """After a failed transition: every component it changed back on its previous values."""
        for c in reversed(list(changed)):
            try:
                self.units[c].put_back(self._contributions(self._state, c)[0], plan[c][2], held[c], changed[c])
            except Exception as e:  # noqa: BLE001 - the engine can no longer be trusted: say so
                raise RefitError(f"a refit failed and putting the previous weights of {c} back failed too ({e}); "
                                 "reload the engines") from e

    def __repr__(self):
        return (f"Refitter({self.family!r}, components={self.components}, active={self.get_active_adapters()}, "
                f"enabled={self.enabled})")


def _signature(state: LoraState, component: str) -> tuple:
    """What decides a component's weights under a state: its active adapters (by identity) with their weights."""
    fused = tuple((m, tuple((f.adapter, f.weight) for f in fs)) for (c, m), fs in sorted(state.fused.items())
                  if c == component)
    if not state.enabled:
        return (), fused
    return tuple((n, id(state.adapters[n]), repr(state.weights.get(n, {}).get(component)),
                  state.multipliers.get(n, {}).get(component, 1.0)) for n in state.active_in(component)), fused


def _same(a: dict, b: dict) -> bool:
    """Whether two {module: [(layer, weight)]} give the same weights (the same layers at the same weights)."""
    if a.keys() != b.keys():
        return False
    return all(len(a[m]) == len(b[m]) and all(x[0] is y[0] and x[1] == y[1] for x, y in zip(a[m], b[m])) for m in a)


def _units(target, backend, family, component, directory, engine_opts) -> dict[str, _Unit]:
    """{component: _Unit} for an engine, a {component: engine} mapping, or a directory."""
    if isinstance(target, Engine):
        return _unit_map({None: target}, family, component, directory)
    if isinstance(target, Mapping):
        if not target:
            raise RefitError("no engines given")
        return _unit_map(dict(target), family, None, None)
    path = Path(target)
    if not path.is_dir():
        raise FileNotFoundError(f"no such export or engine directory: {path}")
    if (path / WEIGHTS_MAP_FILE).is_file():
        return _unit_map({None: load_engine(path, backend=backend, **engine_opts)}, family, component, path)
    if not (path / MANIFEST_FILE).is_file():
        raise RefitError(f"{path} is neither an export (no {MANIFEST_FILE}) nor an exported component "
                         f"(no {WEIGHTS_MAP_FILE})")
    manifest = Manifest.read(path)
    spec = get_family(family or manifest.family)
    engines = {c: load_engine(manifest.component_dir(c), backend=backend, **engine_opts)
               for c in manifest.components if c in spec.components and spec.components[c].lora
               and (manifest.component_dir(c) / WEIGHTS_MAP_FILE).is_file()}
    if not engines:
        raise RefitError(f"{path}: the export has no LoRA-capable component with a weights map")
    return _unit_map(engines, family, None, None)


def _unit_map(engines: dict, family, component, directory) -> dict[str, _Unit]:
    units = {}
    for name, engine in engines.items():
        d = directory or engine.directory
        if d is None:
            raise RefitError("the engine does not know its directory; pass directory= (the exported component dir)")
        files = ComponentFiles(d, engine.model_path)
        if family is not None:
            files.family = family
        if component is not None or name is not None:
            files.component = component or name
        if files.component in units:
            raise RefitError(f"two engines for component {files.component!r}")
        units[files.component] = _Unit(engine, files)
    return units
