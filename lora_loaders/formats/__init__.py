"""LoRA file formats: one converter module each, detected from the keys.

Each converter exposes `NAME`, `detect(keys) -> bool` and
`convert(state_dict, metadata, spec, resolver) -> {(component, module): LoraLayer}`.
"""

from __future__ import annotations

from . import kohya, peft

CONVERTERS = (kohya, peft)  # most specific first


def detect(keys: list[str]):
    for converter in CONVERTERS:
        if converter.detect(keys):
            return converter
    return None
