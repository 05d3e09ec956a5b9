"""A Triton text-to-image model (Python backend): prompt in, picture out, LoRAs per request; for
video families the text-to-video model (`frames` in, `video` out), the same otherwise.

The model owns an engine-backed diffusers pipeline (`engines.load_pipeline` over a copy of
the export: denoiser, text encoders, VAE, scheduler, tokenizers). It does not call the other
models of the repository through BLS: an adapter set must change the denoiser and the text
encoders together, in step with the images being made, and per-request refits of separate
models would race; owning the engines makes each request's adapters exact (the cost: this
model holds its own copy of the weights).

Inputs (each `[1]` per request, `max_batch_size` > 0): `prompt` (BYTES), and optional
`negative_prompt` (BYTES), `seed` (INT64, default 0), `steps` (INT32), `guidance_scale`
(FP32), `height`, `width` (INT32, pixels), video families `frames` (INT32); image-conditioned
requests add `image` (UINT8 `[H, W, 3]`: image-to-image, video families image-to-video),
`mask` (UINT8 `[H, W]`, white repaints: inpainting) and `strength` (FP32 in (0, 1]), and run
diffusers' pipeline of that task (the export's own: Kontext, Fill, Qwen-Image-Edit) over the
same engines and adapter state (`engines.for_task`), at the image's size unless `height` /
`width` say otherwise. One model serves every task rather than a model per task: the tasks
share the engines, so a second model would hold a second copy of the weights and refit
separately for the same adapter set. An export without the task's components (the VAE
encoder: `--tasks`) answers such requests with an error naming them; the request parameter
parameter `loras` as for the denoiser model (absent: what the export baked; `{}`: base), and
for Wan 2.2 `loras_2`, the adapters of its second denoiser (`requests.PerDenoiser`). Outputs
`image`: UINT8 `[H, W, 3]` (video families: `video`, `[F, H, W, 3]`), and `applied_loras` (the
JSON of the adapters it ran with). Limits: `max_steps` (config, default 100); `max_height`,
`max_width`, `max_frames` are the export's (its axes times the VAE factors), or smaller ones
given in the config; requests beyond them get an error before any work.

`TextToImageSwitcher` is the server-independent core: it validates requests, and over
`requests.LoraSwitcher` (grouping by adapter set over the pipeline's one Refitter: the set the
engines hold first, then one refit per other set) runs the requests of a group with equal
settings as one pipeline batch (one generator each, so every image is the one a lone request
would get).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from lora_loaders.families import get_family

from ..manifest import Manifest
from ..pipeline import PipelineError, for_task, size_limits, size_multiple
from .layout import MODEL_PY, copy_dir, make_config
from .requests import LoraRequestError, LoraSwitcher, key_json
from .serving import APPLIED_OUTPUT, _error, _param, _pb, request_items

log = logging.getLogger(__name__)

_STRING, _INT64, _INT32, _FP32, _UINT8 = 8, 7, 6, 1, 2  # ONNX element types, as make_config takes them
INPUTS = {"prompt": _STRING, "negative_prompt": _STRING, "seed": _INT64, "steps": _INT32, "guidance_scale": _FP32,
          "height": _INT32, "width": _INT32, "image": _UINT8, "mask": _UINT8, "strength": _FP32}
VIDEO_INPUTS = {**{k: v for k, v in INPUTS.items() if k not in ("mask", "strength")}, "frames": _INT32}
DIMS = {"image": [None, None, None, 3], "mask": [None, None, None]}  # with the batch dimension; others [None, 1]
LIMITS = {"max_steps": 100}  # max_height, max_width, max_frames: the export's (`pipeline.size_limits`), or smaller
LIMIT_NAMES = ("max_steps", "max_height", "max_width", "max_frames")


def model_name(family: str) -> str:
    """The generating model of a family's repository: text_to_video for video families."""
    return "text_to_video" if "frames" in get_family(family).axes else "text_to_image"


class TextToImageSwitcher:
    """Requests -> pictures over one engine-backed pipeline, adapters per request (see module doc)."""

    def __init__(self, pipe, lora_dir, limits: Mapping[str, int] | None = None, default_steps: int = 30):
        self.pipe = pipe
        self.switcher = LoraSwitcher(pipe.refitter, lora_dir)
        exported = {f"max_{k}": v for k, v in size_limits(pipe).items()}
        given = dict(limits or {})
        self.limits = {**LIMITS, **exported,
                       **{k: min(v, exported.get(k, v)) for k, v in given.items()}}  # never past the export
        self.default_steps = default_steps
        self.factor = size_multiple(pipe)
        self.video = "frames" in pipe.manifest.axes
        self.pipes = {}  # task -> pipeline over the same engines (`for_task`), made when first asked

    current = property(lambda self: self.switcher.current)
    baked_key = property(lambda self: self.switcher.baked_key)
    refits = property(lambda self: self.switcher.refits)

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
            limit = self.limits.get(f"max_{name}", v)
            if v <= 0 or v % self.factor or v > limit:
                raise LoraRequestError(f"{name} must be a positive multiple of {self.factor} up to {limit}, got {v}")
            out[name] = v
        if self.video and values.get("frames") is not None:
            v = int(_scalar(values, "frames", 0))
            if not 1 <= v <= self.limits["max_frames"]:
                raise LoraRequestError(f"frames must be between 1 and {self.limits['max_frames']}, got {v}")
            out["num_frames"] = v
        out.update(self._image_settings(values, out))
        return out

    def _image_settings(self, values: Mapping, out: dict) -> dict:
        """`image` / `mask` / `strength` -> the task and its pipeline arguments (PIL images); the size
        defaults to the image's."""
        from PIL import Image

        image, mask, strength = values.get("image"), values.get("mask"), values.get("strength")
        if image is None:
            for name, v in (("mask", mask), ("strength", strength)):
                if v is not None:
                    raise LoraRequestError(f"{name} needs an image")
            return {"task": "text-to-video" if self.video else "text-to-image"}
        image = _pixels(image, "image", 3)
        h, w = image.shape[:2]
        for name, v in (("height", h), ("width", w)):
            limit = self.limits.get(f"max_{name}", v)
            if name not in out and (v % self.factor or v > limit):
                raise LoraRequestError(f"image {name} must be a multiple of {self.factor} up to {limit}, got {v}")
        settings = {"task": "image-to-video" if self.video else "image-to-image", "image": Image.fromarray(image),
                    "height": out.get("height", h), "width": out.get("width", w)}
        if mask is not None and self.video:
            raise LoraRequestError("mask: video models take an image only (image-to-video)")
        if mask is not None:
            mask = _pixels(mask, "mask", 1)
            if mask.shape[:2] != (h, w):
                raise LoraRequestError(f"mask is {mask.shape[1]}x{mask.shape[0]}, the image {w}x{h}: the mask must "
                                       "have the image's size")
            settings.update(task="inpainting", mask_image=Image.fromarray(mask[..., 0]))
        if strength is not None:
            s = float(_scalar(values, "strength", 0))
            if not (math.isfinite(s) and 0 < s <= 1):
                raise LoraRequestError(f"strength must be in (0, 1], got {s}")
            settings["strength"] = s
        return settings

    def pipeline(self, task: str):
        """The pipeline of a task over the engines; LoraRequestError when the export cannot serve it."""
        if task not in self.pipes:
            pipe = self.pipe if task == self.pipe.task else None
            if pipe is None:
                try:
                    pipe = for_task(self.pipe, task)
                except PipelineError as e:
                    raise LoraRequestError(str(e)) from None
                pipe.set_progress_bar_config(**getattr(self.pipe, "_progress_bar_config", {}))
            self.pipes[task] = pipe
        return self.pipes[task]

    def _settings_or_error(self, values):
        if isinstance(values, Exception):
            return values
        try:
            return self.settings(values)
        except LoraRequestError as e:
            return e

    # -- a batch of requests ----------------------------------------------------------------
    def run(self, items: Sequence[tuple[Mapping | Exception, object]]) -> list:
        """items: [(input values or an Exception, loras value)] -> [(image uint8, key) or Exception]."""
        return self.switcher.run([(self._settings_or_error(v), loras) for v, loras in items], self._generate)

    def _generate(self, settings: list[dict]) -> list:
        """Images for one adapter set's requests: those with equal settings as one pipeline batch."""
        import torch

        batches: dict = {}
        together = self.pipe._engine_spec.generator_lists  # else one pipeline call per request
        for i, s in enumerate(settings):
            alone = not together or "image" in s  # an input image: a call of its own
            same = tuple(sorted((k, v) for k, v in s.items()
                                if k not in ("prompt", "seed", "negative_prompt", "image", "mask_image")))
            batches.setdefault((same, s["negative_prompt"] is None, i if alone else None), []).append(i)
        results: list = [None] * len(settings)
        for (same, no_negative, _), idx in batches.items():
            group = [settings[i] for i in idx]
            kw = dict(same)
            task = kw.pop("task")
            kw.update({k: group[0][k] for k in ("image", "mask_image") if k in group[0]})
            if not no_negative:
                kw["negative_prompt"] = [s["negative_prompt"] for s in group]
            try:
                pipe = self.pipeline(task)
                gens = [torch.Generator().manual_seed(s["seed"]) for s in group]
                out = pipe(prompt=[s["prompt"] for s in group], output_type="np",
                           generator=gens if len(gens) > 1 else gens[0], **kw)
                for i, img in zip(idx, out.frames if hasattr(out, "frames") else out.images):
                    results[i] = to_uint8(img)
            except LoraRequestError as e:  # a task this export cannot serve: the request's error
                for i in idx:
                    results[i] = e
            except Exception as e:  # noqa: BLE001
                for i in idx:
                    results[i] = RuntimeError(f"generation failed: {e}")
        return results


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] floats in [0, 1] -> uint8, as diffusers' numpy_to_pil rounds them."""
    return (np.asarray(image) * 255).round().clip(0, 255).astype(np.uint8)


def _pixels(value, name: str, channels: int) -> np.ndarray:
    """A request's UINT8 image [H, W, 3] or mask [H, W] (either with the request's batch dimension of 1)
    as [H, W, channels]; LoraRequestError otherwise."""
    a = np.asarray(value)
    rank = 3 if channels == 3 else 2
    if a.ndim == rank + 1 and a.shape[0] == 1:
        a = a[0]
    if a.dtype != np.uint8 or a.ndim != rank or (channels == 3 and a.shape[2] != 3) or 0 in a.shape:
        raise LoraRequestError(f"{name} must be UINT8 {'[H, W, 3]' if channels == 3 else '[H, W]'}, "
                               f"got {a.dtype} {list(a.shape)}")
    return a if channels == 3 else a[..., None]


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
        limits = {k: int(_param(self.config, k)) for k in LIMIT_NAMES if _param(self.config, k)}
        backend = _param(self.config, "engine", "auto") or "auto"
        self.pipe = engines.load_pipeline(export_dir, backend=None if backend == "auto" else backend,
                                          lora_dir=lora_dir)  # where the baked adapters' files are
        self.switcher = TextToImageSwitcher(self.pipe, lora_dir, limits,
                                            int(_param(self.config, "default_steps", "30") or 30))
        self.pipe.set_progress_bar_config(disable=True)
        self.output = "video" if self.switcher.video else "image"
        self.inputs = VIDEO_INPUTS if self.switcher.video else INPUTS
        print(f"[lora-engines] {args.get('model_name')}: {self.output} over {export_dir}, adapters from {lora_dir}, "
              f"baked {dict(self.switcher.baked_key)}", file=sys.stderr, flush=True)

    def execute(self, requests):
        pb_utils = _pb()
        items = request_items(pb_utils, requests, list(self.inputs), optional=set(self.inputs) - {"prompt"})
        responses = []
        for res in self.switcher.run(items):
            if isinstance(res, Exception):
                responses.append(_error(pb_utils, str(res), isinstance(res, LoraRequestError)))
                continue
            image, key = res
            applied = np.array([[key_json(key).encode()]], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output, image[None]),
                                                                        pb_utils.Tensor(APPLIED_OUTPUT, applied)]))
        return responses

    def finalize(self):
        self.pipe = None


def text_to_image_config(name: str, *, max_batch_size: int = 8, kind: str = "KIND_CPU", count: int = 1,
                         parameters: Mapping[str, str], video: bool = False, queue_delay_us: int = 5000) -> str:
    """config.pbtxt of the text-to-image (text-to-video) model (every input `[1]` per request, all but the
    prompt optional)."""
    out = ("video", _UINT8, [None] * 4 + [3]) if video else ("image", _UINT8, [None] * 3 + [3])
    inputs = VIDEO_INPUTS if video else INPUTS
    # every input is [1] per request, so the model keeps a batch dimension even without batching
    return make_config(name, inputs=[(n, t, DIMS.get(n, [None, 1])) for n, t in inputs.items()], outputs=[out],
                       max_batch_size=max(1, int(max_batch_size)), backend="python", kind=kind, count=count,
                       parameters=dict(parameters), queue_delay_us=queue_delay_us, optional=set(inputs) - {"prompt"},
                       extra_outputs=[(APPLIED_OUTPUT, "TYPE_STRING", [1])])


def write_text_to_image_model(export_dir, model_dir, *, lora_dir: str = "loras", limits: Mapping[str, int] | None = None,
                              max_batch_size: int = 8, kind: str = "KIND_CPU", instance_count: int = 1,
                              python_path: str | None = None, link: bool = True) -> str:
    """Fill one text-to-image model directory (``1/model.py``, ``1/export/``: the export, hard-linked
    where possible) and return its config.pbtxt text. The adapter directory (``lora_dir``,
    relative to the model directory or absolute) is the caller's to fill: `write_repository`
    ships the same adapters there as to the denoiser."""
    export_dir, model_dir = Path(export_dir).resolve(), Path(model_dir)
    manifest = Manifest.read(export_dir)
    for src in [export_dir, *sorted(p for p in export_dir.rglob("*") if p.is_dir())]:
        copy_dir(src, model_dir / "1" / "export" / src.relative_to(export_dir), link)
    video = "frames" in get_family(manifest.family).axes
    (model_dir / "1" / "model.py").write_text(MODEL_PY.format(
        what=f"text-to-{'video' if video else 'image'} with per-request LoRAs", module="text_to_image",
        cls="TextToImageModel"))
    params = {"family": manifest.family or "", "lora_dir": str(lora_dir),
              **{k: str(v) for k, v in {**LIMITS, **(limits or {})}.items()}}  # sizes: the export's unless given
    if python_path:
        params["python_path"] = python_path
    return text_to_image_config(model_dir.name, max_batch_size=max_batch_size, kind=kind, count=instance_count,
                                parameters=params, video=video)
