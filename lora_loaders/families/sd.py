"""Stable Diffusion 1.x / 2.x (`sd`) and SDXL (`sdxl`): a UNet and CLIP text encoders.

kohya / A1111 files use `lora_unet_` with diffusers or SGM (original) block names,
`lora_te_` / `lora_te1_` / `lora_te2_` for the text encoders.
"""

from __future__ import annotations

import re

import torch

from .common import BATCH, IMAGE_AXES, VAE_TINY, clip, timesteps, vae
from .spec import Axis, Cfg, ComponentSpec, FamilySpec, NameTable, Namespace, TensorSpec

# ---- SGM (original Stable Diffusion) UNet names, as kohya flattens them -> diffusers names ----

_SGM_TOP = [
    (r"^input_blocks_0_0_", "conv_in_"), (r"^time_embed_0_", "time_embedding_linear_1_"),
    (r"^time_embed_2_", "time_embedding_linear_2_"), (r"^label_emb_0_0_", "add_embedding_linear_1_"),
    (r"^label_emb_0_2_", "add_embedding_linear_2_"), (r"^out_0_", "conv_norm_out_"), (r"^out_2_", "conv_out_"),
]
_SGM_RESNET = [("in_layers_0", "norm1"), ("in_layers_2", "conv1"), ("out_layers_0", "norm2"),
               ("out_layers_3", "conv2"), ("emb_layers_1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
_SGM_BLOCK = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$")
_SGM_MIDDLE = re.compile(r"^middle_block_(\d+)_(.+)$")
_SGM_HEADS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out_")


def sgm_to_diffusers(flat: str, flat_names: bool, ctx) -> str | None:
    """One flattened SGM UNet name -> the flattened diffusers name (None: not an SGM name)."""
    if not flat_names or not flat.startswith(_SGM_HEADS):
        return None
    for pattern, repl in _SGM_TOP:
        if re.match(pattern, flat + "_"):
            return re.sub(pattern, repl, flat + "_")[:-1]
    m = _SGM_MIDDLE.match(flat)
    if m:
        outer, rest = int(m.group(1)), m.group(2)
        prefix = {0: "mid_block_resnets_0", 1: "mid_block_attentions_0", 2: "mid_block_resnets_1"}.get(outer)
        if prefix is None:
            raise ValueError(f"invalid middle_block index {outer} in {flat!r}")
        return _resnet_names(f"{prefix}_{rest}") if outer != 1 else f"{prefix}_{rest}"
    m = _SGM_BLOCK.match(flat)
    if not m:
        return None
    kind, outer, inner, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    per = ctx.count(r"down_blocks\.0\.resnets\.(\d+)\.", 2) + 1  # layers_per_block + 1
    if kind == "input_blocks":
        if outer == 0:
            raise ValueError(f"invalid input_blocks index in {flat!r}")
        block, layer = (outer - 1) // per, (outer - 1) % per
        if inner == 0 and rest.startswith("op"):
            return f"down_blocks_{block}_downsamplers_0_conv"
        if inner == 0:
            return _resnet_names(f"down_blocks_{block}_resnets_{layer}_{rest}")
        return f"down_blocks_{block}_attentions_{layer}_{rest}"
    block, layer = outer // per, outer % per
    if inner == 0:
        return _resnet_names(f"up_blocks_{block}_resnets_{layer}_{rest}")
    if rest == "conv" or inner == 2:
        return f"up_blocks_{block}_upsamplers_0_{rest}"
    return f"up_blocks_{block}_attentions_{layer}_{rest}"


def _resnet_names(flat: str) -> str:
    for old, new in _SGM_RESNET:
        flat = flat.replace(old, new)
    return flat


SGM = NameTable(fn=sgm_to_diffusers)


# ---- diffusers' per-block UNet weights, expanded over the UNet's module names ----

def unet_block_weights(scales: dict, modules) -> dict[str, float]:
    """`{"down": .., "mid": .., "up": {"block_1": [..]}}` -> {`down_blocks.i.attentions.j`: w} as diffusers does."""
    unknown = set(scales) - {"down", "mid", "up"}
    if unknown:
        raise ValueError(f"per-block weights take keys down, mid, up; got {sorted(unknown)}")
    names = list(modules)
    with_attn = {side: sorted({int(m.group(1)) for n in names if (m := re.match(rf"{side}_blocks\.(\d+)\.attentions\.", n))})
                 for side in ("down", "up")}
    lpb = len({m.group(1) for n in names if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", n))}) or 2
    per_block = {"down": lpb, "up": lpb + 1}
    out = {}
    mid = scales.get("mid", 1.0)
    if isinstance(mid, list):
        if len(mid) != 1:
            raise ValueError(f"Expected 1 scales for mid, got {len(mid)}.")
        mid = mid[0]
    out["mid_block.attentions.0"] = float(mid)
    for side in ("down", "up"):
        value = scales.get(side, 1.0)
        blocks = value if isinstance(value, dict) else {f"block_{i}": value for i in with_attn[side]}
        for key in blocks:
            if not (key.startswith("block_") and key[6:].isdigit() and int(key[6:]) in with_attn[side]):
                raise ValueError(f"Can't set lora scale for {side}.{key}: no such block with attentions")
        for i in with_attn[side]:
            v = blocks.get(f"block_{i}", 1.0)
            v = [v] * per_block[side] if not isinstance(v, list) else (v * per_block[side] if len(v) == 1 else v)
            if len(v) != per_block[side]:
                raise ValueError(f"Expected {per_block[side]} scales for {side}.block_{i}, got {len(v)}.")
            for j, w in enumerate(v):
                out[f"{side}_blocks.{i}.attentions.{j}"] = float(w)
    return out


# ---- the UNet's graph ----

def _time_ids(shape, g, ctx) -> torch.Tensor:
    h, w = ctx.sizes["height"] * 8, ctx.sizes["width"] * 8  # pixels: latents x the VAE factor
    return torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32).repeat(shape[0], 1)


def _unet(xl: bool, tiny: dict) -> ComponentSpec:
    inputs = [
        TensorSpec("sample", ("batch", Cfg("in_channels"), "height", "width"), doc="noisy latents"),
        TensorSpec("timestep", ("batch",), dtype="float32", sample=timesteps, doc="diffusion timestep per sample"),
        TensorSpec("encoder_hidden_states", ("batch", 77, Cfg("cross_attention_dim", index=0)),
                   doc="text encoder hidden states" + (" (both encoders, concatenated)" if xl else "")),
    ]
    if xl:
        inputs += [
            TensorSpec("text_embeds", ("batch", Cfg(fn=lambda c: c.projection_class_embeddings_input_dim
                                                     - 6 * c.addition_time_embed_dim)),
                       arg="added_cond_kwargs.text_embeds", doc="pooled, projected text_encoder_2 embedding"),
            TensorSpec("time_ids", ("batch", 6), arg="added_cond_kwargs.time_ids", sample=_time_ids,
                       doc="original size, crop top-left, target size (pixels)"),
        ]
    return ComponentSpec(
        name="unet", library="diffusers", class_name="UNet2DConditionModel", role="denoiser",
        inputs=tuple(inputs),
        outputs=(TensorSpec("out_sample", ("batch", Cfg("out_channels"), "height", "width"), source="0",
                            doc="predicted noise (or v)"),),
        call_kwargs={"return_dict": False}, tiny=tiny, block_weights=unet_block_weights,
    )


_VAE = vae(("batch", Cfg("latent_channels"), "height", "width"),
           ("batch", Cfg("out_channels"), "image_height", "image_width"), VAE_TINY)
_EULER = ("EulerDiscreteScheduler", dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                         beta_schedule="scaled_linear", steps_offset=1))
_AXES = {
    **IMAGE_AXES,
    "batch": BATCH,
    # latent pixels / 8; the export traces and validates small sizes (multiples of 8 fit every UNet)
    "height": Axis(32, 64, 128, example=16, check=16),
    "width": Axis(32, 64, 128, example=16, check=24),
}
_KOHYA = (Namespace("lora_unet_", "unet", flat=True, table=SGM, format="kohya"),
          Namespace("lora_te_", "text_encoder", flat=True, format="kohya"),
          Namespace("lora_te1_", "text_encoder", flat=True, format="kohya"))

SD = FamilySpec(
    name="sd", mixin="StableDiffusionLoraLoaderMixin", pipeline="StableDiffusionPipeline",
    components={
        "unet": _unet(False, dict(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16)),
        "text_encoder": clip("text_encoder", "CLIPTextModel",
                             (("last_hidden_state", "last_hidden_state"), ("pooler_output", "pooler_output"))),
        **{c.name: c for c in _VAE},
    },
    axes=_AXES, namespaces=_KOHYA, scheduler=_EULER,
    tasks={"image-to-image": ("StableDiffusionImg2ImgPipeline",), "inpainting": ("StableDiffusionInpaintPipeline",)},
    markers=(r"^unet\.down_blocks\.0\.attentions", r"^unet\.down_blocks\.3\."),
)

SDXL = FamilySpec(
    name="sdxl", mixin="StableDiffusionXLLoraLoaderMixin", pipeline="StableDiffusionXLPipeline",
    components={
        "unet": _unet(True, dict(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=64,
            norm_num_groups=16, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)),
        # SDXL conditions on the penultimate layer of both encoders (the last layer too, for
        # what a pipeline reads as the model's first output)
        "text_encoder": clip("text_encoder", "CLIPTextModel",
                             (("hidden_states", "hidden_states.-2"), ("pooler_output", "pooler_output"),
                              ("last_hidden_state", "last_hidden_state"))),
        "text_encoder_2": clip("text_encoder_2", "CLIPTextModelWithProjection",
                               (("text_embeds", "text_embeds"), ("hidden_states", "hidden_states.-2"))),
        **{c.name: c for c in _VAE},
    },
    scheduler=_EULER,
    tasks={"image-to-image": ("StableDiffusionXLImg2ImgPipeline",), "inpainting": ("StableDiffusionXLInpaintPipeline",)},
    axes={**_AXES, "height": Axis(32, 128, 192, example=16, check=16),
          "width": Axis(32, 128, 192, example=16, check=24)},
    namespaces=(*_KOHYA, Namespace("lora_te2_", "text_encoder_2", flat=True, format="kohya")),
    markers=(r"^text_encoder_2\.", r"^unet\.add_embedding", r"transformer_blocks\.[2-9]\.",
             r"^unet\.down_blocks\.\d\.attentions\.\d\.transformer_blocks\.1\."),
)

FAMILIES = (SD, SDXL)
