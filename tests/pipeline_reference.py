"""The reference for engine pipelines: diffusers' own pipeline over fresh tiny models, with the
export's tokenizer and scheduler files and the LoRAs loaded and fused by diffusers + PEFT."""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import torch

import lora_loaders as L
from export.tiny import build_tiny

CALL = dict(num_inference_steps=2, guidance_scale=4.0, height=32, width=32, output_type="np")


def reference_pipeline(family: str, out: Path, loras=(), pipeline_class: str | None = None):
    """diffusers' pipeline (`pipeline_class`, default the family's; `spec.pipeline`) over fresh tiny
    models of the export's variant (`--model tiny:<variant>`), with the export's tokenizer, scheduler
    and processor files, and the LoRAs loaded and fused by diffusers + PEFT."""
    import diffusers
    from transformers import CLIPTokenizer

    spec = L.get_family(family)
    model = json.loads((out / "manifest.json").read_text())["model"]
    variant = spec.variant(model.partition(":")[2]) if model.startswith("tiny:") else None
    components = [c for c in spec.components if not (variant and c in variant.lacks)]
    models = build_tiny(family, components, overrides=variant.tiny if variant else None)
    parts = {spec.component(c).folder: m for c, m in models.items()}  # both VAE halves: `vae`; aMUSEd's: `vqvae`
    cls = getattr(diffusers, pipeline_class or spec.pipeline)
    params = inspect.signature(cls.__init__).parameters
    index = json.loads((out / "model_index.json").read_text())
    for name in params:
        if name.startswith("tokenizer"):
            parts[name] = CLIPTokenizer.from_pretrained(out / name)
        elif name not in parts and isinstance(index.get(name), list) and (out / name).is_dir():  # processors
            library, class_name = index[name]
            parts[name] = getattr(__import__(library), class_name).from_pretrained(out / name)
    parts["scheduler"] = getattr(diffusers, spec.scheduler[0]).from_pretrained(out / "scheduler")
    for name, p in params.items():
        if name not in parts and name != "self" and p.default is inspect.Parameter.empty:
            parts[name] = None
    # the pipeline's settings (Wan 2.2's boundary_ratio)
    parts.update({k: v for k, v in index.items() if k in params and not k.startswith("_") and k not in parts
                  and not (isinstance(v, list) and len(v) == 2)})
    if "requires_safety_checker" in params:
        parts["requires_safety_checker"] = False
    pipe = cls(**{k: v for k, v in parts.items() if k in params})
    # aMUSEd's pipeline (deprecated in diffusers) has no LoRA methods: everything goes the next way
    loaded = set()
    if loras and hasattr(cls, "load_lora_weights"):
        for i, (path, scale) in enumerate(loras):
            pipe.load_lora_weights(str(path), adapter_name=f"r{i}")
        pipe.set_adapters([f"r{i}" for i in range(len(loras))], [copy.deepcopy(s) for _, s in loras])  # it pops keys
        loaded = set(pipe.get_list_adapters())
        pipe.fuse_lora()
    # Components diffusers' mixin does not load LoRAs into (Lumina2's Gemma; Wan's transformer_2 from
    # `transformer_2.` keys) while the files have layers for them: fused by our loader (each family's
    # tests check it against diffusers' own loading functions or the formula).
    touched = {c for path, _ in loras for c in L.read_lora(str(path), family=family).components}
    extra = {c: parts[c] for c in spec.lora_components if c not in loaded and c in parts and c in touched}
    if extra:
        ours = L.loader_for(family, **extra)
        for i, (path, _) in enumerate(loras):
            ours.load_lora_weights(str(path), adapter_name=f"o{i}")
        ours.set_adapters([f"o{i}" for i in range(len(loras))], [s for _, s in loras])
        ours.fuse_lora()
    pipe.call_kwargs = spec.pipeline_kwargs(pipe) if spec.pipeline_kwargs else {}  # as the engine pipeline's
    return pipe


def frame_counts(pipe) -> tuple[int, int]:
    """Two video frame counts a video pipeline takes: 2 and 3 latent frames through its VAE's time factor."""
    from engines.pipeline import _TIME_FACTORS

    factor = next(int(getattr(pipe, a)) for a in _TIME_FACTORS if getattr(pipe, a, None))
    return 1 + factor, 1 + 2 * factor


def outputs(pipe, family: str, seed=0, both: bool = True) -> list:
    """What the pipeline makes: [its image], or for a video family [its video at each of `frame_counts`]
    (without `both`: the longer only)."""
    if "frames" not in L.get_family(family).axes:
        return [image(pipe, seed)]
    kw = {**CALL, **getattr(pipe, "call_kwargs", {})}
    return [pipe(prompt="a red cube", num_frames=n, generator=torch.Generator().manual_seed(seed), **kw).frames[0]
            for n in frame_counts(pipe)[0 if both else 1:]]


def image(pipe, seed=0, prompt="a red cube"):
    kw = {**CALL, **getattr(pipe, "call_kwargs", {})}
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **kw).images[0]  # FLUX.2 takes `image` first
