"""Small random models built from the registry's tiny configs, so the main job and tests run offline.

Structurally faithful to each family (same block types, conditioning inputs and encoders),
just narrow. Random weights, seeded.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lora_loaders.families import ComponentSpec, get_family


def component_class(spec: ComponentSpec):
    import importlib

    return getattr(importlib.import_module(spec.library), spec.class_name)


def tiny_config(spec: ComponentSpec, overrides: Mapping | None = None):
    """The component's tiny config: a dict (diffusers) or a config object (transformers)."""
    if spec.tiny is None:
        raise ValueError(f"component {spec.name!r} ({spec.class_name}) has no tiny config")
    config = {**spec.tiny, **(overrides or {})}
    if spec.library == "transformers":
        import transformers

        return getattr(transformers, spec.config_class)(**config)
    return config


def build_component(spec: ComponentSpec, config, dtype=torch.float32) -> torch.nn.Module:
    cls = component_class(spec)
    model = cls(config) if spec.library == "transformers" else cls(**config)
    return cast(model, dtype).eval()


def cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(dtype)`, skipped when there is nothing to cast.

    diffusers' `ModelMixin.to(dtype)` warns on every cast, listing the modules the model would
    keep in float32; when it lists none ("[]") the warning says nothing, so torch's own cast is
    used then. Models that do list some (Wan's norms) keep the warning: it is true of our export.
    """
    if not any(p.dtype != dtype for p in model.parameters() if p.is_floating_point()):
        return model
    if _is_diffusers_model(model) and not getattr(model, "_keep_in_fp32_modules", None) \
            and not getattr(model, "is_quantized", False):
        return torch.nn.Module.to(model, dtype)
    return model.to(dtype)


def _is_diffusers_model(model) -> bool:
    return any(c.__module__.startswith("diffusers.") and c.__name__ == "ModelMixin" for c in type(model).__mro__)


def tiny_seed(spec, component: str) -> int:
    """The seed offset of a component: the position of its folder (both VAE halves are one VAE)."""
    folders = list(dict.fromkeys(c.folder for c in spec.components.values()))
    return folders.index(spec.component(component).folder)


def build_tiny(family: str, components: list[str] | None = None, seed: int = 0, dtype=torch.float32,
               overrides: Mapping[str, Mapping] | None = None) -> dict:
    """{component: module} for a family's tiny model, random weights from `seed + index`, eval mode.

    overrides: {component: {config field: value}}, e.g. a Wan I2V tiny model with `image_dim`.
    """
    spec = get_family(family)
    have = [c for c, s in spec.components.items() if s.tiny is not None]
    if not have:
        raise ValueError(f"no tiny model for family {family!r} yet")
    wanted = have if components is None else list(components)
    out = {}
    for name in wanted:
        cspec = spec.component(name)
        torch.manual_seed(seed + tiny_seed(spec, name))
        out[name] = build_component(cspec, tiny_config(cspec, (overrides or {}).get(name)), dtype)
    return out
