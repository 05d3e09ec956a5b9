"""LTX-Video (`ltx-video`): a video DiT over a token sequence (`transformer`) and T5.

Layouts: diffusers/PEFT under `transformer.`; `diffusion_model.` keys (finetrainers' ComfyUI
export, ComfyUI / LTX-Video trainers), in diffusers names or Lightricks' original ones
(`patchify_proj`, `adaln_single`, `q_norm` / `k_norm`, which diffusers' converter does not
rename). The graph takes and returns video latents [batch, channels, frames, height, width],
as LTX's pipeline holds them; it packs them into the transformer's tokens, passes the
latent frames, height and width the rotary embedding needs, and unpacks the prediction.
"""

from __future__ import annotations

import torch

from .common import BATCH, T5_TINY, denoiser, hf_encoder, original_prefixes, prediction, text_mask, timestep
from .spec import Axis, Cfg, FamilySpec, NameTable, Rule, TensorSpec

ORIGINAL = NameTable(rules=(
    Rule(r"patchify_proj", "proj_in"),
    Rule(r"adaln_single\.(.+)", r"time_embed.\1"),
    Rule(r"(transformer_blocks\.\d+\.attn[12])\.(q|k)_norm", r"\1.norm_\2"),
))


def _forward(model, kwargs):
    """The pipeline's `_pack_latents`, the transformer, then `_unpack_latents`."""
    x = kwargs.pop("hidden_states")
    b, _, f, h, w = x.shape
    p, pt = model.config.patch_size, model.config.patch_size_t
    f, h, w = f // pt, h // p, w // p
    for name in ("timestep", "encoder_attention_mask"):  # viewed per sample: one batch axis for the exporter
        torch._check(kwargs[name].shape[0] == b)
    tokens = x.reshape(b, -1, f, pt, h, p, w, p).permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)
    out = model(hidden_states=tokens, num_frames=f, height=h, width=w, **kwargs)[0]
    out = out.reshape(b, f, h, w, -1, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return (out.flatten(6, 7).flatten(4, 5).flatten(2, 3),)


def _rope_scale(shape, g, ctx):
    return torch.tensor([8 / 25, 32.0, 32.0])  # the pipeline's default: VAE compression 8 / 25 fps, 32, 32


TRANSFORMER = denoiser(
    "LTXVideoTransformer3DModel",
    inputs=(
        TensorSpec("hidden_states", ("batch", Cfg(fn=lambda c: c.in_channels // c.patch_size ** 2 // c.patch_size_t),
                                     "frames", "height", "width"), doc="noisy video latents (unpacked)"),
        TensorSpec("encoder_hidden_states", ("batch", "text", Cfg("caption_channels")), doc="T5 hidden states"),
        timestep(),
        text_mask("the T5 tokens' attention mask"),
        TensorSpec("rope_interpolation_scale", (3,), dtype="float32", sample=_rope_scale,
                   doc="(VAE temporal compression / frame rate, VAE spatial compression x 2), as the pipeline sets it"),
    ),
    outputs=(prediction(("batch", Cfg(fn=lambda c: c.out_channels // c.patch_size ** 2 // c.patch_size_t), "frames",
                         "height", "width"), doc="predicted velocity (unpacked)"),),
    graph_forward=_forward,
    tiny=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
              num_layers=1, caption_channels=32),
)

LTX_VIDEO = FamilySpec(
    name="ltx-video", mixin="LTXVideoLoraLoaderMixin", pipeline="LTXPipeline",
    components={
        "transformer": TRANSFORMER,
        "text_encoder": hf_encoder("text_encoder", "T5EncoderModel", "T5Config", T5_TINY),
    },
    axes={
        "batch": BATCH,
        "frames": Axis(1, 21, 33, example=3, check=2),  # latent frames: 1 + (161 video frames - 1) / 8
        "height": Axis(8, 16, 32, example=4, check=6),  # latents (pixels / 32)
        "width": Axis(8, 22, 40, example=4, check=5),
        "text": Axis(1, 128, 256, example=8, check=12),  # T5 tokens
    },
    namespaces=original_prefixes(ORIGINAL, kohya=False),
    # Flux's markers also match these block names: the same pattern, so LTX files are not taken for Flux's.
    markers=(r"^transformer\.transformer_blocks\.\d+\.ff\.net", r"^transformer\.caption_projection\.linear_[12]$"),
)

FAMILIES = (LTX_VIDEO,)
