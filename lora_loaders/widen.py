"""Widening a Linear module for LoRAs trained on a wider input (Flux Control's x_embedder).

A BFL Control LoRA trains `img_in` on the latents and the control image concatenated: twice
the model's input channels. As diffusers does, the module gets zero input columns (the base
output is unchanged for any values there) and the config field the family names follows the
new width, so the graph inputs built from the config widen too. The original weight is kept
bit for bit, and `restore` puts it back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .adapter import LoraAdapter
from .bind import widens
from .families.spec import ComponentSpec, FamilySpec
from .index import TargetIndex

_ORIGINAL = "_lora_widened_from"  # config attribute: {field: value before widening}


@dataclass
class Widened:
    component: str
    module: str
    weight: torch.Tensor  # the module's original weight
    field: str
    value: object  # the config field's original value

    @property
    def original_width(self) -> int:
        return int(self.weight.shape[1])


def wanted(adapters: Iterable[LoraAdapter], spec: FamilySpec, index: TargetIndex) -> dict[tuple[str, str], int]:
    """{(component, module): input width} the adapters need beyond their modules' widths."""
    out: dict[tuple[str, str], int] = {}
    for adapter in adapters:
        for (c, m), layer in adapter.layers.items():
            target = (index.modules(c) or {}).get(m)
            if target is not None and not layer.fits(target.weight) and widens(spec, c, m, layer, target):
                out[(c, m)] = max(out.get((c, m), 0), int(layer.delta_shape()[1]))
    return out


def widen_modules(models: Mapping[str, nn.Module], spec: FamilySpec, widths: Mapping[tuple[str, str], int],
                  widened: Mapping[tuple[str, str], Widened] | None = None) -> tuple[list[Widened], TargetIndex]:
    """Widen each (component, module) of `widths` (`wanted`) in `models`, and return the new records
    with the index over the widened models (which knows every module's width before widening, these
    and the already `widened` ones: narrower adapters are padded to fit, `bind.fit_widened`)."""
    records = [widen(models[c], spec.component(c), m, cols) for (c, m), cols in widths.items()]
    before = {k: r.original_width for k, r in (widened or {}).items()}
    for r in records:
        before.setdefault((r.component, r.module), r.original_width)
    return records, TargetIndex.from_models(models, widened=before)


def original(config, field: str):
    """A config field's value before any widening (the field itself when none happened)."""
    return getattr(config, _ORIGINAL, {}).get(field, getattr(config, field))


def widen(model: nn.Module, cspec: ComponentSpec, module: str, cols: int) -> Widened:
    """Give `model.<module>` `cols` input columns in place (zeros beyond the old ones)."""
    linear = model.get_submodule(module)
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{cspec.name}.{module} is a {type(linear).__name__}; only Linear modules are widened")
    old = linear.weight.data
    new = torch.zeros(old.shape[0], cols, dtype=old.dtype, device=old.device)
    new[:, : old.shape[1]] = old
    # The Parameter object stays (stores and optimizers holding it see the new value).
    linear.weight.data = new
    linear.in_features = cols
    field = cspec.widen[module]
    config = getattr(model, "config", None)
    value = getattr(config, field, None)
    if config is not None:
        before = dict(getattr(config, _ORIGINAL, {}))
        before.setdefault(field, value)
        # diffusers sets the attribute the same way (its FrozenDict configs allow attributes)
        setattr(config, _ORIGINAL, before)
        setattr(config, field, cols)
    return Widened(cspec.name, module, old, field, value)


def restore(model: nn.Module, record: Widened) -> None:
    """Put the original module back (its exact weight) and the config field with it."""
    linear = model.get_submodule(record.module)
    linear.weight.data = record.weight
    linear.in_features = record.original_width
    config = getattr(model, "config", None)
    if config is not None:
        before = dict(getattr(config, _ORIGINAL, {}))
        setattr(config, record.field, before.pop(record.field, record.value))
        setattr(config, _ORIGINAL, before)
