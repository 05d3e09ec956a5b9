"""Canonical adapter -> diffusers/PEFT state dict, and atomic safetensors writing."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .adapter import LoraAdapter
from .io import atomic_path

# LyCORIS names for the non-LoRA kinds, which PEFT keys cannot express.
_LYCORIS = {"w1a": "hada_w1_a", "w1b": "hada_w1_b", "w2a": "hada_w2_a", "w2b": "hada_w2_b",
            "t1": "hada_t1", "t2": "hada_t2"}
_LOKR = {"w1": "lokr_w1", "w1a": "lokr_w1_a", "w1b": "lokr_w1_b", "w2": "lokr_w2", "w2a": "lokr_w2_a",
         "w2b": "lokr_w2_b", "t2": "lokr_t2"}


def adapter_to_state_dict(adapter: LoraAdapter, fold_alpha: bool = False) -> dict[str, torch.Tensor]:
    """`<component>.<module>.lora_A.weight` etc. With fold_alpha, alpha/rank goes into lora_B
    (diffusers reads PEFT files without alphas as scale 1); otherwise `.alpha` entries are kept."""
    out = {}
    for (component, module), layer in adapter.layers.items():
        p = f"{component}.{module}"
        if layer.kind == "lora":
            up = layer.tensors["up"]
            if fold_alpha and layer.scale != 1.0:
                up = (up.float() * layer.scale).to(up.dtype)
            out[f"{p}.lora_A.weight"] = layer.tensors["down"]
            out[f"{p}.lora_B.weight"] = up
            if layer.bias is not None:
                bias = layer.bias
                if fold_alpha and layer.scale != 1.0:
                    bias = (bias.float() * layer.scale).to(bias.dtype)
                out[f"{p}.lora_B.bias"] = bias
            if layer.magnitude is not None:
                out[f"{p}.lora_magnitude_vector"] = layer.magnitude
            if layer.dora_scale is not None:
                raise ValueError(f"{p}: LyCORIS DoRA cannot be written in diffusers/PEFT format")
        elif fold_alpha:
            raise ValueError(f"{p}: a {layer.kind} layer cannot be written in diffusers/PEFT format")
        else:
            names = _LOKR if layer.kind == "lokr" else _LYCORIS if layer.kind == "loha" else {"diff": "diff"}
            out.update({f"{p}.{names[k]}": v for k, v in layer.tensors.items()})
            if layer.bias is not None:
                out[f"{p}.diff_b"] = layer.bias
            if layer.dora_scale is not None:
                out[f"{p}.dora_scale"] = layer.dora_scale
        if layer.alpha is not None and not fold_alpha:
            out[f"{p}.alpha"] = torch.tensor(float(layer.alpha))
    return out


def save_state_dict(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> Path:
    """Write safetensors to a temporary name in the target directory, then rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return path
