"""Acceptance: export with x, then refit y -> x -> x+y (1, .5) -> base -> x -> x at .3.

After each step the engine's weights are bit-identical to a fresh export with the same
adapters baked, and its outputs equal that export's outputs (same engine mode).
"""

from __future__ import annotations

import numpy as np
import pytest

import engines
import refit
from refit_helpers import COMPONENTS, differing, exported, initializers, inputs_for, lora_files

STEPS = [  # (description, action, expected state)
    ("load y", lambda r, f: r.load_lora(str(f["y"]), adapter_name="y"), "y"),
    ("back to the baked x", lambda r, f: r.set_adapters(["x"]), "x"),  # registered from the manifest
    ("x+y at (1, .5)", lambda r, f: r.set_adapters(["x", "y"], [1.0, 0.5]), "xy"),
    ("base", lambda r, f: r.set_adapters([]), "base"),
    ("back to x", lambda r, f: r.set_adapters(["x"]), "x"),
    ("x at .3", lambda r, f: r.set_adapters("x", 0.3), "x03"),
]


def _check(engine, root, family, component, state, feeds, refs, components=None):
    ref_dir = exported(root, family, state, components) / component
    want = initializers(ref_dir / "model.onnx", engine.weight_names())
    got = engine.get_weights()
    bad = differing(got, want)
    assert not bad, f"{family}/{component} after -> {state}: {len(bad)} weights differ, e.g. {bad[:3]}"
    if (state, engine.mode) not in refs:
        refs[(state, engine.mode)] = engines.OrtEngine(ref_dir, mode=engine.mode).infer(feeds)
    out = engine.infer(feeds)
    for name, ref in refs[(state, engine.mode)].items():
        np.testing.assert_array_equal(out[name], ref, err_msg=f"{family}/{component} -> {state}: {name}")


# SDXL: its denoiser and the encoder SD lacks (its first CLIP is SD's, covered there); slow (3 min on
# 2 cores): SDXL's refits against fresh exports are also in test_pipelines.py and test_refit_cli.py.
@pytest.mark.parametrize("family, components", [
    ("sd", COMPONENTS["sd"]), pytest.param("sdxl", ["unet", "text_encoder_2"], marks=pytest.mark.slow)])
def test_refit_sequence_matches_fresh_exports(tmp_path_factory, family, components):
    root = tmp_path_factory.getbasetemp()
    files = lora_files(root, family)
    for component in components:
        engine = engines.load_engine(exported(root, family, "x", components) / component)
        assert engine.mode == engines.DEFAULT_MODE
        r = refit.Refitter(engine)
        feeds = inputs_for(engine, seed=3)
        refs = {}
        _check(engine, root, family, component, "x", feeds, refs, components)
        for what, action, state in STEPS:
            action(r, files)
            _check(engine, root, family, component, state, feeds, refs, components)
        assert r.get_active_adapters() == ["x"]
        assert r.get_adapter_weights() == {"x": 0.3}


@pytest.mark.slow  # 2 min on 2 cores; the session mode's refits are also in test_engines_ort.py
def test_refit_sequence_session_mode(tmp_path_factory):
    """The same sequence through the `session` weight mode (new session per refit)."""
    root = tmp_path_factory.getbasetemp()
    family, component = "sd", "text_encoder"
    files = lora_files(root, family)
    engine = engines.load_engine(exported(root, family, "x") / component, mode="session")
    r = refit.Refitter(engine)
    feeds = inputs_for(engine, seed=4)
    refs = {}
    for what, action, state in STEPS:
        action(r, files)
        _check(engine, root, family, component, state, feeds, refs)


def test_a_to_b_leaves_no_trace_of_a(tmp_path_factory):
    """x touches modules y does not (to_v, ff.net.2, ...): after x -> y they hold base bits."""
    root = tmp_path_factory.getbasetemp()
    family = "sd"
    files = lora_files(root, family)
    d = exported(root, family, "x") / "unet"
    engine = engines.load_engine(d)
    r = refit.Refitter(engine)
    wmap = r.files.map
    base = initializers(exported(root, family, "base") / "unet" / "model.onnx")
    x_only = [e.initializer for p, e in wmap.entries.items() if p.endswith((".to_v.weight", ".ff.net.2.weight"))]
    assert x_only
    # Baked x is visible before the refit ...
    assert differing(engine.get_weights(x_only), base, x_only)
    r.load_lora(str(files["y"]), adapter_name="y")
    # ... and gone after it, bit for bit.
    assert differing(engine.get_weights(x_only), base, x_only) == []
    r.delete_adapters("y")
    assert differing(engine.get_weights(), base, engine.weight_names()) == []
