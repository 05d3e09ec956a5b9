"""Video VAEs as graphs the engine pipeline decodes with as diffusers' `vae.decode` does.

Causal ones with caches are chunk decoders: the caches one chunk of latent frames leaves to the
next are graph inputs and outputs, so any frame count decodes in memory bounded by the chunk, and
the engine pipeline's loop over chunks (`Chunks`) is diffusers' own `decode` loop.

Wan's VAE (`AutoencoderKLWan`: Wan 2.1 / 2.2, SkyReels-V2) decodes one latent frame at a time; every
causal convolution keeps the last two frames of its input. Two graphs: `vae_decoder` for the
first frame (diffusers' `first_chunk`, no time upsampling: one video frame) and `vae_decoder_next`
for each later frame (four video frames), both returning their caches. In the first chunk diffusers
caches one frame where later chunks cache two, and marks the time upsamplers "Rep" (no cache yet):
both are a two-frame cache with zeros in front, the zeros the causal padding would add, so one
`next` graph serves every later chunk. Its encoder (image-to-video's condition video) is the same
pair the other way: `vae_encoder` for the first video frame, `vae_encoder_next` for each later 4.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from functools import lru_cache

import torch

from .common import swapped
from .spec import IMAGE_TO_VIDEO, Cfg, Chunks, ComponentSpec, Scaled, TensorSpec

CACHE_FRAMES = 2  # diffusers' CACHE_T


def _wan_upsampler_first(self, x, feat_cache=None, feat_idx=(0,)):
    """WanResample in the first chunk: diffusers' "Rep" mark as the zeros its time conv pads with."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample

    idx = feat_idx[0]
    empty = self.mode == "upsample3d" and feat_cache is not None and feat_cache[idx] is None
    out = WanResample.forward(self, x, feat_cache, feat_idx)
    if empty:
        feat_cache[idx] = x.new_zeros(x.shape[0], x.shape[1], CACHE_FRAMES, *x.shape[3:])
    return out


def _wan_finish(model, out):
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    if model.config.patch_size is not None:
        out = unpatchify(out, patch_size=model.config.patch_size)
    return torch.clamp(out, min=-1.0, max=1.0)


def _two_frames(cache: torch.Tensor) -> torch.Tensor:
    short = CACHE_FRAMES - cache.shape[2]
    return torch.cat([cache.new_zeros(*cache.shape[:2], short, *cache.shape[3:]), cache], 2) if short else cache


def wan_first(model, kwargs):
    """The first latent frame -> (its video frame, the caches it leaves)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample

    feat, idx = [None] * model._cached_conv_counts["decoder"], [0]
    with ExitStack() as stack:
        for m in model.decoder.modules():
            if isinstance(m, WanResample):
                stack.enter_context(swapped(m, "forward", _wan_upsampler_first))
        out = model.decoder(model.post_quant_conv(kwargs["z"]), feat_cache=feat, feat_idx=idx, first_chunk=True)
    return (_wan_finish(model, out), *(_two_frames(c) for c in feat[:idx[0]]))


def wan_next(model, kwargs):
    """A later latent frame and the caches -> (its video frames, the caches it leaves)."""
    feat = [kwargs[f"cache_{i}"] for i in range(len(_wan_caches(_key(model.config))))]
    out = model.decoder(model.post_quant_conv(kwargs["z"]), feat_cache=feat, feat_idx=[0])
    return (_wan_finish(model, out), *feat)


# -- Wan's encoder: the first video frame, then chunks of 4 (diffusers' `_encode` loop) -------------
#
# As in the decoder, every cache the first chunk leaves is made two frames with zeros in front (the
# zeros the causal padding adds, and the time downsamplers read only the last frame), and so is every
# cache a later chunk leaves (a time downsampler keeps one frame): one `next` graph for every later chunk.


def _wan_encode(model, x, feat):
    from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

    if model.config.patch_size is not None:
        x = patchify(x, patch_size=model.config.patch_size)
    idx = [0]
    return model.quant_conv(model.encoder(x, feat_cache=feat, feat_idx=idx)), idx[0]


def wan_encode_first(model, kwargs):
    """The first video frame -> (the latent distribution's parameters of its latent frame, the caches it leaves)."""
    feat = [None] * model._cached_conv_counts["encoder"]
    out, n = _wan_encode(model, kwargs["x"], feat)
    return (out, *(_two_frames(c) for c in feat[:n]))


def wan_encode_next(model, kwargs):
    """4 later video frames and the caches -> (the parameters of their latent frame, the caches they leave)."""
    feat = [kwargs[f"cache_{i}"] for i in range(len(_wan_encoder_caches(_key(model.config))))]
    out, _ = _wan_encode(model, kwargs["x"], feat)
    return (out, *(_two_frames(c) for c in feat))


@lru_cache(maxsize=16)
def _wan_encoder_caches(key: str) -> tuple[tuple[int, int], ...]:
    """(channels, spatial factor over the latents) of each cache a Wan encoder leaves, from a first chunk
    on the meta device."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        model = AutoencoderKLWan.from_config(json.loads(key))
        side, factor = 4, int(model.config.scale_factor_spatial)
        caches = wan_encode_first(model, {"x": torch.empty(1, model.config.in_channels, 1, side * factor,
                                                           side * factor)})[1:]
    return tuple((int(c.shape[1]), int(c.shape[3]) // side) for c in caches)


def _key(config) -> str:
    return json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, sort_keys=True, default=str)


@lru_cache(maxsize=16)
def _wan_caches(key: str) -> tuple[tuple[int, int], ...]:
    """(channels, spatial factor) of each cache a Wan decoder leaves, from a first chunk on the meta device."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        model = AutoencoderKLWan.from_config(json.loads(key))
        side = 4
        caches = wan_first(model, {"z": torch.empty(1, model.config.z_dim, 1, side, side)})[1:]
    return tuple((int(c.shape[1]), int(c.shape[3]) // side) for c in caches)


# -- CogVideoX ---------------------------------------------------------------------------------


def _flat(cache: dict, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    out = []
    for k, v in cache.items():
        out += _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    return out


def _cog_module(decoder, key: str):
    """The convolution a conv_cache key names: "up_block_1.resnet_0.conv2" -> up_blocks.1.resnets.0.conv2
    (the encoder's: "down_block_1...")."""
    path = re.sub(r"(up_block|down_block|resnet)_(\d+)", lambda m: f"{m.group(1)}s.{m.group(2)}", key)
    return decoder.get_submodule(path)


@lru_cache(maxsize=16)
def _cog_caches(key: str) -> tuple[tuple[str, int, int, int], ...]:
    """(conv_cache key, channels, frames, spatial factor) of each cache a CogVideoX decoder reads back."""
    from diffusers import AutoencoderKLCogVideoX

    side = 4
    with torch.device("meta"):
        model = AutoencoderKLCogVideoX.from_config(json.loads(key))
        _, cache = model.decoder(torch.empty(1, model.config.latent_channels, 2, side, side), conv_cache=None)
    out = []
    for name, t in _flat(cache):
        conv = _cog_module(model.decoder, name)
        if t is None or conv.pad_mode == "replicate" or conv.time_kernel_size == 1:
            continue  # never read back
        out.append((name, int(t.shape[1]), int(t.shape[2]), int(t.shape[3]) // side))
    return tuple(out)


def _nest(pairs) -> dict:
    root: dict = {}
    for name, t in pairs:
        *path, leaf = name.split(".")
        node = root
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = t
    return root


def _cog_decode(model, z, conv_cache):
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXSafeConv3d

    names = [name for name, *_ in _cog_caches(_key(model.config))]
    with ExitStack() as stack:
        for m in model.decoder.modules():  # its > 2 GiB split is the same convolution: no size branch in the graph
            if isinstance(m, CogVideoXSafeConv3d):
                stack.enter_context(swapped(m, "forward", torch.nn.Conv3d.forward))
        if model.post_quant_conv is not None:
            z = model.post_quant_conv(z)
        sample, new = model.decoder(z, conv_cache=conv_cache)
    flat = dict(_flat(new))
    return (sample, *(flat[n] for n in names))


def cog_first(model, kwargs):
    """The first batch of latent frames -> (its video frames, the caches it leaves)."""
    return _cog_decode(model, kwargs["z"], None)


def cog_next(model, kwargs):
    """A later batch of two latent frames and the caches -> (its video frames, the caches it leaves)."""
    names = [name for name, *_ in _cog_caches(_key(model.config))]
    return _cog_decode(model, kwargs["z"], _nest((n, kwargs[f"cache_{i}"]) for i, n in enumerate(names)))


def _cache_specs(config) -> list[tuple[int, int, int]]:
    """(channels, frames, spatial factor) of each cache of a causal video decoder with this config."""
    if "z_dim" in dict(config):  # AutoencoderKLWan
        return [(c, CACHE_FRAMES, f) for c, f in _wan_caches(_key(config))]
    return [(c, t, f) for _, c, t, f in _cog_caches(_key(config))]


def _cache_io(config, inputs: bool, specs=None) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """specs: (channels, frames, spatial factor) of each cache (default: the config's decoder's)."""
    caches = []
    for i, (channels, frames, factor) in enumerate(_cache_specs(config) if specs is None else specs):
        h, w = (("height", "width") if factor == 1 else (Scaled("height", factor), Scaled("width", factor)))
        caches.append((f"cache_{i}", ("batch", channels, frames, h, w)))
    outs = tuple(TensorSpec(f"{n}_out", dims, source=str(i + 1), doc="the cache this chunk leaves")
                 for i, (n, dims) in enumerate(caches))
    ins = tuple(TensorSpec(n, dims, doc="the cache the previous chunk left") for n, dims in caches) if inputs else ()
    return ins, outs


def _upsampled_frames(config) -> int:
    return 2 ** sum(bool(t) for t in config.temperal_downsample)


def wan_vae(tiny: dict, class_name: str = "AutoencoderKLWan") -> dict[str, ComponentSpec]:
    """{name: spec} of Wan's chunk decoder over the denoiser's latent height / width axes."""
    pixels = "image_height", "image_width"  # labels: pixels are the latents times the VAE's factor
    common = dict(library="diffusers", class_name=class_name, role="vae", lora=False, subfolder="vae", tiny=tiny,
                  call_kwargs={"return_dict": False})
    latent = TensorSpec("latent_sample", ("batch", Cfg("z_dim"), 1, "height", "width"), arg="z",
                        doc="one latent frame, de-normalized (latents / std + mean)")
    return {
        "vae_decoder": ComponentSpec(
            name="vae_decoder", method="decode", graph_forward=wan_first, inputs=(latent,),
            outputs=(TensorSpec("sample", ("batch", 3, 1, *pixels), source="0", doc="the first video frame in [-1, 1]"),),
            io=lambda config: _cache_io(config, inputs=False), chunks=Chunks(next="vae_decoder_next"), **common),
        "vae_decoder_next": ComponentSpec(
            name="vae_decoder_next", method="decode_next", graph_forward=wan_next, inputs=(latent,),
            outputs=(TensorSpec("sample", ("batch", 3, Cfg(fn=_upsampled_frames), *pixels), source="0",
                                doc="the video frames of a later latent frame, in [-1, 1]"),),
            io=lambda config: _cache_io(config, inputs=True), **common),
        # image-to-video's condition video: the first frame, then chunks of 4 frames (x8 in space: Wan 2.1's
        # VAE, which Wan 2.2 A14B and SkyReels-V2 use)
        "vae_encoder": ComponentSpec(
            name="vae_encoder", method="encode", graph_forward=wan_encode_first, inputs=(_wan_pixels(1),),
            outputs=(_wan_parameters("the first video frame's latent frame"),),
            io=lambda config: _cache_io(config, inputs=False, specs=_wan_encoder_cache_specs(config)),
            chunks=Chunks(next="vae_encoder_next", size=4), export=False, tasks=(IMAGE_TO_VIDEO,), **common),
        "vae_encoder_next": ComponentSpec(
            name="vae_encoder_next", method="encode_next", graph_forward=wan_encode_next, inputs=(_wan_pixels(4),),
            outputs=(_wan_parameters("the latent frame of 4 later video frames"),),
            io=lambda config: _cache_io(config, inputs=True, specs=_wan_encoder_cache_specs(config)),
            export=False, tasks=(IMAGE_TO_VIDEO,), **common),
    }


WAN_SPATIAL = 8  # pixels per latent of Wan 2.1's VAE (Wan 2.2 TI2V-5B's x16 VAE is not one of these families')


def _wan_pixels(frames: int) -> TensorSpec:
    return TensorSpec("sample", ("batch", 3, frames, Scaled("height", WAN_SPATIAL), Scaled("width", WAN_SPATIAL)),
                      arg="x", doc=f"{frames} video frame(s) in [-1, 1]")


def _wan_parameters(what: str) -> TensorSpec:
    return TensorSpec("latent_parameters", ("batch", Cfg(fn=lambda c: 2 * c.z_dim), 1, "height", "width"),
                      source="0", doc=f"mean and log-variance of {what}")


def _wan_encoder_cache_specs(config) -> list[tuple[int, int, int]]:
    return [(c, CACHE_FRAMES, f) for c, f in _wan_encoder_caches(_key(config))]


def cogvideox_vae(tiny: dict) -> dict[str, ComponentSpec]:
    """{name: spec} of CogVideoX's chunk decoder over the denoiser's latent height / width axes."""
    pixels = "image_height", "image_width"
    common = dict(library="diffusers", class_name="AutoencoderKLCogVideoX", role="vae", lora=False, subfolder="vae",
                  tiny=tiny, call_kwargs={"return_dict": False})

    def latent(frames: int) -> TensorSpec:
        return TensorSpec("latent_sample", ("batch", Cfg("latent_channels"), frames, "height", "width"), arg="z",
                          doc=f"{frames} latent frames, divided by the scaling factor")

    def sample(frames) -> TensorSpec:
        return TensorSpec("sample", ("batch", 3, Cfg(fn=frames), *pixels), source="0", doc="video frames in [-1, 1]")

    def first(name: str, frames: int, video) -> ComponentSpec:
        chunks = Chunks(next="vae_decoder_next", size=2, first=lambda n: 2 + n % 2, others={2: "vae_decoder_even"})
        return ComponentSpec(name=name, method="decode" if frames == 3 else "decode_even", graph_forward=cog_first,
                             inputs=(latent(frames),), outputs=(sample(video),),
                             io=lambda config: _cache_io(config, inputs=False),
                             chunks=chunks if frames == 3 else None, **common)

    return {
        # odd counts: 1 + 2 x 2 video frames per latent pair after the first frame
        "vae_decoder": first("vae_decoder", 3, lambda c: 2 * c.temporal_compression_ratio + 1),
        "vae_decoder_even": first("vae_decoder_even", 2, lambda c: 2 * c.temporal_compression_ratio),
        "vae_decoder_next": ComponentSpec(
            name="vae_decoder_next", method="decode_next", graph_forward=cog_next, inputs=(latent(2),),
            outputs=(sample(lambda c: 2 * c.temporal_compression_ratio),),
            io=lambda config: _cache_io(config, inputs=True), **common),
    }


# CogVideoX's encoder (image-to-video's image; a video in chunks): diffusers' `_encode` runs it over
# chunks of 8 video frames, the first 8 + frames % 8 (an image: its 1 frame), each convolution's cache
# passed to the next chunk. Its group norms normalize over a chunk's frames and its time downsamplers
# treat odd and even chunks apart, so each chunk length is a graph: 1 frame (the image, no caches),
# a first chunk of 9 (videos of 8 k + 1 frames, as CogVideoX makes them) and each later chunk of 8.
COG_ENCODE_CHUNK = 8  # diffusers' num_sample_frames_batch_size
COG_SPATIAL = 8  # pixels per latent of every CogVideoX VAE (4 blocks)


@lru_cache(maxsize=16)
def _cog_encoder_caches(key: str) -> tuple[tuple[str, int, int, int], ...]:
    """(conv_cache key, channels, frames, spatial factor over the latents) of each cache a CogVideoX
    encoder reads back."""
    from diffusers import AutoencoderKLCogVideoX

    side = 4
    with torch.device("meta"):
        model = AutoencoderKLCogVideoX.from_config(json.loads(key))
        x = torch.empty(1, model.config.in_channels, 1, side * COG_SPATIAL, side * COG_SPATIAL)
        _, cache = model.encoder(x, conv_cache=None)
    out = []
    for name, t in _flat(cache):
        conv = _cog_module(model.encoder, name)
        if t is None or conv.pad_mode == "replicate" or conv.time_kernel_size == 1:
            continue  # never read back
        out.append((name, int(t.shape[1]), int(t.shape[2]), int(t.shape[3]) // side))
    return tuple(out)


def _cog_encode(model, x, conv_cache):
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXSafeConv3d

    names = [name for name, *_ in _cog_encoder_caches(_key(model.config))]
    with ExitStack() as stack:
        for m in model.encoder.modules():  # as in the decoder: its > 2 GiB split is the same convolution
            if isinstance(m, CogVideoXSafeConv3d):
                stack.enter_context(swapped(m, "forward", torch.nn.Conv3d.forward))
        h, new = model.encoder(x, conv_cache=conv_cache)
    if model.quant_conv is not None:
        h = model.quant_conv(h)
    flat = dict(_flat(new))
    return (h, *(flat[n] for n in names))


def cog_encode_image(model, kwargs):
    """One video frame (the pipeline's image) -> its latent distribution's parameters (no later chunk)."""
    return _cog_encode(model, kwargs["x"], None)[:1]


def cog_encode_first(model, kwargs):
    """A first chunk of video frames -> (its latent distribution's parameters, the caches it leaves)."""
    return _cog_encode(model, kwargs["x"], None)


def cog_encode_next(model, kwargs):
    """A later chunk of 8 video frames and the caches -> (its parameters, the caches it leaves)."""
    names = [name for name, *_ in _cog_encoder_caches(_key(model.config))]
    return _cog_encode(model, kwargs["x"], _nest((n, kwargs[f"cache_{i}"]) for i, n in enumerate(names)))


def _cog_encoder_cache_specs(config) -> list[tuple[int, int, int]]:
    return [(c, t, f) for _, c, t, f in _cog_encoder_caches(_key(config))]


def cogvideox_vae_encoder(tiny: dict) -> dict[str, ComponentSpec]:
    """{name: spec} of CogVideoX's chunk encoder (exported for image-to-video) over the latent axes."""
    common = dict(library="diffusers", class_name="AutoencoderKLCogVideoX", role="vae", lora=False, subfolder="vae",
                  tiny=tiny, call_kwargs={"return_dict": False}, export=False, tasks=(IMAGE_TO_VIDEO,))

    def pixels(frames: int) -> TensorSpec:
        return TensorSpec("sample", ("batch", Cfg("in_channels"), frames, Scaled("height", COG_SPATIAL),
                                     Scaled("width", COG_SPATIAL)), arg="x",
                          doc=f"{frames} video frame(s) in [-1, 1], the latents' size x {COG_SPATIAL}")

    def parameters(latent) -> TensorSpec:
        return TensorSpec("latent_parameters", ("batch", Cfg(fn=lambda c: 2 * c.latent_channels), Cfg(fn=latent),
                                                "height", "width"), source="0",
                          doc="mean and log-variance of the latent distribution")

    first = 1 + COG_ENCODE_CHUNK
    chunks = Chunks(next="vae_encoder_next", size=COG_ENCODE_CHUNK, others={first: "vae_encoder_first"},
                    first=lambda n: COG_ENCODE_CHUNK + n % COG_ENCODE_CHUNK)
    caches = _cog_encoder_cache_specs
    return {
        "vae_encoder": ComponentSpec(name="vae_encoder", method="encode", graph_forward=cog_encode_image,
                                     inputs=(pixels(1),), outputs=(parameters(lambda c: 1),), chunks=chunks, **common),
        "vae_encoder_first": ComponentSpec(
            name="vae_encoder_first", method="encode_first", graph_forward=cog_encode_first, inputs=(pixels(first),),
            outputs=(parameters(lambda c: 1 + COG_ENCODE_CHUNK // c.temporal_compression_ratio),),
            io=lambda config: _cache_io(config, inputs=False, specs=caches(config)), **common),
        "vae_encoder_next": ComponentSpec(
            name="vae_encoder_next", method="encode_next", graph_forward=cog_encode_next,
            inputs=(pixels(COG_ENCODE_CHUNK),),
            outputs=(parameters(lambda c: COG_ENCODE_CHUNK // c.temporal_compression_ratio),),
            io=lambda config: _cache_io(config, inputs=True, specs=caches(config)), **common),
    }


COGVIDEOX_VAE_TINY = dict(  # the real structure: time upsampling in two blocks, a 1x1 shortcut, spatial norms
    in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
    up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(4, 8, 8, 8), latent_channels=4,
    layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4, sample_height=64, sample_width=64)
WAN_VAE_TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
                    temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                    latents_std=[1.5, 0.8, 1.2, 2.0])


# -- HunyuanVideo (AutoencoderKLHunyuanVideo: HunyuanVideo, Kandinsky 5) ---------------------------
#
# No caches: diffusers decodes up to 4 latent frames in one pass, and more in overlapping windows of
# 5 (stride 3) that it blends (`_temporal_tiled_decode`), each window decoded on its own. One graph,
# `post_quant_conv` then `decoder` over any number of latent frames, is one such pass; the engine
# pipeline runs diffusers' own `decode` with the engine standing in for those two modules, so the
# windows, blending and crop are diffusers' code on the engine's frames. The encoder (`vae_encoder`,
# exported for image-to-video) is likewise `encoder` then `quant_conv` in one graph under diffusers'
# `encode`, over one frame: what the image-to-video pipelines encode (their image).


def _hunyuan_causal_mask(num_frames, height_width, dtype, device, batch_size=None):
    """diffusers' `prepare_causal_attention_mask` (a token sees the tokens of its frame and earlier ones)
    without `repeat_interleave` by a symbolic count, which exports to an Expand ONNX Runtime rejects."""
    frame = torch.div(torch.arange(num_frames * height_width, device=device), height_width, rounding_mode="floor")
    mask = torch.zeros((), dtype=dtype, device=device).masked_fill(torch.ones((), dtype=torch.bool), float("-inf"))
    mask = torch.where(frame[None, :] <= frame[:, None], torch.zeros((), dtype=dtype, device=device), mask)
    if batch_size is not None:
        mask = mask.unsqueeze(0).expand(batch_size, -1, -1)
    return mask


def hunyuan_pass(model, kwargs):
    """Latent frames -> their video frames in one pass (no windows, no tiling): the graph."""
    from diffusers.models.autoencoders import autoencoder_kl_hunyuan_video as hv

    with swapped(hv, "prepare_causal_attention_mask", _hunyuan_causal_mask):
        return (model.decoder(model.post_quant_conv(kwargs["z"])),)


def hunyuan_encode_pass(model, kwargs):
    """Video frames -> the latent distribution's parameters in one pass (no windows, no tiling): the graph."""
    from diffusers.models.autoencoders import autoencoder_kl_hunyuan_video as hv

    with swapped(hv, "prepare_causal_attention_mask", _hunyuan_causal_mask):
        return (model.quant_conv(model.encoder(kwargs["x"])),)


class _EnginePass(torch.nn.Module):
    """`post_quant_conv` + `decoder` (or `encoder` + `quant_conv`) of a diffusers VAE as one run of the graph."""

    def __init__(self, run, arg: str = "z", output: str = "sample"):
        super().__init__()
        self.run, self.arg, self.output = run, arg, output

    def forward(self, x):
        return self.run(**{self.arg: x})[self.output]  # by the graph input's `arg`


@lru_cache(maxsize=16)
def _hunyuan_shell(key: str):
    """The VAE on the meta device (no memory): diffusers' decode logic, its modules never run."""
    from diffusers import AutoencoderKLHunyuanVideo

    with torch.device("meta"):
        vae = AutoencoderKLHunyuanVideo.from_config(json.loads(key))
    vae.post_quant_conv = torch.nn.Identity()  # inside the graph
    vae.quant_conv = torch.nn.Identity()  # inside the encoder's graph
    return vae


def hunyuan_decode(run, args, config):
    """`vae.decode(z, return_dict)` as diffusers does it, each pass one run of the graph."""
    import copy

    vae = copy.copy(_hunyuan_shell(_key(config)))
    vae._modules = {**vae._modules, "decoder": _EnginePass(run)}  # this call's own: the shell stays shared
    return vae.decode(args["z"], return_dict=args.get("return_dict", True))


def hunyuan_encode(run, args, config):
    """`vae.encode(x, return_dict)` as diffusers does it, its one pass a run of the graph: the encoder
    graph takes one frame (what the image-to-video pipelines encode), so a clear error for more."""
    import copy

    frames = args["x"].shape[2]
    if frames != 1:
        raise ValueError(f"the exported HunyuanVideo VAE encoder encodes single frames (an image-to-video "
                         f"pipeline's image), not {frames}; encode videos with the torch VAE")
    vae = copy.copy(_hunyuan_shell(_key(config)))
    vae._modules = {**vae._modules, "encoder": _EnginePass(run, "x", "latent_parameters")}
    return vae.encode(args["x"], return_dict=args.get("return_dict", True))


def hunyuan_vae(tiny: dict) -> dict[str, ComponentSpec]:
    """{name: spec} of the AutoencoderKLHunyuanVideo decoder (and the encoder, for image-to-video) over the
    denoiser's latent axes."""
    return {"vae_decoder": ComponentSpec(
        name="vae_decoder", library="diffusers", class_name="AutoencoderKLHunyuanVideo", role="vae", lora=False,
        subfolder="vae", method="decode", tiny=tiny, graph_forward=hunyuan_pass, pipeline_call=hunyuan_decode,
        inputs=(TensorSpec("latent_sample", ("batch", Cfg("latent_channels"), "frames", "height", "width"), arg="z",
                           doc="latent frames, divided by the scaling factor"),),
        # labels: 1 + (frames - 1) x the time factor, the latents times the spatial factor
        outputs=(TensorSpec("sample", ("batch", Cfg("out_channels"), "video_frames", "image_height", "image_width"),
                            source="0", doc="video frames in [-1, 1]"),),
    ), "vae_encoder": ComponentSpec(
        # exported for image-to-video only; pixels are the latent axes times the VAE's spatial factor 8
        name="vae_encoder", library="diffusers", class_name="AutoencoderKLHunyuanVideo", role="vae", lora=False,
        subfolder="vae", method="encode", tiny=tiny, graph_forward=hunyuan_encode_pass, pipeline_call=hunyuan_encode,
        export=False, tasks=(IMAGE_TO_VIDEO,),
        inputs=(TensorSpec("sample", ("batch", Cfg("in_channels"), 1, Scaled("height", 8), Scaled("width", 8)),
                           arg="x", doc="one video frame (the pipeline's image) in [-1, 1]"),),
        outputs=(TensorSpec("latent_parameters", ("batch", Cfg(fn=lambda c: 2 * c.latent_channels), 1, "height",
                                                  "width"),
                            source="0", doc="mean and log-variance of the latent distribution"),),
    )}


# the real structure (4 blocks: x8 in space, x4 in time, the only time factor its decoder takes), narrow
HUNYUAN_VAE_TINY = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, norm_num_groups=4)
