"""ONNX Runtime engine with refittable weights, in one of two weight modes.

`inputs` (default): at load, on an in-memory copy of the graph (the file on disk is not
    touched), every refittable initializer becomes a graph input. Its value lives in an
    OrtValue bound through one IOBinding, over a host array on CPU. A Refitter computes the
    new values straight into those arrays (`writable_weights`: no second copy of the
    weights); `set_weights` binds OrtValues over new buffers in their place on CPU (all or
    none), or writes into the device buffers in place (`OrtValue.update_inplace`) on a GPU
    EP. No session is created. Cost: ONNX Runtime can
    no longer constant-fold or pre-pack those weights. Measured with bench/bench_refit.py
    (real-config SD 1.5 UNet fp32, rank-32 LoRA on its 160 attention/FF Linears, CPU EP,
    2 cores): inference 0.98-1.23x the baked graph (noise), a swap 0.17-0.23 s with no memory
    added, against 7-10 s in `session` mode and 58-64 s for re-export + new session. Hence the
    default.
`session`: the graph keeps the weights as initializers; their values are supplied with
    `SessionOptions.add_external_initializers`, and a refit builds a new session with the
    new values (by default the old one is freed first, so memory peaks at one session; it is
    rebuilt if the new one fails; `keep_old_session=True` trades memory for never being
    without a session). Swaps cost a full session
    creation (seconds to tens of seconds at real scale), but every graph optimization that
    needs constant weights stays on. Pick it when swaps are rare and an execution provider
    gains a lot from constant weights (e.g. fusions of the CUDA/TensorRT EPs, Conv weight
    layouts), or when the weights must not be graph inputs.

The refittable weights are the initializers named in the engine directory's
`weights_map.json` (all LoRA-targetable Linear/Conv weights and biases; `weights="all"`),
only the Linear ones (`weights="linear"`: Conv weights stay constants that ONNX Runtime
can re-layout, and a LoRA touching a Conv is refused with a clear error), or a list.

bfloat16 exports on the CPU provider (which has no bfloat16 MatMul and other kernels): the session
runs an exact float32 copy of the graph (`onnx_utils.bf16_to_fp32`, as export validation does),
and the engine still looks like the export: bfloat16 inputs are cast to float32 before the session,
float32 outputs rounded back to bfloat16 (round-to-nearest-even, as torch's `.to(torch.bfloat16)`),
and the refittable weights are set and read as bfloat16 (held and bound as float32; both casts
exact, so a refit stays bit-identical to a fresh export). GPU providers run the graph as it is.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
import onnx
from onnx import TensorProto
from onnx.external_data_helper import load_external_data_for_tensor

from lora_loaders import dtypes as dt

from . import onnx_utils as ou
from .base import Engine, EngineError, InputInfo, WeightAccess, WeightInfo
from .weights_map import load_weights_map

log = logging.getLogger(__name__)

MODES = ("inputs", "session")
DEFAULT_MODE = "inputs"

_SESSION_OPTION_ATTRS = (
    "graph_optimization_level", "intra_op_num_threads", "inter_op_num_threads", "execution_mode",
    "enable_cpu_mem_arena", "enable_mem_pattern", "enable_mem_reuse", "log_severity_level",
    "log_verbosity_level", "use_deterministic_compute", "enable_profiling",
)


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - ort is a dependency of the cpu/gpu extras
        raise EngineError("onnxruntime is not installed (pip install lora-engines[cpu] or [gpu])") from e
    return ort


def numpy_dtype(ort_type: str) -> np.dtype | None:
    """The numpy dtype of an ONNX Runtime type string ('tensor(float)' -> float32); None if numpy has none."""
    try:
        return dt.numpy_dtype(ort_type)
    except ValueError:
        return None


def _ortvalue(arr: np.ndarray, device: str, device_id: int):
    ort = _ort()
    if arr.dtype.name == "bfloat16":
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr.view(np.uint16), TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(arr, device, device_id)


def _owned(arr: np.ndarray, copy: bool) -> np.ndarray:
    if copy or not (arr.flags.c_contiguous and arr.flags.writeable):
        return np.array(arr, copy=True, order="C")
    return arr


def _storage(arr: np.ndarray) -> np.ndarray:
    return arr.view(dt.dtype(arr.dtype).storage)


def _cpu_only(providers) -> bool:
    return all((p[0] if isinstance(p, (tuple, list)) else p) == "CPUExecutionProvider" for p in providers)


def _bf16(arr: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16, rounding to nearest even (as torch's .to(torch.bfloat16))."""
    return arr.astype(dt.numpy_dtype("bfloat16"))


class OrtEngine(Engine):
    """An ONNX model in ONNX Runtime whose mapped weights can be rewritten (see module doc)."""

    backend = "onnxruntime"

    def __init__(
        self,
        path,
        mode: str | None = None,
        providers: list | None = None,
        session_options=None,
        weights: Iterable[str] | str | None = None,
        device: str = "cpu",
        device_id: int = 0,
        keep_old_session: bool = False,
    ):
        mode = mode or DEFAULT_MODE
        if mode not in MODES:
            raise ValueError(f"unknown weight mode {mode!r}; choose one of {MODES}")
        ort = _ort()
        self.mode = mode
        self.model_path = ou.find_model(path)
        self.directory = self.model_path.parent
        self.providers = providers or ["CPUExecutionProvider"]
        self.device, self.device_id = device, device_id
        self.keep_old_session = keep_old_session  # session mode: build the new session before freeing the old
        self._template_options = session_options
        self._lock = threading.RLock()
        self.timings: dict[str, float] = {}

        t0 = time.perf_counter()
        model = onnx.load(str(self.model_path), load_external_data=False)
        # bfloat16 graph on the CPU provider: run its exact float32 copy (see module doc).
        self.fp32_copy = ou.computes_in_bf16(model) and _cpu_only(self.providers)
        bf16_io = {v.name for v in [*model.graph.input, *model.graph.output]
                   if v.type.tensor_type.elem_type == TensorProto.BFLOAT16} if self.fp32_copy else set()
        self._model_source = self._prepare(model, self._weight_names(model, path, weights))
        del model
        self.timings["prepare_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if mode == "inputs":
            self._session = ort.InferenceSession(self._model_source, self._options(), providers=self.providers)
            self._ortvalues = {n: _ortvalue(a, device, device_id) for n, a in self._arrays.items()}
            self._binding = self._session.io_binding()
            for n, ov in self._ortvalues.items():
                self._binding.bind_ortvalue_input(n, ov)
        else:
            self._session, self._keepalive = self._new_session(self._arrays)
        self.timings["session_s"] = time.perf_counter() - t0
        weight_set = set(self._infos)
        self._inputs = [i.name for i in self._session.get_inputs() if i.name not in weight_set]
        self._input_infos = {i.name: InputInfo(i.name, numpy_dtype("tensor(bfloat16)" if i.name in bf16_io else i.type),
                                               tuple(i.shape))
                             for i in self._session.get_inputs() if i.name not in weight_set}
        self._outputs = [o.name for o in self._session.get_outputs()]
        self._cast_inputs = [n for n in self._inputs if n in bf16_io]  # fp32 copy: bf16 -> fp32 before the session
        self._round_outputs = {n for n in self._outputs if n in bf16_io}  # and fp32 -> bf16 after it

    def _weight_names(self, model: onnx.ModelProto, path, weights) -> list[str]:
        """The refittable initializers, in graph order (the weights map's, or those asked for)."""
        if weights is None or isinstance(weights, str):
            wmap = load_weights_map(self.directory) if Path(path).is_dir() or self.model_path.name == ou.MODEL_FILE \
                else None
            names = select_weights(wmap, weights or "all") if wmap is not None else []
        else:
            names = list(weights)
        order = {t.name: i for i, t in enumerate(model.graph.initializer)}
        missing = [n for n in names if n not in order]
        if missing:
            raise EngineError(f"{self.model_path}: refittable weights not among the graph's initializers: "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        return sorted(set(names), key=order.__getitem__)

    def _prepare(self, model: onnx.ModelProto, names: list[str]):
        """Take the refittable weights out of the graph (held in `_arrays`), turn them into graph
        inputs (`inputs` mode) or supplied initializers (`session`), and return what a session loads:
        the serialized graph, or a private temporary copy when it is too big for one protobuf message."""
        elem_types = ou.onnx_elem_type(model, names)
        # Values of the refittable weights, read straight from the file (no full in-memory copy).
        if self.mode == "inputs":  # owned, writable buffers: the bound OrtValues share them
            self._arrays: dict[str, np.ndarray] = ou.take_initializers(model, names, self.directory)
            self._arrays = {n: a if a.flags.writeable and a.flags.c_contiguous else a.copy()
                            for n, a in self._arrays.items()}
        else:  # views (external data memory-mapped): only changed weights take new memory
            wanted = set(names)
            self._arrays = {t.name: ou.initializer_view(t, self.directory)
                            for t in model.graph.initializer if t.name in wanted}
        self._infos = {n: WeightInfo(n, tuple(a.shape), a.dtype) for n, a in self._arrays.items()}
        if self.fp32_copy:  # held (and bound) as the float32 the session runs; bfloat16 to callers
            self._arrays = {n: a.astype(np.float32) if a.dtype.name == "bfloat16" else a
                            for n, a in self._arrays.items()}
            elem_types = {n: TensorProto.FLOAT if t == TensorProto.BFLOAT16 else t for n, t in elem_types.items()}
        # Remaining external initializers are loaded into the proto (small: norms, embeddings).
        for t in model.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL and t.name not in self._infos:
                load_external_data_for_tensor(t, str(self.directory))
                t.data_location = TensorProto.DEFAULT
                del t.external_data[:]
        if self.fp32_copy:
            ou.bf16_to_fp32(model, base_dir=self.directory, supplied=names)
            log.info("%s: bfloat16 graph runs as an exact float32 copy on ONNX Runtime's CPU provider (it has no "
                     "bfloat16 kernels); inputs, outputs and weights stay bfloat16", self.model_path)
        if self.mode == "inputs":
            ou.add_inputs(model, self._arrays, elem_types)
        else:
            ou.stub_external(model, names)
        self._tmpdir = None
        if ou.fits_in_memory_proto(model):
            return ou.serialize(model)
        self._tmpdir = tempfile.TemporaryDirectory(prefix="ortengine-")
        p = Path(self._tmpdir.name) / "model.onnx"
        ou.save_with_external(model, p)
        return str(p)

    # -- sessions ------------------------------------------------------------------------
    def _options(self):
        ort = _ort()
        so = ort.SessionOptions()
        if self._template_options is not None:
            for attr in _SESSION_OPTION_ATTRS:
                try:
                    setattr(so, attr, getattr(self._template_options, attr))
                except (AttributeError, TypeError):
                    pass
        return so

    def _new_session(self, arrays: Mapping[str, np.ndarray]):
        ort = _ort()
        so = self._options()
        names = list(arrays)
        values = [_ortvalue(arrays[n], "cpu", 0) for n in names]
        if names:
            so.add_external_initializers(names, values)
        session = ort.InferenceSession(self._model_source, so, providers=self.providers)
        return session, values

    @property
    def session(self):
        return self._session

    # -- inference -----------------------------------------------------------------------
    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = self.check_inputs(feeds)
        for n in self._cast_inputs:
            feeds[n] = feeds[n].astype(np.float32)
        with self._lock:
            if self.mode == "session":
                outs = self._session.run(self._outputs, feeds)
                return self._results(outs)
            b = self._binding
            for k, v in feeds.items():
                b.bind_cpu_input(k, v)
            for name in self._outputs:
                b.bind_output(name, "cpu")
            try:
                self._session.run_with_iobinding(b)
                outs = b.copy_outputs_to_cpu()
            finally:
                b.clear_binding_outputs()
        return self._results(outs)

    def _results(self, outs) -> dict[str, np.ndarray]:
        if self._round_outputs:
            outs = [_bf16(o) if n in self._round_outputs else o for n, o in zip(self._outputs, outs)]
        return dict(zip(self._outputs, outs))

    # -- weights -------------------------------------------------------------------------
    def weight_infos(self) -> dict[str, WeightInfo]:
        return self._infos

    def _read_weights(self, names: list[str]) -> dict[str, np.ndarray]:
        with self._lock:  # host copies are kept current in every mode
            if self.fp32_copy:  # float32 copies of bfloat16 weights: the bfloat16 bits back (exact)
                return {n: _bf16(self._arrays[n]) if self._infos[n].dtype.name == "bfloat16" else self._arrays[n].copy()
                        for n in names}
            return {n: self._arrays[n].copy() for n in names}

    def weight_access(self) -> WeightAccess:
        # in place: `inputs` mode on the CPU, where the bound OrtValues share the host arrays
        return WeightAccess(in_place=self.mode == "inputs" and self.device == "cpu" and not self.fp32_copy)

    @contextlib.contextmanager
    def writable_weights(self):
        """`inputs` mode on the CPU: the host arrays the bound OrtValues share (those whose memory
        ONNX Runtime reads directly), under the engine's lock."""
        if not self.weight_access().in_place:
            yield None
            return
        with self._lock:
            yield MappingProxyType({n: a for n, a in self._arrays.items()
                                    if a.dtype.name != "bfloat16" and self._ortvalues[n].data_ptr() == a.ctypes.data})

    def _write_weights(self, weights: dict[str, np.ndarray], copy: bool = True) -> None:
        t0 = time.perf_counter()
        if self.fp32_copy:  # the session runs float32: exact casts of the bfloat16 weights (new, owned arrays)
            cast = {n: a.astype(np.float32) for n, a in weights.items() if a.dtype.name == "bfloat16"}
            if cast:
                weights, copy = {**weights, **cast}, copy and len(cast) < len(weights)
        with self._lock:
            if self.mode == "session":
                arrays = dict(self._arrays)
                for n, a in weights.items():
                    arrays[n] = _owned(a, copy)
                if not self.keep_old_session:
                    # Inference waits on the lock during a swap anyway: free the old session first
                    # (peak memory of one session, not two) and rebuild it if the new one fails.
                    self._session = self._keepalive = None
                    gc.collect()
                try:
                    session, keep = self._new_session(arrays)
                except Exception as e:
                    if self._session is None:
                        try:
                            self._session, self._keepalive = self._new_session(self._arrays)
                        except Exception as e2:  # noqa: BLE001
                            raise EngineError(f"refit failed while creating the new session ({e}), and so did "
                                              f"restoring the previous one ({e2}); reload the engine") from e
                    raise EngineError(f"refit failed while creating the new session; previous weights kept: {e}") from e
                self._session, self._keepalive, self._arrays = session, keep, arrays
            elif self.device == "cpu":
                # Bind the new buffers in place of the old ones (pointer swaps, no copy of the old
                # values needed to restore): all of them, or none.
                new = {n: _owned(a, copy) for n, a in weights.items()}
                bound = []
                try:
                    for n, a in new.items():
                        ov = _ortvalue(a, "cpu", 0)
                        self._binding.bind_ortvalue_input(n, ov)
                        bound.append((n, ov))
                except Exception as e:
                    for n, _ in bound:
                        self._binding.bind_ortvalue_input(n, self._ortvalues[n])
                    raise EngineError(f"refit failed binding {n!r}; previous weights restored: {e}") from e
                for n, ov in bound:
                    self._ortvalues[n], self._arrays[n] = ov, new[n]
            else:
                # Device buffers: written in place; the host copies are the restore source.
                done = []
                try:
                    for n, a in weights.items():
                        self._ortvalues[n].update_inplace(_storage(np.ascontiguousarray(a)))
                        done.append(n)
                except Exception as e:
                    for d in done:
                        self._ortvalues[d].update_inplace(_storage(self._arrays[d]))
                    raise EngineError(f"refit failed writing {n!r}; previous weights restored: {e}") from e
                for n, a in weights.items():
                    self._arrays[n] = _owned(a, True)
        self.timings["last_write_s"] = time.perf_counter() - t0

    def close(self) -> None:
        self._session = None
        self._binding = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __repr__(self):
        return f"OrtEngine({str(self.model_path)!r}, mode={self.mode!r}, weights={len(self._infos)})"


def select_weights(wmap, which: str) -> list[str]:
    """Initializer names to make refittable: "all" mapped weights, or only "linear" ones (2-D weights + biases)."""
    if which == "all":
        return wmap.initializers()
    if which == "linear":
        linear = {e.module for e in wmap.entries.values() if e.kind == "weight" and len(e.param_shape) == 2}
        return [e.initializer for e in wmap.entries.values() if e.module in linear]
    raise ValueError(f"weights= takes 'all', 'linear' or a list of initializer names, not {which!r}")

