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
    """Write model_index.json, scheduler/ and tokenizer*/ into `out`; the manifest's `pipeline` entry."""
    if spec.pipeline is None:
        return None
    tokenizers = sorted({spec.component(c).tokenizer for c in spec.text_encoders if spec.component(c).tokenizer})
    if source.kind == "tiny":
        _tiny_files(spec, out, tokenizers)
    elif source.kind in ("dir", "hub"):
        root = source.ensure_root()
        for name in ["scheduler", *tokenizers]:
            if (root / name).is_dir():
                shutil.copytree(root / name, out / name)
        if (root / MODEL_INDEX).is_file():
            shutil.copyfile(root / MODEL_INDEX, out / MODEL_INDEX)
    else:
        return {"class": spec.pipeline, "files": [], "missing": "scheduler and tokenizers (the model was given as modules)"}
    if not (out / MODEL_INDEX).is_file():
        _model_index(spec, out, tokenizers)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                   if p.is_file() and (p.name == MODEL_INDEX or p.parts[len(out.parts)] in ("scheduler", *tokenizers)))
    missing = [n for n in ["scheduler", *tokenizers] if not (out / n).is_dir()]
    missing += [c for c in spec.exported if not spec.component(c).optional and c not in components]
    if not any(spec.component(c).role == "vae" for c in components):
        missing.append("a VAE decoder")
    entry = {"class": spec.pipeline, "files": files}
    if missing:
        entry["missing"] = ", ".join(missing)
    return entry


def _model_index(spec: FamilySpec, out: Path, tokenizers: list[str]) -> None:
    import diffusers

    index = {"_class_name": spec.pipeline, "_diffusers_version": diffusers.__version__}
    for c, cs in spec.components.items():
        index.setdefault(cs.folder, [cs.library, cs.class_name])
    if spec.scheduler:
        index["scheduler"] = ["diffusers", spec.scheduler[0]]
    index.update(spec.pipeline_config)
    for t in tokenizers:
        index[t] = ["transformers", "CLIPTokenizer"]
    (out / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _tiny_files(spec: FamilySpec, out: Path, tokenizers: list[str]) -> None:
    import diffusers

    if spec.scheduler:
        cls_name, config = spec.scheduler
        getattr(diffusers, cls_name)(**config).save_pretrained(out / "scheduler")
    for t in tokenizers:
        tiny_tokenizer(out / t)


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
