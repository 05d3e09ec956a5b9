"""Helpers for engine/refit tests: LoRA files and exports of tiny models with adapters baked in.

`export_dir` exports with `export.export_pipeline` (the product path).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from safetensors.torch import save_file

from lora_files import peft_lora

# Two LoRAs that overlap on some modules and not on others.
X_PATTERN = re.compile(r"(to_q|to_v|ff\.net\.2|q_proj|fc1|proj_in)$")
Y_PATTERN = re.compile(r"(to_q|to_k|to_out\.0|k_proj|out_proj|fc2)$")


def write_lora(path, components: dict, pattern, seed: int, rank: int = 4) -> Path:
    sd = peft_lora(components, pattern=pattern, rank=rank, seed=seed)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return Path(path)


def export_dir(family: str, components: list[str], loras, out_dir, dtype: str = "fp32") -> Path:
    """Export tiny `family` components with `loras` ([(path, scale)]) baked in; returns out_dir."""
    import export

    out_dir = Path(out_dir)
    export.export_pipeline(family, model="tiny", loras=[(str(p), s) for p, s in loras], out_dir=str(out_dir),
                           dtype=dtype, components=components, validate=False, progress=False)
    return out_dir


def initializers(model_path, names=None) -> dict[str, np.ndarray]:
    m = onnx.load(str(model_path))
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if names is None or t.name in names}


def inputs_for(engine, seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
    """Seeded inputs matching the engine's graph (tiny models)."""
    rng = np.random.default_rng(seed)
    sess = engine.session
    feeds = {}
    for i in sess.get_inputs():
        if i.name not in engine.input_names:
            continue
        shape = [d if isinstance(d, int) else None for d in i.shape]
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, 1000, size=(batch, 77)).astype(np.int64)
            continue
        dims = []
        for k, d in enumerate(shape):
            if d is not None:
                dims.append(d)
            elif k == 0:
                dims.append(batch)
            elif i.name == "sample":
                dims.append(16)
            else:
                dims.append(8)
        dt = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(double)": np.float64}[i.type]
        feeds[i.name] = (rng.standard_normal(dims) * (10 if i.name == "timestep" else 1)).astype(dt)
    return feeds


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def differing(a: dict, b: dict, names=None) -> list[str]:
    """Names whose arrays differ in bits (or are missing on one side)."""
    names = sorted(set(a) | set(b)) if names is None else names
    return [n for n in names if n not in a or n not in b or not same_bits(a[n], b[n])]


# -- exports shared by the engine / refit test modules (one pytest process) ----------------

COMPONENTS = {"sd": ["unet", "text_encoder"], "sdxl": ["unet", "text_encoder", "text_encoder_2"],
              "wan": ["transformer"]}
STATES = {  # name -> adapters baked ((lora, scale), ...)
    "x": (("x", 1.0),),
    "y": (("y", 1.0),),
    "xy": (("x", 1.0), ("y", 0.5)),
    "base": (),
    "x03": (("x", 0.3),),
}
_EXPORTS: dict = {}


def lora_files(root: Path, family: str) -> dict[str, Path]:
    """x and y LoRA files for a family's tiny model (all components), written once."""
    from export.tiny import build_tiny

    root = Path(root)
    key = ("loras", family)
    if key not in _EXPORTS:
        models = build_tiny(family, COMPONENTS[family])
        d = root / f"{family}_loras"
        d.mkdir(parents=True, exist_ok=True)
        _EXPORTS[key] = {"x": write_lora(d / "x.safetensors", models, X_PATTERN, seed=11),
                         "y": write_lora(d / "y.safetensors", models, Y_PATTERN, seed=22)}
    return _EXPORTS[key]


def exported(root: Path, family: str, state: str, components=None) -> Path:
    """The export directory of `family` with the adapters of `state` baked (cached per process)."""
    components = components or COMPONENTS[family]
    key = (family, state, tuple(components))
    if key not in _EXPORTS:
        loras = lora_files(root, family)
        out = Path(root) / f"{family}_{state}_{'_'.join(components)}"
        export_dir(family, list(components), [(loras[n], s) for n, s in STATES[state]], out)
        _EXPORTS[key] = out
    return _EXPORTS[key]
