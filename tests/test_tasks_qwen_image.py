"""Image-to-image and inpainting over Qwen-Image engines (tests/task_reference.py): diffusers' own
QwenImageImg2ImgPipeline / QwenImageInpaintPipeline over the engines equal diffusers' over the tiny
models, with x baked and after a refit to y; the export holds the VAE encoder only when a task asks.

Qwen-Image-Edit (QwenImageEditPipeline) is not served: see the family entry's notes."""

from __future__ import annotations

import pytest

import engines
from engines.pipeline import PipelineError
from task_reference import check_task, export_task

FAMILY = "qwen-image"
TASKS = ["image-to-image", "inpainting"]
CLASSES = {"image-to-image": "QwenImageImg2ImgPipeline", "inpainting": "QwenImageInpaintPipeline"}


@pytest.fixture(scope="module")
def task_export(tmp_path_factory):
    return export_task(FAMILY, tmp_path_factory.mktemp("tasks_qwen_image"), TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_task_pipeline_equals_diffusers(task_export, task):
    out, files = task_export
    assert check_task(FAMILY, out, files, task).__name__ == CLASSES[task]


def test_tasks_recorded_and_the_encoder_only_when_asked(task_export, tmp_path):
    import export

    out, _ = task_export
    manifest = engines.Manifest.read(out)
    assert "vae_encoder" in manifest.components
    assert manifest["pipeline"]["tasks"] == ["text-to-image", *TASKS]
    plain = tmp_path / "plain"
    export.export_pipeline(FAMILY, "tiny", [], plain, validate=False, progress=False)
    assert "vae_encoder" not in engines.Manifest.read(plain).components
    with pytest.raises(PipelineError, match=r"export the vae_encoder component .*--tasks image-to-image"):
        engines.load_pipeline(plain, task="image-to-image")
