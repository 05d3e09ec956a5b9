"""aMUSEd (`amused`): a masked-token U-ViT over VQ-GAN codes (`transformer`, UVit2DModel) and CLIP-L
with projection (`text_encoder`); both take LoRAs.

Layouts: diffusers/PEFT (`transformer.`, `text_encoder.`, as diffusers' aMUSEd training script
saves them); kohya-style flat names (`lora_unet_` / `lora_transformer_`, `lora_te_` / `lora_te1_`).
diffusers' AmusedLoraLoaderMixin subclasses the SD mixin: its `load_lora_weights` and `fuse_lora`
look for a `unet` and fail on an aMUSEd pipeline; here both components load and fuse by default.
"""

from __future__ import annotations

import torch

from .common import BATCH, CLIP_TINY, IMAGE_AXES, clip
from .spec import IMAGE_TO_IMAGE, INPAINTING, Axis, Cfg, ComponentSpec, FamilySpec, Namespace, TensorSpec


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
    pipeline_output=lambda values, config: values["logits"],  # and the pipeline reads it so
    tiny=dict(hidden_size=32, cond_embed_dim=32, micro_cond_encode_dim=4, micro_cond_embed_dim=20,
              encoder_hidden_size=32, vocab_size=34, codebook_size=32, in_channels=16, block_out_channels=16,
              num_res_blocks=1, block_num_heads=2, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
              sample_size=8),
)

def _vq_codes(shape, g, ctx):
    return torch.randint(0, ctx.config.num_vq_embeddings, shape, generator=g)


def _decode(model, kwargs):
    """VQModel.decode as the pipeline calls it: codes looked up in the codebook (`shape` from the codes')."""
    h = kwargs["h"]
    return model.decode(h, force_not_quantize=True, return_dict=False, shape=(*h.shape, model.config.latent_channels))


# The VQ-GAN decoder: VQ codes [batch, height, width] -> pixels in [0, 1] (the pipeline clips them)
VQ_DECODER = ComponentSpec(
    name="vae_decoder", library="diffusers", class_name="VQModel", role="vae", lora=False, subfolder="vqvae",
    method="decode",
    inputs=(TensorSpec("h", ("batch", "height", "width"), dtype="int64", sample=_vq_codes, doc="VQ codes"),),
    outputs=(TensorSpec("sample", ("batch", Cfg("out_channels"), "image_height", "image_width"), source="0",
                        doc="pixels, about [0, 1]"),),
    graph_forward=_decode,
    tiny=dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
              latent_channels=4, norm_num_groups=8, num_vq_embeddings=32, sample_size=16, lookup_from_codebook=True,
              mid_block_add_attention=False, force_upcast=True),
)

def _encoded(values, config):
    """What the pipelines read from `vqvae.encode`: its `.latents` (they quantize them to codes themselves,
    with `vqvae.quantize` over the codebook saved beside the engine)."""
    from diffusers.models.autoencoders.vq_model import VQEncoderOutput

    return VQEncoderOutput(latents=values["latents"])


# The VQ-GAN encoder, for image-to-image and inpainting: pixels in [0, 1] -> latents before quantization;
# AmusedImg2ImgPipeline / AmusedInpaintPipeline call `vqvae.quantize(latents)` for the codes, which runs
# on the host over the codebook (`pipeline_state`)
VQ_ENCODER = ComponentSpec(
    name="vae_encoder", library="diffusers", class_name="VQModel", role="vae", lora=False, subfolder="vqvae",
    method="encode", export=False, tasks=(IMAGE_TO_IMAGE, INPAINTING), call_kwargs={"return_dict": False},
    inputs=(TensorSpec("sample", ("batch", Cfg("in_channels"), "image_height", "image_width"), arg="x",
                       doc="pixels in [0, 1] (the pipelines do not normalize)"),),
    outputs=(TensorSpec("latents", ("batch", Cfg(fn=lambda c: c.vq_embed_dim or c.latent_channels), "height", "width"),
                        source="0", doc="latents before quantization, one per VQ token"),),
    pipeline_output=_encoded, pipeline_state=("quantize.embedding.weight",), tiny=VQ_DECODER.tiny,
)

AMUSED = FamilySpec(
    name="amused", mixin="AmusedLoraLoaderMixin", pipeline="AmusedPipeline",
    components={
        "transformer": TRANSFORMER,
        "text_encoder": clip("text_encoder", "CLIPTextModelWithProjection",
                             (("text_embeds", "text_embeds"), ("hidden_states", "hidden_states.-2")), tiny=CLIP_TINY),
        "vae_decoder": VQ_DECODER,
        "vae_encoder": VQ_ENCODER,
    },
    tasks={"image-to-image": ("AmusedImg2ImgPipeline",), "inpainting": ("AmusedInpaintPipeline",)},
    # the mask token: the transformer's last id (tiny vocab_size 34)
    scheduler=("AmusedScheduler", dict(mask_token_id=33, masking_schedule="cosine")),
    generator_lists=False,  # AmusedPipeline seeds its sampling from one generator
    axes={
        **IMAGE_AXES,
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
