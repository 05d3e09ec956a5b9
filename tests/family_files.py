"""Writers of original-checkpoint LoRA layouts (kohya SD3, Wan, musubi, LyCORIS) for tiny models.

Each writer also returns the same LoRA in diffusers/PEFT names (alpha folded into lora_B),
which diffusers + PEFT load: that is the reference the converted file must match. The
name tables here are written from the original checkpoints' module names (sd-scripts'
MMDiT, Wan's `model.py`), independently of `lora_loaders.families`.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from lora_loaders.index import targetable_modules


def _linears(model) -> dict[str, nn.Linear]:
    return {n: m for n, m in targetable_modules(model).items() if isinstance(m, nn.Linear)}


# ---- SD3: diffusers name -> (original MMDiT name, index in a fused qkv or None, swap halves) ----

def sd3_original(name: str, last: int):
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)
    if m is None:
        top = {"proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1",
               "context_embedder": "context_embedder", "pos_embed.proj": "x_embedder.proj",
               "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
               "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
               "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
               "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2"}
        return (top[name], None, name == "norm_out.linear") if name in top else None
    i, rest = int(m[1]), m[2]
    b = f"joint_blocks.{i}"
    qkv = {"attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1),
           "attn.to_v": ("x_block.attn.qkv", 2), "attn.add_q_proj": ("context_block.attn.qkv", 0),
           "attn.add_k_proj": ("context_block.attn.qkv", 1), "attn.add_v_proj": ("context_block.attn.qkv", 2),
           "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
           "attn2.to_v": ("x_block.attn2.qkv", 2)}
    if rest in qkv:
        return f"{b}.{qkv[rest][0]}", qkv[rest][1], False
    plain = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
             "attn2.to_out.0": "x_block.attn2.proj", "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
             "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
             "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1"}
    if rest in plain:
        return f"{b}.{plain[rest]}", None, rest == "norm1_context.linear" and i == last
    return None


def _swap(t):
    h = t.shape[0] // 2
    return torch.cat([t[h:], t[:h]])


def fused_kohya(model, original, prefix: str, rank=4, alpha=2.0, seed=0, flat=True):
    """(file, peft) for every Linear with an original name: fused layers share one down projection.

    original(name) -> (original name, index in the fused layer or None, swap halves) | None.
    """
    g = torch.Generator().manual_seed(seed)
    groups: dict[str, list] = {}
    for name, m in _linears(model).items():
        o = original(name)
        if o is not None:
            groups.setdefault(o[0], []).append((o[1], name, m, o[2]))
    file, peft = {}, {}
    for orig, parts in groups.items():
        parts.sort(key=lambda p: p[0] or 0)
        down = torch.randn(rank, parts[0][2].in_features, generator=g) * 0.2
        ups = [torch.randn(m.out_features, rank, generator=g) * 0.2 for _, _, m, _ in parts]
        key = prefix + (orig.replace(".", "_") if flat else orig)
        file[f"{key}.lora_down.weight"] = down
        file[f"{key}.lora_up.weight"] = torch.cat(ups)
        file[f"{key}.alpha"] = torch.tensor(alpha)
        for (_, name, _, swap), up in zip(parts, ups):
            peft[f"{name}.lora_A.weight"] = down
            peft[f"{name}.lora_B.weight"] = (_swap(up) if swap else up) * (alpha / rank)
    return file, peft


# ---- Wan: diffusers name -> original Wan name ----

_WAN = [
    (r"blocks\.(\d+)\.attn1\.to_(q|k|v)", r"blocks.\1.self_attn.\2"), (r"blocks\.(\d+)\.attn1\.to_out\.0", r"blocks.\1.self_attn.o"),
    (r"blocks\.(\d+)\.attn2\.to_(q|k|v)", r"blocks.\1.cross_attn.\2"), (r"blocks\.(\d+)\.attn2\.to_out\.0", r"blocks.\1.cross_attn.o"),
    (r"blocks\.(\d+)\.attn2\.add_(k|v)_proj", r"blocks.\1.cross_attn.\2_img"),
    (r"blocks\.(\d+)\.attn1\.norm_(q|k)", r"blocks.\1.self_attn.norm_\2"),
    (r"blocks\.(\d+)\.attn2\.norm_(q|k)", r"blocks.\1.cross_attn.norm_\2"),
    (r"blocks\.(\d+)\.norm2", r"blocks.\1.norm3"),
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj", r"blocks.\1.ffn.0"), (r"blocks\.(\d+)\.ffn\.net\.2", r"blocks.\1.ffn.2"),
    (r"proj_out", "head.head"), (r"condition_embedder\.time_proj", "time_projection.1"),
    (r"condition_embedder\.text_embedder\.linear_1", "text_embedding.0"),
    (r"condition_embedder\.text_embedder\.linear_2", "text_embedding.2"),
    (r"condition_embedder\.time_embedder\.linear_1", "time_embedding.0"),
    (r"condition_embedder\.time_embedder\.linear_2", "time_embedding.2"),
]


def wan_original(name: str) -> str | None:
    for pattern, repl in _WAN:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    return None
