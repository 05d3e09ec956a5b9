"""HunyuanVideo (`hunyuan-video`): a dual/single-stream video DiT (`transformer`), LLaVA-Llama-3's Llama
text path (`text_encoder`, the pipeline's hidden_states[-3]) and CLIP-L (`text_encoder_2`, pooled);
its VAE decodes as diffusers' does (`video_vae.hunyuan_vae`: one graph per pass, diffusers' windows).

Layouts: diffusers/PEFT; Tencent's original names (`double_blocks`, `single_blocks`, the `txt_in`
token refiner, `final_layer`) under `diffusion_model.`, `transformer.` or none, `lora_A/B` or
`lora_down/up` (ComfyUI, musubi's `convert_lora.py`); musubi-tuner's kohya names (`lora_unet_`).
Fused originals split by output rows: `img_attn_qkv`, `txt_attn_qkv`, the refiner's `self_attn_qkv`
-> q / k / v, `linear1` -> q / k / v / proj_mlp (1 : 1 : 1 : mlp_ratio); the final modulation's
(shift, scale) rows are diffusers' (scale, shift): only output rows are permuted.

Image-to-video: SkyReels-V1 I2V (`HunyuanSkyreelsImageToVideoPipeline`, `--model tiny:skyreels-i2v`) runs
the same text encoders with the image's latents concatenated to the transformer's input (the VAE
encoder, `vae_encoder`, exported with `--tasks image-to-video`). HunyuanVideo-I2V
(`HunyuanVideoImageToVideoPipeline`) is a family of its own, `hunyuan-video-i2v`: its text encoder is
LLaVA (another class than `LlamaModel`), which takes the image too; same LoRA names.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from .video_vae import HUNYUAN_VAE_TINY, hunyuan_vae
from .common import (BATCH, CLIP_TINY, LLAMA_TINY, VIDEO_LATENTS, clip, denoiser, hf_encoder, original_prefixes,
                     prediction, prefix_mask, text_mask, timestep, timesteps)
from .spec import (IMAGE_TO_VIDEO, Axis, Cfg, ComponentSpec, FamilySpec, NameTable, Processor, Rule, Split, TensorSpec,
                   Variant)

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
    # SkyReels-V1 I2V: the same text encoders and VAE; the transformer takes the noisy latents with the
    # image's latents (first frame, zeros after) concatenated on channels, so twice the latent channels in
    tasks={IMAGE_TO_VIDEO: ("HunyuanSkyreelsImageToVideoPipeline",)},
    variants={"skyreels-i2v": Variant("HunyuanSkyreelsImageToVideoPipeline",
                                      tiny={"transformer": {"in_channels": 2 * HUNYUAN_VAE_TINY["latent_channels"]}},
                                      tasks={IMAGE_TO_VIDEO: "HunyuanSkyreelsImageToVideoPipeline"})},
)


# -- HunyuanVideo-I2V (`hunyuan-video-i2v`) -------------------------------------------------------
#
# HunyuanVideoImageToVideoPipeline's text encoder is LLaVA-Llama-3 whole (LlavaForConditionalGeneration):
# the image's CLIP features (576 of them) take the place of the prompt template's `<image>` token, and
# the pipeline keeps every other one of them ahead of the prompt's tokens. A model of another class
# than hunyuan-video's LlamaModel, hence a family of its own over the same transformer names.

# the tiny tokenizer: the byte-level tiny one's 514 ids, then the special tokens the pipeline's template
# holds and crops around; "system" and "\n\n" are one token each, as in Llama-3's, so that `<image>` is
# the template's token 5 (the pipeline's `image_emb_start`)
I2V_TOKENS = ("<image>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
I2V_WORDS = ("system", "\n\n")
IMAGE_TOKEN, PAD_TOKEN = 514, 513  # "<image>"; the tiny tokenizer's pad (its end of text)
# the tiny vision tower makes the real one's 576 features (24 x 24 patches), which the template assumes
LLAVA_TINY = dict(
    text_config={**LLAMA_TINY, "num_hidden_layers": 3, "pad_token_id": PAD_TOKEN},
    vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, image_size=24, patch_size=1, projection_dim=16),
    image_token_index=IMAGE_TOKEN, pad_token_id=PAD_TOKEN, projector_hidden_act="gelu",
)


def _tiny_tokenizer(path, tiny_tokenizer) -> None:
    """The tiny tokenizer with the template's special tokens (see I2V_TOKENS)."""
    from transformers import AddedToken

    tok = tiny_tokenizer(path)
    tok.add_tokens([AddedToken(t, normalized=False, special=True) for t in I2V_TOKENS])
    tok.add_tokens([AddedToken(t, normalized=False) for t in I2V_WORDS])
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_TOKEN
    tok.save_pretrained(path)


def _llava_forward(model, kwargs):
    """LLaVA's forward without its data-dependent checks (the count of image tokens against the
    features, `list(features)`), which do not trace: the vision tower's selected layer, the projector, the
    features scattered over the `<image>` tokens, then the language model at the positions the pipeline
    passes (the mask's cumulative sum, computed here from the mask)."""
    cfg = model.config
    ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
    inner = model.model
    embeds = inner.get_input_embeddings()(ids)
    vision = inner.vision_tower(kwargs["pixel_values"], output_hidden_states=True, return_dict=True)
    features = vision.hidden_states[cfg.vision_feature_layer]
    if cfg.vision_feature_select_strategy == "default":
        features = features[:, 1:]
    features = inner.multi_modal_projector(features).reshape(-1, embeds.shape[-1]).to(embeds.dtype)
    image = (ids == cfg.image_token_index).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(image, features)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return inner.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                output_hidden_states=True, return_dict=True)


def _image_ids(shape, g, ctx) -> torch.Tensor:
    """Token ids with a few `<image>` tokens after the first (the graph scatters the image's features there)."""
    ids = torch.randint(0, IMAGE_TOKEN - 2, shape, generator=g)
    ids[..., 1:3] = ctx.config.image_token_index
    return ids


def _pixel_size(c) -> int:
    return c.vision_config.image_size


LLAVA = ComponentSpec(
    name="text_encoder", library="transformers", class_name="LlavaForConditionalGeneration", role="text_encoder",
    lora=False, tiny=LLAVA_TINY, config_class="LlavaConfig", tokenizer="tokenizer", graph_forward=_llava_forward,
    inputs=(TensorSpec("input_ids", ("batch", "prompt"), dtype="int64", sample=_image_ids,
                       doc="the template's tokens, `<image>` expanded to one per image feature"),
            TensorSpec("attention_mask", ("batch", "prompt"), dtype="int64", sample=prefix_mask,
                       doc="the pipeline's mask (1 where the ids are not padding)"),
            TensorSpec("pixel_values", ("batch", 3, Cfg(fn=_pixel_size), Cfg(fn=_pixel_size)),
                       doc="the image processor's pixels of the condition image")),
    outputs=(TensorSpec("hidden_states", ("batch", "prompt", Cfg(fn=lambda c: c.text_config.hidden_size)),
                        source="hidden_states.-3", doc="the third-last hidden state, as the pipeline takes it"),),
    computed=("position_ids",),  # the pipeline's, from the mask: the graph computes them alike
)

HUNYUAN_VIDEO_I2V = FamilySpec(
    name="hunyuan-video-i2v", mixin="HunyuanVideoLoraLoaderMixin", pipeline="HunyuanVideoImageToVideoPipeline",
    default=IMAGE_TO_VIDEO,
    components={
        # HunyuanVideo-I2V-33ch's: the noisy latents, the image's latents and their mask on channels
        "transformer": replace(TRANSFORMER, tiny={**TRANSFORMER.tiny, "image_condition_type": "latent_concat",
                                                  "in_channels": 2 * HUNYUAN_VAE_TINY["latent_channels"] + 1,
                                                  "guidance_embeds": False}),
        "text_encoder": LLAVA,
        "text_encoder_2": HUNYUAN_VIDEO.components["text_encoder_2"],
        # the VAE encoder is this family's default export: its one pipeline encodes the image
        **{n: replace(c, export=True, tasks=()) for n, c in hunyuan_vae(HUNYUAN_VAE_TINY).items()},
    },
    scheduler=HUNYUAN_VIDEO.scheduler,
    axes={
        **HUNYUAN_VIDEO.axes,
        # the image's 576 / 2 features, then the prompt's tokens (256 at most by default, more with the
        # pipeline's `max_sequence_length`)
        "text": Axis(1, 544, 1024, example=8, check=12),
        # LLaVA's: the template's 103 + 256 prompt tokens, `<image>` expanded to 576
        "prompt": Axis(1, 934, 1536, example=8, check=12),
    },
    # the tiny tokenizer (written over the plain tiny one the text encoder's `tokenizer` gets) with the
    # template's tokens; LLaVA's image processor at the tiny vision tower's 24 pixels
    processors={"tokenizer": Processor("transformers", "CLIPTokenizer", write=_tiny_tokenizer),
                "image_processor": Processor("transformers", "CLIPImageProcessor",
                                             dict(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}))},
    namespaces=HUNYUAN_VIDEO.namespaces,
    # hunyuan-video's: its LoRA files have the same transformer names (a guess from names alone names
    # hunyuan-video, the first; a file given to this family is taken as it is)
    markers=HUNYUAN_VIDEO.markers,
)

FAMILIES = (HUNYUAN_VIDEO, HUNYUAN_VIDEO_I2V)
