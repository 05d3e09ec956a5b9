"""The one effective-weight function.

Every consumer (torch modules, ONNX export, ONNX Runtime and TensorRT refit) calls these,
so an engine refitted to a set of adapters holds the same bits as an export of them.
Math is float32; the result is cast once to the weight's dtype.

Additive adapters (LoRA, LoHa, LoKr, full deltas) are applied in blocks of output rows that
fit in cache: a low-rank delta is never materialised whole, and each block's float32
temporaries stay small. The blocking is part of the definition (same blocks, same order,
same bits) for every caller.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .adapter import LoraLayer

# (layer, weight): weight is the user's adapter weight times any fuse-time lora_scale.
Contribution = tuple[LoraLayer, float]

_EPS = torch.finfo(torch.float32).eps
BLOCK_ELEMENTS = 1 << 19  # float32 elements per row block (2 MiB): speed vs peak memory, measured


def weight_delta(layer: LoraLayer, base: torch.Tensor, weight: float) -> torch.Tensor:
    """What one adapter adds to a whole float32 base weight, at the given weight."""
    if layer.kind == "ia3":
        # LyCORIS IA3: W * (1 + w * s), s per output row, or per input column with on_input.
        s = layer.tensors["weight"].float().reshape(-1)
        shape = [1] * base.dim()
        shape[1 if layer.on_input else 0] = s.numel()
        return base * (weight * s.reshape(shape))
    if layer.kind == "replace":
        # The file's value replaces the weight (BFL Control norms); weight 0 keeps the base.
        return (layer.tensors["weight"].float().reshape(base.shape) - base) if weight else torch.zeros_like(base)
    delta = layer.delta(base.shape)
    if layer.magnitude is not None:
        # PEFT DoRA: renormalise each output row of (W + s*BA) to the learned magnitude.
        combined = base + weight * delta
        norm = combined.flatten(1).norm(dim=1)
        factor = layer.magnitude.float().reshape(-1) / norm
        return factor.reshape(-1, *[1] * (base.dim() - 1)) * combined - base
    if layer.dora_scale is not None:
        # LyCORIS DoRA: Wc = W + delta renormalised to dora_scale (per output row for an (out, 1)
        # scale, per input column for (1, in)) at full strength, then blended with the base by
        # the weight m, as ComfyUI and A1111 apply it: W' = W + m * (Wc * s - W). (LyCORIS' own
        # multiplier keeps the direction change at m = 0; equal at m = 1.)
        combined = base + delta
        scale = layer.dora_scale.float()
        if scale.numel() == base.shape[0] and scale.shape[0] == base.shape[0]:
            norm = combined.flatten(1).norm(dim=1).reshape(-1, *[1] * (base.dim() - 1))
        else:
            norm = combined.transpose(0, 1).flatten(1).norm(dim=1)
            norm = norm.reshape(1, -1, *[1] * (base.dim() - 2))
        return weight * (combined * (scale.reshape(norm.shape) / (norm + _EPS)) - base)
    return weight * delta


def is_additive(contributions: Sequence[Contribution]) -> bool:
    return all(layer.is_additive for layer, _ in contributions)


def row_blocks(shape) -> Iterator[tuple[int, int]]:
    rest = max(1, torch.Size(shape[1:]).numel())
    step = max(1, BLOCK_ELEMENTS // rest)
    for r0 in range(0, shape[0], step):
        yield r0, min(r0 + step, shape[0])


class Scratch:
    """Reusable block buffers: a fresh multi-MiB tensor per block costs page faults, measured."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, key: str, shape, dtype=torch.float32, device=None) -> torch.Tensor:
        shape = torch.Size(shape)
        buf = self._buffers.get((key, dtype, device))
        if buf is None or buf.numel() < shape.numel():
            buf = torch.empty(max(shape.numel(), BLOCK_ELEMENTS), dtype=dtype, device=device)
            self._buffers[(key, dtype, device)] = buf
        return buf[: shape.numel()].view(shape)


class AdditiveDelta:
    """sum_i w_i * delta_i for additive adapters, by blocks of output rows (float32, 2-D)."""

    def __init__(self, contributions: Sequence[Contribution], shape):
        self.shape = torch.Size(shape)
        cols = self.shape[1:].numel()  # 1 for a 1-D weight (norms)
        self._terms = []
        for layer, weight in contributions:
            if layer.kind == "lora":  # keep it low-rank: (up * w * s)[rows] @ down
                up = layer.tensors["up"].float().flatten(1) * (weight * layer.scale)
                self._terms.append((up, layer.tensors["down"].float().flatten(1)))
            else:
                self._terms.append((None, weight * layer.delta(self.shape).reshape(self.shape[0], cols)))

    def blocks(self, scratch: Scratch, device=None) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """(r0, r1, delta rows r0:r1, a float32 work buffer of that shape) for each row block."""
        cols = self.shape[1:].numel()
        for r0, r1 in row_blocks(self.shape):
            out = scratch.get("delta", (r1 - r0, cols), device=device)
            for i, (up, rhs) in enumerate(self._terms):
                if i == 0:
                    torch.mm(up[r0:r1], rhs, out=out) if up is not None else out.copy_(rhs[r0:r1])
                else:
                    out.add_(up[r0:r1] @ rhs if up is not None else rhs[r0:r1])
            yield r0, r1, out, scratch.get("work", out.shape, device=device)


def apply_rows(base_rows, delta_rows, out, work) -> torch.Tensor:
    """One block of the effective weight: cast(float32(base) + delta), in base's dtype."""
    return out.copy_(work.copy_(base_rows).add_(delta_rows))


def remove_rows(current_rows, delta_rows, out, work) -> torch.Tensor:
    """The inverse step: cast(float32(current) - delta), what an exact restore starts from."""
    return out.copy_(work.copy_(current_rows).sub_(delta_rows))


def effective_weight(base: torch.Tensor, contributions: Sequence[Contribution]) -> torch.Tensor:
    """W_base + sum_i w_i * s_i * delta_i (DoRA renormalisation on top), cast to base's dtype."""
    if not contributions:
        return base.clone()
    base = base.detach()
    if not is_additive(contributions):
        w0 = base.float()
        total = None
        for layer, weight in contributions:
            d = weight_delta(layer, w0, weight)
            total = d if total is None else total + d
        return (w0 + total).to(base.dtype)
    out = torch.empty_like(base)
    b2, o2 = base.reshape(base.shape[0], -1), out.view(base.shape[0], -1)
    for r0, r1, d, work in AdditiveDelta(contributions, base.shape).blocks(Scratch(), base.device):
        apply_rows(b2[r0:r1], d, o2[r0:r1], work)
    return out


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
