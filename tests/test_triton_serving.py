"""The Triton denoiser's core without a server: `loras` parsing, safety, grouping, refit counts."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest

import engines
import refit
from engines.triton.requests import (LoraDirectory, LoraRequestError, LoraSwitcher, check_adapter_name,
                                     parse_loras, run_batched)
from refit_helpers import exported, inputs_for, lora_files

# -- parsing (no engine) --------------------------------------------------------------------


@pytest.mark.parametrize("value,key", [
    (None, None),
    ("{}", ()),
    ('{"x": 1}', (("x", 1.0),)),
    ('{"y": 0.5, "x": 1}', (("x", 1.0), ("y", 0.5))),
    ({"x": 0}, (("x", 0.0),)),
    (b'{"a-b.c_1": -2.5}', (("a-b.c_1", -2.5),)),
])
def test_parse_loras_ok(value, key):
    assert parse_loras(value) == key


@pytest.mark.parametrize("value", [
    "nope", "[1, 2]", '"x"', "1", '{"x": "1"}', '{"x": true}', '{"x": null}', '{"x": NaN}', '{"x": Infinity}',
    '{"x": -Infinity}', '{"x": 1e999}', '{"../x": 1}', '{"a/b": 1}', '{"a\\\\b": 1}', '{"..": 1}', '{"": 1}',
    '{"x\\u0000": 1}', '{"/etc/passwd": 1}', '{' + ", ".join(f'"a{i}": 1' for i in range(40)) + '}', b"\xff\xfe",
    "{" * 5000,
])
def test_parse_loras_rejects(value):
    with pytest.raises(LoraRequestError):
        parse_loras(value)


def test_adapter_names():
    assert check_adapter_name("style_v1.2") == "style_v1.2"
    for bad in ("a/b", "a\\b", "..", "a..b", ".hidden", "", "x" * 200, "a b", 3):
        with pytest.raises(LoraRequestError):
            check_adapter_name(bad)


def test_lora_directory_lists_only_its_own_files(tmp_path):
    d = tmp_path / "loras"
    d.mkdir()
    (d / "a.safetensors").write_bytes(b"1")
    (d / "b.bin").write_bytes(b"1")
    (d / "sub.safetensors").mkdir()
    (tmp_path / "secret.safetensors").write_bytes(b"1")
    os.symlink(tmp_path / "secret.safetensors", d / "link.safetensors")
    (d / "inner.safetensors").symlink_to(d / "a.safetensors")  # a link staying inside is fine
    ld = LoraDirectory(d)
    assert set(ld.available()) == {"a", "inner"}
    assert ld.resolve("a") == (d / "a.safetensors").resolve()
    for bad in ("link", "secret", "../secret", "b", "sub", "missing"):
        with pytest.raises(LoraRequestError):
            ld.resolve(bad)


# -- the switcher over a real ORT engine + Refitter ---------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton_serving")
    loras = lora_files(root, "sdxl")
    export = exported(root, "sdxl", "x", components=["unet"])  # x baked at 1.0
    lora_dir = root / "lora_dir"
    lora_dir.mkdir()
    for n, p in loras.items():
        shutil.copy(p, lora_dir / f"{n}.safetensors")
    # a file outside the directory, and a link to it inside: never offered, never opened
    shutil.copy(loras["y"], root / "outside.safetensors")
    os.symlink(root / "outside.safetensors", lora_dir / "escape.safetensors")
    unet = export / "unet"
    feeds = [inputs_for(engines.load_engine(unet), seed=s) for s in (0, 1)]
    # references: a separate engine + Refitter per adapter set
    eng = engines.load_engine(unet)
    baked_out = [eng.infer(f)["out_sample"] for f in feeds]
    r = refit.Refitter(eng)  # x: baked, registered from the manifest
    r.load_lora(str(loras["y"]), adapter_name="y")
    refs = {}
    for key in [(), (("x", 1.0),), (("y", 0.5),), (("x", 1.0), ("y", 0.5))]:
        r.set_adapters([n for n, _ in key], [w for _, w in key])
        refs[key] = [eng.infer(f)["out_sample"] for f in feeds]
    return dict(unet=unet, lora_dir=lora_dir, feeds=feeds, refs=refs, baked_out=baked_out, root=root)


class Counted:
    """Counts an engine's weight writes (each refit of a component enters writable_weights once) and
    the LoRA files hashed (each read of a file hashes it)."""

    def __init__(self, engine, monkeypatch):
        self.writes, self.hashed = 0, []
        real_writable = engine.writable_weights

        def writable():
            self.writes += 1
            return real_writable()

        engine.writable_weights = writable
        import lora_loaders.reader as reader

        real_hash = reader.file_sha256

        def hashed(path):
            self.hashed.append(str(path))
            return real_hash(path)

        monkeypatch.setattr(reader, "file_sha256", hashed)


def _switcher(setup, monkeypatch, **kw):
    refit.clear_cache()  # every file is read here, not found parsed by an earlier test
    eng = engines.load_engine(setup["unet"])
    counted = Counted(eng, monkeypatch)
    return LoraSwitcher(refit.Refitter(eng), setup["lora_dir"], **kw), counted


def test_baked_state_is_the_export(setup, monkeypatch):
    sw, counted = _switcher(setup, monkeypatch, preload="none")
    assert sw.current == sw.baked_key == (("x", 1.0),) and counted.writes == 0  # the export's x: no refit
    (out, key), = sw.run([(setup["feeds"][0], None)], lambda feeds: run_batched(sw.refitter.engine, feeds))
    assert key == (("x", 1.0),) and counted.writes == 0
    np.testing.assert_array_equal(out["out_sample"], setup["baked_out"][0])


def _run(sw, items):
    return sw.run(items, lambda feeds: run_batched(sw.refitter.engine, feeds))


def test_groups_refit_once_per_set_and_match_reference(setup, monkeypatch):
    sw, counted = _switcher(setup, monkeypatch)
    assert sw.current == (("x", 1.0),)  # baked adapters known
    f0, f1 = setup["feeds"]
    sets = ['{}', '{"x": 1}', '{"y": 0.5}', '{"x": 1, "y": 0.5}', None]
    items = [(f0 if i % 2 else f1, sets[i % len(sets)]) for i in range(20)]
    hashed = len(counted.hashed)
    res = _run(sw, items)
    # groups: {x: 1} (== current, == absent) first, no refit; then 3 other sets: one refit each, y read once
    assert sw.refits == counted.writes == 3
    assert [p for p in counted.hashed[hashed:] if p.endswith("y.safetensors")] == [
        str((setup["lora_dir"] / "y.safetensors").resolve())]
    for (feeds, loras), r in zip(items, res):
        out, key = r
        expect = parse_loras(loras) if loras is not None else (("x", 1.0),)
        assert key == expect
        ref = setup["refs"][key][0 if feeds is f0 else 1]
        np.testing.assert_allclose(out["out_sample"], ref, rtol=1e-5, atol=1e-5)
    # the same set again: no refit at all; the last group's set stays current
    last = sw.current
    res = _run(sw, [(f0, json.dumps(dict(last)))] * 3)
    assert counted.writes == 3 and all(not isinstance(r, Exception) for r in res)


def test_bad_requests_fail_alone(setup, monkeypatch):
    sw, counted = _switcher(setup, monkeypatch)
    f0 = setup["feeds"][0]
    bad = ['{"../x": 1}', '{"a/b": 1}', '{"a\\\\b": 1}', '{"escape": 1}', '{"outside": 1}', '{"zz": 1}', "{x: 1}",
           '{"x": NaN}', '{"x": "1"}', '{"x": Infinity}', "[]"]
    items = [(f0, '{"y": 0.5}')] + [(f0, b) for b in bad] + [(f0, "{}"), (LoraRequestError("missing input"), "{}")]
    n = len(counted.hashed)
    res = _run(sw, items)
    assert not isinstance(res[0], Exception) and res[0][1] == (("y", 0.5),)
    for b, r in zip(bad, res[1:-2]):
        assert isinstance(r, LoraRequestError), (b, r)
    assert not isinstance(res[-2], Exception) and res[-2][1] == ()
    assert isinstance(res[-1], LoraRequestError)
    opened = counted.hashed[n:]
    assert opened and all(os.path.dirname(p) == str(setup["lora_dir"].resolve()) for p in opened), opened
    assert all("outside" not in p and "escape" not in p for p in opened)
    np.testing.assert_allclose(res[0][0]["out_sample"], setup["refs"][(("y", 0.5),)][0], rtol=1e-5, atol=1e-5)


def test_adapter_that_fails_to_load_fails_its_group_only(setup, tmp_path):
    eng = engines.load_engine(setup["unet"])
    d = tmp_path / "loras"
    shutil.copytree(setup["lora_dir"], d, symlinks=True)
    (d / "broken.safetensors").write_bytes(b"not a safetensors file")
    sw = LoraSwitcher(refit.Refitter(eng), d)
    f0 = setup["feeds"][0]
    res = _run(sw, [(f0, '{"broken": 1}'), (f0, "{}"), (f0, '{"broken": 1, "x": 1}')])
    assert isinstance(res[0], Exception) and isinstance(res[2], Exception)
    np.testing.assert_allclose(res[1][0]["out_sample"], setup["refs"][()][0], rtol=1e-5, atol=1e-5)
    (out, key), = _run(sw, [(f0, '{"x": 1}')])
    np.testing.assert_allclose(out["out_sample"], setup["refs"][(("x", 1.0),)][0], rtol=1e-5, atol=1e-5)


def test_baked_files_missing(setup, tmp_path):
    """Without the baked adapter files, absent `loras` means the exported weights, until a refit."""
    unet = tmp_path / "export" / "unet"  # the export, moved where the baked file is not
    shutil.copytree(setup["unet"], unet)
    manifest = json.loads((setup["unet"].parent / "manifest.json").read_text())
    for entry in [*manifest["adapters"], *manifest["components"]["unet"]["adapters"]]:
        entry["path"] = str(tmp_path / "gone" / "x.safetensors")
    (unet.parent / "manifest.json").write_text(json.dumps(manifest))
    eng = engines.load_engine(unet)
    d = tmp_path / "only_y"
    d.mkdir()
    shutil.copy(setup["lora_dir"] / "y.safetensors", d / "y.safetensors")
    r = refit.Refitter(eng, lora_dir=d)
    assert r.get_active_adapters() == ["x"] and list(r.missing_adapters) == ["x"]
    sw = LoraSwitcher(r, d)
    f0 = setup["feeds"][0]
    (out, key), = _run(sw, [(f0, None)])
    np.testing.assert_array_equal(out["out_sample"], setup["baked_out"][0])
    assert _run(sw, [(f0, "{}")])[0][1] == ()
    assert isinstance(_run(sw, [(f0, None)])[0], LoraRequestError)
    assert math.isfinite(float(_run(sw, [(f0, '{"y": 0.5}')])[0][0]["out_sample"].sum()))
