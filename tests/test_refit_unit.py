"""The refit unit is the export: one `refit.Refitter` over every LoRA-capable component, with one
adapter state, per-component weights, all-or-nothing transitions across components, adapter
names as export gives them, and the effective-weight backend recorded in the manifest."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import engines
import lora_loaders as L
import refit
from export.tiny import build_tiny
from lora_loaders import kernels
from lora_loaders.dtypes import to_numpy
from refit_helpers import COMPONENTS, differing, export_dir, exported, initializers, inputs_for, lora_files

FAMILY = "sd"  # unet + text_encoder: two LoRA-capable components


@pytest.fixture()
def sd(tmp_path_factory):
    root = tmp_path_factory.getbasetemp()
    return root, lora_files(root, FAMILY)


def _weights(r) -> dict:
    return {c: e.get_weights() for c, e in r.engines.items()}


def _outputs(r, feeds) -> dict:
    return {c: e.infer(feeds[c]) for c, e in r.engines.items()}


def _fresh(root, state, component) -> dict:
    return initializers(exported(root, FAMILY, state) / component / "model.onnx")


def test_one_state_over_the_export_matches_fresh_exports(sd):
    root, files = sd
    r = refit.Refitter(exported(root, FAMILY, "x"))  # the export directory: its engines are loaded
    assert r.components == COMPONENTS[FAMILY] and r.get_active_adapters() == ["x"]
    assert r.get_list_adapters() == {c: ["x"] for c in COMPONENTS[FAMILY]}
    r.load_lora(str(files["y"]), adapter_name="y")  # one read, bound over both weights maps
    assert r.refit_counts == {"unet": 1, "text_encoder": 1} and r.get_active_adapters() == ["y"]
    for state, change in [("y", None), ("xy", lambda: r.set_adapters(["x", "y"], [1.0, 0.5])),
                          ("base", lambda: r.set_adapters([])), ("x03", lambda: r.set_adapters("x", 0.3))]:
        if change:
            change()
        for c, got in _weights(r).items():
            assert differing(got, _fresh(root, state, c), list(got)) == [], (state, c)
    counts = dict(r.refit_counts)
    r.set_adapters("x", 0.3)  # the same set: nothing written
    assert r.refit_counts == counts


def test_per_component_weights_equal_the_mixins(sd):
    """{"unet": 0.3, "text_encoder": 1.2}: each component at its own weight, as the mixins fuse it."""
    root, files = sd
    r = refit.Refitter(exported(root, FAMILY, "base"))
    r.load_lora(str(files["x"]), adapter_name="x")
    r.set_adapters(["x"], [{"unet": 0.3, "text_encoder": 1.2}])
    models = build_tiny(FAMILY, COMPONENTS[FAMILY])
    loader = L.loader_for(FAMILY, **models)
    loader.load_lora_weights(str(files["x"]), adapter_name="x")
    loader.set_adapters(["x"], [{"unet": 0.3, "text_encoder": 1.2}])
    for c, unit in r.units.items():
        params = dict(models[c].named_parameters())
        want = {e.initializer: to_numpy(e.to_onnx(params[p].detach())) for p, e in unit.files.map.entries.items()}
        assert differing(unit.engine.get_weights(), want) == [], c
    assert r.get_adapter_weights() == {"x": {"unet": 0.3, "text_encoder": 1.2}}
    with pytest.raises(ValueError, match=r"not components here.*'down'"):
        r.set_adapters(["x"], [{"down": 0.0, "up": 1.0}])  # per-block weights without their component


@pytest.mark.parametrize("mode", ["inputs", "session"])
def test_a_failed_write_in_the_second_component_leaves_both_as_they_were(sd, monkeypatch, mode):
    root, files = sd
    out = exported(root, FAMILY, "x")
    r = refit.Refitter({c: engines.load_engine(out / c, mode=mode) for c in COMPONENTS[FAMILY]})
    assert r.units["unet"].access.in_place == (mode == "inputs")
    feeds = {c: inputs_for(e, seed=4) for c, e in r.engines.items()}
    before = _weights(r), _outputs(r, feeds)
    second = r.engines["text_encoder"]
    written = []
    real = r.engines["unet"].set_weights
    monkeypatch.setattr(r.engines["unet"], "set_weights", lambda w, copy=True: (written.append(len(w)), real(w, copy)))

    def broken(weights, copy=True):
        raise engines.EngineError("simulated device fault")

    monkeypatch.setattr(second, "set_weights", broken)
    with pytest.raises(refit.RefitError, match="simulated device fault"):
        r.load_lora(str(files["y"]), adapter_name="y")
    assert written  # the first component had been written when the second failed
    monkeypatch.undo()
    for c, w in before[0].items():
        assert differing(r.engines[c].get_weights(), w) == [], c
    for c, outs in _outputs(r, feeds).items():
        for k, v in outs.items():
            np.testing.assert_array_equal(v, before[1][c][k])
    assert r.get_active_adapters() == ["x"] and "y" not in r.get_list_adapters()["unet"]
    r.load_lora(str(files["y"]), adapter_name="y")  # and the next change works as if nothing happened
    for c, got in _weights(r).items():
        assert differing(got, _fresh(root, "y", c), list(got)) == [], c


def test_duplicate_adapter_names_in_a_manifest_are_refused(sd, tmp_path):
    root, files = sd
    out = tmp_path / "dup"
    shutil.copytree(exported(root, FAMILY, "xy"), out)
    m = json.loads((out / "manifest.json").read_text())
    for entry in [m, *m["components"].values()]:
        for a in entry["adapters"]:
            a["name"] = "x"
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(refit.RefitError, match=r"lists the baked adapter\(s\) \['x'\] twice"):
        refit.Refitter(out)


def test_refit_cli_names_a_file_given_twice_as_export_does(sd, tmp_path):
    from refit.__main__ import main

    root, files = sd
    dst = tmp_path / "twice"
    assert main([str(exported(root, FAMILY, "base")), "--lora", f"{files['x']}:0.5", "--lora", f"{files['x']}:0.5",
                 "--out", str(dst)]) == 0
    manifest = engines.Manifest.read(dst)
    assert [a["name"] for a in manifest.adapters] == ["x", "x_2"]
    assert [a["name"] for a in manifest.components["unet"]["adapters"]] == ["x", "x_2"]
    r = refit.Refitter(dst)
    assert r.get_active_adapters() == ["x", "x_2"] and r.missing_adapters == {}
    r.set_adapters(["x"], [1.0])  # x at 0.5 twice was x at 1.0: the same bits as an export of x
    for c, got in _weights(r).items():
        assert differing(got, _fresh(root, "x", c), list(got)) == [], c


def test_the_manifest_records_the_effective_weight_backend(sd, tmp_path):
    """An export made with other kernels (torch here, the C kernels by default) is recomputed by the
    first refit, so the engine then equals a fresh export made where it is refitted."""
    root, files = sd
    if kernels.backend() != "c":
        pytest.skip("the C kernels are not available here: one backend only")
    assert engines.Manifest.read(exported(root, FAMILY, "x"))["effective_weights"] == kernels.describe()
    kernels.set_backend("torch")
    try:
        foreign = export_dir(FAMILY, COMPONENTS[FAMILY], [(files["x"], 1.0)], tmp_path / "torch_x")
    finally:
        kernels.set_backend("c")
    recorded = engines.Manifest.read(foreign)["effective_weights"]
    assert recorded["backend"] == "torch" and recorded["version"] == torch.__version__.split("+")[0]
    here = {c: _fresh(root, "x", c) for c in COMPONENTS[FAMILY]}
    r = refit.Refitter(foreign)
    assert all(u.foreign for u in r.units.values())
    # The two backends may round a product alike (small ranks: torch's FMA chain is the C one), so
    # the exported bits are marked: one baked weight of each engine set to zeros, as a foreign
    # rounding would leave it. A refit that trusted the export would keep the zeros.
    for c, engine in r.engines.items():
        param = sorted(engines.Manifest.read(foreign).components[c]["baked_params"])[0]
        name = engines.WeightsMap.load(foreign / c)[param].initializer
        engine.set_weights({name: np.zeros_like(engine.get_weights()[name])})
    r.set_adapters(["x"], [1.0])  # the state the export baked, recomputed here
    for c, got in _weights(r).items():
        assert differing(got, here[c], list(got)) == [], c
