"""Writers of the video families' original-checkpoint LoRA layouts, for tiny models (test helpers).

Name tables written from the original checkpoints' module names (Tencent's HunyuanVideo
`hyvideo/modules/models.py` and `token_refiner.py`, Lightricks' LTX-Video `transformer3d.py`),
independently of `lora_loaders.families`. Each maps a diffusers module name to
(original name, index in a fused layer or None, whether the original orders the rows
(shift, scale) where diffusers has (scale, shift)), as `family_files.fused_kohya` takes.
"""

from __future__ import annotations

import re

import torch

from lora_loaders.index import targetable_modules


def linears(model) -> re.Pattern:
    """A `peft_lora` pattern matching every Linear module of the model."""
    names = [n for n, m in targetable_modules(model).items() if isinstance(m, torch.nn.Linear)]
    return re.compile("^(" + "|".join(re.escape(n) for n in names) + ")$")


_HY_DOUBLE = {"attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
              "attn.add_q_proj": ("txt_attn_qkv", 0), "attn.add_k_proj": ("txt_attn_qkv", 1),
              "attn.add_v_proj": ("txt_attn_qkv", 2), "attn.to_out.0": ("img_attn_proj", None),
              "attn.to_add_out": ("txt_attn_proj", None), "norm1.linear": ("img_mod.linear", None),
              "norm1_context.linear": ("txt_mod.linear", None), "ff.net.0.proj": ("img_mlp.fc1", None),
              "ff.net.2": ("img_mlp.fc2", None), "ff_context.net.0.proj": ("txt_mlp.fc1", None),
              "ff_context.net.2": ("txt_mlp.fc2", None)}
_HY_SINGLE = {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
              "proj_mlp": ("linear1", 3), "proj_out": ("linear2", None), "norm.linear": ("modulation.linear", None)}
_HY_REFINER = {"attn.to_q": ("self_attn_qkv", 0), "attn.to_k": ("self_attn_qkv", 1), "attn.to_v": ("self_attn_qkv", 2),
               "attn.to_out.0": ("self_attn_proj", None), "ff.net.0.proj": ("mlp.fc1", None),
               "ff.net.2": ("mlp.fc2", None), "norm_out.linear": ("adaLN_modulation.1", None)}
_HY_TOP = {"context_embedder.proj_in": "txt_in.input_embedder",
           "context_embedder.time_text_embed.timestep_embedder.linear_1": "txt_in.t_embedder.mlp.0",
           "context_embedder.time_text_embed.timestep_embedder.linear_2": "txt_in.t_embedder.mlp.2",
           "context_embedder.time_text_embed.text_embedder.linear_1": "txt_in.c_embedder.linear_1",
           "context_embedder.time_text_embed.text_embedder.linear_2": "txt_in.c_embedder.linear_2",
           "time_text_embed.timestep_embedder.linear_1": "time_in.mlp.0",
           "time_text_embed.timestep_embedder.linear_2": "time_in.mlp.2",
           "time_text_embed.guidance_embedder.linear_1": "guidance_in.mlp.0",
           "time_text_embed.guidance_embedder.linear_2": "guidance_in.mlp.2",
           "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
           "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
           "proj_out": "final_layer.linear"}


def hunyuan_original(name: str):
    """diffusers HunyuanVideoTransformer3DModel name -> (original name, fused index, swap halves) | None."""
    for pattern, block, table in ((r"transformer_blocks\.(\d+)\.(.+)", "double_blocks", _HY_DOUBLE),
                                  (r"single_transformer_blocks\.(\d+)\.(.+)", "single_blocks", _HY_SINGLE),
                                  (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.(.+)",
                                   "txt_in.individual_token_refiner.blocks", _HY_REFINER)):
        m = re.fullmatch(pattern, name)
        if m:
            if m[2] not in table:
                return None
            orig, index = table[m[2]]
            return f"{block}.{m[1]}.{orig}", index, False
    if name == "norm_out.linear":  # the original FinalLayer: shift, scale = adaLN_modulation(c).chunk(2)
        return "final_layer.adaLN_modulation.1", None, True
    return (_HY_TOP[name], None, False) if name in _HY_TOP else None


def ltx_original(name: str):
    """diffusers LTXVideoTransformer3DModel name -> (Lightricks' name, None, False)."""
    out = re.sub(r"^proj_in$", "patchify_proj", name)
    out = re.sub(r"^time_embed\.", "adaln_single.", out)
    return re.sub(r"\.norm_(q|k)$", r".\1_norm", out), None, False


def respell(file: dict, a: str = "lora_A", b: str = "lora_B", alpha: bool = False) -> dict:
    """kohya-spelled keys (`lora_down` / `lora_up` / `alpha`) as `lora_A` / `lora_B`, alphas dropped unless kept."""
    out = {}
    for k, v in file.items():
        if k.endswith(".alpha") and not alpha:
            continue
        out[k.replace(".lora_down.", f".{a}.").replace(".lora_up.", f".{b}.")] = v
    return out
