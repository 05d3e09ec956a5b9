"""Image-to-image and inpainting over Z-Image, FLUX.2 and aMUSEd engines (tests/task_reference.py):
diffusers' own pipelines over the engines equal diffusers' over the tiny models, with x baked and after
a refit to y; the export holds the VAE encoder only when a task asks for it.

Z-Image: ZImageImg2ImgPipeline / ZImageInpaintPipeline. FLUX.2: Flux2Pipeline edits with reference
`image`s (VAE-encoded, normalized by the VAE's batch-norm statistics, their tokens appended to the
transformer's sequence). aMUSEd: AmusedImg2ImgPipeline / AmusedInpaintPipeline (the VQ-GAN encoder's
latents, quantized on the host over the codebook saved beside the engine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import engines
from task_reference import check_task, export_task, input_image

TASKS = {"z-image": ("image-to-image", "inpainting"), "flux2": ("image-to-image",),
         "amused": ("image-to-image", "inpainting")}
CLASSES = {("z-image", "image-to-image"): "ZImageImg2ImgPipeline", ("z-image", "inpainting"): "ZImageInpaintPipeline",
           ("flux2", "image-to-image"): "Flux2Pipeline",
           ("amused", "image-to-image"): "AmusedImg2ImgPipeline", ("amused", "inpainting"): "AmusedInpaintPipeline"}
# strength 0.5 of 2 steps: the flow-matching pipelines start 1 step in, at a sigma below 1, so the
# input image shows (at 0.7 they start from pure noise: int(2 - 1.4) = 0 steps skipped)
EXTRA = {"z-image": dict(strength=0.5), "amused": {}}


def gradient(height: int, width: int) -> Image.Image:
    """A smooth image: FLUX.2's tiny transformer attends to reference tokens almost evenly, so noise
    images of the same statistics would change its output less than a gradient does."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 255 // width, y * 255 // height, 255 - x * 255 // width], -1).astype(np.uint8))


def _with_bn_statistics(build):
    """export.tiny.build_component, with non-trivial batch-norm statistics in FLUX.2's VAE (a fresh one
    has mean 0, variance 1: a pipeline that read none would pass)."""
    def wrapped(spec, config, dtype=torch.float32):
        model = build(spec, config, dtype)
        if spec.class_name == "AutoencoderKLFlux2":
            g = torch.Generator().manual_seed(0)
            n = model.bn.running_mean.numel()
            model.bn.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            model.bn.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.25)
        return model
    return wrapped


@pytest.fixture(scope="module", params=list(TASKS))
def task_export(request, tmp_path_factory):
    import export.models
    import export.tiny

    family = request.param
    with pytest.MonkeyPatch.context() as mp:
        if family == "flux2":  # for the export and the reference pipelines alike
            build = _with_bn_statistics(export.tiny.build_component)
            mp.setattr(export.tiny, "build_component", build)
            mp.setattr(export.models, "build_component", build)
        out, files = export_task(family, tmp_path_factory.mktemp(f"tasks_{family}"), list(TASKS[family]))
        yield family, out, files


@pytest.mark.parametrize("task", ["image-to-image", "inpainting"])
def test_task_pipeline_equals_diffusers(task_export, task):
    family, out, files = task_export
    if task not in TASKS[family]:
        pytest.skip(f"{family} has no {task} task")
    if family == "flux2":  # its image processor takes references of 64 pixels a side or more
        extra = dict(image=[gradient(64, 72), input_image(72, 64)])
    else:
        extra = EXTRA[family]
    assert check_task(family, out, files, task, **extra).__name__ == CLASSES[family, task]


def test_tasks_recorded(task_export):
    family, out, _ = task_export
    manifest = engines.Manifest.read(out)
    assert "vae_encoder" in manifest.components
    assert manifest["pipeline"]["tasks"] == ["text-to-image", *TASKS[family]]


def test_flux2_reference_latents_equal_diffusers(task_export):
    """The reference images' latents as the pipeline makes them (the VAE encoder, then the batch-norm
    statistics it reads from the VAE), closer than the end-to-end comparison shows."""
    from pipeline_reference import reference_pipeline

    family, out, files = task_export
    if family != "flux2":
        pytest.skip("FLUX.2 only")
    pipe = engines.load_pipeline(out, task="image-to-image")
    ref = reference_pipeline(family, out, [(files["x"], 1.0)])
    assert ref.vae.bn.running_var.min() < 0.9  # the patched statistics
    images = [pipe.image_processor.preprocess(im, height=64, width=72) for im in (gradient(64, 72),
                                                                             input_image(64, 72, seed=3))]
    got = [p.prepare_image_latents(images=images, batch_size=2, generator=torch.Generator().manual_seed(0),
                                   device="cpu", dtype=torch.float32) for p in (pipe, ref)]
    assert got[0][0].shape == got[1][0].shape == (2, 2 * 16 * 18, 16)  # 2 references of (64 / 4) x (72 / 4)
    torch.testing.assert_close(got[0][1], got[1][1])  # their position ids: t = 10, 20
    torch.testing.assert_close(got[0][0], got[1][0], atol=1e-4, rtol=0)
