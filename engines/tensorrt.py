"""TensorRT engine: a thin adapter of a refittable plan to the `Engine` interface.

- Build (`build_plan`): the exported ONNX, parsed strongly typed (the ONNX carries the
  precision: TensorRT 11 has no weak typing), with `BuilderFlag.REFIT_INDIVIDUAL` and
  `network.mark_weights_refittable(name)` for exactly the initializers of the weights map,
  so only LoRA-targetable weights pay for refittability. Flags are looked up by name
  (their integer values changed between TensorRT 10 and 11).
- Refit (`TensorRTEngine.set_device_weights`, what a Refitter calls: device tensors computed on
  the GPU from base weights kept there; `set_weights` takes numpy and copies to the device):
  `trt.Refitter.set_named_weights` with the ONNX initializer names and
  `trt.Weights(dtype, ptr, count)` + `TensorLocation.DEVICE`, then `refit_cuda_engine_async`.
  Weights must have the engine's dtype. If the refit fails, the previous values are set again
  and refitted, so the engine keeps its old weights. No host copy of the weights is kept.
- Weight-stripped plans (`--strip-plan`, recorded in the manifest): every refittable weight is
  refitted from the ONNX (`OnnxParserRefitter`) when the engine loads.
- Inference: torch CUDA tensors bound by address, `execute_async_v3` on a CUDA stream.

Importing this module never needs TensorRT; using it does (pip install lora-engines[tensorrt]).
Untested here without a GPU: tests/test_engines_tensorrt.py runs where TensorRT and CUDA are.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from lora_loaders import dtypes as dt

from .base import Engine, EngineError, InputInfo, WeightAccess, WeightError, WeightInfo
from .weights_map import load_weights_map

PLAN_FILE = "model.plan"


def _trt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineError("TensorRT is not installed (pip install lora-engines[tensorrt])") from e
    return trt


def tensorrt_available() -> bool:
    """True when `tensorrt` imports and a CUDA device is visible (through torch)."""
    try:
        import tensorrt  # noqa: F401
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - any failure means: not usable here
        return False


def trt_major() -> int:
    return int(_trt().__version__.split(".")[0])


def builder_flag(name: str):
    trt = _trt()
    try:
        return getattr(trt.BuilderFlag, name)
    except AttributeError:
        raise EngineError(f"TensorRT {trt.__version__} has no BuilderFlag.{name}") from None


# trt.DataType member -> the project's dtype name (lora_loaders.dtypes)
_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
           "INT64": "int64", "BOOL": "bool", "UINT8": "uint8"}


def np_dtype_of(trt_dtype) -> np.dtype:
    name = trt_dtype.name if hasattr(trt_dtype, "name") else str(trt_dtype).split(".")[-1]
    try:
        return dt.numpy_dtype(_DTYPES[name])
    except KeyError:
        raise EngineError(f"unsupported TensorRT weight dtype {name}") from None


def _trt_dtype(dtype):
    """The trt.DataType of any dtype spelling."""
    name = dt.name(dtype)
    member = next((k for k, v in _DTYPES.items() if v == name), None)
    if member is None:
        raise EngineError(f"no TensorRT dtype for {name}")
    return getattr(_trt().DataType, member)


def _logger():
    trt = _trt()
    return trt.Logger(trt.Logger.WARNING)


def refit_flags(trt, network, refittable) -> tuple[list[str], list[str]]:
    """(builder flags to set, the initializers marked refittable): REFIT_INDIVIDUAL with
    `network.mark_weights_refittable(name)` for each mapped initializer (TensorRT >= 10.2), else REFIT
    (every weight refittable). Names the parser did not keep as weights come back unmarked."""
    if hasattr(trt.BuilderFlag, "REFIT_INDIVIDUAL") and hasattr(network, "mark_weights_refittable"):
        marked = [n for n in refittable if network.mark_weights_refittable(n)]
        return ["REFIT_INDIVIDUAL"], marked
    return ["REFIT"], list(refittable)


def build_plan(onnx_path, plan_path=None, refittable: Iterable[str] | None = None,
               profiles: Mapping[str, tuple] | None = None, strip_plan: bool = False,
               workspace_bytes: int | None = None, strict: bool = True, timing_cache=None) -> Path:
    """Build a plan from an exported ONNX with only its mapped weights refittable (Polygraphy's loaders).

    Network from the ONNX file, strongly typed (the ONNX carries the precision; always so in
    TensorRT 11); config with one optimization profile ({input: (min, opt, max) shapes}), a timing
    cache (`timing_cache`: a path, read if present and updated), `strip_plan`; then the serialized
    engine, saved atomically. Our own code only marks the weights refittable (`refit_flags`).
    refittable: initializer names (default: the directory's weights map). strict: raise when the
    parser did not keep a mapped initializer as a named weight (it could not be refitted).
    The flags used are in `build_plan.last_info` (and the manifest, via export/tensorrt.py).
    """
    trt = _trt()
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineBytesFromNetwork,
        NetworkFromOnnxPath,
        PostprocessConfig,
        Profile,
    )

    onnx_path = Path(onnx_path)
    plan_path = Path(plan_path) if plan_path else onnx_path.with_name(PLAN_FILE)
    if refittable is None:
        wmap = load_weights_map(onnx_path.parent)
        refittable = wmap.initializers() if wmap is not None else []
    refittable = list(refittable)
    typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    builder, network, parser = NetworkFromOnnxPath(str(onnx_path), strongly_typed=typed or None)()
    flags, marked = refit_flags(trt, network, refittable)
    not_marked = sorted(set(refittable) - set(marked))
    if not_marked and strict:
        raise EngineError(f"{len(not_marked)} mapped initializer(s) are not named weights of the TensorRT network "
                          f"(folded or renamed by the parser), so they could not be refitted: {not_marked[:5]}")
    profile = None
    if profiles:
        profile = Profile()
        for name, (lo, opt, hi) in profiles.items():
            profile.add(name, tuple(lo), tuple(opt), tuple(hi))
    cache = str(timing_cache) if timing_cache else None
    pool = {trt.MemoryPoolType.WORKSPACE: workspace_bytes} if workspace_bytes else None
    config = CreateConfig(profiles=[profile] if profile is not None else None, strip_plan=strip_plan or None,
                          load_timing_cache=cache if cache and Path(cache).is_file() else None,
                          memory_pool_limits=pool)

    def set_flags(builder, network, config):
        for f in flags:
            config.set_flag(builder_flag(f))

    serialized = EngineBytesFromNetwork((builder, network, parser), config=PostprocessConfig(config, set_flags),
                                        save_timing_cache=cache)()
    if serialized is None:
        raise EngineError(f"TensorRT failed to build {onnx_path}")
    tmp = plan_path.with_suffix(plan_path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(serialized)
    tmp.replace(plan_path)
    build_plan.last_info = {"tensorrt": trt.__version__, "gpu": _gpu_name(),
                            "flags": flags + (["STRIP_PLAN"] if strip_plan else []) + (["STRONGLY_TYPED"] if typed else []),
                            "refittable": len(marked), "timing_cache": cache}
    return plan_path


build_plan.last_info = {}


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        return None


class TensorRTEngine(Engine):
    """A refittable TensorRT plan behind the `Engine` interface (see module doc)."""

    backend = "tensorrt"

    def __init__(self, path, device: int = 0, onnx_path=None):
        trt = _trt()
        import torch

        if not torch.cuda.is_available():
            raise EngineError("TensorRTEngine needs a CUDA device")
        path = Path(path)
        plan = path / PLAN_FILE if path.is_dir() else path
        if not plan.is_file():
            raise FileNotFoundError(f"no TensorRT plan at {plan}")
        self.directory = plan.parent
        onnx_candidate = Path(onnx_path) if onnx_path else plan.parent / "model.onnx"
        self.model_path = onnx_candidate if onnx_candidate.is_file() else None
        self.device = torch.device("cuda", device)
        self._lock = threading.RLock()
        self._logger = _logger()
        self._runtime = trt.Runtime(self._logger)
        with open(plan, "rb") as f:
            self._engine = self._runtime.deserialize_cuda_engine(f.read())
        if self._engine is None:
            raise EngineError(f"TensorRT could not load {plan} (built with another TensorRT version or GPU?)")
        self._refitter = trt.Refitter(self._engine, self._logger)
        self._stream = torch.cuda.Stream(device=self.device)
        self.plan_info = self._plan_info()
        self.stripped = "STRIP_PLAN" in self.plan_info.get("flags", [])
        if self.stripped:
            self._fill_stripped()
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._input_infos = self._describe_inputs()
        refittable = list(self._refitter.get_all_weights())
        wmap = load_weights_map(self.directory)
        shapes = {}
        if wmap is not None:
            shapes = {e.initializer: e.shape for e in wmap.by_initializer.values()}
            order = {n: i for i, n in enumerate(wmap.initializers())}
            refittable = sorted((n for n in refittable if n in order), key=order.__getitem__)
        self._infos = {}
        for n in refittable:
            proto = self._refitter.get_weights_prototype(n)
            dtype = np_dtype_of(proto.dtype)
            shape = tuple(shapes.get(n, (proto.size,)))
            self._infos[n] = WeightInfo(n, shape, dtype)
        self._device_values: dict = {}  # name -> the device tensor TensorRT holds (see _device_value)

    def weight_infos(self) -> dict[str, WeightInfo]:
        return self._infos

    def _plan_info(self) -> dict:
        """What the export recorded about this plan (manifest: TensorRT version, GPU, builder flags)."""
        from .manifest import Manifest

        manifest = Manifest.find(self.directory)
        if manifest is None:
            return {}
        _, entry = manifest.entry_for(None, self.directory)
        return dict(entry.get("tensorrt") or {})

    def _fill_stripped(self) -> None:
        """A weight-stripped plan (`--strip-plan`) ships without its refittable weights: refit all of them
        from the ONNX it was built from (TensorRT's `OnnxParserRefitter`) before the first use."""
        trt = _trt()
        if self.model_path is None:
            raise EngineError(f"{self.directory}: the plan was built with STRIP_PLAN (no refittable weights in it) "
                              "and needs the model.onnx it was built from next to it")
        if not hasattr(trt, "OnnxParserRefitter"):
            raise EngineError(f"TensorRT {trt.__version__} has no OnnxParserRefitter: cannot fill a weight-stripped plan")
        parser_refitter = trt.OnnxParserRefitter(self._refitter, self._logger)
        if not parser_refitter.refit_from_file(str(self.model_path)):
            raise EngineError(f"TensorRT could not read the weights of the stripped plan from {self.model_path}")
        missing = list(self._refitter.get_missing_weights())
        if missing:
            raise EngineError(f"stripped plan {self.directory}: weights missing after the refit from ONNX: {missing[:5]}")
        if not self._refitter.refit_cuda_engine_async(self._stream.cuda_stream):
            raise EngineError(f"refitting the stripped plan {self.directory} from its ONNX failed")
        self._stream.synchronize()

    def _describe_inputs(self) -> dict[str, InputInfo]:
        """The plan's input dtypes and shapes (-1: dynamic), dynamic ones named after the export's axes."""
        from .manifest import Manifest

        manifest = Manifest.find(self.directory)
        declared = {}
        if manifest is not None:
            _, entry = manifest.entry_for(None, self.directory)
            declared = {i["name"]: i.get("shape", []) for i in entry.get("inputs", [])}
        def dim(k: int, size: int, names: list):
            if size >= 0:
                return int(size)
            return names[k] if k < len(names) and isinstance(names[k], str) else None

        return {n: InputInfo(n, np_dtype_of(self._engine.get_tensor_dtype(n)),
                             tuple(dim(k, d, declared.get(n, [])) for k, d in enumerate(self._engine.get_tensor_shape(n))))
                for n in self._inputs}

    # -- inference -----------------------------------------------------------------------
    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        feeds = self.check_inputs(feeds)
        with self._lock, torch.cuda.device(self.device):
            keep = []
            for n in self._inputs:
                t = dt.from_numpy(feeds[n]).to(self.device)
                keep.append(t)
                self._context.set_input_shape(n, tuple(t.shape))
                self._context.set_tensor_address(n, t.data_ptr())
            outs = {}
            for n in self._outputs:
                shape = tuple(self._context.get_tensor_shape(n))
                dtype = dt.torch_dtype(np_dtype_of(self._engine.get_tensor_dtype(n)))
                outs[n] = torch.empty(shape, dtype=dtype, device=self.device)
                self._context.set_tensor_address(n, outs[n].data_ptr())
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise EngineError("TensorRT execution failed")
            self._stream.synchronize()
            return {n: dt.to_numpy(t) for n, t in outs.items()}

    # -- weights -------------------------------------------------------------------------
    # The values the engine holds live on the device: the tensors handed to the last refit of
    # each weight (TensorRT reads them in place), or the plan's own (the ONNX initializers, read
    # when first needed for a rollback). No host copy is kept.
    def weight_access(self) -> WeightAccess:
        return WeightAccess(device=str(self.device), layout="initializer")

    def _device_value(self, name: str):
        t = self._device_values.get(name)
        if t is None:
            t = dt.from_numpy(self._initial(name)).to(self.device)
        return t

    def _read_weights(self, names: list[str]) -> dict[str, np.ndarray]:
        with self._lock:
            return {n: dt.to_numpy(self._device_value(n)).copy() for n in names}

    def _initial(self, name: str) -> np.ndarray:
        """Value built into the plan: the ONNX initializer it was built from."""
        if self.model_path is None:
            raise EngineError(f"cannot read weight {name}: no model.onnx next to the plan")
        from .onnx_utils import InitializerReader

        if getattr(self, "_reader", None) is None:
            self._reader = InitializerReader(self.model_path)
        return np.array(self._reader.array(name))

    def check_device_weights(self, values) -> None:
        import torch

        problems = []
        for n, t in values.items():
            info = self._infos.get(n)
            if info is None:
                problems.append(f"{n}: not a refittable weight of this engine")
            elif not isinstance(t, torch.Tensor):
                problems.append(f"{n}: expected a torch tensor, got {type(t).__name__}")
            elif tuple(t.shape) != info.shape or dt.numpy_dtype(t.dtype) != info.dtype or t.device != self.device \
                    or not t.is_contiguous():
                problems.append(f"{n}: {tuple(t.shape)} {t.dtype} on {t.device} != the engine's {info.shape} "
                                f"{info.dtype} on {self.device} (contiguous)")
        if problems:
            raise WeightError(f"cannot set {len(problems)} weight(s): " + "; ".join(problems[:8]))

    def set_device_weights(self, values) -> None:
        """Refit with device tensors in the initializers' layout, all or nothing: if the refit fails,
        the previous values are set again and refitted (the engine keeps its old weights)."""
        if not values:
            return
        self.check_device_weights(values)
        with self._lock:
            previous = {n: self._device_value(n) for n in values}
            try:
                self._refit(values)
            except Exception as e:
                try:
                    self._refit(previous)
                except Exception as e2:  # noqa: BLE001
                    raise EngineError(f"TensorRT refit failed ({e}) and restoring the previous weights "
                                      f"failed too ({e2}): the engine is in an undefined state") from e
                raise EngineError(f"TensorRT refit failed; previous weights restored: {e}") from e
            self._device_values.update(values)

    def _write_weights(self, weights: dict[str, np.ndarray], copy: bool = True) -> None:
        self.set_device_weights({n: dt.from_numpy(a).to(self.device) for n, a in weights.items()})

    def _refit(self, values) -> None:
        trt = _trt()
        for name, t in values.items():
            w = trt.Weights(_trt_dtype(t.dtype), t.data_ptr(), t.numel())
            if not self._refitter.set_named_weights(name, w, trt.TensorLocation.DEVICE):
                raise EngineError(f"TensorRT rejected weights {name!r} ({t.dtype}, {tuple(t.shape)})")
        missing = list(self._refitter.get_missing_weights())
        if missing:
            raise EngineError(f"TensorRT refit is missing weights: {missing[:5]}")
        if self.device.type == "cuda":  # the tensors were written on torch's stream
            import torch

            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        if not self._refitter.refit_cuda_engine_async(self._stream.cuda_stream):
            raise EngineError("refit_cuda_engine_async returned False")
        self._stream.synchronize()
