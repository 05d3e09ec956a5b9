"""Mochi 1 LoRA layouts against diffusers + PEFT (float32, tiny Mochi).

diffusers' Mochi mixin reads only diffusers/PEFT keys: it is the reference. The graph runs
Mochi's attention with the prompt padding masked (diffusers drops padded tokens per sample in
a Python loop) and its RoPE grid in tensors: checked here against diffusers' own forward.
"""

import copy

import pytest
import torch

import lora_loaders as L
from export.graph import example_inputs
from export.tiny import build_tiny
from lora_files import peft_lora
from reference import assert_close, assert_differs, diffusers_loader, outputs
from video_layouts import linears

FAMILY = "mochi"


def _models():
    m = build_tiny(FAMILY, ["transformer"])
    with torch.no_grad():  # diffusers initialises the RoPE frequencies to zero (no rotation)
        m["transformer"].pos_frequencies.normal_(generator=torch.Generator().manual_seed(0))
    return m, copy.deepcopy(m), copy.deepcopy(m)


def test_peft_matches_diffusers():
    m, ours, ref = _models()
    # (no lora_B.bias: diffusers + PEFT leave it on the meta device for the bias-free Linear layers)
    sd = peft_lora(ours, pattern=linears(ours["transformer"]), seed=1)
    assert any("attn1.add_q_proj" in k for k in sd) and any("norm1_context.linear_1" in k for k in sd)
    L.loader_for(FAMILY, **ours).load_lora_weights(dict(sd), adapter_name="x")
    diffusers_loader(FAMILY, ref).load_lora_weights(dict(sd), adapter_name="x")
    o = outputs(FAMILY, ours)
    assert_close(o, outputs(FAMILY, ref))
    assert_differs(o, outputs(FAMILY, m), "transformer")


@pytest.mark.parametrize("lengths", [(12, 12), (12, 5), (1, 7)])
def test_graph_attention_and_rope_equal_diffusers_forward(lengths):
    spec = L.get_family(FAMILY)
    cspec = spec.component("transformer")
    t = _models()[0]["transformer"]
    x = example_inputs(spec, cspec, t, torch.float32, "check", seed=2, batch=2)
    x["encoder_attention_mask"] = (torch.arange(12) < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        ref = t(**x, return_dict=False)[0]
        ours = cspec.graph_forward(t, dict(x, return_dict=False))[0]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert type(t.transformer_blocks[0].attn1.processor).__name__ == "MochiAttnProcessor2_0"  # restored


def test_unmatched_key_raises_naming_it():
    _, ours, _ = _models()
    sd = peft_lora(ours, pattern=linears(ours["transformer"]), seed=3)
    sd["transformer.transformer_blocks.0.attn1.to_qq.lora_A.weight"] = torch.zeros(4, 32)
    sd["transformer.transformer_blocks.0.attn1.to_qq.lora_B.weight"] = torch.zeros(32, 4)
    loader = L.loader_for(FAMILY, **ours)
    with pytest.raises(L.LoraKeyError, match=r"to_qq"):
        loader.load_lora_weights(sd, adapter_name="bad")
    assert loader.get_list_adapters() == {}
