"""How adapters combine per module, and which parameters (weight, bias) each module's adapters set.

The one expansion of adapter layers into parameters, used by the mixins, the export and
refit alike: a module's weight takes every contribution; its bias only those with a bias
delta.
"""

from __future__ import annotations

from collections.abc import Iterable

from .adapter import LoraAdapter
from .index import targetable_modules, targetable_parameters  # noqa: F401 - re-exported
from .weights import Contribution


def contributions_by_module(
    adapters: Iterable[tuple[LoraAdapter, float]], component: str
) -> dict[str, list[Contribution]]:
    """{module path: [(layer, weight), ...]} for one component, in adapter order."""
    out: dict[str, list[Contribution]] = {}
    for adapter, weight in adapters:
        for module, layer in adapter.for_component(component).items():
            out.setdefault(module, []).append((layer, float(weight)))
    return out


def param_contributions(module: str, contributions: list[Contribution]) -> dict[str, list[Contribution]]:
    """{`<module>.weight`: all of them, `<module>.bias`: those with a bias delta (if any)}.

    An additive contribution at weight 0 adds nothing and is left out (the base bits exactly, with
    no product computed: `base + 0 * delta` would also turn -0.0 into +0.0). DoRA and other
    base-dependent layers stay, since weight 0 still renormalises them.
    """
    contributions = [c for c in contributions if c[1] != 0 or not c[0].is_additive]
    weight = [c for c in contributions if not _bias_only(c)]
    out = {f"{module}.weight": weight} if weight else {}
    biased = [c for c in contributions if c[0].bias is not None]
    if biased:
        out[f"{module}.bias"] = biased
    return out


def params_of(by_module: dict[str, list[Contribution]]) -> dict[str, list[Contribution]]:
    """`param_contributions` over every module."""
    out = {}
    for module, cs in by_module.items():
        out.update(param_contributions(module, cs))
    return out


def _bias_only(c: Contribution) -> bool:
    layer = c[0]
    return layer.kind == "full" and "diff" not in layer.tensors
