"""`TorchEngine` (backend="torch"): the component's PyTorch module behind the `Engine` interface.

    engine = engines.load_engine("out/sdxl/unet", backend="torch", device="cuda", compile=True)
    out = engine.infer({"sample": ..., "timestep": ..., ...})     # numpy in, numpy out
    r = refit.Refitter(engine); r.load_lora("y.safetensors")        # weights written in place

The export (`python -m export ... --torch`) writes the component's module, in the state the
export left it (the adapters it baked included, like model.onnx), in its library's
`save_pretrained` layout (safetensors) under `<component dir>/torch/`, with the class named in
`torch/torch_model.json`. The graph's inputs and outputs are the family registry's (the same
names as the ONNX graph), so `infer` is interchangeable with the ONNX Runtime and TensorRT
engines.

Weights: the refittable weights are the weights map's (by initializer name, as for every
engine, with the initializer's shape and dtype), and `set_weights` takes numpy arrays in that
layout. A Refitter does better: the engine declares (`weight_access()`) that it takes torch
tensors on its device in the parameters' own layout, still keyed by initializer name
(`set_device_weights`), computed on that device from base weights kept there (on CUDA; on the
CPU the base weights are read in place from the export's files unless `resident_bases=True`),
with the adapters' factors copied there once: no host round-trip, no host copy of the weights.
Both write the parameters IN PLACE (`copy_`): storage, shapes and
strides never change, so a `torch.compile`d module is not recompiled, and a CUDA graph keeps
pointing at the live weights. Atomic: everything is checked before the first write; with
`rollback=True` (default) the previous values of the weights being written are copied aside
first and put back if a write fails.
"""

from __future__ import annotations

import importlib
import json
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from lora_loaders.families.spec import select_output

from lora_loaders.dtypes import from_numpy, numpy_dtype, to_numpy, torch_dtype

from .base import Engine, EngineError, InputInfo, WeightAccess, WeightError, WeightInfo
from .manifest import Manifest
from .weights_map import load_weights_map

TORCH_DIR = "torch"
TORCH_META = "torch_model.json"


def load_torch_component(torch_dir, dtype=None, device="cpu") -> torch.nn.Module:
    """The module saved by the export's `--torch` (library class from torch_model.json)."""
    torch_dir = Path(torch_dir)
    meta_path = torch_dir / TORCH_META
    if not meta_path.is_file():
        raise EngineError(f"{torch_dir} has no {TORCH_META}: export with --torch to get a torch engine")
    meta = json.loads(meta_path.read_text())
    library = importlib.import_module(meta["library"])
    cls = getattr(library, meta["class"])
    dtype = dtype or torch_dtype(meta["dtype"])
    model = cls.from_pretrained(str(torch_dir), torch_dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


class TorchEngine(Engine):
    """A component's torch module with refittable weights (see module doc)."""

    backend = "torch"

    def __init__(self, path, device="cpu", compile: bool | dict = False, rollback: bool = True, model=None,
                 family: str | None = None, component: str | None = None, resident_bases: bool | None = None):
        path = Path(path)
        self.resident_bases = resident_bases  # None: base weights kept on the device unless it is the CPU
        self.directory = path if path.is_dir() else path.parent
        self.model_path = None
        self.device = torch.device(device)
        self.rollback = rollback
        self._lock = threading.RLock()
        wmap = load_weights_map(self.directory)
        manifest = Manifest.find(self.directory)
        entry = manifest.entry_for(wmap.component if wmap else None, self.directory)[1] if manifest else {}
        self.family = family or (wmap.family if wmap else None) or (manifest.family if manifest else None)
        self.component = component or (wmap.component if wmap else None) or self.directory.name
        if self.family is None:
            raise EngineError(f"cannot tell the family of {self.directory}; pass family=")
        from lora_loaders.families import get_family

        self.spec = get_family(self.family).component(self.component)
        self.model = model if model is not None else load_torch_component(self.directory / TORCH_DIR,
                                                                          device=self.device)
        self.model.to(self.device).eval().requires_grad_(False)
        self._params = dict(self.model.named_parameters())
        self.map = wmap
        self._infos: dict[str, WeightInfo] = {}
        self._by_init: dict[str, str] = {}
        if wmap is not None:
            for p, e in wmap.entries.items():
                if p not in self._params:
                    raise EngineError(f"{self.directory}: mapped parameter {p} is not in the torch module")
                self._infos[e.initializer] = WeightInfo(e.initializer, e.shape, numpy_dtype(e.raw["dtype"]))
                self._by_init[e.initializer] = p
        config = getattr(self.model, "config", None)
        self._tensor_inputs = self.spec.inputs_for(config)
        declared = {i["name"]: i.get("shape", []) for i in entry.get("inputs", [])}
        model_dtype = next(iter(self._params.values())).dtype
        self._input_infos = {}
        for t in self._tensor_inputs:
            dt = numpy_dtype(model_dtype if t.dtype == "model" else t.dtype)
            shape = tuple(d if isinstance(d, int) else (d if isinstance(d, str) else None)
                          for d in declared.get(t.name, [None] * len(t.dims)))
            self._input_infos[t.name] = InputInfo(t.name, dt, shape)
        self._inputs = [t.name for t in self._tensor_inputs]
        self._output_specs = self.spec.outputs_for(config)
        self._outputs = [o.name for o in self._output_specs]
        self._forward = self._call
        if compile:
            opts = compile if isinstance(compile, dict) else {}
            self._forward = torch.compile(self._call, **opts)

    # -- inference -----------------------------------------------------------------------
    def _call(self, *tensors):
        kwargs: dict = dict(self.spec.call_kwargs)
        for t, value in zip(self._tensor_inputs, tensors):
            arg = (t.arg or t.name).split(".")
            target = kwargs
            for part in arg[:-1]:
                target = target.setdefault(part, {})
            target[arg[-1]] = value
        if self.spec.prepare is not None:
            kwargs = self.spec.prepare(self.model, kwargs)
        m = self.model
        if self.spec.graph_forward is not None:  # what the graph computes, from the graph's inputs
            result = self.spec.graph_forward(m, kwargs)
        else:
            result = m(**kwargs) if self.spec.method == "forward" else getattr(m, self.spec.method)(**kwargs)
        return tuple(select_output(result, o.source or o.name) for o in self._output_specs)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = self.check_inputs(feeds)
        with self._lock, torch.inference_mode():
            tensors = [from_numpy(feeds[n]).to(self.device) for n in self._inputs]
            outs = self._forward(*tensors)
            return {n: to_numpy(o.detach()) for n, o in zip(self._outputs, outs)}

    # -- weights: the Engine interface (initializer names, numpy, initializer layout) ------------
    def weight_infos(self) -> dict[str, WeightInfo]:
        return self._infos

    def _read_weights(self, names: list[str]) -> dict[str, np.ndarray]:
        with self._lock:
            return {n: to_numpy(self.map[self._by_init[n]].to_onnx(self._params[self._by_init[n]].detach())).copy()
                    for n in names}

    def _write_weights(self, weights: dict[str, np.ndarray], copy: bool = True) -> None:
        values = {n: self.map[self._by_init[n]].to_torch(from_numpy(a)).to(self.device) for n, a in weights.items()}
        self.set_device_weights(values)

    # -- weights: torch tensors in the parameters' layout (what a Refitter hands this engine) ------
    def weight_access(self) -> WeightAccess:
        return WeightAccess(device=str(self.device), layout="parameter", resident_bases=self.resident_bases)

    def check_device_weights(self, values: Mapping[str, torch.Tensor]) -> None:
        problems = []
        for n, v in values.items():
            p = self._by_init.get(n)
            param = self._params.get(p) if p is not None else None
            if param is None:
                problems.append(f"{n}: not a refittable weight of this engine")
            elif not isinstance(v, torch.Tensor):
                problems.append(f"{p}: expected a torch tensor, got {type(v).__name__}")
            elif v.shape != param.shape or v.dtype != param.dtype or v.device != param.device:
                problems.append(f"{p}: {tuple(v.shape)} {v.dtype} on {v.device} != the parameter's "
                                f"{tuple(param.shape)} {param.dtype} on {param.device}")
        if problems:
            raise WeightError(f"cannot set {len(problems)} weight(s): " + "; ".join(problems[:8]))

    def set_device_weights(self, values: Mapping[str, torch.Tensor]) -> None:
        """Write {initializer name: torch-layout value} into the parameters in place, all or nothing."""
        if not values:
            return
        self.check_device_weights(values)
        values = {self._by_init[n]: v for n, v in values.items()}
        with self._lock, torch.no_grad():
            saved = {p: self._params[p].detach().clone() for p in values} if self.rollback else {}
            done = []
            try:
                for p, v in values.items():
                    self._params[p].copy_(v)
                    done.append(p)
                if self.device.type == "cuda":
                    torch.cuda.current_stream(self.device).synchronize()
            except Exception as e:
                for p in done if self.rollback else ():
                    self._params[p].copy_(saved[p])
                kept = "previous weights restored" if self.rollback else "rollback=False: weights are now mixed"
                raise EngineError(f"writing {p!r} failed ({e}); {kept}") from e

    def __repr__(self):
        return f"TorchEngine({str(self.directory)!r}, device={str(self.device)!r}, weights={len(self._infos)})"
