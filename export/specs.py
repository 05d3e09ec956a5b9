"""Export specs: everything family-specific about exporting a component, as data.

Adding a family means adding one `FamilySpec` to `FAMILIES`; the machinery in
`export.onnx_export` / `export.pipeline` is generic.

Graph inputs are named after the diffusers / transformers `forward` arguments. Dtypes:
floating inputs in the export dtype, except `timestep` (float32, shape [batch]);
`input_ids` int64 [batch, 77]; SDXL's `time_ids` [batch, 6] and `text_embeds` [batch, 1280]
(real config) in the export dtype. Dynamic axes: `batch` everywhere, `height` / `width`
(latent) for the UNet's `sample` and `out_sample`. Outputs:

- UNet (`sd`, `sdxl`): `out_sample`, the denoiser's prediction (noise / v), same shape as
  `sample`.
- `sd` `text_encoder` (CLIPTextModel): `last_hidden_state` (what SD conditions on),
  `pooler_output`.
- `sdxl` `text_encoder` (CLIPTextModel): `hidden_states` = `hidden_states[-2]`, the
  penultimate layer SDXL conditions on, and `pooler_output`.
- `sdxl` `text_encoder_2` (CLIPTextModelWithProjection): `text_embeds` (the pooled,
  projected embedding SDXL passes as `text_embeds`), and `hidden_states` =
  `hidden_states[-2]`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

TEXT_SEQ_LEN = 77


@dataclass
class Inputs:
    """Shapes that example inputs are made at."""

    batch: int = 2
    height: int | None = None  # latent height; None: a default from the model
    width: int | None = None
    seed: int = 0
    # "export": square latents of min(sample_size, 32); "validate": small non-square latents
    # (16 x 16 + one downsampling multiple), cheap even for real-scale fp16 on CPU.
    role: str = "export"


@dataclass
class ComponentSpec:
    name: str
    library: str  # "diffusers" | "transformers"
    class_name: str
    input_names: list[str]
    output_names: list[str]
    # {input or output name: {axis: symbolic dim name}}
    dynamic_axes: dict[str, dict[int, str]]
    wrap: Callable[[nn.Module], nn.Module]
    make_inputs: Callable[[nn.Module, torch.dtype, Inputs], dict[str, torch.Tensor]]
    # Export example shape and a different validation shape (both exercise the dynamic axes).
    export_inputs: Inputs = field(default_factory=lambda: Inputs(batch=2))
    validate_inputs: Inputs = field(default_factory=lambda: Inputs(batch=1, seed=1234, role="validate"))


@dataclass
class FamilySpec:
    name: str
    components: dict[str, ComponentSpec]
    default_components: list[str]


# --- wrappers: positional graph inputs -> diffusers / transformers calls ---------------------


class Wrapper(nn.Module):
    """Holds the component as `.model`; its initializers are renamed back without the prefix."""

    prefix = "model."

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


class UNetWrapper(Wrapper):
    def forward(self, sample, timestep, encoder_hidden_states):
        return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class UNetXLWrapper(Wrapper):
    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        cond = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.model(sample, timestep, encoder_hidden_states, added_cond_kwargs=cond, return_dict=False)[0]


class ClipLastWrapper(Wrapper):
    def forward(self, input_ids):
        out = self.model(input_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


class ClipPenultimateWrapper(Wrapper):
    def forward(self, input_ids):
        out = self.model(input_ids, output_hidden_states=True, return_dict=True)
        return out.hidden_states[-2], out.pooler_output


class ClipProjectionWrapper(Wrapper):
    def forward(self, input_ids):
        out = self.model(input_ids, output_hidden_states=True, return_dict=True)
        return out.text_embeds, out.hidden_states[-2]


# --- example inputs ----------------------------------------------------------------------------


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _latent_hw(model, shape: Inputs) -> tuple[int, int]:
    n_down = len(model.config.block_out_channels) - 1
    mult = 2 ** n_down
    if shape.role == "validate":
        h = shape.height or max(mult * 2, 16)
        w = shape.width or h + mult
    else:
        default = max(mult * 2, min(int(model.config.sample_size or 64), 32))
        h = shape.height or default
        w = shape.width or default
    for v in (h, w):
        if v % mult:
            raise ValueError(f"latent size {v} is not a multiple of {mult}")
    return h, w


def unet_inputs(model, dtype, shape: Inputs) -> dict[str, torch.Tensor]:
    g = _gen(shape.seed)
    cfg = model.config
    h, w = _latent_hw(model, shape)
    b = shape.batch
    cross = cfg.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    return {
        "sample": torch.randn(b, cfg.in_channels, h, w, generator=g).to(dtype),
        "timestep": (torch.rand(b, generator=g) * 999).round().float(),
        "encoder_hidden_states": torch.randn(b, TEXT_SEQ_LEN, cross, generator=g).to(dtype),
    }


def unet_xl_inputs(model, dtype, shape: Inputs) -> dict[str, torch.Tensor]:
    d = unet_inputs(model, dtype, shape)
    g = _gen(shape.seed + 1)
    cfg = model.config
    b = shape.batch
    n_text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    h, w = _latent_hw(model, shape)
    time_ids = torch.tensor([h * 8, w * 8, 0, 0, h * 8, w * 8], dtype=torch.float32).repeat(b, 1)
    d["text_embeds"] = torch.randn(b, n_text, generator=g).to(dtype)
    d["time_ids"] = time_ids.to(dtype)
    return d


def clip_inputs(model, dtype, shape: Inputs) -> dict[str, torch.Tensor]:
    g = _gen(shape.seed)
    cfg = model.config
    seq = min(TEXT_SEQ_LEN, cfg.max_position_embeddings)
    ids = torch.randint(0, cfg.vocab_size, (shape.batch, seq), generator=g)
    ids[:, -1] = cfg.eos_token_id if cfg.eos_token_id is not None else cfg.vocab_size - 1
    return {"input_ids": ids.long()}


# --- families ---------------------------------------------------------------------------------

_UNET_AXES = {
    "sample": {0: "batch", 2: "height", 3: "width"},
    "timestep": {0: "batch"},
    "encoder_hidden_states": {0: "batch"},
    "out_sample": {0: "batch", 2: "height", 3: "width"},
}
_UNET_XL_AXES = {**_UNET_AXES, "text_embeds": {0: "batch"}, "time_ids": {0: "batch"}}


def _clip(name: str, cls: str, wrap, outputs: list[str]) -> ComponentSpec:
    axes = {"input_ids": {0: "batch"}}
    axes.update({o: {0: "batch"} for o in outputs})
    return ComponentSpec(
        name=name, library="transformers", class_name=cls, input_names=["input_ids"], output_names=outputs,
        dynamic_axes=axes, wrap=wrap, make_inputs=clip_inputs,
    )


FAMILIES: dict[str, FamilySpec] = {
    "sd": FamilySpec(
        name="sd",
        components={
            "unet": ComponentSpec(
                name="unet", library="diffusers", class_name="UNet2DConditionModel",
                input_names=["sample", "timestep", "encoder_hidden_states"], output_names=["out_sample"],
                dynamic_axes=_UNET_AXES, wrap=UNetWrapper, make_inputs=unet_inputs,
            ),
            "text_encoder": _clip("text_encoder", "CLIPTextModel", ClipLastWrapper,
                                  ["last_hidden_state", "pooler_output"]),
        },
        default_components=["unet", "text_encoder"],
    ),
    "sdxl": FamilySpec(
        name="sdxl",
        components={
            "unet": ComponentSpec(
                name="unet", library="diffusers", class_name="UNet2DConditionModel",
                input_names=["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"],
                output_names=["out_sample"], dynamic_axes=_UNET_XL_AXES, wrap=UNetXLWrapper,
                make_inputs=unet_xl_inputs,
            ),
            "text_encoder": _clip("text_encoder", "CLIPTextModel", ClipPenultimateWrapper,
                                  ["hidden_states", "pooler_output"]),
            "text_encoder_2": _clip("text_encoder_2", "CLIPTextModelWithProjection", ClipProjectionWrapper,
                                    ["text_embeds", "hidden_states"]),
        },
        default_components=["unet", "text_encoder", "text_encoder_2"],
    ),
}


def family_spec(family: str) -> FamilySpec:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} for export; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[family]
