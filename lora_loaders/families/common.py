"""Pieces several family entries share: text encoders, example-value samplers, axes."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from types import FunctionType, ModuleType
from typing import Any

import torch

from .spec import IMAGE_TO_IMAGE, IMAGE_TO_VIDEO, INPAINTING, Axis, Bound, Cfg, ComponentSpec, Namespace, NameTable, TensorSpec

CLIP_SEQ = Cfg(fn=lambda c: min(77, c.max_position_embeddings))
BATCH = Axis(1, 2, 8, example=2, check=1)
LATENTS = ("batch", Cfg("in_channels"), "height", "width")  # a denoiser's image latents
VIDEO_LATENTS = ("batch", Cfg("in_channels"), "frames", "height", "width")
OUT_CHANNELS = Cfg(fn=lambda c: c.out_channels or c.in_channels)  # configs where out_channels may be None


def timesteps(shape, g, ctx) -> torch.Tensor:
    """Integer-valued diffusion timesteps in [0, 999], as float32."""
    return (torch.rand(shape, generator=g) * 999).round()


def token_ids(shape, g, ctx) -> torch.Tensor:
    """Token ids inside the model's vocabulary, the last one the end-of-text token when it fits."""
    cfg = _text(ctx.config)
    vocab = int(cfg.vocab_size)
    ids = torch.randint(0, vocab, shape, generator=g)
    eos = getattr(cfg, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    # A config whose eos_token_id lies outside the vocabulary (seen in exported CLIP configs)
    # would index past the embedding table.
    ids[..., -1] = eos if isinstance(eos, int) and 0 <= eos < vocab else vocab - 1
    return ids


def prefix_mask(shape, g, ctx) -> torch.Tensor:
    """A tokenizer's attention mask: each row 1 for its first 1..n tokens (right padding), then 0."""
    lengths = torch.randint(1, shape[-1] + 1, shape[:-1], generator=g)
    return (torch.arange(shape[-1]) < lengths[..., None]).long()


def sigmas(shape, g, ctx) -> torch.Tensor:
    """Flow-matching sigmas in [0, 1], for denoisers that take the timestep / 1000."""
    return torch.rand(shape, generator=g)


def denoiser(class_name: str, inputs, outputs, name: str = "transformer", **kw) -> ComponentSpec:
    """A diffusers denoiser (the `transformer` unless named) whose forward is called with `return_dict=False`."""
    kw.setdefault("call_kwargs", {"return_dict": False})
    return ComponentSpec(name=name, library="diffusers", class_name=class_name, role="denoiser",
                         inputs=tuple(inputs), outputs=tuple(outputs), **kw)


def position_grid(field: str, side: Callable[[Any], int]) -> dict[str, Bound]:
    """Bounds on the height and width axes (latents) from a square table of patch positions:
    `side(config)` patches a side, times the patch size (configs without the field: none)."""
    largest = Cfg(fn=lambda c: side(c) * c.patch_size)
    has = lambda c: getattr(c, field, None) is not None  # noqa: E731
    return {"height": Bound(field, max=largest, when=has), "width": Bound(field, max=largest, when=has)}


def rope_table(field: str, **axes: Callable[[Any], int]) -> dict[str, Bound]:
    """Bounds from a table of rotary frequencies with a fixed number of positions per axis:
    {axis: config -> the largest size (latents, tokens) it covers}."""
    return {name: Bound(field, max=Cfg(fn=fn)) for name, fn in axes.items()}


def timestep(name: str = "timestep", doc: str = "flow-matching timestep x 1000", sample=timesteps) -> TensorSpec:
    """A per-sample float32 timestep (default: integer-valued in [0, 999])."""
    return TensorSpec(name, ("batch",), dtype="float32", sample=sample, doc=doc)


def text_mask(doc: str, name: str = "encoder_attention_mask") -> TensorSpec:
    """A tokenizer's attention mask [batch, text] (right padding)."""
    return TensorSpec(name, ("batch", "text"), dtype="int64", sample=prefix_mask, doc=doc)


def prediction(dims: tuple, doc: str = "predicted velocity", source: str = "0") -> TensorSpec:
    """A denoiser's first output, `out_sample`."""
    return TensorSpec("out_sample", dims, source=source, doc=doc)


def original_prefixes(table: NameTable | None = None, kohya: bool = True, lycoris: bool = False,
                      component: str = "transformer") -> tuple[Namespace, ...]:
    """The prefixes a DiT's community LoRAs come under, each read through `table` (original-checkpoint
    names -> diffusers'): `diffusion_model.` (ComfyUI and most trainers), `<component>.` (diffusers'
    prefix, which files also put over original names), with `kohya`: sd-scripts / musubi-tuner's flat
    `lora_unet_`, with `lycoris`: LyCORIS' flat `lycoris_`."""
    return (Namespace("diffusion_model.", component, table=table, format="original"),
            Namespace(f"{component}.", component, table=table),
            *((Namespace("lora_unet_", component, flat=True, table=table, format="kohya"),) if kohya else ()),
            *((Namespace("lycoris_", component, flat=True, table=table, format="lycoris"),) if lycoris else ()))


@contextmanager
def swapped(owner, name: str, value):
    """`owner.name = value` for the duration of a graph_forward call (a function set on an object
    becomes its method; other values are set as they are): swaps a model's code that torch.export
    cannot trace for an equivalent."""
    bound = value.__get__(owner) if isinstance(value, FunctionType) and not isinstance(owner, ModuleType) else value
    own = name in vars(owner) or (isinstance(owner, torch.nn.Module) and name in owner._modules)
    old = getattr(owner, name) if own else None
    setattr(owner, name, bound)
    try:
        yield
    finally:
        if own:
            setattr(owner, name, old)
        else:
            delattr(owner, name)


def clip(name: str, class_name: str, outputs: tuple[tuple[str, str], ...], lora: bool = True,
         tiny: dict | None = None, tokenizer: str | None = None, seq: Cfg = CLIP_SEQ,
         padded: str = "padded to 77") -> ComponentSpec:
    """A CLIP text encoder: `input_ids` [batch, seq] (77 tokens unless the pipeline pads to more)
    -> `outputs` ((name, source), ...)."""
    dims = {"last_hidden_state": ("batch", seq, Cfg("hidden_size")),
            "hidden_states": ("batch", seq, Cfg("hidden_size")),
            "pooler_output": ("batch", Cfg("hidden_size")),
            "text_embeds": ("batch", Cfg("projection_dim"))}
    return ComponentSpec(
        name=name, library="transformers", class_name=class_name, role="text_encoder", lora=lora,
        inputs=(TensorSpec("input_ids", ("batch", seq), dtype="int64", sample=token_ids,
                           doc=f"token ids from the family's CLIP tokenizer, {padded}"),),
        outputs=tuple(TensorSpec(n, dims[n], source=s) for n, s in outputs),
        call_kwargs={"output_hidden_states": True, "return_dict": True},
        tiny=tiny or CLIP_TINY, config_class="CLIPTextConfig", aliases=("text_model.",),
        tokenizer=tokenizer or name.replace("text_encoder", "tokenizer"),
        # attention-processor era text-encoder names (`to_q_lora`) -> CLIP's
        renames=((r"\.self_attn\.to_(q|k|v)$", r".self_attn.\1_proj"), (r"\.self_attn\.to_out\.0$", ".self_attn.out_proj")),
    )


def hf_encoder(name: str, class_name: str, config_class: str, tiny: dict, seq: str = "text",
               lora: bool = False, tokenizer: str | None = None,
               output: tuple[str, str] = ("last_hidden_state", "last_hidden_state"),
               mask: bool = False) -> ComponentSpec:
    """A Hugging Face text encoder (T5, UMT5, Gemma, Qwen, ...): `input_ids` [batch, seq] -> last hidden state,
    or the hidden state a pipeline takes (`output=("hidden_states", "hidden_states.-3")`).
    `mask`: the graph also takes the tokenizer's `attention_mask`, for pipelines that pass it."""
    hidden = output[1].startswith("hidden_states")
    masks = (TensorSpec("attention_mask", ("batch", seq), dtype="int64", sample=prefix_mask,
                        doc="the tokenizer's attention mask"),) if mask else ()
    return ComponentSpec(
        name=name, library="transformers", class_name=class_name, role="text_encoder", lora=lora,
        inputs=(TensorSpec("input_ids", ("batch", seq), dtype="int64", sample=token_ids,
                           doc="token ids from the family's tokenizer"), *masks),
        outputs=(TensorSpec(output[0], ("batch", seq, Cfg(fn=_hidden)), source=output[1]),),
        call_kwargs={"return_dict": True, **({"output_hidden_states": True} if hidden else {})}, tiny=tiny,
        config_class=config_class,
        tokenizer=tokenizer or name.replace("text_encoder", "tokenizer"),
    )


def vae(latent: tuple, image: tuple, tiny: dict, class_name: str = "AutoencoderKL",
        state: tuple[str, ...] = ()) -> tuple[ComponentSpec, ...]:
    """The VAE's two halves as components of their own (both from the `vae` folder): `vae_decoder`
    (latents -> pixels in [-1, 1], exported by default) and `vae_encoder` (pixels -> the latent
    distribution's mean and log-variance, for image-to-image; exported on request).

    latent / image: dims of the latents (as the denoiser takes them) and of the pixels; state: the
    VAE's tensors the pipeline reads itself (`ComponentSpec.pipeline_state`)."""
    return (
        ComponentSpec(
            name="vae_decoder", library="diffusers", class_name=class_name, role="vae", lora=False, subfolder="vae",
            method="decode", call_kwargs={"return_dict": False}, tiny=tiny, pipeline_state=state,
            inputs=(TensorSpec("latent_sample", latent, arg="z", doc="latents, already divided by the scaling factor"),),
            outputs=(TensorSpec("sample", image, source="0", doc="pixels in [-1, 1]"),),
        ),
        ComponentSpec(
            name="vae_encoder", library="diffusers", class_name=class_name, role="vae", lora=False, subfolder="vae",
            method="encode", call_kwargs={"return_dict": False}, tiny=tiny, export=False,
            tasks=(IMAGE_TO_IMAGE, INPAINTING, IMAGE_TO_VIDEO),
            inputs=(TensorSpec("sample", image, arg="x", doc="pixels in [-1, 1]"),),
            outputs=(TensorSpec("latent_parameters", (image[0], Cfg(fn=lambda c: 2 * c.latent_channels), *latent[2:]),
                                source="0.parameters", doc="mean and log-variance of the latent distribution"),),
        ),
    )


IMAGE_LATENTS = ("batch", Cfg("latent_channels"), "height", "width")  # the VAE's side of the latents
PIXELS = ("batch", Cfg("out_channels"), "image_height", "image_width")


def image_vae(tiny: dict, class_name: str = "AutoencoderKL", encoder: bool = True, image: tuple = PIXELS) -> dict:
    """{name: spec} of an image family's VAE halves (`vae`), over the denoiser's height / width axes;
    without `encoder`, the decoder only."""
    return {c.name: c for c in vae(IMAGE_LATENTS, image, tiny, class_name)[:2 if encoder else 1]}


IMAGE_AXES = {  # pixels, for the VAE (multiples of every VAE's downsampling factor)
    "image_height": Axis(256, 1024, 1536, example=32, check=48),
    "image_width": Axis(256, 1024, 1536, example=32, check=64),
}
VAE_TINY = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
                norm_num_groups=8, layers_per_block=1, sample_size=32)


# x8 as the real ones: for pipelines that take the factor as given (Lumina2's `vae_scale_factor = 8`)
VAE8_TINY = {**VAE_TINY, "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
             "block_out_channels": (8, 8, 8, 8)}


def _hidden(config) -> int:
    config = _text(config)
    return int(getattr(config, "d_model", None) or config.hidden_size)


def _text(config):
    """The language model's config (a vision-language model's `text_config`)."""
    return getattr(config, "text_config", None) or config


CLIP_TINY = dict(
    vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, projection_dim=32, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
GEMMA2_TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, max_position_embeddings=512, bos_token_id=2, eos_token_id=1,
                   pad_token_id=0)
T5_TINY = dict(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
               relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
LLAMA_TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=2, pad_token_id=1)
QWEN25_VL_TINY = dict(  # Qwen2.5-VL: the pipelines read its language model's hidden states
    text_config={**LLAMA_TINY, "num_hidden_layers": 1, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
    vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32, patch_size=2,
                       spatial_merge_size=1, temporal_patch_size=1, fullatt_block_indexes=[0], window_size=4),
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
