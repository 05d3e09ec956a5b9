"""aMUSEd (`amused`): a masked-token U-ViT over VQ-GAN codes (`transformer`, UVit2DModel) and CLIP-L
with projection (`text_encoder`); both take LoRAs.

Layouts: diffusers/PEFT (`transformer.`, `text_encoder.`, as diffusers' aMUSEd training script
saves them); kohya-style flat names (`lora_unet_` / `lora_transformer_`, `lora_te_` / `lora_te1_`).
diffusers' AmusedLoraLoaderMixin subclasses the SD mixin: its `load_lora_weights` and `fuse_lora`
look for a `unet` and fail on an aMUSEd pipeline; here both components load and fuse by default.
"""

from __future__ import annotations

import torch

from .common import BATCH, CLIP_TINY, clip
from .spec import Axis, Cfg, ComponentSpec, FamilySpec, Namespace, TensorSpec


def _codes(shape, g, ctx):
    """VQ codes, some replaced by the mask token (the vocabulary's last id), as during sampling."""
    vocab = ctx.config.vocab_size
    codes = torch.randint(0, ctx.config.codebook_size, shape, generator=g)
    return torch.where(torch.rand(shape, generator=g) < 0.5, torch.full(shape, vocab - 1), codes)


def _micro_conds(shape, g, ctx):
    return torch.tensor([256.0, 256.0, 0.0, 0.0, 6.0]).repeat(shape[0], 1)  # width, height, crop, aesthetic score


TRANSFORMER = ComponentSpec(
    name="transformer", library="diffusers", class_name="UVit2DModel", role="denoiser",
    inputs=(
        TensorSpec("input_ids", ("batch", "height", "width"), dtype="int64", sample=_codes,
                   doc="VQ codes of the image tokens, masked ones = vocab_size - 1"),
        TensorSpec("encoder_hidden_states", ("batch", 77, Cfg("encoder_hidden_size")),
                   doc="CLIP's second-to-last hidden states"),
        TensorSpec("pooled_text_emb", ("batch", Cfg("cond_embed_dim")), doc="CLIP's text_embeds"),
        TensorSpec("micro_conds", ("batch", 5), sample=_micro_conds,
                   doc="original width, height, crop top, left, aesthetic score"),
    ),
    outputs=(TensorSpec("logits", ("batch", Cfg("codebook_size"), "height", "width"), source="0",
                        doc="logits over the codebook per image token"),),
    graph_forward=lambda model, kwargs: (model(**kwargs),),  # the forward returns the tensor itself
    tiny=dict(hidden_size=32, cond_embed_dim=32, micro_cond_encode_dim=4, micro_cond_embed_dim=20,
              encoder_hidden_size=32, vocab_size=34, codebook_size=32, in_channels=16, block_out_channels=16,
              num_res_blocks=1, block_num_heads=2, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
              sample_size=8),
)

AMUSED = FamilySpec(
    name="amused", mixin="AmusedLoraLoaderMixin", pipeline="AmusedPipeline",
    components={
        "transformer": TRANSFORMER,
        "text_encoder": clip("text_encoder", "CLIPTextModelWithProjection",
                             (("text_embeds", "text_embeds"), ("hidden_states", "hidden_states.-2")), tiny=CLIP_TINY),
    },
    axes={
        "batch": BATCH,
        "height": Axis(8, 32, 64, example=8, check=6),  # VQ tokens (pixels / 16): 16 at 256 px, 32 at 512 px
        "width": Axis(8, 32, 64, example=6, check=10),
    },
    namespaces=(
        Namespace("lora_unet_", "transformer", flat=True, format="kohya"),
        Namespace("lora_transformer_", "transformer", flat=True, format="kohya"),
        Namespace("lora_te_", "text_encoder", flat=True, format="kohya"),
        Namespace("lora_te1_", "text_encoder", flat=True, format="kohya"),
    ),
    markers=(r"^transformer\.(mlm_layer|cond_embed|encoder_proj|embed|down_block|up_block|project_)",
             r"^transformer\.transformer_layers\."),
)

FAMILIES = (AMUSED,)
