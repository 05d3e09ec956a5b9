"""FLUX.2 (`flux2`): Flux2Transformer2DModel and its Mistral Small 3.1 text encoder
(Mistral3ForConditionalGeneration, intermediate layers' hidden states), diffusers' Flux2Pipeline.

Layouts: diffusers/PEFT (`transformer.`, `base_model.model.` anywhere); BFL names under
`diffusion_model.` (ai-toolkit, ComfyUI) in `lora_A/B` or `lora_down/up`, with LoKr and
`diff` / `diff_b`; kohya (`lora_unet_` over BFL names); diffusers names under `diffusion_model.`
(some exports, with the legacy `sformer_blocks.` alias); LyCORIS LoKr (`lycoris_` + flattened
diffusers names); SimpleTuner's bare dotted diffusers names.

BFL fuses a double block's q, k, v (`qkv`, split here); a single block's `linear1` / `linear2`
are diffusers' fused `to_qkv_mlp_proj` / `to_out` as they are. The final modulation is
(shift, scale) where diffusers has (scale, shift).
"""

from __future__ import annotations

import dataclasses

import torch

from .common import BATCH, IMAGE_AXES, VAE_TINY, hf_encoder, vae
from .flux import guidance_scales, image_ids, unit_timesteps
from .spec import Axis, Cfg, ComponentSpec, FamilySpec, Namespace, NameTable, Rule, Split, TensorSpec

_D = r"double_blocks\.(\d+)"
_S = r"single_blocks\.(\d+)"
_TB = r"transformer_blocks.\1"
_STB = r"single_transformer_blocks.\1"

BFL = NameTable(rules=(
    Rule(rf"{_D}\.img_attn\.qkv", Split((f"{_TB}.attn.to_q", f"{_TB}.attn.to_k", f"{_TB}.attn.to_v"))),
    Rule(rf"{_D}\.txt_attn\.qkv", Split((f"{_TB}.attn.add_q_proj", f"{_TB}.attn.add_k_proj", f"{_TB}.attn.add_v_proj"))),
    Rule(rf"{_D}\.img_attn\.proj", f"{_TB}.attn.to_out.0"),
    Rule(rf"{_D}\.txt_attn\.proj", f"{_TB}.attn.to_add_out"),
    Rule(rf"{_D}\.img_attn\.norm\.query_norm(?:\.scale)?", f"{_TB}.attn.norm_q"),
    Rule(rf"{_D}\.img_attn\.norm\.key_norm(?:\.scale)?", f"{_TB}.attn.norm_k"),
    Rule(rf"{_D}\.txt_attn\.norm\.query_norm(?:\.scale)?", f"{_TB}.attn.norm_added_q"),
    Rule(rf"{_D}\.txt_attn\.norm\.key_norm(?:\.scale)?", f"{_TB}.attn.norm_added_k"),
    Rule(rf"{_D}\.img_mlp\.0", f"{_TB}.ff.linear_in"),  # SwiGLU (gate, value) halves in both
    Rule(rf"{_D}\.img_mlp\.2", f"{_TB}.ff.linear_out"),
    Rule(rf"{_D}\.txt_mlp\.0", f"{_TB}.ff_context.linear_in"),
    Rule(rf"{_D}\.txt_mlp\.2", f"{_TB}.ff_context.linear_out"),
    Rule(rf"{_S}\.linear1", f"{_STB}.attn.to_qkv_mlp_proj"),
    Rule(rf"{_S}\.linear2", f"{_STB}.attn.to_out"),
    Rule(rf"{_S}\.norm\.query_norm(?:\.scale)?", f"{_STB}.attn.norm_q"),
    Rule(rf"{_S}\.norm\.key_norm(?:\.scale)?", f"{_STB}.attn.norm_k"),
    Rule(r"sformer_blocks\.(\d+)\.(.+)", r"transformer_blocks.\1.\2"),  # a legacy export's spelling
    Rule(r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.lin", r"\1.linear"),
    Rule(r"img_in", "x_embedder"),
    Rule(r"txt_in", "context_embedder"),
    Rule(r"time_in\.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
    Rule(r"time_in\.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
    Rule(r"guidance_in\.in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
    Rule(r"guidance_in\.out_layer", "time_guidance_embed.guidance_embedder.linear_2"),
    Rule(r"final_layer\.linear", "proj_out"),
    # BFL's LastLayer: (shift, scale); diffusers' AdaLayerNormContinuous: (scale, shift), as its checkpoint converter swaps
    Rule(r"final_layer\.adaLN_modulation\.1", Split(("norm_out.linear",), swap_halves=True)),
))


def text_ids(shape, g, ctx) -> torch.Tensor:
    """(0, 0, 0, token index), as Flux2Pipeline's `_prepare_text_ids`."""
    ids = torch.zeros(shape)
    ids[:, 3] = torch.arange(shape[0]).float()
    return ids


def _out(config) -> int:
    return int(config.patch_size) ** 2 * int(config.out_channels or config.in_channels)


TRANSFORMER = ComponentSpec(
    name="transformer", library="diffusers", class_name="Flux2Transformer2DModel", role="denoiser",
    inputs=(
        TensorSpec("hidden_states", ("batch", "image", Cfg("in_channels")),
                   doc="packed latents (reference images' tokens appended for editing)"),
        TensorSpec("encoder_hidden_states", ("batch", "text", Cfg("joint_attention_dim")),
                   doc="the text encoder's prompt embeddings (text_encoder's output)"),
        TensorSpec("timestep", ("batch",), dtype="float32", sample=unit_timesteps, doc="sigma (timestep / 1000)"),
        TensorSpec("img_ids", ("image", 4), dtype="float32", sample=image_ids,
                   doc="(t, row, column, l) per latent token (as Flux2Pipeline's `_prepare_latent_ids`)"),
        TensorSpec("txt_ids", ("text", 4), dtype="float32", sample=text_ids, doc="(0, 0, 0, index) per text token"),
        TensorSpec("guidance", ("batch",), dtype="float32", sample=guidance_scales,
                   when=lambda config: bool(config.guidance_embeds), doc="guidance scale (guidance-distilled models)"),
    ),
    outputs=(TensorSpec("out_sample", ("batch", "image", Cfg(fn=_out)), source="0", doc="predicted velocity, packed"),),
    call_kwargs={"return_dict": False},
    tiny=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32, mlp_ratio=3.0,
              axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True),
)


def prompt_layers(config) -> tuple[int, ...]:
    """The layers whose hidden states make the prompt embeddings: Flux2Pipeline's (10, 20, 30) of Mistral
    Small's 40 (and Klein's (9, 18, 27) of Qwen3's 36): a quarter, half and three quarters of the way."""
    n = int(config.text_config.num_hidden_layers)
    return n // 4, n // 2, 3 * n // 4


def _prompt_embeds(model, kwargs):
    """Flux2Pipeline's `_get_mistral_3_small_prompt_embeds`: those layers, side by side per token (the
    language model's head, unused, left out of the graph)."""
    out = model.model(**kwargs).hidden_states
    stacked = torch.stack([out[k] for k in prompt_layers(model.config)], dim=1)
    b, n, seq, hidden = stacked.shape
    return (stacked.permute(0, 2, 1, 3).reshape(b, seq, n * hidden),)


def _layer_states(values, config):
    """What Flux2Pipeline reads from its text encoder (`hidden_states[k]` of those layers), taken
    back apart from the graph's side-by-side output."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    layers = prompt_layers(config)
    hidden = [None] * (int(config.text_config.num_hidden_layers) + 1)
    for k, part in zip(layers, values["prompt_embeds"].unflatten(-1, (len(layers), -1)).unbind(-2)):
        hidden[k] = part
    return BaseModelOutputWithPast(hidden_states=tuple(hidden))


_MISTRAL = hf_encoder("text_encoder", "Mistral3ForConditionalGeneration", "Mistral3Config", dict(
    text_config=dict(model_type="mistral", vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0),
    vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, head_dim=8, image_size=28, patch_size=14),
    image_token_index=10, spatial_merge_size=2, tie_word_embeddings=False), mask=True)
TEXT_ENCODER = dataclasses.replace(
    _MISTRAL, graph_forward=_prompt_embeds, pipeline_output=_layer_states, call_kwargs={"output_hidden_states": True, "use_cache": False,
                                                         "return_dict": True},
    outputs=(TensorSpec("prompt_embeds", ("batch", "text", Cfg(fn=lambda c: 3 * c.text_config.hidden_size)), source="0",
                        doc="hidden states of three intermediate layers, side by side per token"),))

FLUX2 = FamilySpec(
    name="flux2", mixin="Flux2LoraLoaderMixin", pipeline="Flux2Pipeline",
    pipeline_kwargs=lambda pipe: {"text_encoder_out_layers": prompt_layers(pipe.text_encoder.config)},
    components={
        "transformer": TRANSFORMER,
        "text_encoder": TEXT_ENCODER,
        **{c.name: c for c in vae(("batch", Cfg("latent_channels"), "height", "width"),
                                  ("batch", Cfg("out_channels"), "image_height", "image_width"), VAE_TINY,
                                  class_name="AutoencoderKLFlux2", state=("bn.running_mean", "bn.running_var"))},
    },
    # the same pipeline edits: reference `image`(s), VAE-encoded (vae_encoder), their tokens appended to the
    # transformer's `image` sequence
    tasks={"image-to-image": ("Flux2Pipeline",)},
    scheduler=("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                       base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                       max_image_seq_len=4096)),
    axes={
        **IMAGE_AXES,
        "batch": BATCH,
        "image": Axis(16, 4096, 16384, example=12, check=20),  # latent tokens, (height / 16) x (width / 16) and references
        "text": Axis(1, 512, 512, example=8, check=6),  # text encoder tokens
        "height": Axis(32, 128, 256, example=16, check=24),  # the VAE's latents
        "width": Axis(32, 128, 256, example=16, check=20),
    },
    namespaces=(
        Namespace("transformer.", "transformer", table=BFL),
        Namespace("diffusion_model.", "transformer", table=BFL, format="original"),
        Namespace("lora_unet_", "transformer", flat=True, table=BFL, format="kohya"),
        Namespace("lycoris_", "transformer", flat=True, table=BFL, format="lycoris"),
    ),
    markers=(r"^transformer\.single_transformer_blocks\.\d+\.attn\.to_qkv_mlp_proj", r"_stream_modulation_",
             r"^transformer\.time_guidance_embed", r"^transformer\.transformer_blocks\.\d+\.ff(_context)?\.linear_",
             r"single_blocks\.\d+\.linear[12]", r"double_blocks\.\d+\.(img|txt)_(attn|mlp)",
             # Linear modules it shares with FLUX.1: a file touching only those may be for FLUX.2 too
             r"^transformer\.(x_embedder|context_embedder|proj_out|norm_out\.linear)$",
             r"^transformer\.transformer_blocks\.\d+\.attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)$"),
)

FAMILIES = (FLUX2,)
