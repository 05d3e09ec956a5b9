"""A Triton text-to-image model (Python backend): prompt in, picture out, LoRAs per request.

The model owns an engine-backed diffusers pipeline (`engines.load_pipeline` over a copy of
the export: denoiser, text encoders, VAE, scheduler, tokenizers). It does not call the other
models of the repository through BLS: an adapter set must change the denoiser and the text
encoders together, in step with the images being made, and per-request refits of separate
models would race; owning the engines makes each request's adapters exact (the cost: this
model holds its own copy of the weights).

Inputs (each `[1]` per request, `max_batch_size` > 0): `prompt` (BYTES), and optional
`negative_prompt` (BYTES), `seed` (INT64, default 0), `steps` (INT32), `guidance_scale`
(FP32), `height`, `width` (INT32, pixels); the request parameter `loras` as for the
denoiser model (absent: what the export baked; `{}`: base). Output `image`: UINT8
`[H, W, 3]` (video families: `frames`, `[F, H, W, 3]`). Limits (`max_steps`,
`max_height`, `max_width`) are config parameters; requests beyond them get an error.

`TextToImageSwitcher` is the server-independent core: it validates requests, groups them
by adapter set (the set the pipeline holds first, then one refit per other set), and runs
the requests of a group with equal settings as one pipeline batch (one generator each, so
every image is the one a lone request would get).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .serving import (LORA_SUFFIX, LoraDirectory, LoraRequestError, _error, _param, _pb, _request_loras, key_json,
                      request_key)

log = logging.getLogger(__name__)

INPUTS = {"prompt": "TYPE_STRING", "negative_prompt": "TYPE_STRING", "seed": "TYPE_INT64", "steps": "TYPE_INT32",
          "guidance_scale": "TYPE_FP32", "height": "TYPE_INT32", "width": "TYPE_INT32"}
LIMITS = {"max_steps": 100, "max_height": 2048, "max_width": 2048}


class TextToImageSwitcher:
    """Adapter sets and request batches over one engine-backed pipeline (see module doc)."""

    def __init__(self, pipe, lora_dir, limits: Mapping[str, int] | None = None, default_steps: int = 30):
        self.pipe = pipe
        self.lora_dir = LoraDirectory(lora_dir)
        self.limits = {**LIMITS, **(limits or {})}
        self.default_steps = default_steps
        self.factor = getattr(pipe, "vae_scale_factor", 8)
        self.baked_key = self._held()
        self.current = self.baked_key
        self.refits = 0
        self._lock = threading.RLock()

    def _held(self):
        active = self.pipe.get_active_adapters()
        weights = {}
        for r in self.pipe._engine_loras.refitters.values():
            weights.update(r.get_adapter_weights())
        return tuple(sorted((n, float(weights.get(n, 1.0))) for n in active))

    # -- requests ---------------------------------------------------------------------
    def settings(self, values: Mapping) -> dict:
        """A request's inputs -> pipeline arguments. Raises LoraRequestError naming the bad one."""
        prompt = _text(values.get("prompt"), "prompt")
        if not prompt.strip():
            raise LoraRequestError("prompt is empty")
        out = {"prompt": prompt, "seed": int(_scalar(values, "seed", 0))}
        neg = values.get("negative_prompt")
        out["negative_prompt"] = _text(neg, "negative_prompt") if neg is not None else None
        steps = int(_scalar(values, "steps", self.default_steps))
        if not 1 <= steps <= self.limits["max_steps"]:
            raise LoraRequestError(f"steps must be between 1 and {self.limits['max_steps']}, got {steps}")
        out["num_inference_steps"] = steps
        g = values.get("guidance_scale")
        if g is not None:
            g = float(_scalar(values, "guidance_scale", 0))
            if not math.isfinite(g):
                raise LoraRequestError(f"guidance_scale must be finite, got {g}")
            out["guidance_scale"] = g
        for name in ("height", "width"):
            v = values.get(name)
            if v is None:
                continue
            v = int(_scalar(values, name, 0))
            limit = self.limits[f"max_{name}"]
            if v <= 0 or v % self.factor or v > limit:
                raise LoraRequestError(f"{name} must be a positive multiple of {self.factor} up to {limit}, got {v}")
            out[name] = v
        return out

    def request_key(self, loras_value):
        return request_key(loras_value, self.baked_key, self.lora_dir)

    # -- refit ------------------------------------------------------------------------
    def activate(self, key) -> bool:
        with self._lock:
            if key == self.current:
                return False
            known = set(self.pipe._engine_loras.get_list_adapters_flat())
            for name, _ in key:
                if name not in known:
                    self.pipe.load_lora_weights(str(self.lora_dir.resolve(name)), adapter_name=name)
            try:
                self.pipe.set_adapters([n for n, _ in key], [w for _, w in key])
            finally:
                self.current = self._held()
            self.refits += 1
            return True

    # -- a batch of requests ----------------------------------------------------------------
    def run(self, items: Sequence[tuple[Mapping | Exception, object]]) -> list:
        """items: [(input values or an Exception, loras value)] -> [(image uint8, key) or Exception]."""
        import torch

        results: list = [None] * len(items)
        groups: dict = {}
        for i, (values, loras) in enumerate(items):
            try:
                if isinstance(values, Exception):
                    raise values
                s = self.settings(values)
                key = self.request_key(loras)
            except LoraRequestError as e:
                results[i] = e
                continue
            results[i] = s
            batch = tuple(sorted((k, v) for k, v in s.items() if k not in ("prompt", "seed", "negative_prompt")))
            groups.setdefault(key, {}).setdefault((batch, s["negative_prompt"] is None), []).append(i)
        with self._lock:
            for key in sorted(groups, key=lambda k: k != self.current):
                try:
                    self.activate(key)
                except Exception as e:  # noqa: BLE001 - the group's requests get the error
                    err = e if isinstance(e, LoraRequestError) else LoraRequestError(
                        f"cannot apply adapters {key_json(key)}: {e}")
                    for idx in groups[key].values():
                        for i in idx:
                            results[i] = err
                    continue
                for (batch, no_negative), idx in groups[key].items():
                    settings = [results[i] for i in idx]
                    kw = dict(batch)
                    if not no_negative:
                        kw["negative_prompt"] = [s["negative_prompt"] for s in settings]
                    try:
                        out = self.pipe([s["prompt"] for s in settings], output_type="np",
                                        generator=[torch.Generator().manual_seed(s["seed"]) for s in settings], **kw)
                        images = _frames_or_images(out)
                        for i, img in zip(idx, images):
                            results[i] = (to_uint8(img), key)
                    except Exception as e:  # noqa: BLE001
                        for i in idx:
                            results[i] = RuntimeError(f"generation failed: {e}")
        return results


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] floats in [0, 1] -> uint8, as diffusers' numpy_to_pil rounds them."""
    return (np.asarray(image) * 255).round().clip(0, 255).astype(np.uint8)


def _frames_or_images(out):
    return out.frames if hasattr(out, "frames") else out.images


def _text(value, name: str) -> str:
    v = np.asarray(value).reshape(-1)
    if v.size != 1:
        raise LoraRequestError(f"{name} must be one string per request")
    x = v[0]
    if isinstance(x, bytes):
        try:
            return x.decode("utf-8")
        except UnicodeDecodeError:
            raise LoraRequestError(f"{name} is not UTF-8") from None
    return str(x)


def _scalar(values: Mapping, name: str, default):
    v = values.get(name)
    if v is None:
        return default
    a = np.asarray(v).reshape(-1)
    if a.size != 1:
        raise LoraRequestError(f"{name} must be one number per request")
    return a[0].item()


# -- Triton glue -------------------------------------------------------------------------------


class TextToImageModel:
    """``TritonPythonModel``: an engine-backed pipeline + per-request ``loras`` (see module doc)."""

    def initialize(self, args):
        import engines

        self.config = json.loads(args["model_config"])
        model_dir = Path(args["model_repository"])
        export_dir = model_dir / (_param(self.config, "export_dir") or f"{args.get('model_version', '1')}/export")
        lora_dir = Path(_param(self.config, "lora_dir") or "loras")
        if not lora_dir.is_absolute():
            lora_dir = model_dir / lora_dir
        limits = {k: int(_param(self.config, k, v) or v) for k, v in LIMITS.items()}
        backend = _param(self.config, "engine", "auto") or "auto"
        self.pipe = engines.load_pipeline(export_dir, backend=None if backend == "auto" else backend,
                                          lora_dir=lora_dir)  # where the baked adapters' files are
        self.switcher = TextToImageSwitcher(self.pipe, lora_dir, limits,
                                            int(_param(self.config, "default_steps", "30") or 30))
        self.pipe.set_progress_bar_config(disable=True)
        self.output = "frames" if any(o["name"] == "frames" for o in self.config["output"]) else "image"
        print(f"[lora-engines] {args.get('model_name')}: text-to-image over {export_dir}, adapters from {lora_dir}, "
              f"baked {dict(self.switcher.baked_key)}", file=sys.stderr, flush=True)

    def execute(self, requests):
        pb_utils = _pb()
        items = []
        for r in requests:
            values = {}
            for name in INPUTS:
                t = pb_utils.get_input_tensor_by_name(r, name)
                if t is not None:
                    values[name] = t.as_numpy()
            try:
                loras = _request_loras(r)
            except Exception as e:  # noqa: BLE001
                values, loras = LoraRequestError(f"bad request parameters: {e}"), None
            items.append((values, loras))
        responses = []
        for res in self.switcher.run(items):
            if isinstance(res, Exception):
                responses.append(_error(pb_utils, str(res), isinstance(res, LoraRequestError)))
                continue
            image, _ = res
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output, image[None])]))
        return responses

    def finalize(self):
        self.pipe = None


def text_to_image_config(name: str, *, max_batch_size: int = 8, kind: str = "KIND_CPU", count: int = 1,
                         parameters: Mapping[str, str], video: bool = False, queue_delay_us: int = 5000) -> str:
    """config.pbtxt of the text-to-image model (every input `[1]` per request, all but the prompt optional)."""
    from .repository import _q

    lines = [f"name: {_q(name)}", 'backend: "python"', f"max_batch_size: {int(max_batch_size)}", "input ["]
    blocks = []
    for n, t in INPUTS.items():
        optional = "" if n == "prompt" else "\n    optional: true"
        blocks.append(f"  {{\n    name: {_q(n)}\n    data_type: {t}\n    dims: [ 1 ]{optional}\n  }}")
    lines.append(",\n".join(blocks))
    out = ("frames", "[ -1, -1, -1, 3 ]") if video else ("image", "[ -1, -1, 3 ]")
    lines += ["]", "output [", f"  {{\n    name: {_q(out[0])}\n    data_type: TYPE_UINT8\n    dims: {out[1]}\n  }}", "]"]
    text = "\n".join(lines) + "\n"
    text += f"dynamic_batching {{\n  max_queue_delay_microseconds: {int(queue_delay_us)}\n}}\n"
    text += f"instance_group [\n  {{\n    count: {int(count)}\n    kind: {kind}\n  }}\n]\n"
    for k, v in parameters.items():
        text += f"parameters: {{\n  key: {_q(k)}\n  value: {{ string_value: {_q(v)} }}\n}}\n"
    return text


MODEL_PY = '''"""Generated by lora-engines: a text-to-image model with per-request LoRAs."""

import json
import os
import sys


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        extra = params.get("python_path", {}).get("string_value", "")
        for p in reversed([p for p in extra.split(os.pathsep) if p]):
            if p not in sys.path:
                sys.path.insert(0, p)
        from engines.triton.text_to_image import TextToImageModel

        self._impl = TextToImageModel()
        self._impl.initialize(args)

    def execute(self, requests):
        return self._impl.execute(requests)

    def finalize(self):
        impl = getattr(self, "_impl", None)
        if impl is not None:
            impl.finalize()
'''


def write_text_to_image_model(export_dir, model_dir, *, loras=(), limits: Mapping[str, int] | None = None,
                              max_batch_size: int = 8, python_path=None, link: bool = True) -> Path:
    """Write one text-to-image model directory (config.pbtxt, 1/model.py, 1/export/, loras/); returns config path."""
    import os
    import shutil

    from ..manifest import Manifest

    export_dir, model_dir = Path(export_dir).resolve(), Path(model_dir)
    manifest = Manifest.read(export_dir)
    vdir = model_dir / "1"
    target = vdir / "export"
    for src in export_dir.rglob("*"):
        if src.is_file():
            dst = target / src.relative_to(export_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                if not link:
                    raise OSError
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
    (vdir / "model.py").write_text(MODEL_PY)
    lora_dir = model_dir / "loras"
    lora_dir.mkdir(parents=True, exist_ok=True)
    shipped = [Path(a["path"]) for a in manifest.adapters if Path(a.get("path", "")).is_file()]
    for p in [*shipped, *map(Path, loras)]:
        name = next(a["name"] for a in manifest.adapters if Path(a["path"]) == p) if p in shipped else p.stem
        dst = lora_dir / f"{name}{LORA_SUFFIX}"
        if not dst.exists():
            shutil.copy2(p, dst)
    params = {"family": manifest.family, "lora_dir": "loras", **{k: str(v) for k, v in {**LIMITS, **(limits or {})}.items()}}
    if python_path:
        params["python_path"] = os.pathsep.join(str(Path(p).resolve()) for p in (
            [python_path] if isinstance(python_path, (str, os.PathLike)) else python_path))
    text = text_to_image_config(model_dir.name, max_batch_size=max_batch_size, parameters=params)
    (model_dir / "config.pbtxt").write_text(text)
    return model_dir / "config.pbtxt"
