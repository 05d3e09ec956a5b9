"""TensorRT engine: a thin adapter of a refittable plan to the `Engine` interface.

- Build (`build_plan`): the exported ONNX, parsed strongly typed (the ONNX carries the
  precision: TensorRT 11 has no weak typing), with `BuilderFlag.REFIT_INDIVIDUAL` and
  `network.mark_weights_refittable(name)` for exactly the initializers of the weights map,
  so only LoRA-targetable weights pay for refittability. Flags are looked up by name
  (their integer values changed between TensorRT 10 and 11).
- Refit (`TensorRTEngine.set_weights`): `trt.Refitter.set_named_weights` with the ONNX
  initializer names, then `refit_cuda_engine`. Weights must have the engine's dtype. bf16
  (no numpy type) and all device-side weights go through `trt.Weights(dtype, ptr, count)`
  with `TensorLocation.DEVICE` from torch CUDA tensors. If the refit fails, the previous
  values are set again and refitted, so the engine keeps its old weights.
- Inference: torch CUDA tensors bound by address, `execute_async_v3` on a CUDA stream.

Importing this module never needs TensorRT; using it does (pip install lora-engines[tensorrt]).
Untested here without a GPU: tests/test_engines_tensorrt.py runs where TensorRT and CUDA are.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from .base import Engine, EngineError, WeightInfo
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


_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
       "BOOL": np.bool_, "UINT8": np.uint8}


def np_dtype_of(trt_dtype) -> np.dtype:
    name = trt_dtype.name if hasattr(trt_dtype, "name") else str(trt_dtype).split(".")[-1]
    if name == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(_NP[name])
    except KeyError:
        raise EngineError(f"unsupported TensorRT weight dtype {name}") from None


def _logger():
    trt = _trt()
    return trt.Logger(trt.Logger.WARNING)


def build_plan(onnx_path, plan_path=None, refittable: Iterable[str] | None = None,
               profiles: Mapping[str, tuple] | None = None, strip_plan: bool = False,
               workspace_bytes: int | None = None, strict: bool = True) -> Path:
    """Build a plan from an exported ONNX with only its mapped weights refittable.

    refittable: initializer names (default: the directory's weights map). profiles:
    {input name: (min shape, opt shape, max shape)} for dynamic inputs. strict: raise when
    the parser did not keep a mapped initializer as a named weight (it could not be refitted).
    """
    trt = _trt()
    onnx_path = Path(onnx_path)
    plan_path = Path(plan_path) if plan_path else onnx_path.with_name(PLAN_FILE)
    if refittable is None:
        wmap = load_weights_map(onnx_path.parent)
        refittable = wmap.initializers() if wmap is not None else []
    logger = _logger()
    builder = trt.Builder(logger)
    flags = 0
    if trt_major() < 11 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # always on in TensorRT 11
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT could not parse {onnx_path}: {errors[:5]}")
    config = builder.create_builder_config()
    config.set_flag(builder_flag("REFIT_INDIVIDUAL"))
    if strip_plan:
        config.set_flag(builder_flag("STRIP_PLAN"))
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    not_marked = [n for n in refittable if not network.mark_weights_refittable(n)]
    if not_marked and strict:
        raise EngineError(f"{len(not_marked)} mapped initializer(s) are not named weights of the TensorRT network "
                          f"(folded or renamed by the parser), so they could not be refitted: {not_marked[:5]}")
    if profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profiles.items():
            profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build {onnx_path}")
    tmp = plan_path.with_suffix(plan_path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(serialized)
    tmp.replace(plan_path)
    return plan_path


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
        self._context = self._engine.create_execution_context()
        self._refitter = trt.Refitter(self._engine, self._logger)
        self._stream = torch.cuda.Stream(device=self.device)
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
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
        self._current: dict[str, np.ndarray] = {}  # host copies of what was last written
        self._keep = []  # device tensors backing the last refit

    def weight_infos(self) -> dict[str, WeightInfo]:
        return self._infos

    # -- inference -----------------------------------------------------------------------
    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from .weights_map import from_numpy, to_numpy

        missing = [n for n in self._inputs if n not in feeds]
        unknown = [n for n in feeds if n not in self._inputs]
        if missing or unknown:
            raise EngineError(f"bad inputs: missing {missing}, unknown {unknown} (inputs are {self._inputs})")
        with self._lock, torch.cuda.device(self.device):
            keep = []
            for n in self._inputs:
                t = from_numpy(np.ascontiguousarray(feeds[n])).to(self.device)
                keep.append(t)
                self._context.set_input_shape(n, tuple(t.shape))
                self._context.set_tensor_address(n, t.data_ptr())
            outs = {}
            for n in self._outputs:
                shape = tuple(self._context.get_tensor_shape(n))
                dtype = _torch_dtype(np_dtype_of(self._engine.get_tensor_dtype(n)))
                outs[n] = torch.empty(shape, dtype=dtype, device=self.device)
                self._context.set_tensor_address(n, outs[n].data_ptr())
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise EngineError("TensorRT execution failed")
            self._stream.synchronize()
            return {n: to_numpy(t) for n, t in outs.items()}

    # -- weights -------------------------------------------------------------------------
    def _read_weights(self, names: list[str]) -> dict[str, np.ndarray]:
        with self._lock:
            out = {}
            for n in names:
                if n not in self._current:
                    self._current[n] = self._initial(n)
                out[n] = self._current[n].copy()
            return out

    def _initial(self, name: str) -> np.ndarray:
        """Value built into the plan: the ONNX initializer it was built from."""
        if self.model_path is None:
            raise EngineError(f"cannot read weight {name}: no model.onnx next to the plan")
        from .onnx_utils import InitializerReader

        if not hasattr(self, "_reader"):
            self._reader = InitializerReader(self.model_path)
        return np.array(self._reader.array(name))

    def _write_weights(self, weights: dict[str, np.ndarray], copy: bool = True) -> None:
        with self._lock:
            previous = self._read_weights(list(weights))
            try:
                self._refit(weights)
            except Exception as e:
                try:
                    self._refit(previous)
                except Exception as e2:  # noqa: BLE001
                    raise EngineError(f"TensorRT refit failed ({e}) and restoring the previous weights "
                                      f"failed too ({e2}): the engine is in an undefined state") from e
                raise EngineError(f"TensorRT refit failed; previous weights restored: {e}") from e
            for n, a in weights.items():
                self._current[n] = np.array(a, copy=True)

    def _refit(self, weights: Mapping[str, np.ndarray]) -> None:
        trt = _trt()
        import torch

        from .weights_map import from_numpy

        keep = []
        for name, arr in weights.items():
            t = from_numpy(np.ascontiguousarray(arr)).to(self.device)  # device copy: bf16 has no numpy type
            keep.append(t)
            w = trt.Weights(_trt_dtype(arr.dtype), t.data_ptr(), t.numel())
            if not self._refitter.set_named_weights(name, w, trt.TensorLocation.DEVICE):
                raise EngineError(f"TensorRT rejected weights {name!r} ({arr.dtype}, {arr.shape})")
        missing = list(self._refitter.get_missing_weights())
        if missing:
            raise EngineError(f"TensorRT refit is missing weights: {missing[:5]}")
        torch.cuda.synchronize(self.device)
        if not self._refitter.refit_cuda_engine_async(self._stream.cuda_stream):
            raise EngineError("refit_cuda_engine_async returned False")
        self._stream.synchronize()
        self._keep = keep


def _torch_dtype(np_dtype):
    import torch

    if np_dtype.name == "bfloat16":
        return torch.bfloat16
    return torch.from_numpy(np.zeros(0, np_dtype)).dtype


def _trt_dtype(np_dtype):
    trt = _trt()
    name = np.dtype(np_dtype).name
    table = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "int8": "int8", "int32": "int32",
             "int64": "int64", "bool": "bool", "uint8": "uint8"}
    try:
        return getattr(trt, table[name])
    except (KeyError, AttributeError):
        raise EngineError(f"no TensorRT dtype for {name}") from None
