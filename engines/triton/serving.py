"""What runs inside Triton's Python backend: per-request LoRA switching over one engine.

`LoraSwitcher` is the server-independent core (unit-testable without Triton): it owns an
engine and a `refit.Refitter`, resolves each request's ``loras`` parameter against the
adapter directory, groups a batch of requests by adapter set, refits only when a group's
set differs from the engine's current one, and runs the engine.

`DenoiserModel` and `EncoderModel` are the Triton ``TritonPythonModel`` classes that the
generated ``model.py`` files delegate to (see `engines.triton.repository`).

Request parameter ``loras`` (a string holding a JSON object ``{"name": weight, ...}``):

- absent: the adapters baked at export, with their export scales;
- ``{}``: the base model;
- names are file stems of ``*.safetensors`` files directly inside ``lora_dir``; a name with
  ``/``, ``\\`` or ``..``, or one not present there, a malformed value, or a weight that is
  not a finite number is an error for that request alone. Files are looked up by listing
  ``lora_dir`` (never by joining a client string to a path), and a file whose real path
  leaves ``lora_dir`` (a symlink pointing elsewhere) is not offered.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

LORAS_PARAMETER = "loras"
APPLIED_OUTPUT = "applied_loras"
LORA_SUFFIX = ".safetensors"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+\-]{0,127}$")
MAX_ADAPTERS_PER_REQUEST = 16

Key = tuple  # ((name, weight), ...) sorted by name


class LoraRequestError(ValueError):
    """A request's ``loras`` value is invalid; the request gets an error, nothing else changes."""


# -- request parsing -------------------------------------------------------------------------


def check_adapter_name(name) -> str:
    if not isinstance(name, str) or not name:
        raise LoraRequestError(f"adapter names must be non-empty strings, got {name!r}")
    if "/" in name or "\\" in name or ".." in name or "\x00" in name:
        raise LoraRequestError(f"adapter name {name!r} is not allowed: names are file stems in the adapter "
                               "directory (no '/', '\\' or '..')")
    if not _NAME.match(name):
        raise LoraRequestError(f"adapter name {name!r} is not allowed: use letters, digits and _ . + -")
    return name


def parse_loras(value) -> Key | None:
    """The ``loras`` parameter -> sorted ((name, weight), ...); None when absent.

    Accepts the JSON text (as sent) or an already-decoded mapping. Raises LoraRequestError.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise LoraRequestError("parameter 'loras' is not UTF-8") from None
    if isinstance(value, str):
        try:
            value = json.loads(value, parse_constant=_reject_constant)
        except LoraRequestError:
            raise
        except (json.JSONDecodeError, RecursionError) as e:
            raise LoraRequestError(f"parameter 'loras' is not valid JSON: {e}") from None
    if not isinstance(value, Mapping):
        raise LoraRequestError(f"parameter 'loras' must be a JSON object name -> weight, got "
                               f"{type(value).__name__}")
    if len(value) > MAX_ADAPTERS_PER_REQUEST:
        raise LoraRequestError(f"at most {MAX_ADAPTERS_PER_REQUEST} adapters per request, got {len(value)}")
    out = {}
    for name, weight in value.items():
        check_adapter_name(name)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise LoraRequestError(f"weight of adapter {name!r} must be a number, got {weight!r}")
        w = float(weight)
        if not math.isfinite(w):
            raise LoraRequestError(f"weight of adapter {name!r} must be finite, got {weight!r}")
        out[name] = w
    return tuple(sorted(out.items()))


def _reject_constant(c):
    raise LoraRequestError(f"weight {c} is not a finite number")


def key_json(key: Key) -> str:
    return json.dumps(dict(key), sort_keys=True)


# -- the adapter directory --------------------------------------------------------------------


class LoraDirectory:
    """The only place adapters are read from: ``<root>/<name>.safetensors``, by listing."""

    def __init__(self, root):
        self.root = Path(os.path.realpath(root))

    def available(self) -> dict[str, Path]:
        """{stem: real path} of the adapter files directly in the directory."""
        out = {}
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return out
        for e in entries:
            if not e.name.endswith(LORA_SUFFIX):
                continue
            stem = e.name[: -len(LORA_SUFFIX)]
            if not _NAME.match(stem) or ".." in stem:
                continue
            real = Path(os.path.realpath(e.path))
            if real.parent != self.root or not real.is_file():
                continue  # a link leaving the directory (or a folder): not offered
            out[stem] = real
        return out

    def resolve(self, name: str) -> Path:
        check_adapter_name(name)
        path = self.available().get(name)
        if path is None:
            raise LoraRequestError(f"adapter {name!r} is not in the server's adapter directory")
        return path


# -- the core ----------------------------------------------------------------------------------


def request_key(loras_value, baked_key: Key, lora_dir: LoraDirectory) -> Key:
    """A request's ``loras`` value -> its adapter set (absent: the baked one). Raises LoraRequestError."""
    key = parse_loras(loras_value)
    if key is None:
        return baked_key
    available = lora_dir.available()
    for name, _ in key:
        if name not in available:
            raise LoraRequestError(f"adapter {name!r} is not in the server's adapter directory")
    return key


class LoraSwitcher:
    """Per-request adapter sets over one engine + Refitter (single-threaded use, locked anyway).

    baked: [(name, scale)] adapters baked at export (what a request without ``loras`` gets).
    The Refitter registers them from the export's manifest (finding their files in the
    adapter directory, by content hash), so the engine starts out holding exactly that set.
    preload: "all" also loads every adapter in the directory now; "baked" / "none" load
    the others when first named.
    """

    def __init__(self, engine, refitter, lora_dir, baked: Sequence[tuple[str, float]] = (), preload: str = "baked"):
        self.engine = engine
        self.refitter = refitter
        self.lora_dir = LoraDirectory(lora_dir)
        self.baked_key: Key = tuple(sorted((str(n), float(s)) for n, s in baked))
        self.refits = 0  # engine weight changes (adapter loads and set_adapters)
        self._lock = threading.RLock()
        self._sync_current()
        if preload == "all":
            for name in sorted(self.lora_dir.available()):
                self._ensure_loaded(name)
            self.activate(self.baked_key)

    # -- requests -------------------------------------------------------------------------
    def request_key(self, loras_value) -> Key:
        return request_key(loras_value, self.baked_key, self.lora_dir)

    # -- refit -----------------------------------------------------------------------------
    def _sync_current(self):
        r = self.refitter
        self.current = tuple(sorted(r.get_adapter_weights().items())) if r.enabled else ()

    def _ensure_loaded(self, name: str):
        r = self.refitter
        known = name in r.get_list_adapters().get(r.component, [])
        if known and name not in r.missing_adapters:
            return
        if known and name not in self.lora_dir.available():
            return  # a baked adapter without its file: the Refitter says so if a change needs it
        path = self.lora_dir.resolve(name)
        before = self.current
        try:
            r.load_lora(str(path), adapter_name=name)  # a new adapter becomes the only active one: a refit
        finally:
            self._sync_current()
        self.refits += self.current != before

    def activate(self, key: Key) -> bool:
        """Make the engine hold this adapter set; False when it already does (no refit)."""
        with self._lock:
            if key == self.current:
                return False
            for name, _ in key:
                self._ensure_loaded(name)
            if key != self.current:
                try:
                    self.refitter.set_adapters([n for n, _ in key], [w for _, w in key])
                finally:
                    self._sync_current()
                self.refits += 1
            return True

    # -- a batch of requests ---------------------------------------------------------------------
    def run(self, items: Sequence[tuple[Mapping[str, np.ndarray] | Exception, object]], concat: bool = True):
        """items: [(feeds or an Exception, loras value)] -> [(outputs, key) or Exception], same order.

        Requests are grouped by adapter set; the group matching the engine's current set
        runs first, then one refit per other group. Errors stay with their request(s).
        """
        results: list = [None] * len(items)
        groups: dict = {}
        for i, (feeds, loras) in enumerate(items):
            if isinstance(feeds, Exception):
                results[i] = feeds
                continue
            try:
                key = self.request_key(loras)
            except LoraRequestError as e:
                results[i] = e
                continue
            groups.setdefault(key, []).append(i)
        order = sorted(groups, key=lambda k: k != self.current)
        with self._lock:
            for key in order:
                idx = groups[key]
                try:
                    self.activate(key)
                except Exception as e:  # noqa: BLE001 - the group's requests get the error
                    err = e if isinstance(e, LoraRequestError) else LoraRequestError(
                        f"cannot apply adapters {key_json(key)}: {e}")
                    for i in idx:
                        results[i] = err
                    continue
                for i, out in zip(idx, self._infer([items[i][0] for i in idx], concat)):
                    results[i] = out if isinstance(out, Exception) else (out, key)
        return results

    def _infer(self, feeds_list, concat: bool):
        if concat and len(feeds_list) > 1 and _stackable(feeds_list):
            try:
                names = list(feeds_list[0])
                big = {n: np.concatenate([f[n] for f in feeds_list], axis=0) for n in names}
                outs = self.engine.infer(big)
                sizes = [next(iter(f.values())).shape[0] for f in feeds_list]
                splits = np.cumsum(sizes)[:-1]
                parts = {n: np.split(v, splits, axis=0) for n, v in outs.items()}
                return [{n: parts[n][j] for n in outs} for j in range(len(feeds_list))]
            except Exception:  # noqa: BLE001 - fall back to one request at a time
                log.exception("batched inference failed; running requests one by one")
        res = []
        for f in feeds_list:
            try:
                res.append(self.engine.infer(f))
            except Exception as e:  # noqa: BLE001
                res.append(RuntimeError(f"inference failed: {e}"))
        return res


def _stackable(feeds_list) -> bool:
    first = feeds_list[0]
    for f in feeds_list:
        if set(f) != set(first):
            return False
        sizes = {a.shape[0] if a.ndim else None for a in f.values()}
        if len(sizes) != 1 or None in sizes:
            return False
        for n, a in f.items():
            if a.shape[1:] != first[n].shape[1:] or a.dtype != first[n].dtype:
                return False
    return True


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
    ``component``, ``baked_loras`` (JSON [[name, scale], ...]), ``engine`` (auto |
    onnxruntime | tensorrt), ``preload`` (baked | all | none), ``batch_requests``
    (true | false), ``intra_op_threads``.
    """

    def initialize(self, args):
        import refit

        self.config, model_dir, engine_dir, self.engine = _open_engine(args)
        component = _param(self.config, "component")
        lora_dir = Path(_param(self.config, "lora_dir") or "loras")
        if not lora_dir.is_absolute():
            lora_dir = model_dir / lora_dir
        self.refitter = refit.Refitter(self.engine, directory=engine_dir, family=_param(self.config, "family"),
                                       component=component, lora_dir=lora_dir)
        baked = json.loads(_param(self.config, "baked_loras", "[]") or "[]")
        self.switcher = LoraSwitcher(self.engine, self.refitter, lora_dir, [tuple(b) for b in baked],
                                     preload=_param(self.config, "preload", "baked") or "baked")
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
        responses = []
        refits = self.switcher.refits
        results = self.switcher.run(items, concat=self.concat)
        if self.log_batches:
            groups = {json.dumps(r[1]) for r in results if not isinstance(r, Exception)}
            print(f"[lora-engines] execute requests={len(requests)} groups={len(groups)} "
                  f"errors={sum(isinstance(r, Exception) for r in results)} "
                  f"refits={self.switcher.refits - refits}", file=sys.stderr, flush=True)
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
    """``TritonPythonModel`` for a text encoder (no LoRA switching: what the export baked)."""

    def initialize(self, args):
        self.config, _, _, self.engine = _open_engine(args)
        self.input_names = [i["name"] for i in self.config["input"]]
        self.output_names = [o["name"] for o in self.config["output"]]

    def execute(self, requests):
        pb_utils = _pb()
        feeds_list = [_inputs(pb_utils, r, self.input_names) for r in requests]
        good = [i for i, f in enumerate(feeds_list) if not isinstance(f, Exception)]
        outs = {}
        if good:
            fl = [feeds_list[i] for i in good]
            try:
                if len(fl) > 1 and _stackable(fl):
                    big = self.engine.infer({n: np.concatenate([f[n] for f in fl]) for n in fl[0]})
                    splits = np.cumsum([next(iter(f.values())).shape[0] for f in fl])[:-1]
                    parts = {n: np.split(v, splits) for n, v in big.items()}
                    for j, i in enumerate(good):
                        outs[i] = {n: parts[n][j] for n in big}
                else:
                    for i in good:
                        outs[i] = self.engine.infer(feeds_list[i])
            except Exception as e:  # noqa: BLE001
                for i in good:
                    outs.setdefault(i, RuntimeError(f"inference failed: {e}"))
        responses = []
        for i in range(len(requests)):
            res = feeds_list[i] if isinstance(feeds_list[i], Exception) else outs[i]
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
