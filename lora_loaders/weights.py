"""The one effective-weight function.

Every consumer (torch modules, ONNX export, ONNX Runtime and TensorRT refit) calls these,
so an engine refitted to a set of adapters holds the same bits as an export of them.
Math is float32; the result is cast once to the weight's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .adapter import LoraLayer

# (layer, weight): weight is the user's adapter weight times any fuse-time lora_scale.
Contribution = tuple[LoraLayer, float]

_EPS = torch.finfo(torch.float32).eps


def weight_delta(layer: LoraLayer, base: torch.Tensor, weight: float) -> torch.Tensor:
    """What one adapter adds to a float32 base weight, at the given weight."""
    delta = layer.delta(base.shape)
    if layer.magnitude is not None:
        # PEFT DoRA: renormalise each output row of (W + s*BA) to the learned magnitude.
        combined = base + weight * delta
        norm = combined.flatten(1).norm(dim=1)
        factor = layer.magnitude.float().reshape(-1) / norm
        return factor.reshape(-1, *[1] * (base.dim() - 1)) * combined - base
    if layer.dora_scale is not None:
        # LyCORIS DoRA: renormalise at full strength, then blend by the weight.
        combined = base + delta
        scale = layer.dora_scale.float()
        if scale.numel() == base.shape[0] and scale.shape[0] == base.shape[0]:
            norm = combined.flatten(1).norm(dim=1).reshape(-1, *[1] * (base.dim() - 1))
        else:
            norm = combined.transpose(0, 1).flatten(1).norm(dim=1)
            norm = norm.reshape(1, -1, *[1] * (base.dim() - 2))
        decomposed = combined * (scale.reshape(norm.shape) / (norm + _EPS))
        return weight * (decomposed - base)
    return weight * delta


def total_delta(base32: torch.Tensor, contributions: Sequence[Contribution]) -> torch.Tensor:
    """Sum of the adapters' deltas over a float32 base, in adapter order."""
    total = None
    for layer, weight in contributions:
        d = weight_delta(layer, base32, weight)
        total = d if total is None else total + d
    return total


def effective_weight(base: torch.Tensor, contributions: Sequence[Contribution]) -> torch.Tensor:
    """W_base + sum_i w_i * s_i * delta_i (DoRA renormalisation on top), cast to base's dtype."""
    if not contributions:
        return base.clone()
    w0 = base.detach().float()
    return (w0 + total_delta(w0, contributions)).to(base.dtype)


def effective_bias(base: torch.Tensor | None, contributions: Sequence[Contribution]) -> torch.Tensor | None:
    deltas = [(layer.bias_delta(), weight) for layer, weight in contributions if layer.bias is not None]
    if not deltas:
        return None if base is None else base.clone()
    if base is None:
        raise ValueError("an adapter has a bias delta for a module without bias")
    total = None
    for d, weight in deltas:
        total = weight * d if total is None else total + weight * d
    return (base.detach().float() + total).to(base.dtype)


def touches_bias(contributions: Sequence[Contribution]) -> bool:
    return any(layer.bias is not None for layer, _ in contributions)
