"""Wan 2.1 / 2.2 (`wan`): a video DiT (`transformer`; Wan 2.2 adds `transformer_2`) and UMT5.

Layouts: diffusers/PEFT under `transformer.`; the original Wan names under
`diffusion_model.` (or none) with `lora_A/B` or `lora_down/up`, `alpha`, `diff`, `diff_b`
(norm deltas included: diffusers drops those); musubi-tuner's kohya names
(`lora_unet_blocks_0_self_attn_q`, also with dots after the block as some trainers write);
LyCORIS (`lycoris_`). A T2V LoRA loads into an I2V model as is (its `k_img` / `v_img`
modules are simply not targeted).
"""

from __future__ import annotations

from .common import BATCH, T5_TINY, hf_encoder, rope_table, timesteps
from .spec import (IMAGE_TO_VIDEO, Axis, Bound, Cfg, ComponentSpec, FamilySpec, NameTable, Namespace, Processor, Rule,
                   TensorSpec, Variant)
from .video_vae import WAN_VAE_TINY, wan_vae

_B = r"blocks\.(\d+)"
ORIGINAL = NameTable(rules=(
    Rule(rf"{_B}\.self_attn\.(q|k|v)", r"blocks.\1.attn1.to_\2"),
    Rule(rf"{_B}\.self_attn\.o", r"blocks.\1.attn1.to_out.0"),
    Rule(rf"{_B}\.self_attn\.norm_(q|k)", r"blocks.\1.attn1.norm_\2"),
    Rule(rf"{_B}\.cross_attn\.(q|k|v)", r"blocks.\1.attn2.to_\2"),
    Rule(rf"{_B}\.cross_attn\.o", r"blocks.\1.attn2.to_out.0"),
    Rule(rf"{_B}\.cross_attn\.norm_(q|k)", r"blocks.\1.attn2.norm_\2"),
    Rule(rf"{_B}\.cross_attn\.(k|v)_img", r"blocks.\1.attn2.add_\2_proj"),
    Rule(rf"{_B}\.cross_attn\.norm_k_img", r"blocks.\1.attn2.norm_added_k"),
    Rule(rf"{_B}\.norm3", r"blocks.\1.norm2"),  # the cross-attention norm: norm3 in Wan, norm2 in diffusers
    Rule(rf"{_B}\.ffn\.0", r"blocks.\1.ffn.net.0.proj"),
    Rule(rf"{_B}\.ffn\.2", r"blocks.\1.ffn.net.2"),
    Rule(r"head\.head", "proj_out"),
    Rule(r"text_embedding\.0", "condition_embedder.text_embedder.linear_1"),
    Rule(r"text_embedding\.2", "condition_embedder.text_embedder.linear_2"),
    Rule(r"time_embedding\.0", "condition_embedder.time_embedder.linear_1"),
    Rule(r"time_embedding\.2", "condition_embedder.time_embedder.linear_2"),
    Rule(r"time_projection\.1", "condition_embedder.time_proj"),
    Rule(r"img_emb\.proj\.0", "condition_embedder.image_embedder.norm1"),
    Rule(r"img_emb\.proj\.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    Rule(r"img_emb\.proj\.3", "condition_embedder.image_embedder.ff.net.2"),
    Rule(r"img_emb\.proj\.4", "condition_embedder.image_embedder.norm2"),
    Rule(r"patch_embedding", "patch_embedding"),
))


# An I2V transformer takes the image tokens before the text's and cuts them off at 512 from the end
# (diffusers hardcodes the text length; the I2V pipelines pad the prompt to 512): text is 512 there.
I2V_TEXT = {"text": Bound("image_dim", fixed=Cfg(fn=lambda c: 512), when=lambda c: c.image_dim is not None)}


def _denoiser(name: str) -> ComponentSpec:
    return ComponentSpec(
        name=name, library="diffusers", class_name="WanTransformer3DModel", role="denoiser",
        inputs=(
            TensorSpec("hidden_states", ("batch", Cfg("in_channels"), "frames", "height", "width"),
                       doc="noisy video latents (I2V: with the image condition concatenated on channels)"),
            TensorSpec("timestep", ("batch",), dtype="float32", sample=timesteps, doc="flow-matching timestep x 1000"),
            TensorSpec("encoder_hidden_states", ("batch", "text", Cfg("text_dim")), doc="UMT5 hidden states"),
            TensorSpec("encoder_hidden_states_image", ("batch", "image_tokens", Cfg("image_dim")),
                       when=lambda config: config.image_dim is not None,
                       doc="CLIP image embedding: the image encoder's penultimate hidden states (Wan 2.1 I2V only)"),
        ),
        outputs=(TensorSpec("out_sample", ("batch", Cfg("out_channels"), "frames", "height", "width"), source="0",
                            doc="predicted velocity"),),
        call_kwargs={"return_dict": False},
        optional=name == "transformer_2",  # Wan 2.2 only
        tiny=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                  text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        # rotary frequencies for rope_max_seq_len positions per axis (frames, height, width in patches)
        bounds={**rope_table("rope_max_seq_len", **{a: (lambda c, i=i: c.rope_max_seq_len * c.patch_size[i])
                                                               for i, a in enumerate(("frames", "height", "width"))}),
                **I2V_TEXT},
    )


def _image_states(values, config):
    """The image encoder's call as the I2V pipelines read it (`.hidden_states[-2]`): the one layer exported."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(hidden_states=(values["hidden_states"], None))


# Wan 2.1 I2V's (and SkyReels-V2 I2V's) CLIP ViT-H image encoder: the pipeline reads hidden_states[-2]
IMAGE_ENCODER = ComponentSpec(
    name="image_encoder", library="transformers", class_name="CLIPVisionModel", role="image_encoder", lora=False,
    export=False, optional=True, tasks=(IMAGE_TO_VIDEO,), config_class="CLIPVisionConfig",
    inputs=(TensorSpec("pixel_values", ("batch", Cfg("num_channels"), Cfg("image_size"), Cfg("image_size")),
                       doc="the image processor's pixels"),),
    outputs=(TensorSpec("hidden_states", ("batch", Cfg(fn=lambda c: (c.image_size // c.patch_size) ** 2 + 1),
                                          Cfg("hidden_size")), source="hidden_states.-2",
                        doc="the penultimate layer's hidden states"),),
    call_kwargs={"output_hidden_states": True, "return_dict": True}, pipeline_output=_image_states,
    tiny=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, projection_dim=32),
)
# the image encoder's size (224 for the real one)
IMAGE_PROCESSOR = Processor("transformers", "CLIPImageProcessor",
                            dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))
IMAGE_TOKENS = Axis(1, 257, 514, example=3, check=5)  # CLIP tokens: 257 a frame (FLF2V: two frames)
# the I2V transformer takes the noisy latents, the mask (4: the VAE's time factor) and the condition latents
I2V_CHANNELS = {"in_channels": 2 * WAN_VAE_TINY["z_dim"] + 4}
I2V_IMAGE = {"image_dim": IMAGE_ENCODER.tiny["hidden_size"], "added_kv_proj_dim": 16}  # 16: the inner dim, 2 x 8

_NS = dict(table=ORIGINAL)
# Wan's own scheduler: UniPC over flow-matching sigmas
UNIPC_FLOW = ("UniPCMultistepScheduler", dict(num_train_timesteps=1000, prediction_type="flow_prediction",
                                              use_flow_sigmas=True, flow_shift=3.0))
WAN = FamilySpec(
    name="wan", mixin="WanLoraLoaderMixin", pipeline="WanPipeline",
    components={
        "transformer": _denoiser("transformer"),
        "transformer_2": _denoiser("transformer_2"),
        "text_encoder": hf_encoder("text_encoder", "UMT5EncoderModel", "UMT5Config", T5_TINY, mask=True),
        **wan_vae(WAN_VAE_TINY),
        "image_encoder": IMAGE_ENCODER,  # Wan 2.1 I2V only
    },
    scheduler=UNIPC_FLOW,
    pipeline_config={"boundary_ratio": 0.875},  # the tiny model is Wan 2.2's pair of denoisers
    tasks={IMAGE_TO_VIDEO: ("WanImageToVideoPipeline",)},
    variants={
        # Wan 2.1 I2V: one transformer with the CLIP image's cross-attention
        "i2v": Variant("WanImageToVideoPipeline", tiny={"transformer": {**I2V_CHANNELS, **I2V_IMAGE}},
                       lacks=("transformer_2",), pipeline_config={}, processors={"image_processor": IMAGE_PROCESSOR},
                       tasks={IMAGE_TO_VIDEO: "WanImageToVideoPipeline"}),
        # Wan 2.2 I2V A14B: two transformers (boundary_ratio: the family's), no image encoder
        "i2v-2.2": Variant("WanImageToVideoPipeline", tiny={"transformer": I2V_CHANNELS, "transformer_2": I2V_CHANNELS},
                           lacks=("image_encoder",), tasks={IMAGE_TO_VIDEO: "WanImageToVideoPipeline"}),
    },
    axes={
        "batch": BATCH,
        "frames": Axis(1, 21, 31, example=3, check=2),  # latent frames: 1 + (video frames - 1) / 4
        "height": Axis(16, 60, 90, example=8, check=12),  # latents (pixels / 8), multiples of 2
        "width": Axis(16, 104, 160, example=8, check=10),
        "text": Axis(1, 512, 512, example=8, check=12),  # UMT5 tokens
        "image_tokens": IMAGE_TOKENS,
    },
    namespaces=(
        Namespace("diffusion_model.", "transformer", format="original", **_NS),
        Namespace("transformer.", "transformer", **_NS),
        Namespace("transformer_2.", "transformer_2", **_NS),
        Namespace("lora_unet_", "transformer", flat=True, format="kohya", **_NS),
        Namespace("lycoris_", "transformer", flat=True, format="lycoris", **_NS),
    ),
    fuse_default=("transformer",), unfuse_default=("transformer",),
    load_options={"load_into_transformer_2": {"transformer": "transformer_2"}},
    markers=(r"^transformer\.blocks\.\d+\.attn2\.add_k_proj", r"^transformer\.condition_embedder",
             r"^transformer\.blocks\.\d+\.ffn\.net", r"^transformer_2\."),
)

FAMILIES = (WAN,)
