"""Qwen-Image (`qwen-image`): an MMDiT over packed 2x2 latent patches (`transformer`; the Qwen-Image and
Qwen-Image-Edit configs) and Qwen2.5-VL's language model as text encoder.

Layouts (diffusers module names throughout): diffusers/PEFT under `transformer.`, `diffusion_model.`
or no prefix (PEFT's `.default.` names too), `lora_A/B` or `lora_down/up`, `alpha` applied (alpha / rank)
in every spelling; musubi-tuner's kohya names (`lora_unet_transformer_blocks_0_attn_to_q`); LyCORIS
(`lycoris_`). The text-to-image graph takes and returns latents [batch, channels, height, width],
packed as the pipeline does, the rotary grid from their shape (no Edit condition-image input).
"""

from __future__ import annotations

import sys
from contextlib import ExitStack

import torch

from .common import (BATCH, IMAGE_AXES, QWEN25_VL_TINY, denoiser, hf_encoder, original_prefixes, prediction, sigmas,
                     swapped, text_mask, timestep, vae)
from .spec import Axis, Cfg, FamilySpec, TensorSpec


def _rope(self, video_fhw, device=None, max_txt_seq_len=None):
    """QwenEmbedRope for one image, tables built from real angles: diffusers' own casts the text
    length to int (fixing it at export) and slices complex tables (which ONNX export cannot)."""
    frame, height, width = video_fhw[0][0]

    def angles(pos, dim):
        return torch.outer(pos.float(), 1.0 / torch.pow(self.theta, torch.arange(0, dim, 2).float().div(dim)))

    def centred(n):  # scale_rope: positions -n/2 .. n/2 - 1
        return torch.cat([torch.arange(-(n - n // 2), 0), torch.arange(n // 2)]) if self.scale_rope else torch.arange(n)

    f, h, w = (angles(p, d) for p, d in zip((torch.arange(frame), centred(height), centred(width)), self.axes_dim))
    grid = (frame, height, width, -1)
    img = torch.cat([f[:, None, None].expand(grid), h[None, :, None].expand(grid), w[None, None].expand(grid)], -1)
    start = torch.sym_max(height // 2, width // 2) if self.scale_rope else torch.sym_max(height, width)
    txt = torch.cat([angles(torch.arange(max_txt_seq_len) + start, d) for d in self.axes_dim], -1)
    img = img.reshape(frame * height * width, -1)
    return torch.polar(torch.ones_like(img), img), torch.polar(torch.ones_like(txt), txt)


def _text_len(encoder_hidden_states, mask=None):
    """compute_text_seq_len_from_mask without its per-sample lengths (unused by the forward, and
    `torch.as_tensor(length)` there fixes the text length at export)."""
    return encoder_hidden_states.shape[1], None, None if mask is None else mask.bool()


def _forward(model, kwargs):
    """The pipeline's `_pack_latents`, the transformer, then `_unpack_latents`. `zero_cond_t` (Edit-2511)
    modulates condition-image tokens with t = 0; without them it is the same model (its index tensor,
    built in Python from the sizes, would fix them at export), so it is off for the graph."""
    x = kwargs.pop("hidden_states")
    b, c, h, w = x.shape
    p = model.config.patch_size
    tokens = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
    with ExitStack() as stack:
        for m in (model, *model.transformer_blocks):
            stack.enter_context(swapped(m, "zero_cond_t", False))
        stack.enter_context(swapped(model.pos_embed, "forward", _rope))
        stack.enter_context(swapped(sys.modules[type(model).__module__], "compute_text_seq_len_from_mask", _text_len))
        out = model(hidden_states=tokens, img_shapes=[[(1, h // p, w // p)]], **kwargs)[0]
    out = out.reshape(b, h // p, w // p, -1, p, p).permute(0, 3, 1, 4, 2, 5)
    return (out.reshape(b, -1, h, w),)


def _packed(run, args, config):
    """QwenImagePipeline passes packed latents [batch, (h / 2) (w / 2), 4 c] with `img_shapes`: unpacked
    for the graph (its `_pack_latents` undone), the prediction packed back."""
    tokens, (_, hp, wp) = args["hidden_states"], args["img_shapes"][0][0]
    b, p = tokens.shape[0], config.patch_size
    latents = tokens.reshape(b, hp, wp, -1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, hp * p, wp * p)
    text = args["encoder_hidden_states"]
    mask = args.get("encoder_hidden_states_mask")
    out = run(hidden_states=latents, encoder_hidden_states=text, timestep=args["timestep"],
              encoder_hidden_states_mask=torch.ones(text.shape[:2], dtype=torch.int64) if mask is None else mask)
    pred = out["out_sample"]
    pred = pred.reshape(b, -1, hp, p, wp, p).permute(0, 2, 4, 1, 3, 5).reshape(b, hp * wp, -1)
    return (pred,)


TRANSFORMER = denoiser(
    "QwenImageTransformer2DModel",
    inputs=(
        TensorSpec("hidden_states", ("batch", Cfg(fn=lambda c: c.in_channels // c.patch_size ** 2), "height", "width"),
                   doc="noisy latents (unpacked)"),
        TensorSpec("encoder_hidden_states", ("batch", "text", Cfg("joint_attention_dim")),
                   doc="Qwen2.5-VL last hidden states, the prompt template's prefix dropped"),
        text_mask("the prompt tokens' attention mask", name="encoder_hidden_states_mask"),
        timestep(sample=sigmas, doc="the pipeline's timestep / 1000"),
    ),
    outputs=(prediction(("batch", Cfg("out_channels"), "height", "width"), doc="predicted velocity (unpacked)"),),
    graph_forward=_forward,
    pipeline_call=_packed,
    tiny=dict(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
              joint_attention_dim=32, axes_dims_rope=(2, 2, 4)),
)
EDIT_TINY = {"zero_cond_t": True}  # Qwen-Image-Edit-2511's transformer (earlier Edit configs equal Qwen-Image's)

QWEN_IMAGE = FamilySpec(
    name="qwen-image", mixin="QwenImageLoraLoaderMixin", pipeline="QwenImagePipeline",
    components={
        "transformer": TRANSFORMER,
        # the pipeline reads the language model's last hidden states; the vision tower stays unused
        "text_encoder": hf_encoder("text_encoder", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig",
                                   QWEN25_VL_TINY, output=("last_hidden_state", "hidden_states.-1")),
        # its causal 3D VAE (Wan's, per-channel latent statistics) on one frame: an image is one chunk
        **{c.name: c for c in vae(("batch", Cfg("z_dim"), 1, "height", "width"),
                                  ("batch", Cfg("input_channels"), 1, "image_height", "image_width"),
                                  dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                                       temperal_downsample=[False], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                       latents_std=[1.5, 0.8, 1.2, 2.0]),
                                  "AutoencoderKLQwenImage")[:1]},
    },
    scheduler=("FlowMatchEulerDiscreteScheduler", dict(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")),
    axes={
        **IMAGE_AXES,
        "batch": BATCH,
        "height": Axis(32, 128, 256, example=8, check=12),  # latents (pixels / 8), multiples of the patch size 2
        "width": Axis(32, 128, 256, example=12, check=6),
        "text": Axis(1, 256, 1058, example=6, check=9),  # prompt tokens (the template adds 34 to the encoder's)
    },
    namespaces=original_prefixes(lycoris=True),
    # every module a Qwen-Image LoRA may name (its attention names are Flux's and SD3's too)
    markers=(r"^transformer\.transformer_blocks\.\d+\.(attn|img_mlp|txt_mlp|img_mod|txt_mod)\.",
             r"^transformer\.(img_in|txt_in|proj_out|norm_out|time_text_embed)\b", r"\.(img|txt)_(mlp|mod)\."),
)

FAMILIES = (QWEN_IMAGE,)
