"""Image-to-video over HunyuanVideo engines (tests/task_reference.py): diffusers' own
HunyuanSkyreelsImageToVideoPipeline (`hunyuan-video`'s `skyreels-i2v` variant: the image's latents
concatenated on channels) over the engines equals diffusers' over the tiny models, with x baked and
after a refit to y."""

from __future__ import annotations

import pytest

import engines
from task_reference import check_task, export_task

I2V = "image-to-video"
SIZE = dict(height=32, width=48)  # the pipelines take multiples of 16 pixels


@pytest.fixture(scope="module")
def skyreels_export(tmp_path_factory):
    return export_task("hunyuan-video", tmp_path_factory.mktemp("tasks_hunyuan_skyreels"), [I2V],
                       model="tiny:skyreels-i2v")


def test_skyreels_image_to_video_equals_diffusers(skyreels_export):
    out, files = skyreels_export
    assert check_task("hunyuan-video", out, files, I2V, **SIZE).__name__ == "HunyuanSkyreelsImageToVideoPipeline"
    manifest = engines.Manifest.read(out)
    assert manifest["pipeline"]["tasks"] == [I2V]
    assert "vae_encoder" in manifest.components


@pytest.fixture(scope="module")
def i2v_export(tmp_path_factory):
    return export_task("hunyuan-video-i2v", tmp_path_factory.mktemp("tasks_hunyuan_i2v"), [I2V])


def test_hunyuan_i2v_equals_diffusers(i2v_export):
    out, files = i2v_export
    # the tiny tokenizer spells the template in characters (about 410 tokens, where Llama-3's are 108):
    # a longer sequence keeps the prompt's tokens in it
    cls = check_task("hunyuan-video-i2v", out, files, I2V, max_sequence_length=320, **SIZE)
    assert cls.__name__ == "HunyuanVideoImageToVideoPipeline"
    assert type(engines.load_pipeline(out)).__mro__[1] is cls  # its default task
