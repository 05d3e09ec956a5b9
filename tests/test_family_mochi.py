"""Mochi 1 LoRA layouts against diffusers + PEFT (float32, tiny Mochi).

diffusers' Mochi mixin reads only diffusers/PEFT keys: it is the reference. The graph runs
Mochi's attention with the prompt padding masked (diffusers drops padded tokens per sample in
a Python loop) and its RoPE grid in tensors: checked here against diffusers' own forward.
"""

from functools import partial

import pytest
import torch

import lora_loaders as L
from export.graph import example_inputs
from peft_layouts import check_peft, check_unmatched, models

FAMILY = "mochi"


# diffusers initialises the RoPE frequencies to zero (no rotation)
_models = partial(models, FAMILY, init=lambda t: t.pos_frequencies.normal_(generator=torch.Generator().manual_seed(0)))


def test_peft_matches_diffusers_with_two_adapters():
    # (no lora_B.bias: diffusers + PEFT leave it on the meta device for the bias-free Linear layers)
    check_peft(FAMILY, must=("attn1.add_q_proj", "norm1_context.linear_1"), triple=_models())


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
    check_unmatched(FAMILY, "transformer_blocks.0.attn1.to_qq", (4, 32), (32, 4), triple=_models())
