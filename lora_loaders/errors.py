"""The errors a LoRA file can cause, all `LoraError`s (and, for callers that catch the builtin
kinds, `ValueError` or `KeyError`). Each message names the file and the key(s) at fault."""

from __future__ import annotations


class LoraError(Exception):
    """Anything wrong with a LoRA file or state dict."""


class LoraFileError(LoraError, ValueError):
    """A LoRA file that is missing, truncated, corrupt or not allowed (pickles)."""


class ParseError(LoraError, ValueError):
    """Keys or tensors that do not form LoRA layers (unknown keys, bad shapes, dtypes, NaN values)."""


class LoraKeyError(LoraError, KeyError):
    """Keys that match no module of the model, or no prefix the family reads."""

    def __str__(self):  # KeyError quotes its message; show it as written
        return str(self.args[0]) if self.args else ""


class LoraShapeError(LoraError, ValueError):
    """Layers whose shapes do not fit the modules they target (or a fused layer that cannot be split)."""


class LoraWidthError(LoraShapeError):
    """Layers wider than modules the family lets LoRAs widen (Flux Control), where they cannot be widened
    (an engine exported without them)."""


class LoraFamilyError(LoraError, ValueError):
    """A file made for another model family."""
