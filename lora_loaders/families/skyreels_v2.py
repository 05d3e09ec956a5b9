"""SkyReels-V2 (`skyreels-v2`): a Wan-architecture video DiT (`transformer`) and UMT5.

Layouts: diffusers/PEFT under `transformer.`; SkyReels' original names (Wan's, plus the fps
conditioning of `inject_sample_info` models) under `diffusion_model.` (or none) with
`lora_A/B` or `lora_down/up`, `alpha`, `diff`, `diff_b`; musubi-style kohya names
(`lora_unet_blocks_0_self_attn_q`), which diffusers' SkyReels mixin reads like Wan's.
The original-name table is Wan's.
"""

from __future__ import annotations

from .common import BATCH, T5_TINY, denoiser, hf_encoder, original_prefixes, prediction, rope_table, timestep
from .spec import IMAGE_TO_VIDEO, Axis, Cfg, FamilySpec, NameTable, Rule, TensorSpec, Variant
from .video_vae import WAN_VAE_TINY, wan_vae
from .wan import I2V_CHANNELS, I2V_IMAGE, I2V_TEXT, IMAGE_ENCODER, IMAGE_PROCESSOR, IMAGE_TOKENS, UNIPC_FLOW
from .wan import ORIGINAL as WAN_ORIGINAL

ORIGINAL = NameTable(rules=(
    *WAN_ORIGINAL.rules,
    # SkyReels' nn.Sequential(Linear, SiLU, Linear) is diffusers' FeedForward("linear-silu")
    Rule(r"fps_projection\.0", "fps_projection.net.0.proj"),
    Rule(r"fps_projection\.2", "fps_projection.net.2"),
))

TRANSFORMER = denoiser(
    "SkyReelsV2Transformer3DModel",
    inputs=(
        TensorSpec("hidden_states", ("batch", Cfg("in_channels"), "frames", "height", "width"),
                   doc="noisy video latents (I2V: with the image condition concatenated on channels)"),
        timestep(),
        TensorSpec("encoder_hidden_states", ("batch", "text", Cfg("text_dim")), doc="UMT5 hidden states"),
        TensorSpec("encoder_hidden_states_image", ("batch", "image_tokens", Cfg("image_dim")),
                   when=lambda config: config.image_dim is not None,
                   doc="CLIP image embedding: the image encoder's penultimate hidden states (I2V only)"),
        TensorSpec("fps", ("batch",), dtype="int64", when=lambda config: config.inject_sample_info,
                   doc="0: 16 fps, 1: 24 fps (inject_sample_info models only)"),
    ),
    outputs=(prediction(("batch", Cfg("out_channels"), "frames", "height", "width")),),
    tiny=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
              text_dim=32, freq_dim=16, ffn_dim=32, num_layers=1, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
    # rotary frequencies for rope_max_seq_len positions per axis (frames, height, width in patches)
    bounds={**rope_table("rope_max_seq_len", **{a: (lambda c, i=i: c.rope_max_seq_len * c.patch_size[i])
                                                           for i, a in enumerate(("frames", "height", "width"))}),
            **I2V_TEXT},  # Wan's image and text split
)

SKYREELS_V2 = FamilySpec(
    name="skyreels-v2", mixin="SkyReelsV2LoraLoaderMixin", pipeline="SkyReelsV2Pipeline",
    components={
        "transformer": TRANSFORMER,
        "text_encoder": hf_encoder("text_encoder", "UMT5EncoderModel", "UMT5Config", T5_TINY, mask=True),
        **wan_vae(WAN_VAE_TINY),  # Wan 2.1's VAE
        "image_encoder": IMAGE_ENCODER,  # I2V only: Wan 2.1 I2V's CLIP
    },
    scheduler=UNIPC_FLOW,
    tasks={IMAGE_TO_VIDEO: ("SkyReelsV2ImageToVideoPipeline",)},
    variants={"i2v": Variant("SkyReelsV2ImageToVideoPipeline", tiny={"transformer": {**I2V_CHANNELS, **I2V_IMAGE}},
                             processors={"image_processor": IMAGE_PROCESSOR},
                             tasks={IMAGE_TO_VIDEO: "SkyReelsV2ImageToVideoPipeline"})},
    axes={
        "batch": BATCH,
        "frames": Axis(1, 25, 31, example=3, check=2),  # latent frames: 1 + (97 video frames - 1) / 4
        "height": Axis(16, 68, 90, example=8, check=12),  # latents (pixels / 8), multiples of 2
        "width": Axis(16, 120, 160, example=8, check=10),
        "text": Axis(1, 512, 512, example=8, check=12),  # UMT5 tokens
        "image_tokens": IMAGE_TOKENS,
    },
    namespaces=original_prefixes(ORIGINAL),
    # Wan's (the same modules; no more, so a Wan file without them is not taken for SkyReels'), and fps.
    markers=(r"^transformer\.blocks\.\d+\.attn2\.add_k_proj", r"^transformer\.condition_embedder",
             r"^transformer\.blocks\.\d+\.ffn\.net", r"^transformer\.fps_"),
)

FAMILIES = (SKYREELS_V2,)
