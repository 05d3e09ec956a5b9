"""Kandinsky 5 (`kandinsky`): a text-encoder + visual-decoder video DiT (`transformer`), Qwen2.5-VL's
text path (`text_encoder`: its last hidden state) and CLIP-L (`text_encoder_2`: pooled); HunyuanVideo's
VAE (`video_vae.hunyuan_vae`).

Layouts: diffusers/PEFT under `transformer.` (diffusers' Kandinsky mixin reads no other).

The graph takes latents as the pipeline holds them, channels last ([batch, frames, height,
width, channels], with the visual condition and its mask concatenated for `visual_cond`
models). The RoPE positions and the resolution-dependent RoPE scale are the pipeline's
(`visual_rope_pos`, `text_rope_pos`, `_get_scale_factor`), derived from the shapes inside the
graph (at the VAE's 8x spatial compression). Sparse (nabla) attention is not exported.

Image-to-video (`Kandinsky5I2VPipeline`) runs the same transformer: the image's latents replace the
first frame (the VAE encoder, `vae_encoder`, exported with `--tasks image-to-video`).
"""

from __future__ import annotations

import torch

from .video_vae import HUNYUAN_VAE_TINY, hunyuan_vae
from .common import BATCH, CLIP_TINY, QWEN25_VL_TINY, clip, hf_encoder, timestep
from .spec import IMAGE_TO_VIDEO, Axis, Cfg, ComponentSpec, FamilySpec, TensorSpec


def _rope(model, kwargs):
    _, frames, height, width, _ = kwargs["hidden_states"].shape
    _, ph, pw = model.config.patch_size
    kwargs["visual_rope_pos"] = [torch.arange(frames), torch.arange(height // ph), torch.arange(width // pw)]
    kwargs["text_rope_pos"] = torch.arange(kwargs["encoder_hidden_states"].shape[1])
    pixels = [torch.scalar_tensor(n * 8, dtype=torch.float32) for n in (height, width)]
    sd = (480 <= pixels[0]) & (pixels[0] <= 854) & (480 <= pixels[1]) & (pixels[1] <= 854)
    spatial = torch.where(sd, torch.tensor(2.0), torch.tensor(3.16))  # (1, 2, 2) within 480p, else (1, 3.16, 3.16)
    kwargs["scale_factor"] = (1.0, spatial, spatial)
    return kwargs


TRANSFORMER = ComponentSpec(
    name="transformer", library="diffusers", class_name="Kandinsky5Transformer3DModel", role="denoiser",
    inputs=(
        TensorSpec("hidden_states", ("batch", "frames", "height", "width",
                                     Cfg(fn=lambda c: 2 * c.in_visual_dim + 1 if c.visual_cond else c.in_visual_dim)),
                   doc="noisy latents, channels last (visual_cond models: + condition latents + condition mask)"),
        TensorSpec("encoder_hidden_states", ("batch", "text", Cfg("in_text_dim")),
                   doc="Qwen2.5-VL last hidden states (prompt template cropped)"),
        timestep(),
        TensorSpec("pooled_projections", ("batch", Cfg("in_text_dim2")), doc="CLIP pooler output"),
    ),
    outputs=(TensorSpec("out_sample", ("batch", "frames", "height", "width", Cfg("out_visual_dim")), source="sample",
                        doc="predicted velocity, channels last"),),
    call_kwargs={"return_dict": True},  # return_dict=False returns the bare tensor, not a tuple
    prepare=_rope,
    computed=("visual_rope_pos", "text_rope_pos", "scale_factor"),  # the pipeline's, which `_rope` computes alike
    tiny=dict(in_visual_dim=4, in_text_dim=32, in_text_dim2=32, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
              model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=1, axes_dims=(4, 6, 6), visual_cond=True),
)

KANDINSKY = FamilySpec(
    name="kandinsky", mixin="KandinskyLoraLoaderMixin", pipeline="Kandinsky5T2VPipeline",
    components={
        "transformer": TRANSFORMER,
        "text_encoder": hf_encoder("text_encoder", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig",
                                   QWEN25_VL_TINY, output=("hidden_states", "hidden_states.-1"), seq="prompt"),
        "text_encoder_2": clip("text_encoder_2", "CLIPTextModel", (("pooler_output", "pooler_output"),), lora=False,
                               tiny=CLIP_TINY),
        **hunyuan_vae(HUNYUAN_VAE_TINY),
    },
    scheduler=("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=5.0)),  # Kandinsky 5's (5 s)
    axes={
        "batch": BATCH,
        "frames": Axis(1, 31, 61, example=3, check=2),  # latent frames: 1 + (121 video frames - 1) / 4; 10 s: 61
        "height": Axis(16, 64, 128, example=8, check=12),  # latents (pixels / 8), multiples of the patch size 2
        "width": Axis(16, 96, 128, example=8, check=10),
        "text": Axis(1, 256, 256, example=8, check=12),  # Qwen tokens after the prompt template
        "prompt": Axis(1, 384, 384, example=8, check=12),  # Qwen tokens with it: the template's 128 + 256
    },
    markers=(r"^transformer\.(visual|text)_transformer_blocks\.",),
    # the same models: the image's latents as the first frame (and, `visual_cond`, its condition channels);
    # the VAE encoder (`vae_encoder`) exported for it
    tasks={IMAGE_TO_VIDEO: ("Kandinsky5I2VPipeline",)},
)

FAMILIES = (KANDINSKY,)
