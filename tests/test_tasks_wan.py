"""Image-to-video over Wan and SkyReels-V2 engines (tests/task_reference.py): diffusers' own
WanImageToVideoPipeline (Wan 2.1 I2V: one transformer and a CLIP image encoder; Wan 2.2 I2V A14B: two
transformers, no image encoder) and SkyReelsV2ImageToVideoPipeline over the engines equal diffusers'
over the tiny models, with x baked and after a refit to y; Wan's chunked VAE encoder equals
`vae.encode`."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import engines
import export
from export.tiny import build_tiny
from task_reference import check_task, lora_files

I2V = "image-to-video"
VARIANTS = {("wan", "i2v"): "WanImageToVideoPipeline", ("wan", "i2v-2.2"): "WanImageToVideoPipeline",
            ("skyreels-v2", "i2v"): "SkyReelsV2ImageToVideoPipeline"}


@pytest.fixture(scope="module", params=list(VARIANTS), ids=lambda p: f"{p[0]}-{p[1]}")
def task_export(request, tmp_path_factory):
    family, variant = request.param
    root = tmp_path_factory.mktemp(f"tasks_{family}_{variant}")
    files = lora_files(family, root, f"tiny:{variant}")
    for path in files.values():
        _image_pairs(path)
    out = root / "out"
    export.export_pipeline(family, f"tiny:{variant}", [str(files["x"])], out, tasks=[I2V], validate=False,
                           progress=False)
    return family, variant, out, files


def _image_pairs(path):
    """Each image cross-attention LoRA with its partner (add_k_proj with add_v_proj): diffusers takes a file
    with only one of them for a T2V LoRA and overwrites that one with zeros (`_maybe_expand_t2v_lora_for_i2v`),
    where ours loads it (the reference must be diffusers' loading the file as it is)."""
    sd = load_file(str(path))
    for key in list(sd):
        m = re.search(r"\.add_([kv])_proj\.", key)
        if m:
            partner = key.replace(f".add_{m.group(1)}_proj.", f".add_{'v' if m.group(1) == 'k' else 'k'}_proj.")
            sd.setdefault(partner, sd[key].flip(0))
    save_file(sd, str(path))


def test_image_to_video_equals_diffusers(task_export):
    family, variant, out, files = task_export
    assert check_task(family, out, files, I2V, width=48).__name__ == VARIANTS[family, variant]
    manifest = engines.Manifest.read(out)
    assert manifest["pipeline"]["tasks"] == [I2V]
    comps = set(manifest.components)
    assert {"vae_encoder", "vae_encoder_next"} <= comps
    assert ("image_encoder" in comps) == (variant == "i2v")
    assert ("transformer_2" in comps) == (variant == "i2v-2.2")


def test_chunked_encoder_equals_vae_encode(task_export):
    """The first frame, then chunks of 4 frames with the caches (9 frames: three runs), as `vae.encode`."""
    family, variant, out, _ = task_export
    if variant != "i2v":
        pytest.skip("one export is enough: the same VAE")
    vae = build_tiny(family, ["vae_encoder"])["vae_encoder"]
    pipe = engines.load_pipeline(out)
    x = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        want = vae.encode(x).latent_dist
    got = pipe.vae.encode(x).latent_dist
    assert got.parameters.shape == want.parameters.shape == (1, 8, 3, 4, 6)
    torch.testing.assert_close(got.parameters, want.parameters, atol=1e-4, rtol=0)
    # frames after the last whole chunk are left out, as diffusers leaves them
    torch.testing.assert_close(pipe.vae.encode(x[:, :, :7]).latent_dist.mean, want.mean[:, :, :2], atol=1e-4, rtol=0)


def test_generate_and_the_video_model_take_an_image(task_export, tmp_path):
    """`engines.generate --image` on an I2V export writes the video at the image's size; the Triton
    text_to_video model answers an `image` request with the local I2V pipeline's video, per adapter set, and a
    bad image or a mask with the request's own error."""
    import contextlib
    import io

    import numpy as np
    from PIL import Image

    from engines.generate import main
    from engines.triton.requests import LoraRequestError
    from engines.triton.text_to_image import TextToImageSwitcher, to_uint8
    from task_reference import input_image
    from triton_helpers import close_uint8, request_values

    family, variant, out, files = task_export
    if (family, variant) != ("wan", "i2v-2.2"):
        pytest.skip("the same code for every image-to-video export: Wan 2.2's runs it")
    image = input_image(32, 48)
    image.save(tmp_path / "in.png")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        rc = main([str(out), "--prompt", "a red cube", "--steps", "2", "--frames", "5", "--image",
                   str(tmp_path / "in.png"), "--out", str(tmp_path / "v.webp")])
    assert rc == 0, err.getvalue()[-2000:]
    with Image.open(tmp_path / "v.webp") as im:
        assert im.size == (48, 32) and im.n_frames == 5
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        rc = main([str(out), "--prompt", "a red cube", "--frames", "5", "--image", str(tmp_path / "in.png"),
                   "--mask", str(tmp_path / "in.png"), "--out", str(tmp_path / "m.webp")])
    assert rc == 2 and err.getvalue().strip().startswith("error: --mask") and not (tmp_path / "m.webp").exists()

    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    (lora_dir / "y.safetensors").write_bytes(files["y"].read_bytes())
    pipe = engines.load_pipeline(out, lora_dir=lora_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.task == I2V  # the export's own pipeline: model_index names WanImageToVideoPipeline
    sw = TextToImageSwitcher(pipe, lora_dir, {"max_steps": 4})
    pixels = np.asarray(image)

    def values(**kw):
        return {**request_values(0, steps=2, frames=5), "image": pixels, **kw}

    res = sw.run([(values(), '{"y": 0.5}'), (values(), "{}"), (values(image=pixels[:30]), None),
                  (values(mask=pixels[..., 0]), None)])
    ref = engines.load_pipeline(out, lora_dir=lora_dir)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(files["y"]), adapter_name="y")
    for (video, key), loras in zip(res[:2], ((("y", 0.5),), ())):
        assert key == loras
        ref.set_adapters([n for n, _ in loras], [w for _, w in loras])
        want = ref(prompt="a red cube", image=image, num_frames=5, num_inference_steps=2, height=32, width=48,
                   output_type="np", generator=torch.Generator().manual_seed(0)).frames[0]
        assert video.shape == (5, 32, 48, 3) and close_uint8(video, to_uint8(want))
    assert isinstance(res[2], LoraRequestError) and "multiple of" in str(res[2])
    assert isinstance(res[3], LoraRequestError) and "image only" in str(res[3])
