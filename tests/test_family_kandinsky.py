"""Kandinsky 5 LoRA layouts against diffusers + PEFT (float32, tiny Kandinsky 5 T2V, visual_cond).

diffusers' Kandinsky mixin reads only diffusers/PEFT keys: it is the reference. The graph
derives the pipeline's RoPE positions and resolution-dependent RoPE scale from the shapes:
checked against `Kandinsky5T2VPipeline`'s (`visual_rope_pos`, `text_rope_pos`,
`_get_scale_factor`).
"""

import copy

import pytest
import torch

import lora_loaders as L
from export.tiny import build_tiny
from lora_files import peft_lora
from reference import assert_close, assert_differs, diffusers_loader, outputs
from video_layouts import linears

FAMILY = "kandinsky"


def _models():
    m = build_tiny(FAMILY, ["transformer"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # Kandinsky 5 zero-initialises its modulations: the blocks would do nothing
        for p in m["transformer"].parameters():
            if not p.any():
                p.normal_(0, 0.1, generator=g)
    return m, copy.deepcopy(m), copy.deepcopy(m)


def test_peft_matches_diffusers():
    m, ours, ref = _models()
    sd = peft_lora(ours, pattern=linears(ours["transformer"]), seed=1)
    assert any("visual_transformer_blocks.0.cross_attention.to_key" in k for k in sd)
    L.loader_for(FAMILY, **ours).load_lora_weights(dict(sd), adapter_name="x")
    diffusers_loader(FAMILY, ref).load_lora_weights(dict(sd), adapter_name="x")
    o = outputs(FAMILY, ours)
    assert_close(o, outputs(FAMILY, ref))
    assert_differs(o, outputs(FAMILY, m), "transformer")


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
    _, ours, _ = _models()
    sd = peft_lora(ours, pattern=linears(ours["transformer"]), seed=3)
    sd["transformer.visual_transformer_blocks.0.self_attention.to_queryy.lora_A.weight"] = torch.zeros(4, 32)
    sd["transformer.visual_transformer_blocks.0.self_attention.to_queryy.lora_B.weight"] = torch.zeros(32, 4)
    loader = L.loader_for(FAMILY, **ours)
    with pytest.raises(L.LoraKeyError, match=r"to_queryy"):
        loader.load_lora_weights(sd, adapter_name="bad")
    assert loader.get_list_adapters() == {}
