"""Writes the example LoRA files for the tiny models (deterministic; run from the repo root).

    python examples/make_examples.py

- examples/sd_tiny_lora.safetensors    diffusers/PEFT keys, unet + text_encoder, rank 4
- examples/sdxl_tiny_lora.safetensors  diffusers/PEFT keys, unet + text_encoder + text_encoder_2, rank 4
- examples/sdxl_tiny_lora_2.safetensors  a second one to stack or swap with it: other layers in part
  (to_k, to_out.0, proj_in/out, fc2, out_proj), rank 2
- examples/wan_tiny_lora.safetensors   diffusers/PEFT keys, Wan's transformer (load it into Wan 2.2's
  transformer_2 too with `load_into_transformer_2=True` / `--lora-2`), rank 4

They target the attention and feed-forward Linear layers of `export.tiny` models, e.g.
`unet.<module>.lora_A.weight` / `lora_B.weight` and `text_encoder.text_model.<module>...`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.tiny import build_tiny  # noqa: E402
from lora_loaders.targets import targetable_modules  # noqa: E402

TARGETS = re.compile(r"(to_q|to_k|to_v|to_out\.0|ff\.net\.0\.proj|ff\.net\.2|q_proj|k_proj|v_proj|out_proj)$")
TARGETS_2 = re.compile(r"(to_k|to_out\.0|proj_in|proj_out|fc2|out_proj)$")
RANK = 4
# (file stem, family, seed, target pattern, rank, components: None for every one)
EXAMPLES = (("sd_tiny_lora", "sd", 101, TARGETS, RANK, None), ("sdxl_tiny_lora", "sdxl", 202, TARGETS, RANK, None),
            ("sdxl_tiny_lora_2", "sdxl", 303, TARGETS_2, 2, None),
            ("wan_tiny_lora", "wan", 404, TARGETS, RANK, ["transformer"]))


def peft_state_dict(components: dict, seed: int, rank: int = RANK, targets=TARGETS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for c, model in components.items():
        prefix = "text_model." if c.startswith("text_encoder") and not hasattr(model, "text_model") else ""
        for name, m in targetable_modules(model).items():
            if not targets.search(name) or not isinstance(m, torch.nn.Linear):
                continue
            sd[f"{c}.{prefix}{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.2
            sd[f"{c}.{prefix}{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.2
    return sd


def main(out_dir: str | Path = Path(__file__).resolve().parent, only=None) -> list[Path]:
    out_dir = Path(out_dir)
    written = []
    for stem, family, seed, targets, rank, components in EXAMPLES:
        if only is not None and stem not in only:
            continue
        sd = peft_state_dict(build_tiny(family, components), seed, rank, targets)
        path = out_dir / f"{stem}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})
        written.append(path)
    return written


if __name__ == "__main__":
    for p in main():
        print(p, p.stat().st_size)
