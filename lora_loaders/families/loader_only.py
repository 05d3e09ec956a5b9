"""Families that load LoRAs (diffusers/PEFT layout, strict) but have no export entry yet.

Each becomes a module of its own, with graph inputs, axes, tiny configs and its
community layouts, as its export lands; until then its components take no export.
"""

from __future__ import annotations

from .spec import ComponentSpec, FamilySpec


def _denoiser(cls: str) -> ComponentSpec:
    return ComponentSpec("transformer", "diffusers", cls, "denoiser", export=False)


def _family(name, mixin, cls, markers=(), extra=None, **kw) -> FamilySpec:
    components = {"transformer": _denoiser(cls), **(extra or {})}
    return FamilySpec(name, mixin, components, markers=markers, **kw)


FAMILIES = (
    _family("flux", "FluxLoraLoaderMixin", "FluxTransformer2DModel",
            markers=(r"single_transformer_blocks", r"double_blocks", r"x_embedder"),
            extra={"text_encoder": ComponentSpec("text_encoder", "transformers", "CLIPTextModel", "text_encoder",
                                                 export=False, aliases=("text_model.",))},
            fuse_default=("transformer",), unfuse_default=("transformer", "text_encoder")),
    _family("auraflow", "AuraFlowLoraLoaderMixin", "AuraFlowTransformer2DModel", markers=(r"joint_transformer_blocks",)),
    _family("cogvideox", "CogVideoXLoraLoaderMixin", "CogVideoXTransformer3DModel"),
    _family("mochi", "Mochi1LoraLoaderMixin", "MochiTransformer3DModel"),
    _family("ltx-video", "LTXVideoLoraLoaderMixin", "LTXVideoTransformer3DModel"),
    _family("sana", "SanaLoraLoaderMixin", "SanaTransformer2DModel"),
    _family("hunyuan-video", "HunyuanVideoLoraLoaderMixin", "HunyuanVideoTransformer3DModel"),
    _family("lumina2", "Lumina2LoraLoaderMixin", "Lumina2Transformer2DModel"),
    _family("skyreels-v2", "SkyReelsV2LoraLoaderMixin", "SkyReelsV2Transformer3DModel"),
    _family("cogview4", "CogView4LoraLoaderMixin", "CogView4Transformer2DModel"),
    _family("amused", "AmusedLoraLoaderMixin", "UVit2DModel",
            extra={"text_encoder": ComponentSpec("text_encoder", "transformers", "CLIPTextModelWithProjection",
                                                 "text_encoder", export=False, aliases=("text_model.",))}),
    _family("hidream", "HiDreamImageLoraLoaderMixin", "HiDreamImageTransformer2DModel"),
    _family("qwen-image", "QwenImageLoraLoaderMixin", "QwenImageTransformer2DModel"),
    _family("kandinsky", "KandinskyLoraLoaderMixin", "Kandinsky5Transformer3DModel"),
)
