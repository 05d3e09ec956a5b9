"""Sana (`sana`): a linear-attention DiT (GLU conv feed-forward), Gemma 2, the DC-AE (32x) VAE.

Layouts: diffusers/PEFT under `transformer.` (diffusers' `train_dreambooth_lora_sana`,
SimpleTuner), or without a prefix. Only the VAE's decoder is exported: DC-AE encodes to a
latent, not the distribution `vae_encoder` describes.
"""

from __future__ import annotations

from .common import (BATCH, GEMMA2_TINY, IMAGE_AXES, LATENTS, OUT_CHANNELS, denoiser, hf_encoder, image_vae, prediction,
                     text_mask, timestep)
from .spec import Axis, Cfg, FamilySpec, TensorSpec

TRANSFORMER = denoiser(
    "SanaTransformer2DModel",
    inputs=(
        TensorSpec("hidden_states", LATENTS, doc="noisy latents"),
        TensorSpec("encoder_hidden_states", ("batch", "text", Cfg("caption_channels")), doc="Gemma 2 hidden states"),
        timestep(doc="timestep (x timestep_scale)"),
        text_mask("the Gemma tokens' attention mask"),
    ),
    outputs=(prediction(("batch", OUT_CHANNELS, "height", "width"), doc="predicted flow"),),
    tiny=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
              num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
              sample_size=16, patch_size=1, qk_norm="rms_norm_across_heads"),  # Sana 1.5's q/k norms
)

DC_AE_TINY = dict(in_channels=3, latent_channels=4, attention_head_dim=8,
                  encoder_block_types=("ResBlock", "EfficientViTBlock"),
                  decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 16),
                  decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                  encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                  upsample_block_type="interpolate", downsample_block_type="Conv", scaling_factor=0.41407)

SANA = FamilySpec(
    name="sana", mixin="SanaLoraLoaderMixin", pipeline="SanaPipeline",
    components={
        "transformer": TRANSFORMER,
        "text_encoder": hf_encoder("text_encoder", "Gemma2Model", "Gemma2Config",
                                   {**GEMMA2_TINY, "num_hidden_layers": 1}, seq="prompt", mask=True),
        **image_vae(DC_AE_TINY, "AutoencoderDC", encoder=False,
                    image=("batch", Cfg("in_channels"), "image_height", "image_width")),
    },
    scheduler=("DPMSolverMultistepScheduler", dict(num_train_timesteps=1000, prediction_type="flow_prediction",
                                                   use_flow_sigmas=True, flow_shift=3.0)),
    axes={
        **IMAGE_AXES,
        "batch": BATCH,
        "height": Axis(8, 32, 128, example=6, check=12),  # latents (pixels / 32)
        "width": Axis(8, 32, 128, example=4, check=10),
        "text": Axis(1, 300, 300, example=8, check=12),  # Gemma tokens the transformer reads
        # what the text encoder reads: the pipeline's complex human instruction, then up to 300 prompt tokens
        "prompt": Axis(1, 300, 2048, example=8, check=12),
    },
    markers=(r"^transformer\.caption_projection", r"\.ff\.conv_(inverted|depth|point)", r"^transformer\.caption_norm"),
)

FAMILIES = (SANA,)
