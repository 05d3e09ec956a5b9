"""`--tensorrt`: build a TensorRT plan per exported component, only mapped weights refittable.

The build itself is `engines.tensorrt.build_plan` (REFIT_INDIVIDUAL, strongly typed: the
ONNX carries the precision). This module turns the manifest's dynamic axes into one
optimization profile per component:

- `batch`: 1 / 2 / 4 (min / opt / max); `height`, `width` (latent): sample_size // 2 /
  sample_size / sample_size * 2; every other dimension as exported.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

BATCH = (1, 2, 4)


def profiles_for(entry: dict, batch=BATCH) -> dict[str, tuple]:
    """{input: (min, opt, max) shapes} from a manifest component entry."""
    size = int(entry.get("sample_size") or 64)
    ranges = {"batch": batch, "height": (size // 2, size, size * 2), "width": (size // 2, size, size * 2)}
    out = {}
    for inp in entry["inputs"]:
        shapes = []
        for k in range(3):
            shape = []
            for d in inp["shape"]:
                if isinstance(d, int):
                    shape.append(d)
                elif d in ranges:
                    shape.append(ranges[d][k])
                else:
                    raise ValueError(f"no profile range for dimension {d!r} of input {inp['name']}")
            shapes.append(tuple(shape))
        out[inp["name"]] = tuple(shapes)
    return out


def check_available() -> None:
    """Raise a clear error unless TensorRT with a CUDA device can build here."""
    try:
        from engines.tensorrt import tensorrt_available
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError(f"--tensorrt needs the engines package with TensorRT support: {e}") from e
    if not tensorrt_available():
        raise RuntimeError("--tensorrt: TensorRT with a CUDA device is not available here "
                           "(pip install 'lora-engines[tensorrt]' on a machine with an NVIDIA GPU)")


def build_engines(out_dir: str | Path, manifest: dict, batch=BATCH) -> None:
    """Build out_dir/<component>/model.plan for every component of the manifest (records it there)."""
    check_available()
    from engines.tensorrt import build_plan
    out_dir = Path(out_dir)
    for component, entry in manifest["components"].items():
        onnx_path = out_dir / entry["dir"] / entry["model"]
        profiles = profiles_for(entry, batch)
        log.info("%s: building TensorRT plan, profiles %s", component, profiles)
        plan = build_plan(onnx_path, profiles=profiles)
        entry["tensorrt"] = {"plan": plan.name, "profiles": {k: [list(s) for s in v] for k, v in profiles.items()}}
