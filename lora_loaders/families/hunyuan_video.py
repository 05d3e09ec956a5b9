"""HunyuanVideo (`hunyuan-video`): a dual/single-stream video DiT (`transformer`), LLaVA-Llama-3's Llama
text path (`text_encoder`, the pipeline's hidden_states[-3]) and CLIP-L (`text_encoder_2`, pooled);
its VAE decodes as diffusers' does (`video_vae.hunyuan_vae`: one graph per pass, diffusers' windows).

Layouts: diffusers/PEFT; Tencent's original names (`double_blocks`, `single_blocks`, the `txt_in`
token refiner, `final_layer`) under `diffusion_model.`, `transformer.` or none, `lora_A/B` or
`lora_down/up` (ComfyUI, musubi's `convert_lora.py`); musubi-tuner's kohya names (`lora_unet_`).
Fused originals split by output rows: `img_attn_qkv`, `txt_attn_qkv`, the refiner's `self_attn_qkv`
-> q / k / v, `linear1` -> q / k / v / proj_mlp (1 : 1 : 1 : mlp_ratio); the final modulation's
(shift, scale) rows are diffusers' (scale, shift): only output rows are permuted.
"""

from __future__ import annotations

import re

from .video_vae import HUNYUAN_VAE_TINY, hunyuan_vae
from .common import (BATCH, CLIP_TINY, LLAMA_TINY, VIDEO_LATENTS, clip, denoiser, hf_encoder, original_prefixes,
                     prediction, text_mask, timestep, timesteps)
from .spec import Axis, Cfg, FamilySpec, NameTable, Rule, Split, TensorSpec

_D, _TB = r"double_blocks\.(\d+)", r"transformer_blocks.\1"
_S, _STB = r"single_blocks\.(\d+)", r"single_transformer_blocks.\1"
_R, _RB = r"txt_in\.individual_token_refiner\.blocks\.(\d+)", r"context_embedder.token_refiner.refiner_blocks.\1"
_EMB = {"time_in.mlp.0": "time_text_embed.timestep_embedder.linear_1",
        "time_in.mlp.2": "time_text_embed.timestep_embedder.linear_2",
        "guidance_in.mlp.0": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.mlp.2": "time_text_embed.guidance_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "txt_in.input_embedder": "context_embedder.proj_in",
        "txt_in.t_embedder.mlp.0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
        "txt_in.t_embedder.mlp.2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
        "txt_in.c_embedder.linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
        "txt_in.c_embedder.linear_2": "context_embedder.time_text_embed.text_embedder.linear_2",
        "img_in.proj": "x_embedder.proj", "final_layer.linear": "proj_out"}
_BLOCK = {"img_attn_proj": "attn.to_out.0", "txt_attn_proj": "attn.to_add_out", "img_mod.linear": "norm1.linear",
          "txt_mod.linear": "norm1_context.linear", "img_mlp.fc1": "ff.net.0.proj", "img_mlp.fc2": "ff.net.2",
          "txt_mlp.fc1": "ff_context.net.0.proj", "txt_mlp.fc2": "ff_context.net.2", "img_attn_q_norm": "attn.norm_q",
          "img_attn_k_norm": "attn.norm_k", "txt_attn_q_norm": "attn.norm_added_q", "txt_attn_k_norm": "attn.norm_added_k"}
_SINGLE = {"linear2": "proj_out", "modulation.linear": "norm.linear", "q_norm": "attn.norm_q", "k_norm": "attn.norm_k"}
_REFINER = {"self_attn_proj": "attn.to_out.0", "norm1": "norm1", "norm2": "norm2", "mlp.fc1": "ff.net.0.proj",
            "mlp.fc2": "ff.net.2", "adaLN_modulation.1": "norm_out.linear"}


def _qkv(prefix: str, names=("to_q", "to_k", "to_v")) -> tuple[str, ...]:
    return tuple(f"{prefix}.attn.{n}" for n in names)


ORIGINAL = NameTable(rules=(
    Rule(rf"{_D}\.img_attn_qkv", Split(_qkv(_TB))),
    Rule(rf"{_D}\.txt_attn_qkv", Split(_qkv(_TB, ("add_q_proj", "add_k_proj", "add_v_proj")))),
    Rule(rf"{_S}\.linear1", Split((*_qkv(_STB), f"{_STB}.proj_mlp"), ratios=(1, 1, 1, 4))),
    Rule(rf"{_R}\.self_attn_qkv", Split(_qkv(_RB))),
    Rule(r"final_layer\.adaLN_modulation\.1", Split(("norm_out.linear",), swap_halves=True)),
    *(Rule(rf"{block}\.{re.escape(k)}", f"{to}.{v}")
      for block, to, table in ((_D, _TB, _BLOCK), (_S, _STB, _SINGLE), (_R, _RB, _REFINER)) for k, v in table.items()),
    *(Rule(re.escape(k), v) for k, v in _EMB.items()),
))

TRANSFORMER = denoiser(
    "HunyuanVideoTransformer3DModel",
    inputs=(
        TensorSpec("hidden_states", VIDEO_LATENTS, doc="noisy latents"),
        timestep(),
        TensorSpec("encoder_hidden_states", ("batch", "text", Cfg("text_embed_dim")),
                   doc="Llama hidden states (the pipeline's hidden_states[-3], prompt template cropped)"),
        text_mask("the Llama tokens' attention mask"),
        TensorSpec("pooled_projections", ("batch", Cfg("pooled_projection_dim")), doc="CLIP-L pooler output"),
        TensorSpec("guidance", ("batch",), dtype="float32", sample=timesteps, when=lambda c: c.guidance_embeds,
                   doc="guidance scale x 1000 (guidance-distilled models)"),
    ),
    outputs=(prediction(("batch", Cfg("out_channels"), "frames", "height", "width")),),
    tiny=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
              num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
              pooled_projection_dim=32, rope_axes_dim=(2, 2, 4)),
)

HUNYUAN_VIDEO = FamilySpec(
    name="hunyuan-video", mixin="HunyuanVideoLoraLoaderMixin", pipeline="HunyuanVideoPipeline",
    components={
        "transformer": TRANSFORMER,
        # the pipeline passes the tokenizer's mask (it pads the prompt to max_length)
        "text_encoder": hf_encoder("text_encoder", "LlamaModel", "LlamaConfig", {**LLAMA_TINY, "num_hidden_layers": 3},
                                   output=("hidden_states", "hidden_states.-3"), seq="prompt", mask=True),
        "text_encoder_2": clip("text_encoder_2", "CLIPTextModel", (("pooler_output", "pooler_output"),), lora=False,
                               tiny=CLIP_TINY),
        **hunyuan_vae(HUNYUAN_VAE_TINY),
    },
    scheduler=("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=7.0)),  # HunyuanVideo's
    axes={
        "batch": BATCH,
        "frames": Axis(1, 33, 33, example=3, check=2),  # latent frames: 1 + (129 video frames - 1) / 4
        "height": Axis(16, 90, 90, example=8, check=12),  # latents (pixels / 8), multiples of the patch size 2
        "width": Axis(16, 160, 160, example=8, check=10),
        "text": Axis(1, 256, 256, example=8, check=12),  # Llama tokens after the prompt template
        "prompt": Axis(1, 351, 351, example=8, check=12),  # Llama tokens with it: the template's 95 + 256
    },
    namespaces=original_prefixes(ORIGINAL),
    # Flux's block names (a subset of Flux's markers: no other family's file gains a hit), then what only
    # HunyuanVideo has.
    markers=(r"^transformer\.single_transformer_blocks\.\d+\.(proj_mlp|norm\.linear|attn\.to_[qkv])",
             (r"^transformer\.transformer_blocks\.\d+\.(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)"
              r"|ff(_context)?\.net|norm1(_context)?\.linear)"),
             r"^transformer\.context_embedder\.token_refiner", r"^transformer\.x_embedder\.proj$"),
)

FAMILIES = (HUNYUAN_VIDEO,)
