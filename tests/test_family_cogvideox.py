"""CogVideoX LoRA layouts against diffusers + PEFT (float32, tiny CogVideoX 1.0 with rotary embedding).

diffusers' CogVideoX mixin reads only diffusers/PEFT keys (`transformer.`, or none): it is the
reference. The graph computes the pipeline's 3D rotary embedding from the latents' shape:
checked against `CogVideoXPipeline._prepare_rotary_positional_embeddings` for 1.0 (the
resize-and-centre crop, both branches) and 1.5 (sliced positions).
"""

import copy
import types

import pytest
import torch

import lora_loaders as L
from export.tiny import build_tiny
from lora_files import peft_lora
from reference import assert_close, assert_differs, diffusers_loader, outputs
from video_layouts import linears

FAMILY = "cogvideox"


def _models():
    m = build_tiny(FAMILY, ["transformer"])
    return m, copy.deepcopy(m), copy.deepcopy(m)


def test_peft_matches_diffusers_with_two_adapters():
    m, ours, ref = _models()
    x = peft_lora(ours, pattern=linears(ours["transformer"]), seed=1, bias=True)
    y = peft_lora(ours, pattern=linears(ours["transformer"]), seed=2, every=2)
    a, b = L.loader_for(FAMILY, **ours), diffusers_loader(FAMILY, ref)
    for loader in (a, b):
        loader.load_lora_weights(dict(x), adapter_name="x")
        loader.load_lora_weights(dict(y), adapter_name="y")
        loader.set_adapters(["x", "y"], [0.6, 1.3])
    o = outputs(FAMILY, ours)
    assert_close(o, outputs(FAMILY, ref))
    assert_differs(o, outputs(FAMILY, m), "transformer")


@pytest.mark.parametrize("config", [{}, {"patch_size_t": 2, "sample_height": 24, "sample_width": 20}])
def test_rotary_embedding_is_the_pipelines(config):
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

    t = build_tiny(FAMILY, ["transformer"], overrides={"transformer": config})["transformer"]
    pipe = types.SimpleNamespace(transformer=t, vae_scale_factor_spatial=8)
    prepare = L.get_family(FAMILY).component("transformer").prepare
    for frames, height, width in [(2, 12, 10), (4, 8, 8), (3, 16, 6), (2, 6, 20)]:
        ours = prepare(t, {"hidden_states": torch.zeros(1, frames, 4, height, width)})["image_rotary_emb"]
        ref = CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, height * 8, width * 8, frames, "cpu")
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unmatched_key_raises_naming_it():
    _, ours, _ = _models()
    sd = peft_lora(ours, pattern=linears(ours["transformer"]), seed=3)
    sd["transformer.transformer_blocks.0.attn1.to_qq.lora_A.weight"] = torch.zeros(4, 32)
    sd["transformer.transformer_blocks.0.attn1.to_qq.lora_B.weight"] = torch.zeros(32, 4)
    loader = L.loader_for(FAMILY, **ours)
    with pytest.raises(L.LoraKeyError, match=r"to_qq"):
        loader.load_lora_weights(sd, adapter_name="bad")
    assert loader.get_list_adapters() == {}
