"""A Refitter knows the adapters its export baked (manifest: name, sha256, scale) and can
re-weight or remove them; their files are found by hash next to the export, in a Triton
lora_dir or at the recorded path, or supplied with load_lora(path, adapter_name=...)."""

from __future__ import annotations

import json
import shutil

import pytest

import engines
import refit
from refit import RefitError
from refit_helpers import exported, initializers, lora_files, same_bits

FAMILY, COMPONENT = "sd", "text_encoder"


@pytest.fixture()
def setup(tmp_path_factory):
    root = tmp_path_factory.getbasetemp()
    files = lora_files(root, FAMILY)
    return exported(root, FAMILY, "x", [COMPONENT]), files, root


def _moved(export_dir, tmp_path, where=None):
    """A copy of the export whose manifest records x at a path that no longer exists (x moved away,
    or into `where`)."""
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    path = copy / "manifest.json"
    m = json.loads(path.read_text())
    for a in m["adapters"] + [a for e in m["components"].values() for a in e.get("adapters", [])]:
        a["path"] = str(tmp_path / "gone" / "x.safetensors")
    path.write_text(json.dumps(m))
    return copy


def _expected(root, state):
    return initializers(exported(root, FAMILY, state, [COMPONENT]) / COMPONENT / "model.onnx")


def test_baked_adapters_are_registered_and_restackable(setup):
    export_dir, files, root = setup
    engine = engines.load_engine(export_dir / COMPONENT)
    r = refit.Refitter(engine)
    assert r.get_active_adapters() == ["x"] and r.get_adapter_weights() == {"x": 1.0}
    assert r.get_list_adapters() == {COMPONENT: ["x"]} and r.missing_adapters == {}
    r.load_lora(str(files["y"]), adapter_name="y")
    assert r.get_active_adapters() == ["y"]
    r.set_adapters(["x", "y"], [1.0, 0.5])  # the README's call: the baked x, re-weighted and stacked
    want = _expected(root, "xy")
    got = engine.get_weights()
    assert got and all(same_bits(v, want[k]) for k, v in got.items())  # = the export with x and y baked
    r.delete_adapters("x")
    r.set_adapters([])
    base = _expected(root, "base")
    assert all(same_bits(v, base[k]) for k, v in engine.get_weights().items())


def test_missing_baked_file_says_where_it_looked_and_can_be_supplied(setup, tmp_path):
    export_dir, files, _ = setup
    copy = _moved(export_dir, tmp_path)
    engine = engines.load_engine(copy / COMPONENT)
    before = engine.get_weights()
    r = refit.Refitter(engine)
    assert r.get_active_adapters() == ["x"]  # the engine holds it, file or not
    searched = r.missing_adapters["x"]
    assert str(tmp_path / "gone" / "x.safetensors") in searched and str(copy / "x.safetensors") in searched
    r.load_lora(str(files["y"]), adapter_name="y")  # y alone: x's weights are not needed
    with pytest.raises(RefitError) as e:
        r.set_adapters(["x", "y"], [1.0, 0.5])
    msg = str(e.value)
    assert "adapter 'x' was baked at export" in msg and str(tmp_path / "gone" / "x.safetensors") in msg
    assert str(copy) in msg and "load_lora(path, adapter_name='x')" in msg
    with pytest.raises(RefitError, match="is not the adapter 'x' baked at export"):
        r.load_lora(str(files["y"]), adapter_name="x")  # the content hash must match
    r.load_lora(str(files["x"]), adapter_name="x")
    r.set_adapters(["x"], [1.0])
    assert all(same_bits(v, before[k]) for k, v in engine.get_weights().items())
    r.set_adapters(["x", "y"], [1.0, 0.5])
    assert r.get_active_adapters() == ["x", "y"]


@pytest.mark.parametrize("where", ["next to the export", "lora_dir"])
def test_baked_file_found_by_hash(setup, tmp_path, where):
    export_dir, files, root = setup
    copy = _moved(export_dir, tmp_path)
    if where == "lora_dir":
        ldir = tmp_path / "server_loras"
        ldir.mkdir()
        shutil.copy(files["x"], ldir / "x.safetensors")
        r = refit.Refitter(engines.load_engine(copy / COMPONENT), lora_dir=ldir)
    else:
        shutil.copy(files["x"], copy / "x.safetensors")
        r = refit.Refitter(engines.load_engine(copy / COMPONENT))
    assert r.missing_adapters == {}
    r.set_adapters(["x"], [0.3])
    assert r.get_adapter_weights() == {"x": 0.3}
    want = _expected(root, "x03")  # the export of x at 0.3
    assert all(same_bits(v, want[k]) for k, v in r.engine.get_weights().items())
