"""AuraFlow (`auraflow`): an MMDiT then single-stream DiT transformer, UMT5 (pile-t5), SDXL's VAE.

Layouts: diffusers/PEFT under `transformer.` (diffusers' and SimpleTuner's trainers; ComfyUI
reads AuraFlow LoRAs in no other layout), or without a prefix. The transformer takes no text
mask (the pipeline zeroes padded UMT5 states), so the text encoder's graph takes it.
"""

from __future__ import annotations

import math

from .common import (BATCH, IMAGE_AXES, LATENTS, T5_TINY, VAE_TINY, denoiser, hf_encoder, image_vae, position_grid,
                     prediction, sigmas, timestep)
from .spec import Axis, Cfg, FamilySpec, TensorSpec

TRANSFORMER = denoiser(
    "AuraFlowTransformer2DModel",
    inputs=(
        TensorSpec("hidden_states", LATENTS, doc="noisy latents"),
        TensorSpec("encoder_hidden_states", ("batch", "text", Cfg("joint_attention_dim")),
                   doc="UMT5 hidden states, padded tokens zeroed"),
        timestep(sample=sigmas, doc="flow-matching timestep / 1000"),
    ),
    outputs=(prediction(("batch", Cfg("out_channels"), "height", "width")),),
    tiny=dict(sample_size=32, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
              out_channels=4, pos_embed_max_size=256),
    # the learned positions: a sqrt(pos_embed_max_size)-patch square, centred crops of it
    bounds=position_grid("pos_embed_max_size", lambda c: math.isqrt(c.pos_embed_max_size)),
)

AURAFLOW = FamilySpec(
    name="auraflow", mixin="AuraFlowLoraLoaderMixin", pipeline="AuraFlowPipeline",
    components={
        "transformer": TRANSFORMER,
        "text_encoder": hf_encoder("text_encoder", "UMT5EncoderModel", "UMT5Config", T5_TINY, mask=True),
        **image_vae({**VAE_TINY, "scaling_factor": 0.13025}),
    },
    scheduler=("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=1.73)),
    axes={
        **IMAGE_AXES,
        "batch": BATCH,
        "height": Axis(32, 128, 192, example=16, check=24),  # latents (pixels / 8), multiples of the patch size 2;
        "width": Axis(32, 128, 192, example=16, check=20),  # the position table covers 96 x 96 patches
        "text": Axis(1, 256, 256, example=8, check=12),  # UMT5 tokens
    },
    markers=(r"joint_transformer_blocks", r"^transformer\.time_step_proj", r"\.ff(_context)?\.out_projection"),
)

FAMILIES = (AURAFLOW,)
