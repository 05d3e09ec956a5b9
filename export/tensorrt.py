"""`--tensorrt`: build a TensorRT plan per exported component, only mapped weights refittable.

The build itself is `engines.tensorrt.build_plan` (REFIT_INDIVIDUAL, strongly typed: the
ONNX carries the precision). This module turns the family's axes (recorded in the
manifest) into one optimization profile per component: every named dimension of an input
takes its axis' min / opt / max; fixed dimensions stay as exported.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lora_loaders.families.spec import parse_dim

log = logging.getLogger(__name__)


def profiles_for(entry: dict, axes: dict[str, dict]) -> dict[str, tuple]:
    """{input: (min, opt, max) shapes} from a manifest component entry and the family's axes."""
    out = {}
    for inp in entry["inputs"]:
        shapes = []
        for k in ("min", "opt", "max"):
            shape = []
            for d in inp["shape"]:
                if isinstance(d, int):
                    shape.append(d)
                elif parse_dim(d)[0] in axes:  # an axis, or an axis times a factor ("height*2")
                    axis, factor = parse_dim(d)
                    shape.append(int(axes[axis][k]) * factor)
                else:
                    raise ValueError(f"no profile range for dimension {d!r} of input {inp['name']}")
            shapes.append(tuple(shape))
        out[inp["name"]] = tuple(shapes)
    return out


def check_available() -> None:
    """Raise a clear error unless TensorRT with a CUDA device can build here."""
    from engines.tensorrt import tensorrt_available

    if not tensorrt_available():
        raise RuntimeError("--tensorrt: TensorRT with a CUDA device is not available here "
                           "(pip install 'lora-engines[tensorrt]' on a machine with an NVIDIA GPU)")


def build_engines(out_dir: str | Path, manifest, family, strip_plan: bool = False, timing_cache=None) -> None:
    """Build out_dir/<component>/model.plan for every component of the manifest (records it there:
    plan, profiles, TensorRT version, GPU, builder flags, how many weights are refittable).

    strip_plan: plans without their refittable weights (refit them from the ONNX / a Refitter
    before use). timing_cache: a file shared by the builds (read if present, then updated).
    """
    check_available()
    from engines.tensorrt import build_plan

    out_dir = Path(out_dir)
    axes = manifest.axes or {n: {"min": a.min, "opt": a.opt, "max": a.max} for n, a in family.axes.items()}
    for component, entry in manifest.components.items():
        onnx_path = out_dir / entry["dir"] / entry["model"]
        profiles = profiles_for(entry, axes)
        log.info("%s: building TensorRT plan, profiles %s", component, profiles)
        plan = build_plan(onnx_path, profiles=profiles, strip_plan=strip_plan,
                          timing_cache=timing_cache or out_dir / "timing.cache")
        info = dict(build_plan.last_info)
        info.pop("timing_cache", None)
        entry["tensorrt"] = {"plan": plan.name, "profiles": {k: [list(s) for s in v] for k, v in profiles.items()},
                             **info}
