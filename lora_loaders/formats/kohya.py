"""kohya-ss / A1111 / LyCORIS keys: `lora_unet_<flat module>.<part>`.

Covers LoRA and LoCon (`lora_down`/`lora_up`/`alpha`), LoHa (`hada_*`), LoKr (`lokr_*`),
LyCORIS DoRA (`dora_scale`) and full deltas (`diff`, `diff_b`), with diffusers or SGM
(`input_blocks`, `middle_block`, `output_blocks`) UNet block names.
"""

from __future__ import annotations

from ..adapter import LoraLayer
from .common import group_layers
from .names import sgm_to_diffusers

NAME = "kohya"

# part suffix -> (kind, tensor name); kind None for parts that any kind may carry.
_PARTS = {
    "lora_down.weight": ("lora", "down"), "lora_up.weight": ("lora", "up"),
    "hada_w1_a": ("loha", "w1a"), "hada_w1_b": ("loha", "w1b"), "hada_w2_a": ("loha", "w2a"),
    "hada_w2_b": ("loha", "w2b"), "hada_t1": ("loha", "t1"), "hada_t2": ("loha", "t2"),
    "lokr_w1": ("lokr", "w1"), "lokr_w1_a": ("lokr", "w1a"), "lokr_w1_b": ("lokr", "w1b"),
    "lokr_w2": ("lokr", "w2"), "lokr_w2_a": ("lokr", "w2a"), "lokr_w2_b": ("lokr", "w2b"),
    "lokr_t2": ("lokr", "t2"), "diff": ("full", "diff"),
    "alpha": (None, "alpha"), "dora_scale": (None, "dora_scale"), "diff_b": (None, "bias"),
}
_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_")


def detect(keys: list[str]) -> bool:
    return any(k.startswith(_PREFIXES) for k in keys)


def convert(state_dict, metadata, spec, resolver):
    prefixes = spec.kohya_prefixes or {"lora_unet_": spec.denoiser, "lora_transformer_": spec.denoiser}
    parts, unknown = {}, []
    for key, value in state_dict.items():
        name, _, part = key.partition(".")
        prefix = next((p for p in sorted(prefixes, key=len, reverse=True) if name.startswith(p)), None)
        if prefix is None or part not in _PARTS:
            unknown.append(key)
            continue
        component = prefixes[prefix]
        flat = name[len(prefix):]
        if component == "unet" and flat.startswith(("input_blocks", "middle_block", "output_blocks", "time_embed",
                                                     "label_emb", "out_")):
            flat = sgm_to_diffusers(flat, resolver.layers_per_block(component))
        module = resolver(component, flat)
        parts.setdefault((component, module), {})[part] = (key, value)
    if unknown:
        hint = ""
        if any(k.split(".")[0].startswith(p) for k in unknown for p in _PREFIXES):
            hint = f" (this family, {spec.name}, takes kohya prefixes {sorted(prefixes)})"
        raise KeyError(f"unrecognised kohya/LyCORIS keys{hint}: {unknown[:10]}")
    return group_layers(parts, _layer)


def _layer(component, module, parts):
    kinds = {_PARTS[p][0] for p in parts} - {None}
    if not kinds and "diff_b" in parts:
        kinds = {"full"}  # a bias-only delta
    if len(kinds) != 1:
        raise ValueError(f"expected exactly one of LoRA / LoHa / LoKr / full delta, found {sorted(kinds) or 'none'}")
    kind = kinds.pop()
    tensors = {_PARTS[p][1]: v for p, (_, v) in parts.items() if _PARTS[p][0] == kind}
    alpha = parts["alpha"][1].item() if "alpha" in parts else None
    return LoraLayer(
        kind, tensors, alpha=alpha,
        bias=parts["diff_b"][1] if "diff_b" in parts else None,
        dora_scale=parts["dora_scale"][1] if "dora_scale" in parts else None,
    )
