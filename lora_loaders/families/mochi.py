"""Mochi 1 (`mochi`): an asymmetric dual-stream video DiT (`transformer`) and T5.

Layouts: diffusers/PEFT under `transformer.` (diffusers' Mochi mixin reads no other). diffusers'
Mochi attention drops the padded prompt tokens per sample (a Python loop with `nonzero`, which no
graph with a dynamic batch can trace); the graph masks the padded keys and zeroes the padded text
outputs instead: the same for right-padded masks (T5's), checked in tests/test_family_mochi.py.

The VAE (`AutoencoderKLMochi`) decodes all latent frames in one pass, as diffusers' default `decode`
does (no tiling, no framewise chunks): one graph, 6 x frames - 5 video frames at 8 x the latent size.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import replace

import torch
import torch.nn.functional as F

from .common import (BATCH, OUT_CHANNELS, T5_TINY, VIDEO_LATENTS, denoiser, hf_encoder, prediction, swapped, text_mask,
                     timestep, vae)
from .spec import Axis, Cfg, FamilySpec, TensorSpec


class MaskedMochiAttnProcessor:
    """diffusers' MochiAttnProcessor2_0 with the prompt padding masked instead of dropped."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None):
        def heads(x, proj, norm=None):  # [batch, tokens, heads, head dim]
            x = proj(x).unflatten(2, (attn.heads, -1))
            return x if norm is None else norm(x)

        q, k = heads(hidden_states, attn.to_q, attn.norm_q), heads(hidden_states, attn.to_k, attn.norm_k)
        if image_rotary_emb is not None:
            q, k = _rotate(q, *image_rotary_emb), _rotate(k, *image_rotary_emb)
        text = encoder_hidden_states
        q, k, v = (torch.cat(pair, 1).transpose(1, 2) for pair in (
            (q, heads(text, attn.add_q_proj, attn.norm_added_q)), (k, heads(text, attn.add_k_proj, attn.norm_added_k)),
            (heads(hidden_states, attn.to_v), heads(text, attn.add_v_proj))))
        n = hidden_states.shape[1]
        keep = F.pad(attention_mask.bool(), (n, 0), value=True)  # [batch, video + text tokens]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        out = (out * keep[:, None, :, None].to(out.dtype)).transpose(1, 2).flatten(2, 3)
        video, text = attn.to_out[1](attn.to_out[0](out[:, :n])), out[:, n:]
        return video, (attn.to_add_out(text) if getattr(attn, "to_add_out", None) is not None else text)


def _rotate(x, cos, sin):  # Mochi's rotary embedding on [batch, tokens, heads, head dim]
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2).to(x.dtype)


def _rope(self, pos_frequencies, num_frames, height, width, device=None, dtype=None):
    """MochiRoPE's forward with the grid computed in tensors (its Python float arithmetic on the
    sizes would be baked into the graph at the export's sizes): same centres, same einsum."""
    hf, wf = (torch.scalar_tensor(n, dtype=torch.float32) for n in (height, width))
    scale = torch.sqrt(self.target_area / (hf * wf))
    t = torch.arange(num_frames, dtype=torch.float32)
    h = (torch.arange(height, dtype=torch.float32) + 0.5 - hf / 2) * scale
    w = (torch.arange(width, dtype=torch.float32) + 0.5 - wf / 2) * scale
    pos = torch.stack(torch.meshgrid(t, h, w, indexing="ij"), -1).view(-1, 3)
    freqs = torch.einsum("nd,dhf->nhf", pos, pos_frequencies.float())
    return freqs.cos(), freqs.sin()


def _forward(model, kwargs):
    with ExitStack() as stack:
        for m in model.modules():
            if type(m).__name__ == "MochiAttention":
                stack.enter_context(swapped(m, "processor", MaskedMochiAttnProcessor()))
        stack.enter_context(swapped(model.rope, "forward", _rope))
        return model(**kwargs)


def _group_norm(self, x):
    """MochiChunkedGroupNorm3D.forward as one norm call: diffusers splits batch x frames into chunks of 8,
    a count the trace would bake in; GroupNorm normalizes each (sample, frame) alone, so it is the same."""
    batch_size = x.size(0)
    x = x.permute(0, 2, 1, 3, 4).flatten(0, 1)
    return self.norm_layer(x).unflatten(0, (batch_size, -1)).permute(0, 2, 1, 3, 4)


def _decode(model, kwargs):
    """`model.decode` with its size-dependent Python branches replaced by the same computation."""
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXSafeConv3d
    from diffusers.models.autoencoders.autoencoder_kl_mochi import MochiChunkedGroupNorm3D

    with ExitStack() as stack:
        for m in model.decoder.modules():
            if isinstance(m, MochiChunkedGroupNorm3D):
                stack.enter_context(swapped(m, "forward", _group_norm))
            elif isinstance(m, CogVideoXSafeConv3d):  # its > 2 GiB split is the same convolution
                stack.enter_context(swapped(m, "forward", torch.nn.Conv3d.forward))
        return model.decode(**kwargs)


# MochiPipeline de-normalizes with latents_mean / latents_std viewed as 12 channels: the tiny VAE has 12 (and
# statistics other than 0 / 1, so the de-normalization shows); GroupNorm's 32 groups: channels of 32.
VAE_TINY = dict(latent_channels=12, encoder_block_out_channels=(32, 32, 32, 32),
                decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 0, 0, 0, 1),
                latents_mean=[0.1 * (i - 5) for i in range(12)], latents_std=[0.5 + 0.1 * i for i in range(12)])
# decoded video frames: the first latent frame gives one, each later one six
VIDEO = ("batch", Cfg("out_channels"), "video_frames", "image_height", "image_width")
_DECODER = vae(("batch", Cfg("latent_channels"), "frames", "height", "width"), VIDEO, VAE_TINY, "AutoencoderKLMochi")[0]
VAE_DECODER = replace(_DECODER, graph_forward=_decode, inputs=(replace(
    _DECODER.inputs[0], doc="latents, de-normalized (latents x std / scaling factor + mean)"),))

TRANSFORMER = denoiser(
    "MochiTransformer3DModel",
    inputs=(
        TensorSpec("hidden_states", VIDEO_LATENTS, doc="noisy latents"),
        TensorSpec("encoder_hidden_states", ("batch", "text", Cfg("text_embed_dim")), doc="T5 hidden states"),
        timestep(),
        text_mask("the T5 tokens' attention mask (right padding)"),
    ),
    outputs=(prediction(("batch", OUT_CHANNELS, "frames", "height", "width")),),
    graph_forward=_forward,
    # in_channels: the VAE's latent channels (12, as in the real model)
    tiny=dict(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
              in_channels=12, text_embed_dim=32, time_embed_dim=16, max_sequence_length=16),
)

MOCHI = FamilySpec(
    name="mochi", mixin="Mochi1LoraLoaderMixin", pipeline="MochiPipeline",
    components={
        "transformer": TRANSFORMER,
        # the pipeline passes the tokenizer's mask: padded tokens masked as in diffusers' T5 call
        "text_encoder": hf_encoder("text_encoder", "T5EncoderModel", "T5Config", T5_TINY, mask=True),
        "vae_decoder": VAE_DECODER,
    },
    # Mochi's own: Euler over the pipeline's linear-quadratic sigmas, inverted (Mochi's time runs 0 -> 1)
    scheduler=("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, invert_sigmas=True)),
    axes={
        "batch": BATCH,
        "frames": Axis(1, 28, 31, example=3, check=2),  # latent frames: 1 + (163 video frames - 1) / 6
        "height": Axis(16, 60, 60, example=8, check=12),  # latents (pixels / 8), multiples of the patch size 2
        "width": Axis(16, 106, 106, example=8, check=10),
        "text": Axis(1, 256, 256, example=8, check=12),  # T5 tokens
    },
    # Flux's and SD3's markers also match these block names: the same patterns, so Mochi files are not
    # taken for theirs; then what only Mochi has.
    markers=(r"^transformer\.transformer_blocks\.\d+\.(ff(_context)?\.net|norm1(_context)?\.linear)",
             r"^transformer\.transformer_blocks\.\d+\.attn1\.(add_[qkv]_proj|to_add_out)",
             r"^transformer\.time_embed\.(pooler|caption_proj)"),
)

FAMILIES = (MOCHI,)
