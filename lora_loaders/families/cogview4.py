"""CogView4 (`cogview4`): a DiT with 2-D RoPE and size conditioning, GLM-4 (its second-last
hidden states), a 16-channel VAE.

Layouts: diffusers/PEFT under `transformer.` (diffusers' and finetrainers' trainers), or
without a prefix.
"""

from __future__ import annotations

import torch

from .common import BATCH, IMAGE_AXES, LATENTS, VAE_TINY, denoiser, hf_encoder, image_vae, prediction, timestep
from .spec import Axis, Cfg, FamilySpec, TensorSpec


def _size(shape, g, ctx) -> torch.Tensor:
    return torch.tensor([1024.0, 1024.0]).expand(shape).clone()  # (height, width) in pixels, as the pipeline sets it


def _zeros(shape, g, ctx) -> torch.Tensor:
    return torch.zeros(shape)


TRANSFORMER = denoiser(
    "CogView4Transformer2DModel",
    inputs=(
        TensorSpec("hidden_states", LATENTS, doc="noisy latents"),
        TensorSpec("encoder_hidden_states", ("batch", "text", Cfg("text_embed_dim")), doc="GLM's second-last states"),
        timestep(),
        TensorSpec("original_size", ("batch", 2), sample=_size, doc="(height, width) of the original image"),
        TensorSpec("target_size", ("batch", 2), sample=_size, doc="(height, width) of the generated image"),
        TensorSpec("crop_coords", ("batch", 2), sample=_zeros, doc="(top, left) crop coordinates"),
    ),
    outputs=(prediction(("batch", Cfg("out_channels"), "height", "width")),),
    tiny=dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
              text_embed_dim=32, time_embed_dim=16, condition_dim=8),
)

GLM_TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1)

COGVIEW4 = FamilySpec(
    name="cogview4", mixin="CogView4LoraLoaderMixin", pipeline="CogView4Pipeline",
    components={
        "transformer": TRANSFORMER,
        "text_encoder": hf_encoder("text_encoder", "GlmModel", "GlmConfig", GLM_TINY,
                                   output=("hidden_states", "hidden_states.-2")),
        **image_vae(VAE_TINY),
    },
    scheduler=("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, use_dynamic_shifting=True,
                                                       base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                       time_shift_type="linear")),
    axes={
        **IMAGE_AXES,
        "batch": BATCH,
        "height": Axis(32, 128, 256, example=16, check=24),  # latents (pixels / 8), multiples of the patch size 2
        "width": Axis(32, 128, 256, example=16, check=20),
        "text": Axis(1, 256, 1024, example=8, check=12),  # GLM tokens (the pipeline pads to a multiple of 16)
    },
    markers=(r"^transformer\.time_condition_embed", r"^transformer\.patch_embed\.text_proj"),
)

FAMILIES = (COGVIEW4,)
