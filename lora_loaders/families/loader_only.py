"""Families that load LoRAs (diffusers/PEFT layout, strict) but have no export entry yet.

Each becomes a module of its own, with graph inputs, axes, tiny configs and its
community layouts, as its export lands; until then its components take no export.
"""

from __future__ import annotations

from .spec import ComponentSpec, FamilySpec


def _denoiser(cls: str) -> ComponentSpec:
    return ComponentSpec("transformer", "diffusers", cls, "denoiser", export=False)


def _family(name, mixin, cls, markers=(), extra=None, **kw) -> FamilySpec:
    components = {"transformer": _denoiser(cls), **(extra or {})}
    return FamilySpec(name, mixin, components, markers=markers, **kw)


FAMILIES = (
)
