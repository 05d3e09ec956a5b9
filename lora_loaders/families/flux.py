"""FLUX.1 (`flux`): dev, schnell, Fill, Kontext and Control are configs of one FluxTransformer2DModel;
CLIP-L (pooled prompt) and T5 (prompt tokens).

Layouts: diffusers/PEFT (`transformer.`, `base_model.model.` anywhere: fal Kontext, SimpleTuner's
older `transformer.base_model.model.` files); BFL original names with `diffusion_model.`,
`model.diffusion_model.` or no prefix (ai-toolkit, ComfyUI, BFL Control, fal Kontext), in
`lora_A/B` or `lora_down/up`, with `diff` / `diff_b` and BFL Control's norm `scale`
replacements; kohya sd-scripts (`lora_unet_` over BFL names, `lora_te1_` CLIP, `lora_te3_` T5);
XLabs (`processor.qkv_lora1.down.weight`); `lora_transformer_` over diffusers names (OneTrainer,
civitai mixtures) with `lora_te1_` / `lora_te2_`; OneTrainer's OMI names (`lora_transformer.`
over BFL names with `qkv.0`, `lora_clip_l_`, `lora_t5_`); LyCORIS (`lycoris_`); ComfyUI's
`text_encoders.clip_l.transformer.` / `text_encoders.t5xxl.transformer.`.

BFL fuses what diffusers splits: `qkv` -> to_q / to_k / to_v, a single block's `linear1` ->
to_q / to_k / to_v / proj_mlp (1 : 1 : 1 : mlp_ratio); the final modulation is (shift, scale)
where diffusers has (scale, shift). Control LoRAs widen `img_in` (x_embedder) to twice the
latent channels: the loaders widen it (zero columns), an export records the wider input.
"""

from __future__ import annotations

import math

import torch

from .common import BATCH, IMAGE_AXES, T5_TINY, VAE_TINY, clip, hf_encoder, vae
from .spec import (IMAGE_TO_IMAGE, INPAINTING, TEXT_TO_IMAGE, Axis, Cfg, ComponentSpec, FamilySpec, Namespace,
                   NameTable, Rule, Split, TensorSpec, Variant)

_D = r"double_blocks\.(\d+)"
_S = r"single_blocks\.(\d+)"
_TB = r"transformer_blocks.\1"
_STB = r"single_transformer_blocks.\1"
_QKV = (f"{_TB}.attn.to_q", f"{_TB}.attn.to_k", f"{_TB}.attn.to_v")
_ADD_QKV = (f"{_TB}.attn.add_q_proj", f"{_TB}.attn.add_k_proj", f"{_TB}.attn.add_v_proj")
_S_QKV = (f"{_STB}.attn.to_q", f"{_STB}.attn.to_k", f"{_STB}.attn.to_v")

BFL = NameTable(rules=(
    # double blocks (BFL's DoubleStreamBlock)
    Rule(rf"{_D}\.img_attn\.qkv", Split(_QKV)),
    Rule(rf"{_D}\.txt_attn\.qkv", Split(_ADD_QKV)),
    Rule(rf"{_D}\.img_attn\.proj", f"{_TB}.attn.to_out.0"),
    Rule(rf"{_D}\.txt_attn\.proj", f"{_TB}.attn.to_add_out"),
    Rule(rf"{_D}\.img_attn\.norm\.query_norm(?:\.scale)?", f"{_TB}.attn.norm_q"),
    Rule(rf"{_D}\.img_attn\.norm\.key_norm(?:\.scale)?", f"{_TB}.attn.norm_k"),
    Rule(rf"{_D}\.txt_attn\.norm\.query_norm(?:\.scale)?", f"{_TB}.attn.norm_added_q"),
    Rule(rf"{_D}\.txt_attn\.norm\.key_norm(?:\.scale)?", f"{_TB}.attn.norm_added_k"),
    Rule(rf"{_D}\.img_mlp\.0", f"{_TB}.ff.net.0.proj"),
    Rule(rf"{_D}\.img_mlp\.2", f"{_TB}.ff.net.2"),
    Rule(rf"{_D}\.txt_mlp\.0", f"{_TB}.ff_context.net.0.proj"),
    Rule(rf"{_D}\.txt_mlp\.2", f"{_TB}.ff_context.net.2"),
    # (shift, scale, gate) x 2 in both BFL's Modulation and diffusers' AdaLayerNormZero
    Rule(rf"{_D}\.img_mod\.lin", f"{_TB}.norm1.linear"),
    Rule(rf"{_D}\.txt_mod\.lin", f"{_TB}.norm1_context.linear"),
    # single blocks (SingleStreamBlock): linear1 = qkv + mlp in, linear2 = attention + mlp out
    Rule(rf"{_S}\.linear1", Split((*_S_QKV, f"{_STB}.proj_mlp"), ratios=(1, 1, 1, 4))),
    Rule(rf"{_S}\.linear2", f"{_STB}.proj_out"),
    Rule(rf"{_S}\.modulation\.lin", f"{_STB}.norm.linear"),
    Rule(rf"{_S}\.norm\.query_norm(?:\.scale)?", f"{_STB}.attn.norm_q"),
    Rule(rf"{_S}\.norm\.key_norm(?:\.scale)?", f"{_STB}.attn.norm_k"),
    # XLabs' attention-processor LoRAs (x-flux): qkv adds to BFL's fused qkv / linear1's first rows
    Rule(rf"{_D}\.processor\.qkv_lora1", Split(_QKV)),
    Rule(rf"{_D}\.processor\.qkv_lora2", Split(_ADD_QKV)),
    Rule(rf"{_D}\.processor\.proj_lora1", f"{_TB}.attn.to_out.0"),
    Rule(rf"{_D}\.processor\.proj_lora2", f"{_TB}.attn.to_add_out"),
    Rule(rf"{_S}\.processor\.qkv_lora", Split(_S_QKV)),
    Rule(rf"{_S}\.processor\.proj_lora", f"{_STB}.proj_out"),
    # OneTrainer's OMI names: BFL names with the fused layers' parts numbered
    *(Rule(rf"{_D}\.img_attn\.qkv\.{i}", t) for i, t in enumerate(_QKV)),
    *(Rule(rf"{_D}\.txt_attn\.qkv\.{i}", t) for i, t in enumerate(_ADD_QKV)),
    *(Rule(rf"{_S}\.linear1\.{i}", t) for i, t in enumerate((*_S_QKV, f"{_STB}.proj_mlp"))),
    Rule(r"img_in(?:\.proj)?", "x_embedder"),
    Rule(r"txt_in", "context_embedder"),
    Rule(r"time_in\.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    Rule(r"time_in\.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    Rule(r"vector_in\.in_layer", "time_text_embed.text_embedder.linear_1"),
    Rule(r"vector_in\.out_layer", "time_text_embed.text_embedder.linear_2"),
    Rule(r"guidance_in\.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    Rule(r"guidance_in\.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    Rule(r"final_layer\.linear", "proj_out"),
    # BFL's LastLayer: (shift, scale); diffusers' AdaLayerNormContinuous: (scale, shift)
    Rule(r"final_layer\.adaLN_modulation\.1", Split(("norm_out.linear",), swap_halves=True)),
))


# ---- the transformer's graph ----

def _grid(n: int) -> tuple[int, int]:
    """The most nearly square h x w = n (packed latent rows and columns)."""
    h = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return h, n // h


def image_ids(shape, g, ctx) -> torch.Tensor:
    """(0, row, column[, 0]) per packed latent token, as FluxPipeline's `_prepare_latent_image_ids`
    (and Flux2Pipeline's `_prepare_latent_ids`, whose fourth axis is 0 for the latents)."""
    n, axes = shape
    h, w = _grid(n)
    ids = torch.zeros(n, axes)
    ids[:, 1] = torch.arange(h).repeat_interleave(w).float()
    ids[:, 2] = torch.arange(w).repeat(h).float()
    return ids


def unit_timesteps(shape, g, ctx) -> torch.Tensor:
    """Flow-matching sigmas in (0, 1]: the pipelines pass timestep / 1000."""
    return torch.rand(shape, generator=g) * 0.999 + 0.001


def guidance_scales(shape, g, ctx) -> torch.Tensor:
    return torch.rand(shape, generator=g) * 4 + 1


def out_channels(config) -> int:
    """proj_out's width: out_channels, else in_channels as built (a Control LoRA widens only the input)."""
    from ..widen import original

    return int(config.patch_size) ** 2 * int(config.out_channels or original(config, "in_channels"))


TRANSFORMER = ComponentSpec(
    name="transformer", library="diffusers", class_name="FluxTransformer2DModel", role="denoiser",
    inputs=(
        TensorSpec("hidden_states", ("batch", "image", Cfg("in_channels")),
                   doc="packed latents (2x2 patches of 16 channels; Fill / Control: with the condition "
                       "concatenated on channels; Kontext: with the reference image's tokens appended)"),
        TensorSpec("encoder_hidden_states", ("batch", "text", Cfg("joint_attention_dim")), doc="T5 hidden states"),
        TensorSpec("pooled_projections", ("batch", Cfg("pooled_projection_dim")), doc="CLIP-L pooled output"),
        TensorSpec("timestep", ("batch",), dtype="float32", sample=unit_timesteps, doc="sigma (timestep / 1000)"),
        TensorSpec("img_ids", ("image", 3), dtype="float32", sample=image_ids,
                   doc="(index, row, column) of each latent token (Kontext: index 1 for the reference image)"),
        TensorSpec("txt_ids", ("text", 3), dtype="float32", doc="zeros, one row per T5 token"),
        TensorSpec("guidance", ("batch",), dtype="float32", sample=guidance_scales,
                   when=lambda config: bool(config.guidance_embeds),
                   doc="guidance scale (guidance-distilled dev / Fill / Kontext / Control; schnell has none)"),
    ),
    outputs=(TensorSpec("out_sample", ("batch", "image", Cfg(fn=out_channels)), source="0",
                        doc="predicted velocity, packed"),),
    call_kwargs={"return_dict": False},
    tiny=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
              axes_dims_rope=(4, 6, 6)),
    # BFL Control LoRAs train img_in on the latents and the control image, concatenated
    widen={"x_embedder": "in_channels"},
)

_VAE_TINY = {**VAE_TINY, "shift_factor": 0.1159, "scaling_factor": 0.3611, "use_quant_conv": False,
             "use_post_quant_conv": False}


def _fill_tiny(vae: dict) -> dict:
    """FLUX.1 Fill's transformer over a VAE: its input is the packed latents, the packed masked-image
    latents (2 x 2 patches of latent channels each) and the packed mask (one channel per pixel of each
    2 x 2 latent patch: the VAE factor squared x 4); its output the latents' width (real: 384 in, 64 out)."""
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    packed = 4 * vae["latent_channels"]
    return {"in_channels": 2 * packed + 4 * factor ** 2, "out_channels": packed}


FLUX = FamilySpec(
    name="flux", mixin="FluxLoraLoaderMixin", pipeline="FluxPipeline",
    components={
        "transformer": TRANSFORMER,
        "text_encoder": clip("text_encoder", "CLIPTextModel", (("pooler_output", "pooler_output"),)),
        # diffusers' Flux mixin drops T5 LoRAs silently; sd-scripts (lora_te3_) and OneTrainer (lora_te2_) write them
        "text_encoder_2": hf_encoder("text_encoder_2", "T5EncoderModel", "T5Config", T5_TINY, lora=True),
        # 16 latent channels (tiny: 4), packed 2 x 2 into the transformer's tokens
        **{c.name: c for c in vae(("batch", Cfg("latent_channels"), "height", "width"),
                                  ("batch", Cfg("out_channels"), "image_height", "image_width"),
                                  _VAE_TINY)},
    },
    tasks={IMAGE_TO_IMAGE: ("FluxImg2ImgPipeline", "FluxKontextPipeline"),
           INPAINTING: ("FluxInpaintPipeline", "FluxFillPipeline", "FluxKontextInpaintPipeline")},
    variants={
        # FLUX.1 Fill: inpainting only, the mask and masked image concatenated on the latents' channels
        "fill": Variant("FluxFillPipeline", tiny={"transformer": _fill_tiny(_VAE_TINY)},
                        tasks={INPAINTING: "FluxFillPipeline"}),
        # FLUX.1 Kontext: dev's transformer; the reference image's tokens follow the latents' on the image
        # axis (img_ids index 1), so a Kontext call has up to twice the tokens of its size
        "kontext": Variant("FluxKontextPipeline", tasks={TEXT_TO_IMAGE: "FluxPipeline",
                                                          IMAGE_TO_IMAGE: "FluxKontextPipeline",
                                                          INPAINTING: "FluxKontextInpaintPipeline"}),
    },
    scheduler=("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                       base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                       max_image_seq_len=4096)),
    axes={
        **IMAGE_AXES,
        "batch": BATCH,
        "height": Axis(32, 128, 256, example=16, check=24),  # the VAE's latents (pixels / 8)
        "width": Axis(32, 128, 256, example=16, check=20),
        # packed latent tokens, (height / 16) x (width / 16); Kontext appends the reference image's
        "image": Axis(16, 4096, 16384, example=12, check=20),
        "text": Axis(1, 512, 512, example=8, check=6),  # T5 tokens (dev 512, schnell 256)
    },
    namespaces=(
        Namespace("transformer.", "transformer", table=BFL),
        Namespace("diffusion_model.", "transformer", table=BFL, format="original"),
        Namespace("model.diffusion_model.", "transformer", table=BFL, format="original"),
        Namespace("lora_unet_", "transformer", flat=True, table=BFL, format="kohya"),
        Namespace("lora_transformer_", "transformer", flat=True, table=BFL, format="onetrainer"),
        Namespace("lora_transformer.", "transformer", table=BFL, format="onetrainer"),
        Namespace("lycoris_", "transformer", flat=True, table=BFL, format="lycoris"),
        Namespace("lora_te_", "text_encoder", flat=True, format="kohya"),
        Namespace("lora_te1_", "text_encoder", flat=True, format="kohya"),
        Namespace("lora_te2_", "text_encoder_2", flat=True, format="kohya"),
        Namespace("lora_te3_", "text_encoder_2", flat=True, format="kohya"),
        Namespace("lora_clip_l_", "text_encoder", flat=True, format="onetrainer"),
        Namespace("lora_t5_", "text_encoder_2", flat=True, format="onetrainer"),
        Namespace("text_encoders.clip_l.transformer.", "text_encoder", format="comfyui"),
        Namespace("text_encoders.t5xxl.transformer.", "text_encoder_2", format="comfyui"),
    ),
    fuse_default=("transformer",), unfuse_default=("transformer", "text_encoder"),
    markers=(r"^transformer\.single_transformer_blocks\.\d+\.(proj_mlp|norm\.linear|attn\.to_[qkv])",
             r"^transformer\.x_embedder", r"^transformer\.time_text_embed\.guidance_embedder",
             (r"^transformer\.transformer_blocks\.\d+\.(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)"
              r"|ff(_context)?\.net|norm1(_context)?\.linear)"), r"^text_encoder_2\.encoder\.block\.",
             # BFL's own names, as families without Flux's table keep them (for "looks like a LoRA for" hints)
             r"double_blocks\.\d+\.(img|txt)_(attn|mlp|mod)", r"single_blocks\.\d+\.(linear[12]|modulation)"),
)

FAMILIES = (FLUX,)
