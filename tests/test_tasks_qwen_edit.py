"""Qwen-Image-Edit over engines (tests/task_reference.py): the `tiny:edit` export (Edit-2511's
`zero_cond_t` transformer, the text encoder's vision tower as a graph of its own), diffusers' own
QwenImageEditPipeline and QwenImageEditInpaintPipeline over the engines equal to diffusers' over the
tiny models, with x baked and after a refit to y; the condition image's two ways in (prompt embeddings,
the transformer's condition tokens) checked where the tiny model's output barely shows them.

Two things are patched for the whole module, in both pipelines alike (the comparison stays fair):

- `calculate_dimensions` of the Edit pipelines' modules: they resize the condition image to about
  1024 x 1024 pixels whatever its size, which the tiny VAE takes minutes to encode on a CPU; patched,
  the condition image keeps the input image's size.
- torchvision's part of transformers' Qwen2VLProcessor: from transformers 5 the processor always takes
  a video processor, whose class needs torchvision (not installable beside this CPU torch build), and
  it type-checks that attribute even when it is None. Here `AutoVideoProcessor.from_pretrained` gives
  None and the check lets None through; the image path (what the Edit pipelines use) is transformers'
  own. Where torchvision is installed (as for real Qwen-Image-Edit users) nothing needs patching.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import engines
from pipeline_reference import reference_pipeline
from task_reference import HEIGHT, WIDTH, check_task, export_task, input_image

FAMILY = "qwen-image"
TASKS = ["image-to-image", "inpainting"]
CLASSES = {"image-to-image": "QwenImageEditPipeline", "inpainting": "QwenImageEditInpaintPipeline"}


@pytest.fixture(scope="module", autouse=True)
def small_condition_image_and_no_torchvision():
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_inpaint
    from transformers.models.auto import video_processing_auto
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class

    def no_video_check(self, name, argument):
        return None if name == "video_processor" and argument is None else check(self, name, argument)

    def no_video(*args, **kwargs):
        return (None, {}) if kwargs.get("return_unused_kwargs") else None

    mp = pytest.MonkeyPatch()
    for module in (pipeline_qwenimage_edit, pipeline_qwenimage_edit_inpaint):
        mp.setattr(module, "calculate_dimensions", lambda area, ratio: (WIDTH, HEIGHT, None))
    if importlib.util.find_spec("torchvision") is None:
        mp.setattr(ProcessorMixin, "check_argument_for_proper_class", no_video_check)
        mp.setattr(video_processing_auto.AutoVideoProcessor, "from_pretrained", no_video)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def task_export(tmp_path_factory, small_condition_image_and_no_torchvision):
    return export_task(FAMILY, tmp_path_factory.mktemp("tasks_qwen_edit"), TASKS, model="tiny:edit")


@pytest.mark.parametrize("task", TASKS)
def test_task_pipeline_equals_diffusers(task_export, task):
    out, files = task_export
    assert check_task(FAMILY, out, files, task).__name__ == CLASSES[task]


def test_edit_graphs_only_for_edit_models(task_export):
    out, _ = task_export
    manifest = engines.Manifest.read(out)
    assert {"transformer", "text_encoder", "vision_encoder", "vae_encoder"} <= set(manifest.components)
    inputs = {c: [i["name"] for i in manifest.components[c]["inputs"]] for c in ("transformer", "text_encoder")}
    assert "image_latents" in inputs["transformer"] and "image_embeds" in inputs["text_encoder"]
    assert manifest["pipeline"]["tasks"] == TASKS


def test_condition_image_reaches_both_graphs(task_export):
    """The tiny model's output image moves little with the condition image (less than the tolerance), so
    its two ways in are checked where they move much, engine against diffusers' with x: the prompt
    embeddings (vision tower + language model) and the transformer's prediction with its tokens."""
    out, files = task_export
    pipe = engines.load_pipeline(out, task="image-to-image")
    ref = reference_pipeline(FAMILY, out, [(files["x"], 1.0)], "QwenImageEditPipeline")
    embeds = {}
    for seed in (0, 5):
        image = input_image(seed=seed)
        got, mask = pipe.encode_prompt(prompt="a red cube", image=image, device="cpu")
        want, _ = ref.encode_prompt(prompt="a red cube", image=image, device="cpu")
        assert got.shape == want.shape and (got - want).abs().max() < 1e-4
        embeds[seed] = got
    assert (embeds[0] - embeds[5]).abs().max() > 0.1
    g = torch.Generator().manual_seed(0)
    (hp, wp), (ch, cw) = (4, 5), (3, 4)  # latent and condition token grids
    latents = torch.randn(1, hp * wp, 16, generator=g)
    preds = []
    for cond in (torch.randn(1, ch * cw, 16, generator=g), torch.randn(1, ch * cw, 16, generator=g)):
        args = dict(hidden_states=torch.cat([latents, cond], 1), encoder_hidden_states=embeds[0],
                    encoder_hidden_states_mask=mask, timestep=torch.tensor([0.5]),
                    img_shapes=[[(1, hp, wp), (1, ch, cw)]], return_dict=False)
        with torch.no_grad():
            got, want = pipe.transformer(**args)[0], ref.transformer(**args)[0][:, :hp * wp]
        assert got.shape == want.shape and (got - want).abs().max() < 1e-5
        preds.append(got)
    assert (preds[0] - preds[1]).abs().max() > 1e-3  # the tiny transformer's: 4e-3
