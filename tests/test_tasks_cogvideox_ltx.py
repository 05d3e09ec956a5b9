"""Image-to-video over CogVideoX and LTX-Video engines (tests/task_reference.py): diffusers' own
CogVideoXImageToVideoPipeline (a tiny CogVideoX 1.5 I2V: `--model tiny:i2v`) and LTXImageToVideoPipeline
over the engines equal diffusers' over the tiny models, with x baked and after a refit to y; the
engine VAE encoders equal diffusers' `vae.encode` over videos as well (CogVideoX: chunks with caches,
LTX-Video: one pass)."""

from __future__ import annotations

import pytest
import torch

import engines
from export.tiny import build_tiny
from task_reference import check_task, export_task

TASK = "image-to-video"
# (tiny model, the pipeline class, call sizes: multiples of the VAE factor times the patch size)
CASES = {"cogvideox": ("tiny:i2v", "CogVideoXImageToVideoPipeline", dict(height=32, width=48)),
         "ltx-video": ("tiny", "LTXImageToVideoPipeline", dict(height=64, width=96))}


@pytest.fixture(scope="module", params=list(CASES))
def task_export(request, tmp_path_factory):
    family = request.param
    out, files = export_task(family, tmp_path_factory.mktemp(f"tasks_{family}"), [TASK], model=CASES[family][0])
    return family, out, files


def test_image_to_video_equals_diffusers(task_export):
    family, out, files = task_export
    _, cls, sizes = CASES[family]
    assert check_task(family, out, files, TASK, **sizes).__name__ == cls
    manifest = engines.Manifest.read(out)
    assert "vae_encoder" in manifest.components and TASK in manifest["pipeline"]["tasks"]


def test_vae_encode_equals_diffusers_over_frames(task_export):
    """The engine VAE's `encode` over an image (1 frame) and videos (CogVideoX: a first chunk of 9
    frames, then chunks of 8 with the caches; LTX-Video: one pass) equals diffusers' `vae.encode`."""
    family, out, _ = task_export
    vae = build_tiny(family, ["vae_encoder"])["vae_encoder"]
    engine_vae = engines.load_pipeline(out, task=TASK).vae
    g = torch.Generator().manual_seed(3)
    for frames in (1, 9, 17):
        x = torch.rand(1, 3, frames, 32, 64, generator=g) * 2 - 1
        with torch.no_grad():
            want = vae.encode(x).latent_dist
        got = engine_vae.encode(x).latent_dist
        assert got.mean.shape == want.mean.shape, (frames, got.mean.shape, want.mean.shape)
        torch.testing.assert_close(got.mean, want.mean, rtol=0, atol=1e-4)
        torch.testing.assert_close(got.logvar, want.logvar, rtol=0, atol=1e-4)


def test_cogvideox_encoder_names_what_it_cannot_encode(task_export):
    family, out, _ = task_export
    if family != "cogvideox":
        pytest.skip("CogVideoX's chunk lengths")
    with pytest.raises(engines.pipeline.PipelineError, match="first chunk of 12 frames"):
        engines.load_pipeline(out, task=TASK).vae.encode(torch.zeros(1, 3, 12, 32, 32))


def test_cogvideox_decodes_an_even_latent_count_over_chunks(task_export):
    """4 latent frames: the even first chunk's graph (2 frames), then a later chunk of 2 with its caches."""
    family, out, _ = task_export
    if family != "cogvideox":
        pytest.skip("CogVideoX's chunk lengths")
    vae = build_tiny(family, ["vae_decoder"])["vae_decoder"]
    z = torch.randn(1, 4, 4, 4, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = vae.decode(z).sample
    got = engines.load_pipeline(out, task=TASK).vae.decode(z).sample
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
