"""Kandinsky 5 LoRA layouts against diffusers + PEFT (float32, tiny Kandinsky 5 T2V, visual_cond).

diffusers' Kandinsky mixin reads only diffusers/PEFT keys: it is the reference. The graph
derives the pipeline's RoPE positions and resolution-dependent RoPE scale from the shapes:
checked against `Kandinsky5T2VPipeline`'s (`visual_rope_pos`, `text_rope_pos`,
`_get_scale_factor`).
"""

from functools import partial

import pytest
import torch

import lora_loaders as L
from export.tiny import build_tiny
from peft_layouts import check_peft, check_unmatched, models

FAMILY = "kandinsky"


def _nonzero(t):  # Kandinsky 5 zero-initialises its modulations: the blocks would do nothing
    g = torch.Generator().manual_seed(0)
    for p in t.parameters():
        if not p.any():
            p.normal_(0, 0.1, generator=g)


_models = partial(models, FAMILY, init=_nonzero)


def test_peft_matches_diffusers_with_two_adapters():
    check_peft(FAMILY, must=("visual_transformer_blocks.0.cross_attention.to_key",), triple=_models())


@pytest.mark.parametrize("frames,height,width", [(2, 12, 10), (3, 64, 96), (1, 60, 108), (2, 64, 120)])
def test_rope_positions_and_scale_are_the_pipelines(frames, height, width):
    from diffusers import Kandinsky5T2VPipeline

    t = build_tiny(FAMILY, ["transformer"])["transformer"]
    prepare = L.get_family(FAMILY).component("transformer").prepare
    kw = prepare(t, {"hidden_states": torch.zeros(1, frames, height, width, 9),
                     "encoder_hidden_states": torch.zeros(1, 7, 32)})
    for a, b in zip(kw["visual_rope_pos"], (frames, height // 2, width // 2)):
        assert torch.equal(a, torch.arange(b))
    assert torch.equal(kw["text_rope_pos"], torch.arange(7))
    want = Kandinsky5T2VPipeline._get_scale_factor(None, height * 8, width * 8)
    assert [float(s) for s in kw["scale_factor"]] == pytest.approx(list(want))


def test_unmatched_key_raises_naming_it():
    check_unmatched(FAMILY, "visual_transformer_blocks.0.self_attention.to_queryy", (4, 32), (32, 4), triple=_models())
