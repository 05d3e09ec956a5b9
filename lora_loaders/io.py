"""Reading LoRA files: safetensors (validated), opt-in pickles, local dirs and the hub."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch

from .errors import LoraFileError

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def resolve_path(source: str | os.PathLike, weight_name: str | None = None, **hub_kwargs) -> Path:
    """A local file for `source`: a file, a directory + weight_name, or a hub repo id + weight_name."""
    path = Path(source)
    if path.is_dir():
        name = weight_name or _single_weight_file(path)
        path = path / name
        if not path.is_file():
            raise FileNotFoundError(f"LoRA file {name!r} not found in directory {source}")
        return path
    if path.is_file():
        return path
    if _looks_like_repo_id(str(source)):
        return _hub_download(str(source), weight_name, **hub_kwargs)
    raise FileNotFoundError(f"LoRA file not found: {source}")


def _single_weight_file(directory: Path) -> str:
    if (directory / DEFAULT_WEIGHT_NAME).is_file():
        return DEFAULT_WEIGHT_NAME
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    raise FileNotFoundError(
        f"directory {directory} holds {len(files)} .safetensors files; pass weight_name= to pick one"
    )


def _looks_like_repo_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/")) and "\\" not in s


def _hub_download(repo_id: str, weight_name: str | None, **hub_kwargs) -> Path:
    from huggingface_hub import hf_hub_download, list_repo_files

    allowed = {"subfolder", "revision", "cache_dir", "local_files_only", "token", "force_download", "proxies"}
    unknown = set(hub_kwargs) - allowed
    if unknown:
        raise TypeError(f"unexpected hub arguments {sorted(unknown)}")
    if weight_name is None:
        files = [f for f in list_repo_files(repo_id, revision=hub_kwargs.get("revision"), token=hub_kwargs.get("token"))
                 if f.endswith(".safetensors")]
        if len(files) != 1:
            raise FileNotFoundError(f"hub repo {repo_id} holds {len(files)} .safetensors files; pass weight_name=")
        weight_name = files[0]
    return Path(hf_hub_download(repo_id, weight_name, **hub_kwargs))


def load_state_dict(
    source, weight_name: str | None = None, allow_pickle: bool = False, **hub_kwargs
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) from a path, directory, hub repo id or dict (its tensors copied: a caller
    that changes its dict afterwards does not change a loaded adapter)."""
    if isinstance(source, dict):
        bad = [k for k, v in source.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise LoraFileError(f"state dict keys must be strings and values tensors; not for keys {bad[:5]}")
        return {k: v.detach().clone() for k, v in source.items()}, {}
    path = resolve_path(source, weight_name, **hub_kwargs)
    if path.suffix in _PICKLE_SUFFIXES:
        if not allow_pickle:
            raise LoraFileError(
                f"{path} is a pickled checkpoint; refusing to load it. Convert it to .safetensors, "
                "or pass allow_pickle=True to load it with torch.load(weights_only=True)."
            )
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - report any unpickling failure as a file error
            raise LoraFileError(f"cannot load pickled checkpoint {path}: {e}") from e
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        return load_state_dict(sd)[0], {}
    return read_safetensors(path)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file (`safe_open`: memory-mapped, read on use); a
    truncated or corrupt file raises LoraFileError saying which and why."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors' own error type; said in our words
        raise LoraFileError(f"{path} {_safetensors_problem(e, Path(path))}") from e


def _safetensors_problem(e: Exception, path: Path) -> str:
    msg = str(e)
    if "header too small" in msg:
        return f"is not a safetensors file: {path.stat().st_size} bytes, too short for a header"
    if "not fully covered" in msg or "incomplete" in msg:
        return f"is truncated: {msg}"
    if "header" in msg.lower() or "utf-8" in msg.lower() or "json" in msg.lower():
        return f"has a corrupt safetensors header: {msg}"
    return f"is a corrupt safetensors file: {msg}"


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """`path[:scale]` -> (path, scale), as the command lines take it. A path that exists (even with a
    `:` in it) is taken whole; a scale must be a finite number."""
    arg = str(arg)
    path, _, text = arg.rpartition(":")
    if Path(arg).exists() or ":" not in arg or "/" in text or "\\" in text:  # "C:/x.safetensors" is a path
        return arg, 1.0
    try:
        scale = float(text)
    except ValueError:
        raise ValueError(f"LoRA {arg!r}: scale {text!r} is not a number (use PATH or PATH:SCALE, "
                         "e.g. x.safetensors:0.8)") from None
    if not math.isfinite(scale):
        raise ValueError(f"LoRA {arg!r}: scale {text!r} is not a finite number")
    return path, scale


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """A temporary name next to `path` to write to: renamed to `path` when the block succeeds,
    removed when it fails, so a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def listing(path: str | os.PathLike, limit: int = 5) -> str:
    """What a directory holds, for an error message: "notes.txt, a/, ... (7 entries)"."""
    entries = sorted(Path(path).iterdir())
    names = [e.name + ("/" if e.is_dir() else "") for e in entries[:limit]]
    more = f", ... ({len(entries)} entries)" if len(entries) > limit else ""
    return ", ".join(names) + more


def new_dir_beside(path: str | os.PathLike) -> Path:
    """An empty temporary directory next to `path` (same file system: it can be renamed into place),
    with the mode a plain `mkdir` gets under the user's umask (not mkdtemp's 0700)."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def commit_dirs(moves) -> None:
    """Move finished temporary directories into place, [(tmp, target)], replacing the targets: all
    of them or, if a move fails, none (the old targets are put back)."""
    moves = [(Path(t), Path(d)) for t, d in moves]
    aside, placed = [], []
    try:
        for tmp, target in moves:
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}-{threading.get_ident()}")
                os.replace(target, old)
                aside.append((old, target))
            os.replace(tmp, target)
            placed.append((tmp, target))
    except BaseException:
        for tmp, target in reversed(placed):
            os.replace(target, tmp)
        for old, target in reversed(aside):
            os.replace(old, target)
        raise
    for old, _ in aside:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """A temporary directory to fill (`new_dir_beside`): it becomes `path` (replacing what was
    there) when the block succeeds, and is removed when it fails or is interrupted, so a reader
    never sees a half-written directory."""
    tmp = new_dir_beside(path)
    try:
        yield tmp
        commit_dirs([(tmp, Path(path).absolute())])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
