"""Writing effective weights into torch parameters while keeping the exact base bits.

For additive adapters the base is not copied: while writing W' = cast(W + T) in place, block
by block (`kernels.apply_checked`, one pass while the block is in cache), we check that
cast(W' - T) gives W back and store only the elements where it does not (where W + T rounds
into a coarser binade: about |T| / |W| of the elements, a few percent for strong LoRAs, with
4 + 2 bytes each for fp16). Restoring recomputes T with the same function, in place, and
applies those corrections, so the base comes back bit for bit while memory stays near the
model's size. Weights touched by DoRA (whose delta depends on the base) keep a full copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import kernels
from .weights import AdditiveDelta, Contribution, as_rows, effective_bias, effective_weight, for_blocks


@dataclass
class _Residual:
    contributions: list[Contribution]
    index: torch.Tensor  # flat positions where cast(W' - T) != W
    values: torch.Tensor  # the base values there

    @property
    def nbytes(self) -> int:
        return self.index.numel() * self.index.element_size() + self.values.numel() * self.values.element_size()


class ParamStore:
    """Effective weights for the parameters of one module tree, with exact base restore."""

    def __init__(self, model: nn.Module, keep_copies: bool = False):
        self.model = model
        self.keep_copies = keep_copies
        self._params = dict(model.named_parameters())
        self._copies: dict[str, torch.Tensor] = {}
        self._residuals: dict[str, _Residual] = {}
        self._applied: dict[str, list[Contribution]] = {}  # what each modified parameter holds now

    def has(self, name: str) -> bool:
        return name in self._params

    def numel(self, name: str) -> int:
        return self._params[name].numel()

    def modified(self) -> list[str]:
        return [*self._copies, *self._residuals]

    def residual_bytes(self) -> int:
        """Memory held for exact restores (residuals and full copies)."""
        return (sum(r.nbytes for r in self._residuals.values())
                + sum(c.numel() * c.element_size() for c in self._copies.values()))

    def base(self, name: str) -> torch.Tensor:
        """The exact base value of a parameter (a view of the parameter when unmodified)."""
        if name in self._copies:
            return self._copies[name]
        current = self._params[name].detach()
        r = self._residuals.get(name)
        if r is None:
            return current
        base = torch.empty_like(current)
        _restore(current, base, r)
        return base

    def write(self, name: str, contributions: Sequence[Contribution]):
        """Set parameter `name` to base + contributions (bias parameters take bias deltas)."""
        param = self._params[name]
        contributions = list(contributions)
        if _same(self._applied.get(name, []), contributions):
            return  # e.g. fusing the adapters that are already applied
        additive = all(layer.is_additive for layer, _ in contributions) and not name.endswith(".bias")
        if additive and not self.keep_copies and param.data.is_contiguous():
            # In place: back to the exact base (if modified), then the new value, with no copy.
            if name in self._copies:
                param.data.copy_(self._copies.pop(name))
            r = self._residuals.pop(name, None)
            if r is not None:
                _restore(param.data, param.data, r)
            self._applied.pop(name, None)
            if contributions:
                self._applied[name] = contributions
                self._write_with_residual(name, contributions)
            return
        base = self.base(name)
        if not contributions:
            param.data.copy_(base)
            self._forget(name)
            return
        self._applied[name] = contributions
        if name.endswith(".bias"):
            self._keep_copy(name, base)
            param.data.copy_(effective_bias(base, contributions))
            return
        self._keep_copy(name, base)
        param.data.copy_(effective_weight(base, contributions))

    def _write_with_residual(self, name, contributions):
        """Write the parameter (holding its exact base) in place, block by block, recording where
        cast(W' - delta) would not give the base back."""
        param = self._params[name]
        w = param.data
        delta = AdditiveDelta(contributions, w.shape, w.device)
        index_dtype = torch.int32 if w.numel() < 2**31 else torch.int64
        parts = [p for p in for_blocks(delta, kernels.checked_op(as_rows(w), index_dtype)) if p is not None]
        index = torch.cat([p[0] for p in parts]) if parts else torch.empty(0, dtype=index_dtype, device=w.device)
        vals = torch.cat([p[1] for p in parts]) if parts else torch.empty(0, dtype=w.dtype, device=w.device)
        self._copies.pop(name, None)
        self._residuals[name] = _Residual(list(contributions), index, vals)

    def accept_current(self, name: str):
        """Make the current value the new base (diffusers' unload after fuse keeps fused weights)."""
        self._forget(name)

    def _keep_copy(self, name, base):
        if name not in self._copies:
            self._copies[name] = base.clone() if base.data_ptr() == self._params[name].data_ptr() else base
        self._residuals.pop(name, None)

    def _forget(self, name):
        self._copies.pop(name, None)
        self._residuals.pop(name, None)
        self._applied.pop(name, None)


def _restore(current: torch.Tensor, out: torch.Tensor, r: _Residual) -> None:
    """out = the exact base of `current` (which holds base + r.contributions); out may be current."""
    delta = AdditiveDelta(r.contributions, current.shape, current.device)  # additive: independent of the base
    for_blocks(delta, kernels.remove_op(as_rows(current), as_rows(out)))
    out.view(-1)[r.index.long()] = r.values


def _same(a: Sequence[Contribution], b: Sequence[Contribution]) -> bool:
    return len(a) == len(b) and all(la is lb and wa == wb for (la, wa), (lb, wb) in zip(a, b))
