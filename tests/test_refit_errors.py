"""Refit failures are atomic and explain themselves; adapters are cached; mixin semantics."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import engines
import refit
from lora_loaders import LoraAdapter, read_lora
from refit import RefitError
from refit_helpers import differing, exported, inputs_for, lora_files

FAMILY, COMPONENT = "sd", "text_encoder"


@pytest.fixture()
def setup(tmp_path_factory):
    root = tmp_path_factory.getbasetemp()
    files = lora_files(root, FAMILY)
    d = exported(root, FAMILY, "x", [COMPONENT]) / COMPONENT
    engine = engines.load_engine(d)
    r = refit.Refitter(engine)
    r.load_lora(str(files["y"]), adapter_name="y")
    feeds = inputs_for(engine, seed=5)
    return engine, r, files, feeds


def _state(engine, r, feeds):
    return engine.get_weights(), engine.infer(feeds), r.get_active_adapters(), r.get_adapter_weights()


def _assert_unchanged(before, engine, r, feeds):
    w, out, active, weights = before
    assert differing(engine.get_weights(), w) == []
    for k, v in engine.infer(feeds).items():
        np.testing.assert_array_equal(v, out[k])
    assert r.get_active_adapters() == active and r.get_adapter_weights() == weights


def _bad_copy(files, mutate) -> LoraAdapter:
    a = read_lora(str(files["x"]), FAMILY)
    layers = {k: copy.deepcopy(v) for k, v in a.layers.items()}
    keys = [k for k in layers if k[0] == COMPONENT]
    mutate(layers[keys[-1]])  # the last layer: a refit fails after computing the others
    return LoraAdapter(layers, a.family, a.format, a.source)


def test_nan_adapter_leaves_engine_unchanged(setup):
    engine, r, files, feeds = setup
    before = _state(engine, r, feeds)
    bad = _bad_copy(files, lambda layer: layer.tensors["up"].view(-1).__setitem__(0, float("nan")))
    with pytest.raises(RefitError, match="NaN or Inf"):
        r.load_lora(bad, adapter_name="bad")
    _assert_unchanged(before, engine, r, feeds)
    assert "bad" not in r.get_list_adapters().get(COMPONENT, [])


def test_overflowing_scale_rejected(setup):
    engine, r, files, feeds = setup
    r.set_adapters(["x"])  # x: baked at export, registered from the manifest
    before = _state(engine, r, feeds)
    with pytest.raises(RefitError, match="NaN or Inf"):
        r.set_adapters(["x"], [1e39])
    _assert_unchanged(before, engine, r, feeds)


def test_wrong_shape_adapter_rejected(setup):
    engine, r, files, feeds = setup
    before = _state(engine, r, feeds)

    def widen(layer):
        layer.tensors["down"] = torch.zeros(layer.tensors["down"].shape[0], layer.tensors["down"].shape[1] + 3)

    with pytest.raises(RefitError, match="different graph"):
        r.load_lora(_bad_copy(files, widen), adapter_name="wide")
    _assert_unchanged(before, engine, r, feeds)


def test_engine_bind_failure_halfway_restores(setup, monkeypatch):
    """set_weights binds new buffers; a failure after some were bound binds the old ones back."""
    engine, r, files, feeds = setup
    before = _state(engine, r, feeds)
    calls = {"n": 0}
    real = engine._binding.bind_ortvalue_input

    def flaky(name, ov):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("simulated device error")
        real(name, ov)

    monkeypatch.setattr(engine._binding, "bind_ortvalue_input", flaky)
    new = {n: np.ones_like(a) for n, a in list(before[0].items())[:6]}
    with pytest.raises(engines.EngineError, match="simulated device error"):
        engine.set_weights(new)
    assert calls["n"] > 4  # the three rebound weights were bound back to their old buffers
    monkeypatch.setattr(engine._binding, "bind_ortvalue_input", real)
    _assert_unchanged(before, engine, r, feeds)


def test_write_failure_after_in_place_writes_restores(setup, monkeypatch):
    """The weights a Refitter wrote into the engine's own arrays are put back when a later step fails."""
    engine, r, files, feeds = setup
    before = _state(engine, r, feeds)

    def boom(weights):  # after compute wrote the weights in place (the rest would be set here)
        raise engines.WeightError("simulated check failure")

    monkeypatch.setattr(engine, "check_weights", boom)
    with pytest.raises(engines.WeightError, match="simulated check failure"):
        r.load_lora(str(files["x"]), adapter_name="x2")
    assert "x2" not in r.get_list_adapters()[COMPONENT]
    monkeypatch.undo()
    _assert_unchanged(before, engine, r, feeds)


def test_first_refit_failure_restores_the_exported_values(tmp_path_factory):
    """Before a Refitter has written anything, the engine holds the export's values; a failed refit
    puts those back from the exported file, not a recomputation (which another backend or machine
    could round differently): here the refit runs the torch backend on a C-backend export."""
    from lora_loaders import kernels

    root = tmp_path_factory.getbasetemp()
    lora_files(root, FAMILY)
    engine = engines.load_engine(exported(root, FAMILY, "x", [COMPONENT]) / COMPONENT)
    r = refit.Refitter(engine)
    feeds = inputs_for(engine, seed=7)
    before = _state(engine, r, feeds)
    previous = kernels.backend()
    kernels.set_backend("torch")
    try:
        with pytest.raises(RefitError, match="NaN or Inf"):
            r.set_adapters(["x"], [1e39])
    finally:
        kernels.set_backend(previous)
    _assert_unchanged(before, engine, r, feeds)


def test_swap_writes_into_the_engines_arrays(setup, tmp_path_factory):
    """inputs mode on the CPU: a refit writes the weights where the session reads them (no second
    copy of the weights in memory), and holds what a fresh export of the same adapters holds."""
    engine, r, files, feeds = setup
    arrays = dict(engine._arrays)
    r.set_adapters(["x"])
    matrices = [n for n in engine.weight_names() if len(engine.weight_info(n).shape) == 2]
    assert matrices and all(engine._arrays[n] is arrays[n] for n in matrices)
    fresh = engines.load_engine(exported(tmp_path_factory.getbasetemp(), FAMILY, "x", [COMPONENT]) / COMPONENT)
    assert differing(engine.get_weights(), fresh.get_weights()) == []
    for k, v in engine.infer(feeds).items():
        np.testing.assert_array_equal(v, fresh.infer(feeds)[k])


def test_session_mode_failure_keeps_old_session(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp()
    files = lora_files(root, FAMILY)
    engine = engines.load_engine(exported(root, FAMILY, "x", [COMPONENT]) / COMPONENT, mode="session")
    r = refit.Refitter(engine)
    feeds = inputs_for(engine, seed=6)
    before = _state(engine, r, feeds)

    real = engine._new_session
    calls = {"n": 0}

    def boom(arrays):  # the new session fails; rebuilding the previous one works
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("no memory for a new session")
        return real(arrays)

    monkeypatch.setattr(engine, "_new_session", boom)
    with pytest.raises(RefitError, match="no memory"):
        r.load_lora(str(files["y"]), adapter_name="y")
    _assert_unchanged(before, engine, r, feeds)
    engine.keep_old_session, calls["n"] = True, 0  # the other strategy: the old session is never freed
    with pytest.raises(RefitError, match="no memory"):
        r.load_lora(str(files["y"]), adapter_name="y")
    assert calls["n"] == 1
    _assert_unchanged(before, engine, r, feeds)


def test_adapter_for_other_component_or_family(setup, tmp_path):
    engine, r, files, feeds = setup
    unet_only = read_lora(str(files["x"]), FAMILY)
    unet_only = LoraAdapter({k: v for k, v in unet_only.layers.items() if k[0] == "unet"}, FAMILY)
    with pytest.raises(RefitError, match="no layers for component 'text_encoder'"):
        r.load_lora(unet_only, adapter_name="u")
    sdxl = LoraAdapter(dict(read_lora(str(files["x"]), FAMILY).layers), "sdxl")
    with pytest.raises(RefitError, match="family 'sdxl'"):
        r.load_lora(sdxl, adapter_name="s")
    # An sdxl file (text_encoder_2 keys) read for this sd engine: a clear error from the reader.
    sdxl_files = lora_files(tmp_path, "sdxl")
    with pytest.raises(RefitError, match="sdxl|text_encoder_2"):
        r.load_lora(str(sdxl_files["x"]), adapter_name="s2")


def test_adapter_touching_unmapped_weights(setup):
    engine, r, files, feeds = setup
    a = read_lora(str(files["x"]), FAMILY)
    (c, m), layer = next((k, v) for k, v in a.layers.items() if k[0] == COMPONENT)
    stray = LoraAdapter({(COMPONENT, "text_model.embeddings.position_embedding"): layer}, FAMILY)
    with pytest.raises(RefitError, match="does not map"):
        r.load_lora(stray, adapter_name="stray")


def test_mixin_semantics(setup):
    engine, r, files, feeds = setup
    assert r.get_active_adapters() == ["y"]
    assert r.get_list_adapters() == {COMPONENT: ["x", "y"]}  # x was baked at export
    r.load_lora(str(files["x"]), adapter_name="x2")
    assert r.get_active_adapters() == ["x2"]
    with pytest.raises(ValueError, match="already in use"):
        r.load_lora(str(files["x"]), adapter_name="x")
    r.delete_adapters("x2")
    with pytest.raises(ValueError, match="not in the list"):
        r.set_adapters(["nope"])
    with pytest.raises(ValueError, match="Length"):
        r.set_adapters(["x", "y"], [1.0])
    r.set_adapters(["x", "y"], [{"text_encoder": 0.5, "unet": 2.0}, 0.25])
    assert r.get_adapter_weights() == {"x": 0.5, "y": 0.25}
    stacked = engine.get_weights()
    r.disable_lora()
    assert r.get_active_adapters() == ["x", "y"] and not r.enabled
    assert differing(engine.get_weights(), stacked)
    r.enable_lora()
    assert differing(engine.get_weights(), stacked) == []
    r.delete_adapters("x")
    assert r.get_active_adapters() == ["y"] and r.get_list_adapters() == {COMPONENT: ["y"]}
    r.unload_lora_weights()
    assert r.get_active_adapters() == [] and r.get_list_adapters() == {}


def test_parsed_adapters_are_cached(setup, monkeypatch):
    engine, r, files, feeds = setup
    import lora_loaders.reader

    refit.clear_cache()
    calls = {"n": 0}
    real = lora_loaders.reader.parse

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(lora_loaders.reader, "parse", counting)
    r.load_lora(str(files["x"]), adapter_name="x1")
    r.load_lora(str(files["x"]), adapter_name="x2")
    r2 = refit.Refitter(engine)  # registers the baked x: same content, no new parse
    r2.load_lora(str(files["x"]), adapter_name="x3")
    assert calls["n"] == 1


def test_adapter_on_weights_the_engine_keeps_constant(tmp_path_factory):
    """An engine with only Linear weights refittable refuses a LoRA on a Conv (tiny sd proj_in is a 1x1 conv)."""
    root = tmp_path_factory.getbasetemp()
    files = lora_files(root, FAMILY)
    engine = engines.OrtEngine(exported(root, FAMILY, "base") / "unet", weights="linear")
    r = refit.Refitter(engine)
    before = engine.get_weights()
    with pytest.raises(RefitError, match="without as refittable"):
        r.load_lora(str(files["x"]), adapter_name="x")
    assert differing(engine.get_weights(), before) == []
    r.load_lora(str(files["y"]), adapter_name="y")  # y touches Linear layers only
    assert r.get_active_adapters() == ["y"]
