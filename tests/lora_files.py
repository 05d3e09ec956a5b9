"""Writers of LoRA state dicts in each format, for tiny models (test helpers)."""

from __future__ import annotations

import re

import torch
from torch import nn

from lora_loaders.targets import targetable_modules

ATTN_FF = re.compile(r"(to_q|to_k|to_v|to_out\.0|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out"
                     r"|q_proj|k_proj|v_proj|out_proj|fc1|fc2)$")


def pick(model: nn.Module, pattern=ATTN_FF, every: int = 1, offset: int = 0) -> dict[str, nn.Module]:
    """{name as LoRA files spell it: module}; text encoders keep CLIP's `text_model.` level as real files do."""
    prefix = "text_model." if hasattr(model, "embeddings") and not hasattr(model, "text_model") else ""
    mods = [(prefix + n, m) for n, m in targetable_modules(model).items() if pattern.search(n)]
    return dict(mods[offset::every])


def _factors(module, rank, g, scale=0.2):
    if isinstance(module, nn.Linear):
        return (torch.randn(rank, module.in_features, generator=g) * scale,
                torch.randn(module.out_features, rank, generator=g) * scale)
    k = module.kernel_size
    return (torch.randn(rank, module.in_channels, *k, generator=g) * scale,
            torch.randn(module.out_channels, rank, 1, 1, generator=g) * scale)


def peft_lora(components: dict, pattern=ATTN_FF, rank=4, seed=0, every=1, offset=0, bias=False, dora=False):
    """diffusers/PEFT keys (scale 1: no alphas)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for c, model in components.items():
        for n, m in pick(model, pattern, every, offset).items():
            down, up = _factors(m, rank, g)
            sd[f"{c}.{n}.lora_A.weight"] = down
            sd[f"{c}.{n}.lora_B.weight"] = up
            if bias and m.bias is not None:
                sd[f"{c}.{n}.lora_B.bias"] = torch.randn(up.shape[0], generator=g) * 0.1
            if dora:  # PEFT stores a conv's magnitude as (1, out, 1, 1)
                mag = m.weight.detach().flatten(1).norm(dim=1) * (1 + 0.1 * torch.randn(up.shape[0], generator=g))
                sd[f"{c}.{n}.lora_magnitude_vector.weight"] = mag if isinstance(m, nn.Linear) else mag.reshape(1, -1, 1, 1)
    return sd


KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def kohya_lora(components: dict, pattern=ATTN_FF, rank=4, seed=0, alpha=2.0, every=1, offset=0, rename=None,
               prefixes=KOHYA_PREFIX):
    """kohya keys: lora_unet_<flat>.lora_down.weight / lora_up.weight / alpha (LoCon for convs)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for c, model in components.items():
        for n, m in pick(model, pattern, every, offset).items():
            down, up = _factors(m, rank, g)
            name = (rename(c, n) if rename else n).replace(".", "_")
            base = prefixes[c] + name
            sd[f"{base}.lora_down.weight"] = down
            sd[f"{base}.lora_up.weight"] = up
            sd[f"{base}.alpha"] = torch.tensor(alpha)
    return sd


def _sgm_resnet(rest: str) -> str:
    return (rest.replace("conv1", "in_layers.2").replace("conv2", "out_layers.3")
            .replace("time_emb_proj", "emb_layers.1").replace("conv_shortcut", "skip_connection"))


def to_sgm(name: str, layers_per_block: int) -> str:
    """diffusers UNet module path -> SGM (original SD) path, written independently of our converter."""
    per = layers_per_block + 1
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + b * per + j
        if kind == "resnets":
            return f"input_blocks.{idx}.0.{_sgm_resnet(rest)}"
        return f"input_blocks.{idx}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", name)
    if m:
        return f"input_blocks.{1 + int(m[1]) * per + layers_per_block}.0.op"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = b * per + j
        if kind == "resnets":
            return f"output_blocks.{idx}.0.{_sgm_resnet(rest)}"
        return f"output_blocks.{idx}.1.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", name)
    if m:
        outer = 1 if m[1] == "attentions" else (0 if m[2] == "0" else 2)
        rest = m[3]
        if m[1] == "resnets":
            rest = _sgm_resnet(rest)
        return f"middle_block.{outer}.{rest}"
    return {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}.get(name, name)


def lycoris(components: dict, kind: str, pattern=ATTN_FF, rank=4, seed=0, alpha=2.0, every=1, offset=0,
            dora=False, prefixes=KOHYA_PREFIX):
    """LoHa (`hada_*`), LoKr (`lokr_*`) or full (`diff`, `diff_b`) keys, optional LyCORIS `dora_scale`."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for c, model in components.items():
        for n, m in pick(model, pattern, every, offset).items():
            base = prefixes[c] + n.replace(".", "_")
            w = m.weight
            out_f, in_f = w.shape[0], w[0].numel()
            r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
            if kind == "loha":
                sd.update({f"{base}.hada_w1_a": r(out_f, rank), f"{base}.hada_w1_b": r(rank, in_f),
                           f"{base}.hada_w2_a": r(out_f, rank), f"{base}.hada_w2_b": r(rank, in_f)})
                sd[f"{base}.alpha"] = torch.tensor(alpha)
            elif kind == "lokr":
                f1 = 2 if out_f % 2 == 0 else 1
                f2 = 2 if in_f % 2 == 0 else 1
                sd[f"{base}.lokr_w1"] = r(f1, f2)
                sd[f"{base}.lokr_w2_a"] = r(out_f // f1, rank)
                sd[f"{base}.lokr_w2_b"] = r(rank, in_f // f2)
                sd[f"{base}.alpha"] = torch.tensor(alpha)
            else:
                sd[f"{base}.diff"] = r(*w.shape) * 0.1
                if m.bias is not None:
                    sd[f"{base}.diff_b"] = r(out_f) * 0.1
            if dora:
                sd[f"{base}.dora_scale"] = (w.detach().flatten(1).norm(dim=1, keepdim=True)
                                            * (1 + 0.1 * r(out_f, 1)))
    return sd
