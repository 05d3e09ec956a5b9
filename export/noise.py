"""Drop third-party log records that tell an export's user nothing (exact messages, never whole loggers).

Real warnings of the same libraries still show; a message listed here that changes wording
shows again (tests/test_user_errors.py checks a normal export prints none of these).
"""

from __future__ import annotations

import logging

# logger name -> message prefixes to drop, each with why it carries no information
NOISE = {
    # torch.onnx lists the torchvision ops it skips registering (4 lines per export), whether or
    # not the model uses torchvision: no diffusion component does.
    "torch.onnx._internal.exporter._registration": ("torchvision is not installed. Skipping",),
    # onnxscript's optimizer notes ops it leaves unfolded (Wan's rotary Split): the graph is
    # still correct, and the export validates its outputs anyway.
    "onnxscript.optimizer._constant_folding": ("Skipping constant folding for op",),
}


class _DropNoise(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.prefixes))


def install() -> None:
    """Add the filters (once) to the loggers that emit the records."""
    for name, prefixes in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(prefixes))
