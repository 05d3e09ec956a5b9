"""Small random models built from configs, so the main job and the tests run offline.

Structurally faithful to each family (same block types, SDXL's added time conditions and
second text encoder with projection), just narrow. Random weights, seeded.
"""

from __future__ import annotations

import torch

_CLIP = dict(
    vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, projection_dim=32, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
)

_UNET = {
    "sd": dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
    ),
    "sdxl": dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=64, norm_num_groups=16,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
    ),
}

# component -> (library, class name, config)
TINY_CONFIGS: dict[str, dict[str, tuple[str, str, dict]]] = {
    "sd": {
        "unet": ("diffusers", "UNet2DConditionModel", _UNET["sd"]),
        "text_encoder": ("transformers", "CLIPTextModel", _CLIP),
    },
    "sdxl": {
        "unet": ("diffusers", "UNet2DConditionModel", _UNET["sdxl"]),
        "text_encoder": ("transformers", "CLIPTextModel", _CLIP),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", _CLIP),
    },
}


def build_tiny(family: str, components: list[str] | None = None, seed: int = 0, dtype=torch.float32) -> dict:
    """{component: module} for a family's tiny model, random weights from `seed`, eval mode."""
    if family not in TINY_CONFIGS:
        raise ValueError(f"no tiny model for family {family!r}; have {sorted(TINY_CONFIGS)}")
    specs = TINY_CONFIGS[family]
    wanted = list(specs) if components is None else components
    out = {}
    for i, name in enumerate(wanted):
        if name not in specs:
            raise ValueError(f"family {family!r} has no component {name!r}; have {sorted(specs)}")
        library, cls_name, config = specs[name]
        torch.manual_seed(seed + i)
        if library == "diffusers":
            import diffusers

            model = getattr(diffusers, cls_name)(**config)
        else:
            import transformers

            model = getattr(transformers, cls_name)(transformers.CLIPTextConfig(**config))
        out[name] = model.to(dtype).eval()
    return out
