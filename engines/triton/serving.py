"""What runs inside Triton's Python backend: the denoiser with per-request LoRAs, and text encoders.

`DenoiserModel` and `EncoderModel` are the ``TritonPythonModel`` classes that the generated
``model.py`` files delegate to (see `engines.triton.repository`). The denoiser owns its engine
and a `refit.Refitter` over it, and is thin over `requests.LoraSwitcher` (the ``loras``
request parameter, the adapter directory, grouping by adapter set): read the requests, run
each adapter set's group as one batch (`requests.run_batched`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

import refit

from .requests import (LORAS_PARAMETER, SECOND_PARAMETER, LoraRequestError, LoraSwitcher, PerDenoiser, key_json,
                       run_batched)

APPLIED_OUTPUT = "applied_loras"


# -- Triton glue -------------------------------------------------------------------------------


def _param(config: dict, name: str, default=None):
    p = config.get("parameters", {}).get(name)
    if p is None:
        return default
    return p.get("string_value", default) if isinstance(p, dict) else p


def _model_dir(args: dict) -> Path:
    return Path(args["model_repository"])


def _pb():
    import triton_python_backend_utils as pb_utils

    return pb_utils


def _error(pb_utils, msg: str, invalid: bool = True):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if invalid else None
    try:
        err = pb_utils.TritonError(msg, code) if code is not None else pb_utils.TritonError(msg)
    except TypeError:
        err = pb_utils.TritonError(msg)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


def _load_engine(engine_dir: Path, args: dict, config: dict):
    import engines

    choice = (_param(config, "engine", "auto") or "auto").lower()
    kind = args.get("model_instance_kind", "CPU")
    device_id = int(args.get("model_instance_device_id", 0) or 0)
    has_plan = (engine_dir / engines.PLAN_FILE).is_file()
    if choice == "auto":
        from engines.tensorrt import tensorrt_available

        choice = "tensorrt" if has_plan and kind == "GPU" and tensorrt_available() else "onnxruntime"
    if choice in ("tensorrt", "trt"):
        return engines.load_engine(engine_dir, backend="tensorrt", device=device_id)
    opts = {}
    threads = _int_param(config, "intra_op_threads")
    if threads > 0:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        opts["session_options"] = so
    if kind == "GPU":
        opts.update({"device": "cuda", "device_id": device_id,
                     "providers": [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]})
    return engines.load_engine(engine_dir, backend="onnxruntime", **opts)


def _int_param(config, name) -> int:
    try:
        return int(_param(config, name, "0") or 0)
    except ValueError:
        return 0


def _threads(config):
    n = _int_param(config, "intra_op_threads")
    if n > 0:
        import torch

        torch.set_num_threads(n)


def _inputs(pb_utils, request, names, optional=()) -> dict[str, np.ndarray] | Exception:
    feeds = {}
    for n in names:
        t = pb_utils.get_input_tensor_by_name(request, n)
        if t is None:
            if n in optional:
                continue
            return LoraRequestError(f"missing input {n!r}")
        feeds[n] = t.as_numpy()
    return feeds


def request_items(pb_utils, requests, names, optional=()) -> list[tuple]:
    """(inputs, loras) per request; a request whose inputs or parameters are bad carries its error
    in place of its inputs, so it alone fails."""
    items = []
    for r in requests:
        feeds = _inputs(pb_utils, r, names, optional)
        try:
            loras = _request_loras(r)
        except Exception as e:  # noqa: BLE001 - any malformed parameter is the request's error
            loras, feeds = None, LoraRequestError(f"bad request parameters: {e}")
        items.append((feeds, loras))
    return items


def _request_loras(request):
    try:
        params = request.parameters()
    except Exception:  # noqa: BLE001 - older backends
        return None
    if not params:
        return None
    params = json.loads(params) if isinstance(params, (str, bytes)) else params
    if params.get(SECOND_PARAMETER) is not None:
        return PerDenoiser(params.get(LORAS_PARAMETER), params[SECOND_PARAMETER])
    return params.get(LORAS_PARAMETER)


def _open_engine(args):
    """The model's config, directory, engine directory and loaded engine (both model kinds)."""
    config = json.loads(args["model_config"])
    _threads(config)
    model_dir = _model_dir(args)
    component = _param(config, "component")
    engine_dir = model_dir / (_param(config, "engine_dir") or f"{args.get('model_version', '1')}/{component}")
    return config, model_dir, engine_dir, _load_engine(engine_dir, args, config)


class DenoiserModel:
    """``TritonPythonModel`` for a denoiser: engine + Refitter + per-request ``loras``.

    Model config parameters: ``engine_dir`` (relative to the model directory; default
    "1/<component>"), ``lora_dir`` (relative or absolute; default "loras"), ``family``,
    ``component``, ``engine`` (auto | onnxruntime | tensorrt), ``preload`` (baked | all |
    none), ``batch_requests`` (true | false), ``intra_op_threads``, ``log_batches``.
    A request without ``loras`` gets the adapters the export baked (the manifest says which).
    """

    def initialize(self, args):
        self.config, model_dir, engine_dir, self.engine = _open_engine(args)
        lora_dir = Path(_param(self.config, "lora_dir") or "loras")
        if not lora_dir.is_absolute():
            lora_dir = model_dir / lora_dir
        refitter = refit.Refitter(self.engine, directory=engine_dir, family=_param(self.config, "family"),
                                  component=_param(self.config, "component"), lora_dir=lora_dir)
        self.switcher = LoraSwitcher(refitter, lora_dir, preload=_param(self.config, "preload", "baked") or "baked")
        self.concat = (_param(self.config, "batch_requests", "true") or "true").lower() != "false"
        self.input_names = [i["name"] for i in self.config["input"]]
        self.output_names = [o["name"] for o in self.config["output"] if o["name"] != APPLIED_OUTPUT]
        self.batched = int(self.config.get("max_batch_size", 0)) > 0
        self.log_batches = (_param(self.config, "log_batches", "false") or "false").lower() == "true"
        print(f"[lora-engines] {args.get('model_name')}: {self.engine.backend} engine, adapters from {lora_dir}, "
              f"baked {dict(self.switcher.baked_key)}", file=sys.stderr, flush=True)

    def execute(self, requests):
        pb_utils = _pb()
        items = request_items(pb_utils, requests, self.input_names)
        refits = self.switcher.refits
        results = self.switcher.run(items, lambda feeds: run_batched(self.engine, feeds, self.concat))
        if self.log_batches:
            groups = {json.dumps(r[1]) for r in results if not isinstance(r, Exception)}
            print(f"[lora-engines] execute requests={len(requests)} groups={len(groups)} "
                  f"errors={sum(isinstance(r, Exception) for r in results)} "
                  f"refits={self.switcher.refits - refits}", file=sys.stderr, flush=True)
        responses = []
        for res in results:
            if isinstance(res, Exception):
                responses.append(_error(pb_utils, str(res), isinstance(res, LoraRequestError)))
                continue
            outs, key = res
            tensors = [pb_utils.Tensor(n, np.ascontiguousarray(outs[n])) for n in self.output_names]
            text = key_json(key).encode()
            rows = next(iter(outs.values())).shape[0] if self.batched else None
            applied = np.array([[text]] * rows if rows is not None else [text], dtype=np.object_)
            tensors.append(pb_utils.Tensor(APPLIED_OUTPUT, applied))
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self):
        eng = getattr(self, "engine", None)
        if eng is not None:
            eng.close()


class EncoderModel:
    """``TritonPythonModel`` for a text encoder or VAE served as exported (no LoRA switching)."""

    def initialize(self, args):
        self.config, _, _, self.engine = _open_engine(args)
        self.input_names = [i["name"] for i in self.config["input"]]
        self.output_names = [o["name"] for o in self.config["output"]]

    def execute(self, requests):
        pb_utils = _pb()
        feeds_list = [_inputs(pb_utils, r, self.input_names) for r in requests]
        good = [i for i, f in enumerate(feeds_list) if not isinstance(f, Exception)]
        results = list(feeds_list)
        for i, out in zip(good, run_batched(self.engine, [feeds_list[i] for i in good])):
            results[i] = out
        responses = []
        for res in results:
            if isinstance(res, Exception):
                responses.append(_error(pb_utils, str(res)))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(res[n])) for n in self.output_names]))
        return responses

    def finalize(self):
        eng = getattr(self, "engine", None)
        if eng is not None:
            eng.close()
