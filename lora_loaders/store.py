"""Writing effective weights into torch parameters while keeping the exact base bits.

For additive adapters the base is not copied: after writing W' = cast(W + T) we check that
cast(W' - T) gives W back and store only the elements where it does not (rarely more than
a few per million). Restoring recomputes T with the same function and applies those
corrections, so the base comes back bit for bit while memory stays near the model's size.
Weights touched by DoRA (whose delta depends on the base) keep a full copy instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .weights import (
    AdditiveDelta,
    Contribution,
    Scratch,
    apply_rows,
    effective_bias,
    effective_weight,
    remove_rows,
)


@dataclass
class _Residual:
    contributions: list[Contribution]
    index: torch.Tensor  # flat positions where cast(W' - T) != W
    values: torch.Tensor  # the base values there


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64, 1: torch.int8}[t.element_size()])


def _mismatches(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Flat positions where a and b differ in bits."""
    if a.device.type == "cpu":  # numpy's compare and nonzero are several times faster than torch's here
        return torch.from_numpy(np.flatnonzero(_bits(a).numpy() != _bits(b).numpy()))
    return (_bits(a) != _bits(b)).view(-1).nonzero().view(-1)


class ParamStore:
    """Effective weights for the parameters of one module tree, with exact base restore."""

    def __init__(self, model: nn.Module, keep_copies: bool = False):
        self.model = model
        self.keep_copies = keep_copies
        self._params = dict(model.named_parameters())
        self._copies: dict[str, torch.Tensor] = {}
        self._residuals: dict[str, _Residual] = {}
        self._applied: dict[str, list[Contribution]] = {}  # what each modified parameter holds now
        self._scratch = Scratch()

    def has(self, name: str) -> bool:
        return name in self._params

    def modified(self) -> list[str]:
        return [*self._copies, *self._residuals]

    def base(self, name: str) -> torch.Tensor:
        """The exact base value of a parameter (a view of the parameter when unmodified)."""
        if name in self._copies:
            return self._copies[name]
        current = self._params[name].detach()
        r = self._residuals.get(name)
        if r is None:
            return current
        delta = AdditiveDelta(r.contributions, current.shape)  # additive: independent of the base
        base = torch.empty_like(current)
        c2, b2 = current.reshape(current.shape[0], -1), base.view(current.shape[0], -1)
        for r0, r1, d, work in delta.blocks(self._scratch, current.device):
            remove_rows(c2[r0:r1], d, b2[r0:r1], work)
        base.view(-1)[r.index.long()] = r.values
        return base

    def write(self, name: str, contributions: Sequence[Contribution]):
        """Set parameter `name` to base + contributions (bias parameters take bias deltas)."""
        param = self._params[name]
        contributions = list(contributions)
        if _same(self._applied.get(name, []), contributions):
            return  # e.g. fusing the adapters that are already applied
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
        additive = all(layer.is_additive for layer, _ in contributions)
        if additive and not self.keep_copies:
            self._write_with_residual(name, base, contributions)
        else:
            self._keep_copy(name, base)
            param.data.copy_(effective_weight(base, contributions))

    def _write_with_residual(self, name, base, contributions):
        """Write block by block, recording where cast(W' - delta) would not give the base back."""
        param = self._params[name]
        if base.data_ptr() != param.data_ptr():
            param.data.copy_(base)  # start from the exact base, then update in place
        w2 = param.data.view(param.shape[0], -1)
        delta = AdditiveDelta(contributions, param.shape)
        index_dtype = torch.int32 if param.numel() < 2**31 else torch.int64
        wrong, values = [], []
        for r0, r1, d, work in delta.blocks(self._scratch, w2.device):
            new = apply_rows(w2[r0:r1], d, self._scratch.get("new", d.shape, w2.dtype, w2.device), work)
            back = remove_rows(new, d, self._scratch.get("back", d.shape, w2.dtype, w2.device), work)
            bad = _mismatches(back, w2[r0:r1])
            if bad.numel():
                wrong.append((bad + r0 * w2.shape[1]).to(index_dtype))
                values.append(w2[r0:r1].reshape(-1)[bad])
            w2[r0:r1].copy_(new)
        index = torch.cat(wrong) if wrong else torch.empty(0, dtype=index_dtype)
        vals = torch.cat(values) if values else torch.empty(0, dtype=param.dtype)
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


def _same(a: Sequence[Contribution], b: Sequence[Contribution]) -> bool:
    return len(a) == len(b) and all(la is lb and wa == wb for (la, wa), (lb, wb) in zip(a, b))
