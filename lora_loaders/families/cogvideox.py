"""CogVideoX 1.0 / 1.5 (`cogvideox`): an expert-adaLN video DiT (`transformer`) and T5.

Layouts: diffusers/PEFT under `transformer.` (diffusers' CogVideoX mixin reads no other).

The 3D rotary embedding (5B and 1.5 models) is the pipeline's `_prepare_rotary_positional_
embeddings`, computed inside the graph from the latents' shape, so frames, height and width
stay dynamic: 1.0 resizes the latent grid into the config's base grid and centres it (the
crop arithmetic done in tensors, not Python numbers the exporter would bake in), 1.5 slices
positions from 0. CogVideoX-2B's sinusoidal positions (no rotary embedding) are one table of
`max_text_seq_length` text rows then the patches: the text axis is fixed at that length (a
`Bound`), while frames, height and width stay dynamic (the table is recomputed in the graph, as
diffusers does at sizes other than the config's; the same values at the config's).

Image-to-video (CogVideoXImageToVideoPipeline; `--model tiny:i2v` is CogVideoX 1.5 I2V's form): the
transformer takes the image latents concatenated on channels (and 1.5's `ofs`), and the VAE encoder
(`--tasks image-to-video`) is chunk graphs as diffusers' `encode` loops (video_vae.py).
"""

from __future__ import annotations

import torch

from .video_vae import COGVIDEOX_VAE_TINY, cogvideox_vae, cogvideox_vae_encoder
from .common import BATCH, T5_TINY, denoiser, hf_encoder, prediction, swapped, timestep
from .spec import Axis, Bound, Cfg, FamilySpec, TensorSpec, Variant


def _grid(n: int, start=None, stop=None) -> torch.Tensor:
    """`torch.arange(n)`, or `torch.linspace(start, stop * (n - 1) / n, n)` for tensor bounds."""
    i = torch.arange(n, dtype=torch.float32)
    if start is None:
        return i
    nf = torch.scalar_tensor(n, dtype=torch.float32)
    return start + i * (stop * (nf - 1) / nf - start) / torch.clamp(nf - 1, min=1)


def _rope(model, kwargs):
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    cfg = model.config
    if not cfg.use_rotary_positional_embeddings:
        return kwargs
    _, frames, _, height, width = kwargs["hidden_states"].shape
    p, pt = cfg.patch_size, cfg.patch_size_t
    gh, gw = height // p, width // p
    base_h, base_w = cfg.sample_height // p, cfg.sample_width // p
    if pt is None:  # get_resize_crop_region_for_grid((gh, gw), base_w, base_h), then linspace grids
        h, w = (torch.scalar_tensor(n, dtype=torch.float32) for n in (gh, gw))
        tall = h / w > base_h / base_w
        rh = torch.where(tall, torch.tensor(float(base_h)), torch.round(base_w / w * h))
        rw = torch.where(tall, torch.round(base_h / h * w), torch.tensor(float(base_w)))
        top, left = torch.round((base_h - rh) / 2), torch.round((base_w - rw) / 2)
        grids = _grid(frames), _grid(gh, top, top + rh), _grid(gw, left, left + rw)
    else:
        grids = _grid((frames + pt - 1) // pt), _grid(gh), _grid(gw)
    d = cfg.attention_head_dim
    cos, sin = zip(*(get_1d_rotary_pos_embed(n, g, theta=10000, use_real=True)
                     for n, g in zip((d // 4, d // 8 * 3, d // 8 * 3), grids)))
    kwargs["image_rotary_emb"] = (_combine(*cos), _combine(*sin))
    return kwargs


def _combine(t, h, w):  # [T, dt], [H, dh], [W, dw] -> [T * H * W, dt + dh + dw]
    nt, nh, nw = t.shape[0], h.shape[0], w.shape[0]
    return torch.cat([t[:, None, None].expand(-1, nh, nw, -1), h[None, :, None].expand(nt, -1, nw, -1),
                      w[None, None].expand(nt, nh, -1, -1)], -1).flatten(0, 2)


def _sincos_rows(self, sample_height, sample_width, sample_frames, device=None):
    """diffusers' CogVideoXPatchEmbed._get_positional_embeddings without its in-place write into
    `.data` (torch.export refuses it): zeros for the text rows, then the patches' sincos rows."""
    from diffusers.models.embeddings import get_3d_sincos_pos_embed

    h, w = sample_height // self.patch_size, sample_width // self.patch_size
    t = (sample_frames - 1) // self.temporal_compression_ratio + 1
    pos = get_3d_sincos_pos_embed(self.embed_dim, (w, h), t, self.spatial_interpolation_scale,
                                  self.temporal_interpolation_scale, device=device, output_type="pt").flatten(0, 1)
    return torch.cat([pos.new_zeros(self.max_text_seq_length, self.embed_dim), pos])[None]


def _forward(model, kwargs):
    with swapped(model.patch_embed, "_get_positional_embeddings", _sincos_rows):
        return model(**kwargs)


def _learned(c) -> bool:
    return bool(c.use_learned_positional_embeddings)


# Without rotary embeddings (CogVideoX-2b) the positions are a sincos table of max_text_seq_length
# text rows, then the patches: the text is padded to exactly that. Learned positions (CogVideoX
# 1.0 5b-I2V) hold the sample size's patches too: height, width and frames are that size.
POSITION_TABLES = {
    "text": Bound("max_text_seq_length", fixed=Cfg("max_text_seq_length"),
                  when=lambda c: not c.use_rotary_positional_embeddings or _learned(c)),
    "height": Bound("sample_height", fixed=Cfg("sample_height"), when=_learned),
    "width": Bound("sample_width", fixed=Cfg("sample_width"), when=_learned),
    "frames": Bound("sample_frames", fixed=Cfg(fn=lambda c: (c.sample_frames - 1) // c.temporal_compression_ratio + 1),
                    when=_learned),
}

TRANSFORMER = denoiser(
    "CogVideoXTransformer3DModel",
    inputs=(
        TensorSpec("hidden_states", ("batch", "frames", Cfg("in_channels"), "height", "width"),
                   doc="noisy latents, frames before channels (I2V: image latents concatenated on channels)"),
        TensorSpec("encoder_hidden_states", ("batch", "text", Cfg("text_embed_dim")), doc="T5 hidden states"),
        timestep(doc="DDIM / DPM timestep"),
        TensorSpec("ofs", (1,), dtype="float32", sample=lambda shape, g, ctx: torch.full(shape, 2.0),
                   when=lambda c: c.ofs_embed_dim is not None, doc="CogVideoX 1.5 I2V's offset (2.0 in the pipeline)"),
    ),
    outputs=(prediction(("batch", "frames", Cfg("out_channels"), "height", "width"), doc="predicted noise / v"),),
    prepare=_rope,
    computed=("image_rotary_emb",),  # the pipeline's, which `_rope` computes the same way in the graph
    graph_forward=_forward,
    tiny=dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
              text_embed_dim=32, num_layers=1, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
              max_text_seq_length=16, use_rotary_positional_embeddings=True),
    bounds=POSITION_TABLES,
)

COGVIDEOX = FamilySpec(
    name="cogvideox", mixin="CogVideoXLoraLoaderMixin", pipeline="CogVideoXPipeline",
    components={
        "transformer": TRANSFORMER,
        "text_encoder": hf_encoder("text_encoder", "T5EncoderModel", "T5Config", T5_TINY),
        **cogvideox_vae(COGVIDEOX_VAE_TINY),
        **cogvideox_vae_encoder(COGVIDEOX_VAE_TINY),
    },
    tasks={"image-to-video": ("CogVideoXImageToVideoPipeline",)},
    # CogVideoX 1.5 I2V's form: the image latents concatenated on channels, frames in pairs (patch_size_t) and
    # the offset embedding (`ofs`), without patch bias as the real one
    variants={"i2v": Variant(pipeline="CogVideoXImageToVideoPipeline", tiny={"transformer": dict(
        in_channels=8, patch_size_t=2, ofs_embed_dim=16, patch_bias=False)})},
    axes={
        "batch": BATCH,
        "frames": Axis(1, 13, 22, example=4, check=2),  # latent frames: 1 + (49 video frames - 1) / 4; 1.5: 22
        "height": Axis(16, 60, 96, example=8, check=12),  # latents (pixels / 8), multiples of the patch size 2
        "width": Axis(16, 90, 170, example=8, check=10),
        "text": Axis(1, 226, 226, example=8, check=12),  # T5 tokens
    },
    # CogVideoX-2b's scheduler (the 5b's is its DPM twin)
    scheduler=("CogVideoXDDIMScheduler", dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=3.0,
        timestep_spacing="trailing")),
    # Flux's markers also match these block names: the same pattern, so CogVideoX files are not taken for Flux's.
    markers=(r"^transformer\.transformer_blocks\.\d+\.(ff\.net|norm1\.linear)", r"^transformer\.patch_embed\.text_proj"),
)

FAMILIES = (COGVIDEOX,)
