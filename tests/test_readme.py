"""The README runs as written: every ```python and ```bash block, in order, and its tables match the registry.

Blocks run in one temporary directory holding `examples/` and `.venv` (links to this
checkout's), with the venv's `bin` first on PATH, as after `. .venv/bin/activate` in the
repository root. Each python block runs in a fresh interpreter, so it must define what it
uses. Installation steps (`python3 -m venv`, `pip install`) are skipped: the tests run in the
installed environment. `<!-- not run: why -->` on the line before a block skips it; such
blocks stay few. One export of the tiny SDXL model (the main job) serves the later blocks.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from lora_loaders.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_NOT_RUN = 6
_NOT_RUN = re.compile(r"^<!--\s*not run:\s*(\S.*?)\s*-->$")
_INSTALL = re.compile(r"(^|\s)(python3? -m venv\b|\S*pip3? install\b)")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    not_run: str | None  # the reason, when marked

    def title(self) -> str:
        first = next((l for l in self.code.splitlines() if l.strip()), "")
        return f"README.md:{self.line} ```{self.lang} ({first[:70]!r})"


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block (any language), with the not-run marker of the line before it."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        prev = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        marker = _NOT_RUN.match(prev)
        blocks.append(Block(m.group(1), "\n".join(body) + "\n", start + 1, marker.group(1) if marker else None))
        i += 1
    return blocks


def without_install_steps(code: str) -> str:
    """The shell code with `python3 -m venv ...` and `pip install ...` steps of `&&` chains dropped."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        if not _INSTALL.search(line):
            out.append(line)  # as written (a heredoc's indentation included)
            continue
        steps = [s for s in line.split("&&") if not _INSTALL.search(s)]
        if steps:
            out.append(" && ".join(s.strip() for s in steps))
    return "\n".join(out) + "\n"


def run_block(block: Block, index: int, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    if block.lang == "python":
        script = cwd / f"readme_block_{index}.py"
        script.write_text(block.code)
        cmd = [sys.executable, str(script)]
    else:
        cmd = ["bash", "-e", "-o", "pipefail", "-c", without_install_steps(block.code)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _runnable(blocks):
    return [b for b in blocks if b.lang in ("python", "bash") and b.not_run is None]


# --- the blocks run ---------------------------------------------------------------------------


def test_readme_blocks_run_in_order(tmp_path):
    work = tmp_path / "readme"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    (work / ".venv").symlink_to(Path(sys.prefix))
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    env.pop("PYTHONPATH", None)  # the snippets import the installed project, as a user's would
    blocks = _runnable(readme_blocks(README.read_text()))
    assert len(blocks) >= 8, [b.title() for b in blocks]
    for i, block in enumerate(blocks):
        r = run_block(block, i, work, env)
        assert r.returncode == 0, f"{block.title()} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
        assert "Traceback" not in r.stderr, f"{block.title()}:\n{r.stderr[-4000:]}"
        if i == 0:  # the main job: validated, the scale as written, and no warnings on the way
            manifest = json.loads((work / "out" / "sdxl" / "manifest.json").read_text())
            assert all(c["validation"]["passed"] for c in manifest["components"].values())
            assert manifest["adapters"][0]["scale"] == 0.8
            for noise in ("WARNING", "Warning", "torchvision", "kept in float32"):
                assert noise not in r.stderr, r.stderr[-3000:]
    assert (work / "out" / "sdxl_y" / "unet" / "model.onnx").is_file()
    assert (work / "repo" / "unet" / "loras" / "sdxl_tiny_lora_2.safetensors").is_file()
    for d in (work, work / "out"):  # no temporary directories left behind
        assert not [p.name for p in d.iterdir() if p.name.startswith(".") and p.name != ".venv"], d


# --- the runner's own rules (fast) ------------------------------------------------------------


def test_block_parsing_and_markers():
    text = ("intro\n\n```bash\necho a && python3 -m venv v && v/bin/pip install x && echo b\n```\n\n"
            "<!-- not run: needs a GPU -->\n```python\nimport tensorrt\n```\n```text\nnot code\n```\n")
    blocks = readme_blocks(text)
    assert [(b.lang, b.not_run, b.line) for b in blocks] == [("bash", None, 3), ("python", "needs a GPU", 8),
                                                            ("text", None, 11)]
    assert without_install_steps(blocks[0].code) == "echo a && echo b\n"
    assert [b.lang for b in _runnable(blocks)] == ["bash"]


def test_not_run_blocks_are_few_and_say_why():
    blocks = readme_blocks(README.read_text())
    skipped = [b for b in blocks if b.not_run is not None]
    assert 0 < len(skipped) <= MAX_NOT_RUN, [b.title() for b in skipped]
    assert all(b.lang in ("python", "bash") and len(b.not_run) > 5 for b in skipped)
    assert all(b.lang in ("python", "bash", "text", "") for b in blocks)  # nothing hides in another language


# --- the tables match the registry ------------------------------------------------------------


def _table(text: str, heading: str) -> list[list[str]]:
    """Rows (cells stripped, header and rule dropped) of the first table after `heading`."""
    section = text.split(heading, 1)[1]
    rows, started = [], False
    for line in section.splitlines():
        if line.startswith("|"):
            started = True
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif started:
            break
    return [r for r in rows[2:]]


def _names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_family_table_matches_registry():
    rows = {_names(r[0])[0]: r for r in _table(README.read_text(), "## What works for each family")}
    assert set(rows) == set(FAMILIES)
    for name, spec in FAMILIES.items():
        exported = [c for c in spec.exported if spec.component(c).inputs]
        row = rows[name]
        assert row[1] == "yes", name  # every family loads LoRAs
        assert row[2:5] == (["yes"] * 3 if exported else ["no"] * 3), name
        # prompt to picture / video: the export holds a VAE decoder and the pipeline's scheduler
        # (tests/test_pipelines.py, tests/test_family_exports.py check each such family's output)
        generates = bool(spec.pipeline and spec.scheduler and any(spec.component(c).role == "vae" for c in exported))
        makes = "video" if "frames" in spec.axes else "image"
        assert row[5] == (f"yes ({makes})" if generates else "no"), name
        # image-conditioned tasks (tests/test_tasks_*.py check each against diffusers) and tiny variants
        tasks = [t for t in spec.task_pipelines() if t != spec.default_task]
        assert _names(row[6]) == tasks + [f"tiny:{v}" for v in spec.variants], name
        assert _names(row[7]) == exported, name


def _dtype(spec_dtype: str) -> str:
    return "export" if spec_dtype == "model" else spec_dtype


def test_input_table_matches_registry():
    rows = _table(README.read_text(), "#### Graph inputs")
    table: dict[tuple[str, str], list[list[str]]] = {}
    for r in rows:
        (family,), (component,) = _names(r[0]), _names(r[1])
        table.setdefault((family, component), []).append(r)
    families = {f for f, _ in table}
    assert {"sd", "sdxl"} <= families
    for family in families:
        spec = FAMILIES[family]
        listed = {}
        for component in [c for c, cs in spec.components.items() if cs.inputs]:
            inputs = spec.component(component).inputs
            if (family, component) not in table and component not in spec.exported:
                continue  # exported on request only (a VAE encoder): listed where it matters
            if (family, component) not in table:
                # a component may be left out only where it takes a listed one's inputs (Wan 2.2's transformer_2)
                assert any(tuple(i.name for i in inputs) == v for v in listed.values()), (family, component)
                continue
            got = table[(family, component)]
            listed[component] = tuple(i.name for i in inputs)
            assert [_names(r[2])[0] for r in got] == [i.name for i in inputs], (family, component)
            for r, t in zip(got, inputs):
                dims = [d.strip() for d in _names(r[4])[0].strip("[]").split(",")]
                assert r[3] == _dtype(t.dtype), (family, component, t.name)
                assert len(dims) == len(t.dims), (family, component, t.name)
                for d, want in zip(dims, t.dims):  # axis names and fixed sizes as the registry has them
                    if isinstance(want, (str, int)):
                        assert d == str(want), (family, component, t.name, dims)
                assert r[5] == t.doc, (family, component, t.name)


def test_snippets_send_timestep_as_float32():
    """Every export's timestep is float32 (the registry); no snippet may build it otherwise."""
    assert all(t.dtype == "float32" for f in FAMILIES.values() for c in f.components.values()
               for t in c.inputs if t.name == "timestep")
    for block in readme_blocks(README.read_text()):
        for line in block.code.splitlines():
            if '"timestep"' in line and "np." in line:
                assert "float16" not in line and "FP16" not in line, (block.title(), line)
        assert '"FP16")' not in block.code, block.title()  # inputs take the dtype the model declares


def test_readme_documents_the_exit_codes():
    text = README.read_text()
    section = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    for code in ("**0**", "**2**", "**1**", "**130**"):
        assert code in section
    for script in ("lora-export", "lora-refit"):
        assert f"`{script}`" in section
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'lora-export = "export.__main__:main"' in pyproject and 'lora-refit = "refit.__main__:main"' in pyproject


@pytest.mark.parametrize("command", [["-m", "export", "--help"], ["-m", "refit", "--help"],
                                     ["-m", "engines.triton", "--help"]])
def test_help_states_exit_codes(command):
    r = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Exit codes: 0 done, 2 bad usage or input" in r.stdout, r.stdout


def test_readme_tells_a_newcomer():
    """What the first questions need: tiny is random, where components come from, GPU setup, the commands."""
    text = README.read_text()
    for fact in ("**random weights**", "from_pretrained", "export.build_tiny", "save_pretrained(",
                 "--model tiny-sd", "onnxruntime-gpu", "--index-url", ".[gpu,tensorrt]", "'numpy<2'",
                 "lora-export", "lora-refit", "engine.input_infos()"):
        assert fact in text, fact
