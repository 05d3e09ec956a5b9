"""Image-to-video over Kandinsky 5 engines (tests/task_reference.py): diffusers' own
Kandinsky5I2VPipeline over the engines equals diffusers' over the tiny models, with x baked and
after a refit to y; the HunyuanVideo VAE encoder engine (`vae_encoder`, exported for the task only)
gives diffusers' `vae.encode(x).latent_dist`."""

from __future__ import annotations

import pytest
import torch

import engines
import lora_loaders as L
from export.tiny import build_tiny
from task_reference import check_task, export_task

# the I2V pipeline takes multiples of 16 pixels (2 x 3 latent patches); its `normalize_first_frame`
# takes the statistics of latent frames 4..8 (NaN with fewer than 5): 1 + 4 x 4 video frames
SIZE = dict(height=32, width=48, num_frames=17)


@pytest.fixture(scope="module")
def kandinsky_export(tmp_path_factory):
    out, files = export_task("kandinsky", tmp_path_factory.mktemp("tasks_kandinsky"), ["image-to-video"])
    return out, files


def test_kandinsky_image_to_video_equals_diffusers(kandinsky_export):
    out, files = kandinsky_export
    assert check_task("kandinsky", out, files, "image-to-video", **SIZE).__name__ == "Kandinsky5I2VPipeline"


def test_hunyuan_vae_encoder_engine_equals_diffusers_encode(kandinsky_export):
    out, _ = kandinsky_export
    pipe = engines.load_pipeline(out, task="image-to-video")
    vae = build_tiny("kandinsky", ["vae_decoder"])["vae_decoder"]  # the export's tiny VAE (same seed)
    x = torch.rand(2, 3, 1, 48, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        want = vae.encode(x).latent_dist
    got = pipe.vae.encode(x).latent_dist
    torch.testing.assert_close(got.mean, want.mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.logvar, want.logvar, atol=1e-4, rtol=0)
    got_t = pipe.vae.encode(x, return_dict=False)[0]
    torch.testing.assert_close(got_t.mode(), want.mode(), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="single frames"):
        pipe.vae.encode(torch.zeros(1, 3, 5, 48, 64))


def test_kandinsky_task_recorded_and_the_encoder_only_on_request(kandinsky_export):
    out, _ = kandinsky_export
    manifest = engines.Manifest.read(out)
    assert "vae_encoder" in manifest.components
    assert manifest["pipeline"]["tasks"] == ["text-to-video", "image-to-video"]
    assert type(engines.load_pipeline(out)).__mro__[1].__name__ == "Kandinsky5T2VPipeline"  # the default task's
    for family in ("kandinsky", "hunyuan-video"):  # the shared VAE's encoder: exported only when a task asks
        spec = L.get_family(family)
        assert "vae_encoder" not in spec.exported and spec.component("vae_encoder").tasks == ("image-to-video",)
    assert L.get_family("kandinsky").task_components("image-to-video") == ("vae_encoder",)
