"""Stable Diffusion 3 / 3.5 (`sd3`): an MMDiT transformer, CLIP-L and CLIP-G with projection, T5.

Layouts: diffusers/PEFT; kohya sd-scripts (`lora_unet_` over the original MMDiT names,
fused `qkv`, `lora_te1_` / `lora_te2_` / `lora_te3_` for CLIP-L, CLIP-G and T5); LyCORIS
(`lycoris_` over diffusers names, as SimpleTuner writes for SD3.5); ComfyUI's
`diffusion_model.` over the original names.
"""

from __future__ import annotations

import re

from .common import BATCH, IMAGE_AXES, T5_TINY, VAE_TINY, clip, hf_encoder, position_grid, timesteps, vae
from .spec import Axis, Cfg, ComponentSpec, FamilySpec, NameTable, Namespace, Rule, Split, TensorSpec

_B = r"joint_blocks\.(\d+)"
_T = r"transformer_blocks.\1"


def _context_modulation(name: str, flat: bool, ctx):
    """The last block's context side is AdaLayerNormContinuous: (scale, shift) where the original has (shift, scale)."""
    m = re.fullmatch(r"joint_blocks[._](\d+)[._]context_block[._]adaLN_modulation[._]1", name)
    if m is None:
        return None
    last = ctx.count(r"transformer_blocks\.(\d+)\.", 0) - 1
    if last < 0:  # no model at hand: the file's last block
        last = max(int(b) for n in ctx.file_names if (b := _block(n)) is not None)
    target = f"transformer_blocks.{m.group(1)}.norm1_context.linear"
    return Split((target,), swap_halves=True) if int(m.group(1)) == last else target


def _block(name: str) -> str | None:
    m = re.match(r"joint_blocks[._](\d+)[._]", name)
    return m.group(1) if m else None


ORIGINAL = NameTable(fn=_context_modulation, rules=(
    Rule(rf"{_B}\.x_block\.attn\.qkv", Split((f"{_T}.attn.to_q", f"{_T}.attn.to_k", f"{_T}.attn.to_v"))),
    Rule(rf"{_B}\.context_block\.attn\.qkv",
         Split((f"{_T}.attn.add_q_proj", f"{_T}.attn.add_k_proj", f"{_T}.attn.add_v_proj"))),
    Rule(rf"{_B}\.x_block\.attn2\.qkv", Split((f"{_T}.attn2.to_q", f"{_T}.attn2.to_k", f"{_T}.attn2.to_v"))),
    Rule(rf"{_B}\.x_block\.attn\.proj", f"{_T}.attn.to_out.0"),
    Rule(rf"{_B}\.x_block\.attn2\.proj", f"{_T}.attn2.to_out.0"),
    Rule(rf"{_B}\.context_block\.attn\.proj", f"{_T}.attn.to_add_out"),
    Rule(rf"{_B}\.x_block\.attn\.ln_(q|k)", rf"{_T}.attn.norm_\2"),
    Rule(rf"{_B}\.x_block\.attn2\.ln_(q|k)", rf"{_T}.attn2.norm_\2"),
    Rule(rf"{_B}\.context_block\.attn\.ln_(q|k)", rf"{_T}.attn.norm_added_\2"),
    Rule(rf"{_B}\.x_block\.mlp\.fc1", f"{_T}.ff.net.0.proj"),
    Rule(rf"{_B}\.x_block\.mlp\.fc2", f"{_T}.ff.net.2"),
    Rule(rf"{_B}\.context_block\.mlp\.fc1", f"{_T}.ff_context.net.0.proj"),
    Rule(rf"{_B}\.context_block\.mlp\.fc2", f"{_T}.ff_context.net.2"),
    Rule(rf"{_B}\.x_block\.adaLN_modulation\.1", f"{_T}.norm1.linear"),
    Rule(r"x_embedder\.proj", "pos_embed.proj"),
    Rule(r"t_embedder\.mlp\.0", "time_text_embed.timestep_embedder.linear_1"),
    Rule(r"t_embedder\.mlp\.2", "time_text_embed.timestep_embedder.linear_2"),
    Rule(r"y_embedder\.mlp\.0", "time_text_embed.text_embedder.linear_1"),
    Rule(r"y_embedder\.mlp\.2", "time_text_embed.text_embedder.linear_2"),
    Rule(r"context_embedder", "context_embedder"),
    Rule(r"final_layer\.linear", "proj_out"),
    Rule(r"final_layer\.adaLN_modulation\.1", Split(("norm_out.linear",), swap_halves=True)),
))

TRANSFORMER = ComponentSpec(
    name="transformer", library="diffusers", class_name="SD3Transformer2DModel", role="denoiser",
    inputs=(
        TensorSpec("hidden_states", ("batch", Cfg("in_channels"), "height", "width"), doc="noisy latents"),
        TensorSpec("encoder_hidden_states", ("batch", "context", Cfg("joint_attention_dim")),
                   doc="CLIP-L + CLIP-G hidden states (zero-padded to the T5 width), then T5's, along the sequence"),
        TensorSpec("pooled_projections", ("batch", Cfg("pooled_projection_dim")),
                   doc="CLIP-L and CLIP-G pooled embeddings, concatenated"),
        TensorSpec("timestep", ("batch",), dtype="float32", sample=timesteps, doc="flow-matching timestep x 1000"),
    ),
    outputs=(TensorSpec("out_sample", ("batch", Cfg("out_channels"), "height", "width"), source="0",
                        doc="predicted velocity"),),
    call_kwargs={"return_dict": False},
    # 16 latent channels as the real one's: StableDiffusion3InpaintPipeline takes no other width
    tiny=dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
              joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
              pos_embed_max_size=96, dual_attention_layers=(0,), qk_norm="rms_norm"),
    bounds=position_grid("pos_embed_max_size", lambda c: c.pos_embed_max_size),  # cropped from that square
)

_CLIP_OUT = (("text_embeds", "text_embeds"), ("hidden_states", "hidden_states.-2"))

SD3 = FamilySpec(
    name="sd3", mixin="SD3LoraLoaderMixin", pipeline="StableDiffusion3Pipeline",
    components={
        "transformer": TRANSFORMER,
        "text_encoder": clip("text_encoder", "CLIPTextModelWithProjection", _CLIP_OUT),
        "text_encoder_2": clip("text_encoder_2", "CLIPTextModelWithProjection", _CLIP_OUT),
        # diffusers' SD3 mixin does not load T5 LoRAs; sd-scripts writes them (`lora_te3_`), so we do.
        "text_encoder_3": hf_encoder("text_encoder_3", "T5EncoderModel", "T5Config", T5_TINY, lora=True),
        **{c.name: c for c in vae(("batch", Cfg("latent_channels"), "height", "width"),
                                  ("batch", Cfg("out_channels"), "image_height", "image_width"),
                                  {**VAE_TINY, "shift_factor": 0.0609, "scaling_factor": 1.5305,
                                   "latent_channels": 16})},
    },
    scheduler=("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0)),
    tasks={"image-to-image": ("StableDiffusion3Img2ImgPipeline",), "inpainting": ("StableDiffusion3InpaintPipeline",)},
    axes={
        **IMAGE_AXES,
        "batch": BATCH,
        "height": Axis(32, 128, 192, example=16, check=24),  # latents (pixels / 8), multiples of the patch size 2
        "width": Axis(32, 128, 192, example=16, check=20),
        "text": Axis(1, 256, 512, example=8, check=12),  # T5 tokens
        "context": Axis(78, 333, 589, example=10, check=14),  # 77 CLIP tokens + T5 tokens
    },
    namespaces=(
        Namespace("lora_unet_", "transformer", flat=True, table=ORIGINAL, format="kohya"),
        Namespace("lora_te1_", "text_encoder", flat=True, format="kohya"),
        Namespace("lora_te2_", "text_encoder_2", flat=True, format="kohya"),
        Namespace("lora_te3_", "text_encoder_3", flat=True, format="kohya"),
        Namespace("lycoris_", "transformer", flat=True, table=ORIGINAL, format="lycoris"),
        Namespace("diffusion_model.", "transformer", table=ORIGINAL, format="original"),
        Namespace("transformer.", "transformer", table=ORIGINAL),
    ),
    markers=(r"^transformer\.transformer_blocks\.\d+\.attn\.(add_[qkv]_proj|to_add_out)", r"context_embedder",
             r"^transformer\.pos_embed", r"norm1_context", r"^transformer\.transformer_blocks\.\d+\.ff_context",
             r"^text_encoder_3\."),
)

FAMILIES = (SD3,)
