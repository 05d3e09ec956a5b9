"""Drop third-party log records that tell a user of export or generate nothing (exact messages, never whole loggers).

Real warnings of the same libraries still show; a message listed here that changes wording
shows again (tests/test_user_errors.py checks a normal export prints none of these).
"""

from __future__ import annotations

import logging

# logger name -> message fragments to drop, each with why it carries no information
NOISE = {
    # transformers falls back to its PIL image processors (the pipelines' feature extractors,
    # which no exported component uses) and says so once per process.
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
    # torch.onnx lists the torchvision ops it skips registering (4 lines per export), whether or
    # not the model uses torchvision: no diffusion component does.
    "torch.onnx._internal.exporter._registration": ("torchvision is not installed. Skipping",),
    # onnxscript's optimizer notes ops it leaves unfolded (Wan's rotary Split): the graph is
    # still correct, and the export validates its outputs anyway.
    "onnxscript.optimizer._constant_folding": ("Skipping constant folding for op",),
}


class _DropNoise(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and any(f in record.msg for f in self.fragments))


def install() -> None:
    """Add the filters (once) to the loggers that emit the records."""
    for name, fragments in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(fragments))
