"""LTX-Video (`ltx-video`): a video DiT over a token sequence (`transformer`) and T5.

Layouts: diffusers/PEFT under `transformer.`; `diffusion_model.` keys (finetrainers' ComfyUI
export, ComfyUI / LTX-Video trainers), in diffusers names or Lightricks' original ones
(`patchify_proj`, `adaln_single`, `q_norm` / `k_norm`, which diffusers' converter does not
rename). The graph takes and returns video latents [batch, channels, frames, height, width]; it
packs them into the transformer's tokens, passes the latent frames, height and width the rotary
embedding needs, and unpacks the prediction. LTXPipeline holds the latents packed: its call is
unpacked for the graph and the prediction packed back. The graph's timestep is one per latent
position: LTXImageToVideoPipeline passes one per token (its image's frame at 0, the others
denoising), LTXPipeline one per sample, both spread over the latent grid for the graph.

The VAE (`AutoencoderKLLTXVideo`) decodes all latent frames in one pass, as diffusers' `decode`
does by default (no tiling, no framewise decoding): one graph, its decode timestep an input where
the config has timestep conditioning (0.9.1 and later). Its encoder (image-to-video's image,
`--tasks image-to-video`) is one graph over any 1 + 8 k video frames, as diffusers' `encode` runs it.
"""

from __future__ import annotations

import torch

from .common import BATCH, T5_TINY, denoiser, hf_encoder, original_prefixes, prediction, text_mask, timesteps
from .spec import IMAGE_TO_VIDEO, Axis, Cfg, ComponentSpec, FamilySpec, NameTable, Rule, Scaled, TensorSpec

ORIGINAL = NameTable(rules=(
    Rule(r"patchify_proj", "proj_in"),
    Rule(r"adaln_single\.(.+)", r"time_embed.\1"),
    Rule(r"(transformer_blocks\.\d+\.attn[12])\.(q|k)_norm", r"\1.norm_\2"),
))


def _forward(model, kwargs):
    """The pipeline's `_pack_latents`, the transformer, then `_unpack_latents`."""
    x = kwargs.pop("hidden_states")
    b, _, f, h, w = x.shape
    for name in ("timestep", "encoder_attention_mask"):  # viewed per sample: one batch axis for the exporter
        torch._check(kwargs[name].shape[0] == b)
    c = model.config
    p, pt = c.patch_size, c.patch_size_t
    # per latent position -> per token, in the tokens' order (the transformer embeds each token's own)
    kwargs["timestep"] = kwargs["timestep"][:, ::pt, ::p, ::p].flatten(1)
    f, h, w = f // pt, h // p, w // p
    out = model(hidden_states=_pack(x, c), num_frames=f, height=h, width=w, **kwargs)[0]
    return (_unpack(out, f, h, w, c),)


def _pack(x, config):
    """LTXPipeline._pack_latents: [b, c, f, h, w] -> tokens [b, f h w (in patches), c pt p p]."""
    b, _, f, h, w = x.shape
    p, pt = config.patch_size, config.patch_size_t
    x = x.reshape(b, -1, f // pt, pt, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def _unpack(tokens, f, h, w, config):
    """LTXPipeline._unpack_latents: tokens over an f x h x w grid of patches -> [b, c, f pt, h p, w p]."""
    p, pt = config.patch_size, config.patch_size_t
    x = tokens.reshape(tokens.shape[0], f, h, w, -1, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def _packed(run, args, config):
    """LTXPipeline's transformer call: packed tokens and the grid they came from (`num_frames`, `height`,
    `width`, in patches, as the transformer's rotary embedding reads them) -> unpacked for the graph, the
    prediction packed back."""
    if args.get("video_coords") is not None:  # LTXConditionPipeline's: the graph makes the grid from the shape
        raise ValueError("ltx-video transformer: the exported graph has no input for 'video_coords'")
    scale = args.get("rope_interpolation_scale")
    if scale is None:  # the transformer would leave its grid unscaled: a graph without that input
        raise ValueError("ltx-video transformer: the exported graph needs `rope_interpolation_scale`")
    f, h, w = args["num_frames"], args["height"], args["width"]
    latents = _unpack(args["hidden_states"], f, h, w, config)
    out = run(hidden_states=latents, encoder_hidden_states=args["encoder_hidden_states"],
              timestep=_per_position(args["timestep"], latents.shape[0], f, h, w, config),
              encoder_attention_mask=args["encoder_attention_mask"],
              rope_interpolation_scale=torch.as_tensor(scale, dtype=torch.float32))
    pred = _pack(out["out_sample"], config)
    if args.get("return_dict", True):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=pred)
    return (pred,)


def _per_position(timestep, batch: int, f: int, h: int, w: int, config) -> torch.Tensor:
    """The pipeline's timestep -> one per latent position [batch, frames, height, width]: LTXPipeline's is
    one per sample, LTXImageToVideoPipeline's one per token (the conditioning frame's tokens at 0)."""
    t = torch.as_tensor(timestep, dtype=torch.float32)
    t = t.reshape(-1, 1).expand(batch, f * h * w) if t.dim() <= 1 else t
    t = t.reshape(batch, f, h, w)
    p, pt = config.patch_size, config.patch_size_t
    return t.repeat_interleave(pt, 1).repeat_interleave(p, 2).repeat_interleave(p, 3)


def _rope_scale(shape, g, ctx):
    return torch.tensor([8 / 25, 32.0, 32.0])  # the pipeline's default: VAE compression 8 / 25 fps, 32, 32


TRANSFORMER = denoiser(
    "LTXVideoTransformer3DModel",
    inputs=(
        TensorSpec("hidden_states", ("batch", Cfg(fn=lambda c: c.in_channels // c.patch_size ** 2 // c.patch_size_t),
                                     "frames", "height", "width"), doc="noisy video latents (unpacked)"),
        TensorSpec("encoder_hidden_states", ("batch", "text", Cfg("caption_channels")), doc="T5 hidden states"),
        # one per latent position: LTXImageToVideoPipeline's conditioning frame is at 0 while the others denoise
        TensorSpec("timestep", ("batch", "frames", "height", "width"), dtype="float32", sample=timesteps,
                   doc="flow-matching timestep x 1000 at each latent position (the image's frame: 0 in I2V)"),
        text_mask("the T5 tokens' attention mask"),
        TensorSpec("rope_interpolation_scale", (3,), dtype="float32", sample=_rope_scale,
                   doc="(VAE temporal compression / frame rate, VAE spatial compression x 2), as the pipeline sets it"),
    ),
    outputs=(prediction(("batch", Cfg(fn=lambda c: c.out_channels // c.patch_size ** 2 // c.patch_size_t), "frames",
                         "height", "width"), doc="predicted velocity (unpacked)"),),
    graph_forward=_forward,
    pipeline_call=_packed,
    # in_channels: the VAE's latent channels, as the pipeline makes the latents (patch size 1, as LTX's own)
    tiny=dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
              num_layers=1, caption_channels=32),
)


def _decode(model, kwargs):
    """`vae.decode`, refused for decoders that add noise (LTX-Video 0.9.1's `decoder_inject_noise`): diffusers
    draws it from torch's global generator inside `decode`, which no deterministic graph can give; such a
    model exports without its VAE (`--components transformer,text_encoder`)."""
    if any(model.config.decoder_inject_noise):
        raise ValueError("ltx-video vae_decoder: this VAE injects random noise while decoding "
                         f"(decoder_inject_noise={list(model.config.decoder_inject_noise)}), drawn from torch's global "
                         "generator, which an exported graph cannot reproduce; export the other components only "
                         "(--components transformer,text_encoder)")
    return model.decode(**kwargs)


def _decode_timesteps(shape, g, ctx):
    """LTXPipeline's `decode_timestep`: small (0 by default, 0.025 to 0.05 in LTX's examples)."""
    return torch.rand(shape, generator=g) * 0.1


VAE_DECODER = ComponentSpec(
    name="vae_decoder", library="diffusers", class_name="AutoencoderKLLTXVideo", role="vae", lora=False,
    subfolder="vae", method="decode", call_kwargs={"return_dict": False}, graph_forward=_decode,
    pipeline_state=("latents_mean", "latents_std"),  # the pipeline de-normalizes with these buffers itself
    inputs=(
        TensorSpec("latent_sample", ("batch", Cfg("latent_channels"), "frames", "height", "width"), arg="z",
                   doc="latents, de-normalized (latents x std / scaling factor + mean), noised by the pipeline "
                       "with the decode timestep"),
        TensorSpec("timestep", ("batch",), dtype="float32", arg="temb", sample=_decode_timesteps,
                   when=lambda config: bool(config.timestep_conditioning), doc="the pipeline's decode_timestep"),
    ),
    # labels: 1 + (frames - 1) x 8 video frames, the latents x 32 in pixels
    outputs=(TensorSpec("sample", ("batch", Cfg("out_channels"), "video_frames", "image_height", "image_width"),
                        source="0", doc="video frames in [-1, 1]"),),
    # LTX-Video 0.9.5 / 0.9.7's decoder, narrow: residual depth-to-space upsamplers, timestep conditioning, no
    # noise injection; x32 in space, x8 in time as the real one
    tiny=dict(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
              decoder_block_out_channels=(8, 16, 32), layers_per_block=(1, 1, 1, 1, 1),
              decoder_layers_per_block=(1, 1, 1, 1), spatio_temporal_scaling=(True, True, True, False),
              decoder_spatio_temporal_scaling=(True, True, True), decoder_inject_noise=(False, False, False, False),
              upsample_residual=(True, True, True), upsample_factor=(2, 2, 2), timestep_conditioning=True,
              patch_size=4, patch_size_t=1, encoder_causal=True, decoder_causal=False),
)

VAE_ENCODER = ComponentSpec(
    name="vae_encoder", library="diffusers", class_name="AutoencoderKLLTXVideo", role="vae", lora=False,
    subfolder="vae", method="encode", call_kwargs={"return_dict": False}, tiny=VAE_DECODER.tiny, export=False,
    tasks=(IMAGE_TO_VIDEO,),  # LTXImageToVideoPipeline encodes its image as one video frame
    # diffusers' `encode` runs the encoder over all frames in one pass (no tiling, no framewise encoding)
    inputs=(TensorSpec("sample", ("batch", Cfg("in_channels"), "video_frames", Scaled("height", 32),
                                  Scaled("width", 32)), arg="x",
                       doc="video frames in [-1, 1], 1 + 8 k of them (an image: 1), the latents' size x 32"),),
    outputs=(TensorSpec("latent_parameters", ("batch", Cfg(fn=lambda c: 2 * c.latent_channels), "frames", "height",
                                              "width"), source="0.parameters",
                        doc="mean and log-variance of the latent distribution (not normalized)"),),
)

LTX_VIDEO = FamilySpec(
    name="ltx-video", mixin="LTXVideoLoraLoaderMixin", pipeline="LTXPipeline",
    components={
        "transformer": TRANSFORMER,
        # LTXPipeline calls T5 without the tokenizer's mask (it masks the transformer's cross-attention instead)
        "text_encoder": hf_encoder("text_encoder", "T5EncoderModel", "T5Config", T5_TINY),
        "vae_decoder": VAE_DECODER,
        "vae_encoder": VAE_ENCODER,
    },
    tasks={"image-to-video": ("LTXImageToVideoPipeline",)},
    # LTX-Video's own: Euler over the pipeline's sigmas, shifted by the video's token count
    scheduler=("FlowMatchEulerDiscreteScheduler", dict(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
        base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)),
    axes={
        "batch": BATCH,
        "frames": Axis(1, 21, 33, example=3, check=2),  # latent frames: 1 + (161 video frames - 1) / 8
        "height": Axis(8, 16, 32, example=4, check=6),  # latents (pixels / 32)
        "width": Axis(8, 22, 40, example=4, check=5),
        "text": Axis(1, 128, 256, example=8, check=12),  # T5 tokens
        "video_frames": Axis(1, 161, 257, example=9, check=17),  # the VAE encoder's: 1 + 8 k (an image: 1)
    },
    namespaces=original_prefixes(ORIGINAL, kohya=False),
    # Flux's markers also match these block names: the same pattern, so LTX files are not taken for Flux's.
    markers=(r"^transformer\.transformer_blocks\.\d+\.ff\.net", r"^transformer\.caption_projection\.linear_[12]$"),
)

FAMILIES = (LTX_VIDEO,)
