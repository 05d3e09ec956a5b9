"""Image-conditioned tasks, end to end on a tiny model: an export with x baked and the task's
components (`tasks=[task]`), `engines.load_pipeline(out, task=...)` compared with diffusers' own
pipeline of the same class over the same tiny models with x fused by diffusers + PEFT; then y
through `load_lora_weights` + `set_adapters` (a refit) against diffusers with y.

Each family's test module calls `check_task` (spread over modules for `--dist loadfile`)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import engines
import lora_loaders as L
from export.tiny import build_tiny
from lora_files import peft_lora
from pipeline_reference import frame_counts, reference_pipeline

HEIGHT, WIDTH = 32, 40  # not square, so a swapped height and width would show


def input_image(height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def input_mask(height: int = HEIGHT, width: int = WIDTH, seed: int = 1) -> Image.Image:
    """White (repaint) on the right half and on random pixels, black (keep) elsewhere."""
    rng = np.random.default_rng(seed)
    m = rng.random((height, width)) > 0.7
    m[:, width // 2:] = True
    return Image.fromarray(m.astype(np.uint8) * 255)


def task_call(pipe, task: str, **extra) -> dict:
    """The call's arguments for a task: the prompt, the input image (and mask, strength) where the
    pipeline takes them, 2 steps, the image's size, numpy output; `extra` last."""
    params = inspect.signature(type(pipe).__call__).parameters
    kw = dict(prompt="a red cube", num_inference_steps=2, output_type="np", height=HEIGHT, width=WIDTH)
    if "guidance_scale" in params:
        kw["guidance_scale"] = 4.0
    if task != "text-to-image" and task != "text-to-video":
        kw["image"] = input_image()
    if task == "inpainting":
        kw["mask_image"] = input_mask()
    if "strength" in params and task in ("image-to-image", "inpainting"):
        kw["strength"] = 0.7
    if "video" in task:
        kw["num_frames"] = frame_counts(pipe)[0]
    kw.update(getattr(pipe, "call_kwargs", {}))
    kw.update(extra)
    return {k: v for k, v in kw.items() if k in params or k == "prompt"}


def run(pipe, kw: dict, seed: int = 0):
    # the reference's `call_kwargs` (FLUX.2's text_encoder_out_layers), which the engine pipeline sets itself
    out = pipe(generator=torch.Generator().manual_seed(seed), **{**getattr(pipe, "call_kwargs", {}), **kw})
    return out.frames[0] if hasattr(out, "frames") else out.images[0]


def lora_files(family: str, root: Path, model: str = "tiny") -> dict[str, Path]:
    """x and y: PEFT LoRAs on every other Linear of every LoRA component of the (variant's) tiny model."""
    spec = L.get_family(family)
    variant = spec.variant(model.partition(":")[2]) if model.startswith("tiny:") else None
    comps = [c for c, s in spec.components.items() if s.lora and not (variant and c in variant.lacks)]
    models = build_tiny(family, comps, overrides=variant.tiny if variant else None)
    files = {}
    for name, seed, offset in (("x", 1, 0), ("y", 2, 1)):
        sd = {}
        for c, m in models.items():
            names = [n for n, mod in L.targetable_modules(m).items() if isinstance(mod, torch.nn.Linear)]
            pattern = re.compile("(" + "|".join(re.escape(n) for n in names) + ")$")
            sd.update(peft_lora({c: m}, pattern=pattern, seed=seed + len(sd), every=2, offset=offset))
        files[name] = root / f"{name}.safetensors"
        save_file(sd, str(files[name]))
    return files


def export_task(family: str, root: Path, tasks, model: str = "tiny") -> tuple[Path, dict]:
    """(the export of the tiny model with x baked and the tasks' components, the LoRA files)."""
    import export

    files = lora_files(family, root, model)
    out = root / "out"
    export.export_pipeline(family, model, [str(files["x"])], out, tasks=tasks, validate=False, progress=False)
    return out, files


def check_task(family: str, out: Path, files: dict, task: str, pipeline_class: str | None = None,
               atol: float = 1e-3, **extra) -> type:
    """The engine pipeline for the task equals diffusers' with x baked, then with y at 0.7 after a
    refit, and y changes the output. Returns the diffusers class the engine pipeline is."""
    pipe = engines.load_pipeline(out, task=task, pipeline_class=pipeline_class)
    pipe.set_progress_bar_config(disable=True)
    cls = type(pipe).__mro__[1]
    assert pipe.task == task or pipeline_class is not None
    kw = task_call(pipe, task, **extra)
    ref = reference_pipeline(family, out, [(files["x"], 1.0)], cls.__name__)
    ref.set_progress_bar_config(disable=True)
    got, want = run(pipe, kw), run(ref, kw)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all(), "NaN or inf in the output (assert_allclose takes NaN as equal to NaN)"
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    pipe.load_lora_weights(str(files["y"]), adapter_name="y")
    pipe.set_adapters(["y"], [0.7])
    got_y = run(pipe, kw, seed=1)
    ref = reference_pipeline(family, out, [(files["y"], 0.7)], cls.__name__)
    ref.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(got_y, run(ref, kw, seed=1), atol=atol, rtol=0)
    pipe.set_adapters([], [])
    assert np.abs(run(pipe, kw, seed=1) - got_y).max() > atol  # y changes it
    return cls
