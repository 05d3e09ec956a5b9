"""Lumina-Image 2.0 (`lumina2`): a DiT with noise and context refiners, Gemma 2, Flux's VAE.

Layouts: diffusers/PEFT; the original (Alpha-VLLM NextDiT) names under `diffusion_model.`
(ComfyUI), `transformer.`, `lycoris_` or no prefix, with the fused `attention.qkv` split by the
model's own q / k / v sizes (GQA: 3 : 1 : 1 in Lumina-Image 2.0 when no model is at hand);
sd-scripts' `lora_unet_` over the original names, and its `lora_te_` for Gemma 2 (which
diffusers does not load; we do).
"""

from __future__ import annotations

import torch

from .common import (BATCH, GEMMA2_TINY, IMAGE_AXES, LATENTS, OUT_CHANNELS, VAE8_TINY, denoiser, hf_encoder, image_vae,
                     original_prefixes, prediction, rope_table, sigmas, text_mask, timestep)
from .spec import Axis, Cfg, FamilySpec, Namespace, NameTable, Rule, Split, TensorSpec

_B = r"(layers|noise_refiner|context_refiner)\.(\d+)"
ORIGINAL = NameTable(rules=(
    Rule(rf"{_B}\.attention\.qkv", Split(tuple(rf"\1.\2.attn.to_{x}" for x in "qkv"), ratios=(3, 1, 1))),
    Rule(rf"{_B}\.attention\.out", r"\1.\2.attn.to_out.0"),
    Rule(rf"{_B}\.attention\.(q|k)_norm", r"\1.\2.attn.norm_\3"),
    Rule(rf"{_B}\.feed_forward\.w(1|2|3)", r"\1.\2.feed_forward.linear_\3"),
    Rule(rf"{_B}\.adaLN_modulation\.1", r"\1.\2.norm1.linear"),
    Rule(r"(layers|noise_refiner)\.(\d+)\.attention_norm1", r"\1.\2.norm1.norm"),  # modulated blocks
    Rule(r"context_refiner\.(\d+)\.attention_norm1", r"context_refiner.\1.norm1"),
    Rule(rf"{_B}\.attention_norm2", r"\1.\2.norm2"),
    Rule(r"t_embedder\.mlp\.0", "time_caption_embed.timestep_embedder.linear_1"),
    Rule(r"t_embedder\.mlp\.2", "time_caption_embed.timestep_embedder.linear_2"),
    Rule(r"cap_embedder\.(0|1)", r"time_caption_embed.caption_embedder.\1"),
    Rule(r"final_layer\.linear", "norm_out.linear_2"),
    Rule(r"final_layer\.adaLN_modulation\.1", "norm_out.linear_1"),  # scale only: no halves to swap
))


def _forward(model, kw):
    """Lumina2's forward with the captions kept at their padded length (padding masked) where
    diffusers packs them by their lengths in Python loops: the same outputs, traceable with
    dynamic batch, sizes and caption lengths."""
    x, cap, mask = kw["hidden_states"], kw["encoder_hidden_states"], kw["encoder_attention_mask"]
    (b, c, height, width), p, n = x.shape, model.config.patch_size, cap.shape[1]
    h, w = height // p, width // p
    temb, cap = model.time_caption_embed(x, kw["timestep"], cap)
    x = model.x_embedder(x.view(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2))
    zero, dev = torch.zeros(b, n, dtype=torch.int64, device=x.device), x.device
    cap_rope = _rope(model, torch.arange(n, device=dev).expand(b, n), zero, zero)
    img_rope = _rope(model, mask.sum(1, keepdim=True).to(torch.int64).expand(b, h * w),  # images follow the caption
                     torch.arange(h, device=dev)[:, None].expand(h, w).flatten().expand(b, -1),
                     torch.arange(w, device=dev)[None].expand(h, w).flatten().expand(b, -1))
    for layer in model.context_refiner:
        cap = layer(cap, mask, cap_rope)
    for layer in model.noise_refiner:
        x = layer(x, None, img_rope, temb)
    joint, rope = torch.cat([cap, x], 1), torch.cat([cap_rope, img_rope], 1)
    joint_mask = torch.cat([mask.bool(), torch.ones(b, h * w, dtype=torch.bool, device=dev)], 1)
    for layer in model.layers:
        joint = layer(joint, joint_mask, rope, temb)
    out = model.norm_out(joint, temb)[:, n:]
    return (out.view(b, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(b, -1, height, width),)


def _rope(model, *ids) -> torch.Tensor:
    """The model's complex RoPE factors [b, s, head_dim / 2] at these position ids per axis (looked up
    in real form, complex64: the exporter has no complex gather, TensorRT no float64)."""
    tables = [torch.view_as_real(f).float().to(ids[0].device) for f in model.rope_embedder.freqs_cis]
    return torch.view_as_complex(torch.cat([t[i] for t, i in zip(tables, ids)], -2))


TRANSFORMER = denoiser(
    "Lumina2Transformer2DModel",
    inputs=(
        TensorSpec("hidden_states", LATENTS, doc="noisy latents"),
        timestep(sample=sigmas, doc="1 - flow-matching timestep / 1000"),
        TensorSpec("encoder_hidden_states", ("batch", "text", Cfg("cap_feat_dim")), doc="Gemma 2's second-last states"),
        text_mask("the Gemma tokens' attention mask"),
    ),
    outputs=(prediction(("batch", OUT_CHANNELS, "height", "width")),),
    graph_forward=_forward,
    tiny=dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=1, num_refiner_layers=1,
              num_attention_heads=4, num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 2, 2), cap_feat_dim=32),
    # rotary tables of axes_lens positions: caption tokens 0 .. n-1 and the image at n on the first,
    # patch rows and columns on the others
    bounds=rope_table("axes_lens", text=lambda c: c.axes_lens[0] - 1,
                      height=lambda c: c.axes_lens[1] * c.patch_size, width=lambda c: c.axes_lens[2] * c.patch_size),
)

LUMINA2 = FamilySpec(
    name="lumina2", mixin="Lumina2LoraLoaderMixin", pipeline="Lumina2Pipeline",
    components={
        "transformer": TRANSFORMER,
        "text_encoder": hf_encoder("text_encoder", "Gemma2Model", "Gemma2Config", GEMMA2_TINY, lora=True,
                                   output=("hidden_states", "hidden_states.-2"), mask=True),
        **image_vae({**VAE8_TINY, "scaling_factor": 0.3611, "shift_factor": 0.1159}),  # its pipeline takes x8
    },
    scheduler=("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=6.0)),
    axes={
        **IMAGE_AXES,
        "batch": BATCH,
        "height": Axis(32, 128, 256, example=8, check=12),  # latents (pixels / 8), multiples of the patch size 2
        "width": Axis(32, 128, 256, example=8, check=10),
        "text": Axis(1, 256, 256, example=8, check=12),  # Gemma tokens
    },
    namespaces=(*original_prefixes(ORIGINAL, lycoris=True), Namespace("lora_te_", "text_encoder", flat=True, format="kohya")),
    markers=(r"^transformer\.(noise|context)_refiner", r"^transformer\.time_caption_embed",
             r"\.feed_forward\.linear_3"),
)

FAMILIES = (LUMINA2,)
