"""aMUSEd LoRA layouts against diffusers + PEFT (float32, tiny UVit2DModel and CLIP with projection).

diffusers' AmusedLoraLoaderMixin subclasses the SD mixin and keeps its `load_lora_weights` and
`fuse_lora`, which look for a `unet`: on aMUSEd's components the first raises AttributeError and
the second's default raises ValueError (checked below). Its classmethods work, as diffusers'
aMUSEd training script uses them: `lora_state_dict`, `load_lora_into_transformer`,
`load_lora_into_text_encoder` are the reference here, on the same file.
"""

import copy

import diffusers.loaders
import pytest
import torch

import lora_loaders as L
from export.tiny import build_tiny
from image_layouts import linear_pattern, relayout
from lora_files import peft_lora
from peft_layouts import raises_on_unknown_module
from reference import assert_close, assert_differs, diffusers_loader, outputs

FAMILY = "amused"


def _models():
    m = build_tiny(FAMILY, ["transformer", "text_encoder"])  # the LoRA components
    return m, copy.deepcopy(m), copy.deepcopy(m)


def _peft(models, seed):
    t = models["transformer"]
    sd = peft_lora({"transformer": t}, pattern=linear_pattern(t), seed=seed)
    return {**sd, **peft_lora({"text_encoder": models["text_encoder"]}, seed=seed + 1)}


def _diffusers(models, file):
    """diffusers' aMUSEd classmethods, as its training script loads a LoRA."""
    cls = diffusers.loaders.AmusedLoraLoaderMixin
    state, alphas = cls.lora_state_dict(dict(file))
    if any(k.startswith("transformer.") for k in state):
        cls.load_lora_into_transformer(state, alphas, models["transformer"], adapter_name="x")
    cls.load_lora_into_text_encoder(state, alphas, models["text_encoder"], prefix="text_encoder", adapter_name="x")


def test_diffusers_mixin_cannot_load_or_fuse():
    m, _, _ = _models()
    pipe = diffusers_loader(FAMILY, m)
    with pytest.raises(AttributeError, match="unet"):
        pipe.load_lora_weights(_peft(m, seed=1), adapter_name="x")
    with pytest.raises(ValueError, match="unet"):
        pipe.fuse_lora()


def test_peft_matches_diffusers():
    m, ours, ref = _models()
    sd = _peft(ours, seed=2)
    assert any(".conv" in k or "embed.conv" in k for k in sd)  # 1x1 convolutions too
    L.loader_for(FAMILY, **ours).load_lora_weights(dict(sd), adapter_name="x")
    _diffusers(ref, sd)
    o = outputs(FAMILY, ours)
    assert_close(o, outputs(FAMILY, ref))
    base = outputs(FAMILY, m)
    assert_differs(o, base, "transformer")
    assert_differs(o, base, "text_encoder")


def test_kohya_text_encoder_matches_diffusers():
    """`lora_te_` + flattened CLIP names with alphas, which diffusers' SD converter reads."""
    m, ours, ref = _models()
    te = peft_lora({"text_encoder": ours["text_encoder"]}, seed=3)
    file = relayout(te, "lora_te_", "down", alpha=2.0, flat=True)
    L.loader_for(FAMILY, **ours).load_lora_weights(dict(file), adapter_name="x")
    _diffusers(ref, file)
    o = outputs(FAMILY, ours)
    assert_close(o, outputs(FAMILY, ref))
    assert_differs(o, outputs(FAMILY, m), "text_encoder")


def test_fuse_lora_fuses_both_components_and_unfuse_restores_the_bits():
    m, ours, _ = _models()
    loader = L.loader_for(FAMILY, **ours)
    loader.load_lora_weights(_peft(ours, seed=4), adapter_name="x")
    loader.fuse_lora()
    assert loader.num_fused_loras == 1
    loader.unload_lora_weights()  # fused weights stay, as in diffusers
    fused = outputs(FAMILY, ours)
    assert_differs(fused, outputs(FAMILY, m), "transformer")
    assert_differs(fused, outputs(FAMILY, m), "text_encoder")
    again = L.loader_for(FAMILY, **copy.deepcopy(m))
    again.load_lora_weights(_peft(m, seed=4), adapter_name="x")
    again.fuse_lora()
    again.unfuse_lora()
    again.unload_lora_weights()  # unfused: the adapter goes, the exact base comes back
    for c, model in m.items():
        for (n, p), q in zip(model.named_parameters(), getattr(again, c).parameters()):
            assert torch.equal(p, q), (c, n)


def test_unmatched_key_raises_naming_it():
    _, ours, _ = _models()
    raises_on_unknown_module(FAMILY, ours, _peft(ours, seed=5), "transformer.transformer_layers.0.attn1.to_qq", (32, 32))
