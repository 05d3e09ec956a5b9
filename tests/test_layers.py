"""Layers read one way: every module of the project belongs to one layer, imports only its own layer
and the layers below it (module-level and function-level imports alike, no exemptions), and no
modules import each other in a cycle. The table is the project's layer drawing (the design's
layers.json): loaders at the bottom; the runtimes; export and refit side by side; the deployment
(pipelines, generate, Triton, the `engines` package face) on top; the command lines as faces.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lora_loaders", "engines", "export", "refit", "bench")
LAYERS = {  # layer -> files or directories (a file is more specific than its directory)
    "Loaders": ["lora_loaders/"],
    "Runtimes": ["engines/base.py", "engines/ort.py", "engines/tensorrt.py", "engines/torch_engine.py",
                 "engines/load.py", "engines/weights_map.py", "engines/manifest.py", "engines/onnx_utils.py",
                 "engines/noise.py", "engines/cli.py"],
    "Export": ["export/"],
    "Refit": ["refit/"],
    "Deploy": ["engines/pipeline.py", "engines/generate.py", "engines/triton/", "engines/__init__.py"],
    "Bench": ["bench/"],
    "Faces": ["export/__main__.py", "refit/__main__.py"],
}
BELOW = {  # layer -> the layers it may import (besides its own)
    "Loaders": set(),
    "Runtimes": {"Loaders"},
    "Export": {"Runtimes", "Loaders"},
    "Refit": {"Runtimes", "Loaders"},
    "Deploy": {"Refit", "Runtimes", "Loaders"},
    "Bench": {"Export", "Refit", "Deploy", "Runtimes", "Loaders"},
    "Faces": {"Export", "Refit", "Deploy", "Runtimes", "Loaders"},
}


def layer_of(rel: str, layers=LAYERS) -> str | None:
    best = None
    for layer, places in layers.items():
        for place in places:
            if rel == place or (place.endswith("/") and rel.startswith(place)):
                if best is None or len(place) > len(best[1]):
                    best = (layer, place)
    return best[0] if best else None


def _module_file(root: Path, dotted: str) -> str | None:
    """The project file a dotted module name is (a package: its __init__), or None."""
    base = root / Path(*dotted.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return str(cand.relative_to(root))
    return None


def imports_of(root: Path, rel: str) -> set[str]:
    """The project modules (files) one file imports, anywhere in it (functions included)."""
    path = root / rel
    package = rel.rsplit("/", 1)[0].replace("/", ".") if "/" in rel else ""
    if path.name == "__init__.py":
        package = rel[: -len("/__init__.py")].replace("/", ".")
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in [*parts, *(base.split(".") if base else [])] if p)
            # `from pkg import sub` imports the submodule where there is one, else pkg itself
            names = [f"{base}.{a.name}" if _module_file(root, f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        for name in names:
            f = _module_file(root, name)
            if f is not None:
                out.add(f)
    return out


def project_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for pkg in PACKAGES if (root / pkg).is_dir()
                  for p in (root / pkg).rglob("*.py"))


def violations(root: Path, layers=LAYERS, below=BELOW) -> list[str]:
    """Every module without a layer, every import of a layer not below, and every import cycle."""
    problems, graph = [], {}
    for rel in project_files(root):
        mine = layer_of(rel, layers)
        if mine is None:
            problems.append(f"{rel}: in no layer")
            continue
        graph[rel] = imports_of(root, rel)
        for dep in sorted(graph[rel]):
            theirs = layer_of(dep, layers)
            if theirs != mine and theirs not in below[mine]:
                problems.append(f"{rel} ({mine}) imports {dep} ({theirs})")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_layers_import_downward_only_without_exemptions():
    assert not (ROOT / "triton").exists()  # torch's GPU builds depend on the `triton` compiler package
    assert violations(ROOT) == []


def test_importing_the_runtimes_pulls_in_no_upper_layer():
    r = subprocess.run([sys.executable, "-c", "import engines, sys; print(sorted(m for m in sys.modules "
                        "if m.split('.')[0] in ('refit', 'export') or m.startswith(('engines.pipeline', "
                        "'engines.triton'))))"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_the_check_fails_on_an_upward_import_a_cycle_and_an_unplaced_module(tmp_path):
    """The same check over a small tree that breaks each rule once (the way a regression would)."""
    root = _tree(tmp_path, {
        "lora_loaders/__init__.py": "", "lora_loaders/ok.py": "import os\n",
        "lora_loaders/up.py": "def f():\n    from refit import core  # a lazy import counts too\n",
        "engines/__init__.py": "", "engines/base.py": "from lora_loaders import ok\n",
        "engines/pipeline.py": "from .base import x\nfrom refit.core import y\n",
        "engines/stray.py": "",
        "refit/__init__.py": "", "refit/core.py": "from .store import z\n", "refit/store.py": "from . import core\n",
    })
    found = violations(root)
    assert "lora_loaders/up.py (Loaders) imports refit/core.py (Refit)" in found
    assert "engines/stray.py: in no layer" in found
    assert "import cycle: refit/core.py -> refit/store.py" in found
    assert len(found) == 3, found  # engines/pipeline.py (Deploy) may import refit and the runtimes
