"""Image-to-image and inpainting over SD and SDXL engines (tests/task_reference.py): diffusers' own
Img2Img / Inpaint pipelines over the engines equal diffusers' over the tiny models, with x baked and
after a refit to y; the export holds the VAE encoder only when a task asks for it."""

from __future__ import annotations

import pytest

import engines
from engines.pipeline import PipelineError
from task_reference import check_task, export_task

CLASSES = {("sd", "image-to-image"): "StableDiffusionImg2ImgPipeline",
           ("sd", "inpainting"): "StableDiffusionInpaintPipeline",
           ("sdxl", "image-to-image"): "StableDiffusionXLImg2ImgPipeline",
           ("sdxl", "inpainting"): "StableDiffusionXLInpaintPipeline"}


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def task_export(request, tmp_path_factory):
    family = request.param
    out, files = export_task(family, tmp_path_factory.mktemp(f"tasks_{family}"), ["image-to-image", "inpainting"])
    return family, out, files


@pytest.mark.parametrize("task", ["image-to-image", "inpainting"])
def test_task_pipeline_equals_diffusers(task_export, task):
    family, out, files = task_export
    assert check_task(family, out, files, task).__name__ == CLASSES[family, task]


def test_tasks_recorded_and_a_task_without_its_components_names_them(task_export, tmp_path):
    import export

    family, out, files = task_export
    manifest = engines.Manifest.read(out)
    assert "vae_encoder" in manifest.components
    assert manifest["pipeline"]["tasks"] == ["text-to-image", "image-to-image", "inpainting"]
    plain = tmp_path / "plain"
    export.export_pipeline(family, "tiny", [], plain, validate=False, progress=False)
    assert "vae_encoder" not in engines.Manifest.read(plain).components
    with pytest.raises(PipelineError, match=r"export the vae_encoder component .*--tasks inpainting"):
        engines.load_pipeline(plain, task="inpainting")
    with pytest.raises(PipelineError, match="no 'image-to-video' pipeline"):
        engines.load_pipeline(plain, task="image-to-video")
    with pytest.raises(PipelineError, match="not a diffusers pipeline"):
        engines.load_pipeline(plain, pipeline_class="NoSuchPipeline")


def test_for_task_shares_the_engines_and_adapter_state(task_export):
    family, out, files = task_export
    pipe = engines.load_pipeline(out)
    inpaint = engines.for_task(pipe, "inpainting")
    assert type(inpaint).__mro__[1].__name__ == CLASSES[family, "inpainting"]
    assert inpaint.refitter is pipe.refitter and inpaint.unet is pipe.unet
    pipe.load_lora_weights(str(files["y"]), adapter_name="y")
    assert inpaint.get_active_adapters() == ["y"]
    explicit = engines.load_pipeline(out, pipeline_class=CLASSES[family, "image-to-image"])
    assert explicit.task == "image-to-image"
