"""diffusers / PEFT keys: `<component>.<module>.lora_A.weight`, older `lora.down` names, DoRA, bias."""

from __future__ import annotations

import json
import math
import re

from ..adapter import LoraLayer
from .common import group_layers

NAME = "diffusers"

_SUFFIXES = [
    (re.compile(r"\.lora_A(?:\.[\w-]+)?\.weight$"), "down"),
    (re.compile(r"\.lora_B(?:\.[\w-]+)?\.weight$"), "up"),
    (re.compile(r"\.lora_B(?:\.[\w-]+)?\.bias$"), "bias"),
    (re.compile(r"\.lora_magnitude_vector(?:\.[\w-]+)?(?:\.weight)?$"), "magnitude"),
    (re.compile(r"\.lora(?:_linear_layer)?\.down\.weight$"), "down"),
    (re.compile(r"\.lora(?:_linear_layer)?\.up\.weight$"), "up"),
    (re.compile(r"\.alpha$"), "alpha"),
]
# Attention-processor era: `attn1.processor.to_q_lora.down.weight`.
_OLD_ATTN = re.compile(r"(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_OLD_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def detect(keys: list[str]) -> bool:
    return any("lora_A" in k or "lora_B" in k or ".lora.down" in k or "_lora.down" in k
               or "lora_linear_layer" in k or "lora_magnitude_vector" in k for k in keys)


def split_key(key: str, text_encoder: bool) -> tuple[str, str] | None:
    """(module path, role) for one key without its component prefix, or None if not a LoRA key."""
    m = _OLD_ATTN.search(key)
    if m:
        proj = m.group(1)
        proj = _OLD_TEXT[proj] if text_encoder else ("to_out.0" if proj == "to_out" else proj)
        return key[: m.start()] + "." + proj, ("down" if m.group(2) == "down" else "up")
    for pattern, role in _SUFFIXES:
        m = pattern.search(key)
        if m:
            return key[: m.start()], role
    return None


def convert(state_dict, metadata, spec, resolver):
    config = _adapter_config(metadata)
    from ..families import FAMILIES

    known = {c for f in FAMILIES.values() for c in f.components}
    prefixed = {}
    for key, value in state_dict.items():
        key = key.removeprefix("base_model.model.")
        component, _, rest = key.partition(".")
        if component not in known:
            # Files of the attention-processor era hold only the denoiser, unprefixed.
            component, rest = spec.denoiser, key
        prefixed[(component, rest)] = (key, value)

    parts, unknown = {}, []
    for (component, rest), (key, value) in prefixed.items():
        split = split_key(rest, component in spec.text_encoders)
        if split is None:
            unknown.append(key)
            continue
        module, role = split
        parts.setdefault((component, module), {})[role] = (key, value)
    if unknown:
        raise KeyError(f"keys that are not diffusers/PEFT LoRA keys: {unknown[:10]}")
    return group_layers(parts, lambda c, m, p: _layer(c, m, p, config))


def _layer(component, module, parts, config):
    if "down" not in parts or "up" not in parts:
        missing = "lora_A (down)" if "down" not in parts else "lora_B (up)"
        raise KeyError(f"{component}.{module}: {missing} weight missing; keys {[k for k, _ in parts.values()]}")
    down, up = parts["down"][1], parts["up"][1]
    alpha = parts["alpha"][1].item() if "alpha" in parts else _alpha(config.get(component), module, down.shape[0])
    return LoraLayer(
        "lora", {"down": down, "up": up}, alpha=alpha,
        bias=parts["bias"][1] if "bias" in parts else None,
        magnitude=parts["magnitude"][1] if "magnitude" in parts else None,
    )


def _adapter_config(metadata: dict) -> dict[str, dict]:
    """Per-component LoraConfig values from diffusers' `lora_adapter_metadata` header."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    flat = json.loads(raw) if isinstance(raw, str) else raw
    out: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, name = key.partition(".")
        out.setdefault(component, {})[name] = value
    return out


def _alpha(config: dict | None, module: str, rank: int) -> float:
    """PEFT's rule: alpha_pattern / rank_pattern entries match module-name suffixes."""
    if not config:
        return float(rank)
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
    r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
    if config.get("use_rslora"):
        return float(alpha) * rank / math.sqrt(r)
    return float(alpha) * rank / r


def _pattern_value(patterns: dict, module: str, default):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default
