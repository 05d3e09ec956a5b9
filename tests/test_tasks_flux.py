"""Image-to-image and inpainting over SD3 and FLUX.1 engines (tests/task_reference.py): diffusers' own
pipelines over the engines equal diffusers' over the tiny models, with x baked and after a refit to y.
FLUX.1 Fill (`tiny:fill`, a wider transformer input) inpaints with FluxFillPipeline; Kontext
(`tiny:kontext`) edits with FluxKontextPipeline and inpaints with FluxKontextInpaintPipeline."""

from __future__ import annotations

import pytest

import engines
from engines.pipeline import PipelineError
from task_reference import HEIGHT, WIDTH, check_task, export_task

I2I, INPAINT = "image-to-image", "inpainting"
# Kontext works at max_area's size of the call's aspect ratio: the call's own, so the sizes stay small
KONTEXT = dict(_auto_resize=False, max_area=HEIGHT * WIDTH)
CASES = {
    "sd3": {I2I: "StableDiffusion3Img2ImgPipeline", INPAINT: "StableDiffusion3InpaintPipeline"},
    "flux": {I2I: "FluxImg2ImgPipeline", INPAINT: "FluxInpaintPipeline"},
    "flux:fill": {INPAINT: "FluxFillPipeline"},
    "flux:kontext": {I2I: "FluxKontextPipeline", INPAINT: "FluxKontextInpaintPipeline"},
}


@pytest.fixture(scope="module", params=list(CASES))
def task_export(request, tmp_path_factory):
    family, _, variant = request.param.partition(":")
    model = f"tiny:{variant}" if variant else "tiny"
    root = tmp_path_factory.mktemp(f"tasks_{family}_{variant or 'base'}")
    out, files = export_task(family, root, list(CASES[request.param]), model=model)
    return request.param, family, out, files


def test_tasks_equal_diffusers(task_export):
    case, family, out, files = task_export
    for task, cls in CASES[case].items():
        extra = KONTEXT if case == "flux:kontext" else {}
        assert check_task(family, out, files, task, **extra).__name__ == cls


def test_manifest_records_the_variant(task_export):
    case, family, out, files = task_export
    manifest = engines.Manifest.read(out)
    assert "vae_encoder" in manifest.components
    tasks = manifest["pipeline"]["tasks"]
    if case == "flux:fill":
        # packed latents (2 x 2 x 4 channels), packed masked-image latents, the packed mask (2 x 2 x 2 x 2)
        hidden = next(i for i in manifest.components["transformer"]["inputs"] if i["name"] == "hidden_states")
        assert hidden["shape"][-1] == 16 + 16 + 16
        assert tasks == [INPAINT]
        assert type(engines.load_pipeline(out)).__mro__[1].__name__ == "FluxFillPipeline"
        with pytest.raises(PipelineError, match="no 'image-to-image' pipeline; its tasks: inpainting"):
            engines.load_pipeline(out, task=I2I)
    else:
        assert tasks == ["text-to-image", I2I, INPAINT]
    if case == "flux:kontext":
        assert type(engines.load_pipeline(out)).__mro__[1].__name__ == "FluxKontextPipeline"
        assert type(engines.load_pipeline(out, task="text-to-image")).__mro__[1].__name__ == "FluxPipeline"


def test_kontext_appends_the_reference_tokens(task_export):
    """FluxKontextPipeline's transformer call: the latents' tokens, then the reference image's (index 1)."""
    case, family, out, files = task_export
    if case != "flux:kontext":
        pytest.skip("Kontext only")
    from task_reference import input_image

    pipe = engines.load_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    run = pipe.transformer._run
    pipe.transformer._run = lambda method, args, kwargs: seen.append(kwargs) or run(method, args, kwargs)
    pipe(prompt="a red cube", image=input_image(), num_inference_steps=1, height=HEIGHT, width=WIDTH, output_type="np",
         **KONTEXT)
    tokens = (HEIGHT // 4) * (WIDTH // 4)  # the tiny VAE's factor 2, then 2 x 2 patches
    hidden, ids = seen[0]["hidden_states"], seen[0]["img_ids"]
    assert hidden.shape[1] == ids.shape[0] == 2 * tokens
    assert (ids[:tokens, 0] == 0).all() and (ids[tokens:, 0] == 1).all()
