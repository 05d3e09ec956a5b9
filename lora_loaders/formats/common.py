"""Helpers shared by the converters."""

from __future__ import annotations

from ..adapter import LoraLayer


def group_layers(parts: dict, make) -> dict[tuple[str, str], LoraLayer]:
    """Build one layer per (component, module) from its collected parts, naming the keys on failure."""
    layers = {}
    for (component, module), p in parts.items():
        try:
            layers[(component, module)] = make(component, module, p)
        except ValueError as e:
            keys = [k for k, _ in p.values()]
            raise ValueError(f"{component}.{module}: {e} (keys {keys})") from e
    return layers
