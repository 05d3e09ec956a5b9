"""CogVideoX LoRA layouts against diffusers + PEFT (float32, tiny CogVideoX 1.0 with rotary embedding).

diffusers' CogVideoX mixin reads only diffusers/PEFT keys (`transformer.`, or none): it is the
reference. The graph computes the pipeline's 3D rotary embedding from the latents' shape:
checked against `CogVideoXPipeline._prepare_rotary_positional_embeddings` for 1.0 (the
resize-and-centre crop, both branches) and 1.5 (sliced positions).
"""

import types

import pytest
import torch

import lora_loaders as L
from export.tiny import build_tiny
from peft_layouts import check_peft, check_unmatched

FAMILY = "cogvideox"


def test_peft_matches_diffusers_with_two_adapters():
    check_peft(FAMILY, bias=True, must=("transformer_blocks.0.norm1.linear", "patch_embed.text_proj"))


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
    check_unmatched(FAMILY, "transformer_blocks.0.attn1.to_qq", (4, 32), (32, 4))
