"""The family registry: one entry per model family, read by every layer.

An entry (`FamilySpec`, in one module of this package) declares the family's components
(classes, roles, which take LoRAs, which are exported, graph inputs and outputs over named
axes, tiny configs), its axes, the key prefixes of the LoRA layouts it reads with their
name tables, and its markers. Adding a family is adding a module here.
"""

from __future__ import annotations

import importlib
import pkgutil
import re

from .spec import (TASKS, Axis, Bound, Cfg, Chunks, ComponentSpec, FamilySpec, NameTable, Namespace, Processor, Rule,
                   Scaled, Split, TensorSpec, Variant)

def _collect() -> dict[str, FamilySpec]:
    """Every module of this package that defines FAMILIES is an entry."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__))
    out: dict[str, FamilySpec] = {}
    for name in names:
        for spec in getattr(importlib.import_module(f"{__name__}.{name}"), "FAMILIES", ()):
            if spec.name in out:
                raise RuntimeError(f"family {spec.name!r} is defined twice (again in families/{name}.py)")
            out[spec.name] = spec
    return out


FAMILIES: dict[str, FamilySpec] = _collect()


def get_family(name: str) -> FamilySpec:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; supported: {', '.join(FAMILIES)}") from None


def _hits(spec: FamilySpec, target_names) -> int:
    return sum(1 for m in spec.markers for n in target_names if re.search(m, n))


def guess_family(target_names: list[str]) -> str | None:
    """The family (with all these components) whose markers match the most of these
    `component.module` names, if any."""
    components = {n.split(".", 1)[0] for n in target_names}
    best, best_hits = None, 0
    for spec in FAMILIES.values():
        if not components <= set(spec.components):
            continue
        hits = _hits(spec, target_names)
        if hits > best_hits:
            best, best_hits = spec.name, hits
    return best


def looks_like(spec: FamilySpec, target_names: list[str]) -> str | None:
    """Another family this file looks made for, or None when it may be for `spec`."""
    components = {n.split(".", 1)[0] for n in target_names}
    if not components <= set(spec.components):
        return guess_family(target_names) or "another family"
    guess = guess_family(target_names)
    if guess is None or guess == spec.name:
        return None
    return guess if _hits(spec, target_names) == 0 else None


__all__ = ["FAMILIES", "TASKS", "Processor", "Variant", "Axis", "Bound", "Cfg", "Chunks", "ComponentSpec", "FamilySpec", "NameTable", "Namespace", "Rule",
           "Scaled", "Split", "TensorSpec", "get_family", "guess_family", "looks_like"]
