"""Model families as data: components, LoRA-loadable modules, fuse defaults, formats, markers.

Mirrors diffusers' per-family LoRA mixins (`loaders/lora_pipeline.py`). Adding a family
means adding one `FamilySpec` here (and, for export, one spec in `export/`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FamilySpec:
    name: str
    mixin: str  # diffusers mixin class name, kept for our mixins
    components: dict[str, str]  # LoRA-loadable component -> model class name
    fuse_default: tuple[str, ...] | None = None  # None: every loadable component
    unfuse_default: tuple[str, ...] | None = None
    formats: tuple[str, ...] = ("peft",)
    text_encoders: tuple[str, ...] = ()
    # Regexes over "component.module" target names that identify files of this family.
    markers: tuple[str, ...] = ()
    layers_per_block: int = 2  # default for SGM block numbering when no UNet config is given
    kohya_prefixes: dict[str, str] = field(default_factory=dict)  # kohya prefix -> component

    @property
    def denoiser(self) -> str:
        return next(c for c in self.components if c not in self.text_encoders)

    @property
    def loadable(self) -> tuple[str, ...]:
        return tuple(self.components)


def _transformer_family(name, mixin, cls, markers=(), **kw):
    return FamilySpec(name, mixin, {"transformer": cls, **kw.pop("extra", {})}, markers=markers, **kw)


_SD_KOHYA = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in [
        FamilySpec(
            "sd", "StableDiffusionLoraLoaderMixin",
            {"unet": "UNet2DConditionModel", "text_encoder": "CLIPTextModel"},
            formats=("peft", "kohya"), text_encoders=("text_encoder",),
            markers=(r"^unet\.down_blocks\.0\.attentions", r"^unet\.down_blocks\.3\."),
            kohya_prefixes=_SD_KOHYA,
        ),
        FamilySpec(
            "sdxl", "StableDiffusionXLLoraLoaderMixin",
            {"unet": "UNet2DConditionModel", "text_encoder": "CLIPTextModel",
             "text_encoder_2": "CLIPTextModelWithProjection"},
            formats=("peft", "kohya"), text_encoders=("text_encoder", "text_encoder_2"),
            markers=(r"^text_encoder_2\.", r"^unet\.add_embedding", r"transformer_blocks\.[2-9]\.",
                     r"^unet\.down_blocks\.\d\.attentions\.\d\.transformer_blocks\.1\."),
            kohya_prefixes={**_SD_KOHYA, "lora_te2_": "text_encoder_2"},
        ),
        FamilySpec(
            "sd3", "SD3LoraLoaderMixin",
            {"transformer": "SD3Transformer2DModel", "text_encoder": "CLIPTextModelWithProjection",
             "text_encoder_2": "CLIPTextModelWithProjection"},
            text_encoders=("text_encoder", "text_encoder_2"),
            markers=(r"^transformer\.transformer_blocks\.\d+\.attn\.add_q_proj", r"context_embedder"),
        ),
        FamilySpec(
            "flux", "FluxLoraLoaderMixin",
            {"transformer": "FluxTransformer2DModel", "text_encoder": "CLIPTextModel"},
            fuse_default=("transformer",), unfuse_default=("transformer", "text_encoder"),
            text_encoders=("text_encoder",),
            markers=(r"single_transformer_blocks", r"double_blocks", r"x_embedder"),
        ),
        _transformer_family("auraflow", "AuraFlowLoraLoaderMixin", "AuraFlowTransformer2DModel",
                            markers=(r"joint_transformer_blocks",)),
        _transformer_family("cogvideox", "CogVideoXLoraLoaderMixin", "CogVideoXTransformer3DModel"),
        _transformer_family("mochi", "Mochi1LoraLoaderMixin", "MochiTransformer3DModel"),
        _transformer_family("ltx-video", "LTXVideoLoraLoaderMixin", "LTXVideoTransformer3DModel"),
        _transformer_family("sana", "SanaLoraLoaderMixin", "SanaTransformer2DModel"),
        _transformer_family("hunyuan-video", "HunyuanVideoLoraLoaderMixin", "HunyuanVideoTransformer3DModel"),
        _transformer_family("lumina2", "Lumina2LoraLoaderMixin", "Lumina2Transformer2DModel"),
        _transformer_family("wan", "WanLoraLoaderMixin", "WanTransformer3DModel",
                            extra={"transformer_2": "WanTransformer3DModel"}, fuse_default=("transformer",)),
        _transformer_family("skyreels-v2", "SkyReelsV2LoraLoaderMixin", "SkyReelsV2Transformer3DModel"),
        _transformer_family("cogview4", "CogView4LoraLoaderMixin", "CogView4Transformer2DModel"),
        FamilySpec(
            "amused", "AmusedLoraLoaderMixin",
            {"transformer": "UVit2DModel", "text_encoder": "CLIPTextModelWithProjection"},
            text_encoders=("text_encoder",),
        ),
        _transformer_family("hidream", "HiDreamImageLoraLoaderMixin", "HiDreamImageTransformer2DModel"),
        _transformer_family("qwen-image", "QwenImageLoraLoaderMixin", "QwenImageTransformer2DModel"),
        _transformer_family("kandinsky", "KandinskyLoraLoaderMixin", "Kandinsky5Transformer3DModel"),
    ]
}


def get_family(name: str) -> FamilySpec:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; supported: {', '.join(FAMILIES)}") from None


def guess_family(target_names: list[str]) -> str | None:
    """The family whose markers match the most of these `component.module` names, if any."""
    best, best_hits = None, 0
    for spec in FAMILIES.values():
        hits = sum(1 for m in spec.markers for n in target_names if re.search(m, n))
        if hits > best_hits:
            best, best_hits = spec.name, hits
    return best


def looks_like(spec: FamilySpec, target_names: list[str]) -> str | None:
    """Another family this file looks made for, or None when it may be for `spec`."""
    components = {n.split(".", 1)[0] for n in target_names}
    if not components <= set(spec.components):
        return guess_family(target_names) or "another family"
    guess = guess_family(target_names)
    if guess is None or guess == spec.name:
        return None
    own_hits = sum(1 for m in spec.markers for n in target_names if re.search(m, n))
    return guess if own_hits == 0 else None
