"""Real-scale model configs (SD 1.5, SDXL) with random weights, built on `meta` then materialized."""

from __future__ import annotations

import torch

from lora_loaders.families import get_family

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
CONFIGS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET, "tiny_sdxl": dict(get_family("sdxl").component("unet").tiny)}  # tiny: smoke runs


_POOL_ELEMENTS = 1 << 24  # one pool of normal draws, copied from at pseudo-random offsets: seconds, not minutes


@torch.no_grad()
def fill_normal(params, std: float, seed: int = 0):
    """Fill tensors with N(0, std) values: slices of one pool of 16 M draws at seeded random offsets
    (the value distribution of independent draws at memory speed; generating 2.6 B normals on 2 cores
    takes tens of seconds)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(2 * _POOL_ELEMENTS, generator=g) * std
    for p in params:
        flat = p.view(-1)
        for i in range(0, flat.numel(), _POOL_ELEMENTS):
            n = min(_POOL_ELEMENTS, flat.numel() - i)
            off = int(torch.randint(0, _POOL_ELEMENTS, (1,), generator=g))
            flat[i:i + n].copy_(pool[off:off + n])


@torch.no_grad()
def real_unet(name: str, dtype=torch.float16, seed: int = 0):
    """A UNet2DConditionModel with the real config and random weights (std 0.02), never fully in fp32."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**CONFIGS[name])
    unet = unet.to(dtype=dtype).to_empty(device="cpu")
    fill_normal(list(unet.parameters()), 0.02, seed)
    for b in unet.buffers():
        b.zero_()
    return unet.eval()
