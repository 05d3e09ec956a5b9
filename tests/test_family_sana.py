"""Sana LoRA layouts against diffusers + PEFT (float32, tiny Sana 1.5: linear attention with q/k norms).

Its community publishes diffusers/PEFT files (`transformer.`: diffusers' and SimpleTuner's
trainers; attention, and the 1x1 convolutions of the GLU feed-forward); diffusers reads them.
An unprefixed file diffusers loads as nothing (checked): compared with diffusers on the same
keys prefixed.
"""

import numpy as np
import torch

import lora_loaders as L
from export.graph import example_inputs, run_torch
from export.onnx_export import export_component
from export.tiny import build_tiny
from peft_layouts import check_peft, check_unmatched, check_unprefixed

FAMILY = "sana"


def test_peft_matches_diffusers_with_two_adapters():
    check_peft(FAMILY, convs=True, must=("ff.conv_inverted", "ff.conv_point", "attn2.to_k", "caption_projection"))


def test_unprefixed_file_is_the_transformers():
    check_unprefixed(FAMILY, convs=True)


def test_unmatched_key_raises_naming_it():
    check_unmatched(FAMILY, "transformer_blocks.0.ff.conv_invertedd", (4, 16, 1, 1), (80, 4, 1, 1))


def test_export_keeps_the_linear_attention_epsilon(tmp_path):
    """Sana's linear attention divides by (sum + 1e-15); onnxscript's optimizer took 1e-15 for 0
    (its `x + 0` rule matches within 1e-8) and ONNX Runtime gave 0 / 0 = NaN where a query is all
    zero after ReLU. A zero `to_q` makes every query zero."""
    import onnxruntime as ort

    spec = L.get_family(FAMILY)
    t = build_tiny(FAMILY, ["transformer"])["transformer"]
    with torch.no_grad():
        t.transformer_blocks[0].attn1.to_q.weight.zero_()
    cspec = spec.component("transformer")
    export_component(t, cspec, tmp_path, spec)
    feeds = example_inputs(spec, cspec, t, torch.float32, "check", seed=1)
    got = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    want = run_torch(cspec, t, feeds)[0]
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
