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
    if family != "sd":
        return  # the errors are the same code for every family: sd's export checks them
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


def _generate(args):
    import contextlib
    import io

    from engines.generate import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        rc = main(args)
    return rc, err.getvalue()


def test_generate_takes_an_image_and_a_mask(task_export, tmp_path):
    """`python -m engines.generate OUT --image in.png [--mask m.png] [--strength S]`: the task's picture, of
    the input image's size (an odd size works at multiples of the grid and is resized back), equal to the
    engine pipeline's; bad images, masks and strengths give one `error:` line, exit 2, nothing written."""
    import numpy as np
    import torch
    from PIL import Image

    from task_reference import input_image, input_mask

    family, out, files = task_export
    if family != "sd":
        pytest.skip("the command is the same for every family: sd's export runs it")
    input_image().save(tmp_path / "in.png")
    input_mask().save(tmp_path / "mask.png")
    input_image(30, 42, seed=3).save(tmp_path / "odd.png")
    input_mask(32, 32).save(tmp_path / "small_mask.png")
    (tmp_path / "bad.png").write_text("not an image")
    base = [str(out), "--prompt", "a red cube", "--steps", "2"]
    for name, extra, task, kw in (
            ("i2i.png", ["--image", str(tmp_path / "in.png"), "--strength", "0.6"], "image-to-image",
             {"strength": 0.6}),
            ("inpaint.png", ["--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png")],
             "inpainting", {"mask_image": input_mask()})):
        rc, err = _generate([*base, *extra, "--out", str(tmp_path / name)])
        assert rc == 0, err[-2000:]
        pipe = engines.load_pipeline(out, task=task)
        pipe.set_progress_bar_config(disable=True)
        want = pipe(prompt="a red cube", num_inference_steps=2, image=input_image(), height=32, width=40,
                    generator=torch.Generator().manual_seed(0), **kw).images[0]
        with Image.open(tmp_path / name) as im:
            assert im.size == (40, 32) and np.array_equal(np.asarray(im), np.asarray(want)), name
    rc, err = _generate([*base, "--image", str(tmp_path / "odd.png"), "--out", str(tmp_path / "odd_out.png")])
    assert rc == 0, err[-2000:]
    with Image.open(tmp_path / "odd_out.png") as im:
        assert im.size == (42, 30)
    for extra, says in (
            (["--image", str(tmp_path / "none.png")], "--image: no such file"),
            (["--image", str(tmp_path / "bad.png")], "not a readable image"),
            (["--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "small_mask.png")],
             "the mask must have the image's size"),
            (["--image", str(tmp_path / "in.png"), "--strength", "0"], "--strength must be in (0, 1]"),
            (["--image", str(tmp_path / "in.png"), "--strength", "1.5"], "--strength must be in (0, 1]"),
            (["--mask", str(tmp_path / "mask.png")], "--mask needs --image")):
        rc, err = _generate([*base, *extra, "--out", str(tmp_path / "x.png")])
        lines = [x for x in err.splitlines() if x.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], (extra, err)
        assert not (tmp_path / "x.png").exists() and not list(tmp_path.glob(".x.png*"))


def test_export_refuses_an_unknown_task_or_variant(tmp_path):
    import contextlib
    import io

    from export.__main__ import main

    for extra, says in ((["--tasks", "image-to-video"], "family 'sd' has no task(s) ['image-to-video']"),
                        (["--model", "tiny:fill"], "family 'sd' has no tiny variant 'fill'")):
        args = ["--family", "sd", "--model", "tiny", "--out", str(tmp_path / "o"), "--no-progress", *extra]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            rc = main(args)
        lines = [x for x in err.getvalue().splitlines() if x.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], err.getvalue()
        assert not (tmp_path / "o").exists()
