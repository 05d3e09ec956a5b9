"""What a diffusers pipeline needs from the model besides the engines: `model_index.json`, the
scheduler config and the tokenizers, written into the export so it alone can generate.

From a diffusers directory or hub snapshot they are copied; for `--model tiny` the scheduler
comes from the registry and each text encoder gets a small byte-level CLIP tokenizer made
here (its ids fit the tiny vocabularies). A {component: module} dict or a factory has none of
them: the manifest says so, and `engines.load_pipeline` explains what is missing.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from lora_loaders.families import FamilySpec

log = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
# the messages' text, in order: what a chat template reduces to for a tokenizer without roles
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
                 "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
                 "{% endif %}{% endfor %}")


def write_pipeline_files(source, spec: FamilySpec, out: Path, components: list[str]) -> dict | None:
    """Write model_index.json, scheduler/, tokenizer*/ and processors into `out`; the manifest's `pipeline` entry."""
    if spec.pipeline is None:
        return None
    tokenizers = sorted({spec.component(c).tokenizer for c in spec.text_encoders if spec.component(c).tokenizer})
    parts = ["scheduler", *tokenizers]
    if source.kind == "tiny":
        parts += _tiny_files(spec, source.variant, out, tokenizers)
    elif source.kind in ("dir", "hub"):
        root = source.ensure_root()
        parts += _processors(spec, root)
        for name in parts:
            if (root / name).is_dir():
                shutil.copytree(root / name, out / name)
        if (root / MODEL_INDEX).is_file():
            shutil.copyfile(root / MODEL_INDEX, out / MODEL_INDEX)
    else:
        return {"class": spec.pipeline, "files": [], "missing": "scheduler and tokenizers (the model was given as modules)"}
    if not (out / MODEL_INDEX).is_file():
        _model_index(spec, out, tokenizers)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                   if p.is_file() and (p.name == MODEL_INDEX or p.parts[len(out.parts)] in parts))
    missing = [n for n in ["scheduler", *tokenizers] if not (out / n).is_dir()]
    missing += [c for c in spec.exported if not spec.component(c).optional and c not in components]
    if not any(spec.component(c).role == "vae" for c in components):
        missing.append("a VAE decoder")
    index = json.loads((out / MODEL_INDEX).read_text())
    entry = {"class": index.get("_class_name") or spec.pipeline, "files": files}
    if missing:
        entry["missing"] = ", ".join(missing)
    return entry


def _processors(spec: FamilySpec, root: Path) -> list[str]:
    """The model_index entries of a diffusers directory that are neither engines nor weights
    (image processors, feature extractors): copied as they are."""
    path = root / MODEL_INDEX
    if not path.is_file():
        return []
    folders = {s.folder for s in spec.components.values()}
    out = []
    for name, value in json.loads(path.read_text()).items():
        if isinstance(value, list) and len(value) == 2 and value[0] and name not in folders and (root / name).is_dir() \
                and not any((root / name).glob("*.safetensors")) and not any((root / name).glob("*.bin")):
            out.append(name)
    return out


def _model_index(spec: FamilySpec, out: Path, tokenizers: list[str], variant=None) -> None:
    import diffusers

    index = {"_class_name": variant.pipeline if variant else spec.pipeline, "_diffusers_version": diffusers.__version__}
    for c, cs in spec.components.items():
        if not (variant and c in variant.lacks):
            index.setdefault(cs.folder, [cs.library, cs.class_name])
    if spec.scheduler:
        index["scheduler"] = ["diffusers", spec.scheduler[0]]
    index.update(spec.pipeline_config if variant is None or variant.pipeline_config is None else variant.pipeline_config)
    for t in tokenizers:
        index[t] = ["transformers", "CLIPTokenizer"]
    for name, proc in _tiny_processors(spec, variant).items():
        index[name] = [proc.library, proc.class_name]
    (out / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _tiny_processors(spec: FamilySpec, variant) -> dict:
    return {**spec.processors, **(variant.processors if variant else {})}


def _tiny_files(spec: FamilySpec, variant, out: Path, tokenizers: list[str]) -> list[str]:
    """The tiny model's scheduler, tokenizers, processors and model_index; the processors' folders."""
    import importlib

    import diffusers

    if spec.scheduler:
        cls_name, config = spec.scheduler
        getattr(diffusers, cls_name)(**config).save_pretrained(out / "scheduler")
    for t in tokenizers:
        tiny_tokenizer(out / t)
    processors = _tiny_processors(spec, variant)
    for name, proc in processors.items():
        if proc.write is not None:
            proc.write(out / name, tiny_tokenizer)
            continue
        getattr(importlib.import_module(proc.library), proc.class_name)(**proc.config).save_pretrained(out / name)
    _model_index(spec, out, tokenizers, variant)
    return list(processors)


def tiny_tokenizer(path: Path, max_length: int = 77):
    """A byte-level CLIP tokenizer without merges: every character is a token (514 ids, end of text last,
    so the tiny CLIP models' legacy `argmax` pooling finds it)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer.from_pretrained(str(path), model_max_length=max_length)
    tok.chat_template = CHAT_TEMPLATE  # for pipelines that prompt through one (FLUX.2)
    tok.save_pretrained(path)
    return tok
