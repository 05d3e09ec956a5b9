"""Axes a model's config bounds: a table of positions fixes or limits a named axis.

Each bound is checked against the model itself: at the size the bound allows the component
runs, one step beyond it fails (diffusers' own error: an index past the table, a shape that
does not add up). Then the exports that failed before (CogVideoX-2b's sincos positions,
AuraFlow with a small position table) export and validate in ONNX Runtime, and a config no
export can serve is one clear error naming the field.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import engines
import export
import lora_loaders as L
from cli_helpers import one_error_line, run
from export.graph import example_inputs, run_torch
from export.models import ModelSource
from export.tiny import build_tiny, tiny_config

# (family, transformer config overrides, axis, the size the bound allows, a step beyond, other sizes)
CASES = [
    ("auraflow", {"pos_embed_max_size": 16}, "height", 8, 2, {}),  # 4 x 4 patches of 2
    ("sd3", {"pos_embed_max_size": 6}, "width", 12, 2, {}),
    ("wan", {}, "height", 64, 2, {"frames": 1, "width": 4}),  # tiny rope_max_seq_len 32, patches of 2
    ("skyreels-v2", {"rope_max_seq_len": 4}, "frames", 4, 1, {"height": 4, "width": 4}),
    ("lumina2", {"axes_lens": (10, 6, 6)}, "width", 12, 2, {}),
    ("z-image", {}, "text", 224, 1, {"height": 4, "width": 4}),  # tiny axes_lens (256, 64, 64)
    ("z-image", {}, "height", 128, 2, {"width": 4}),
    ("cogvideox", {"use_rotary_positional_embeddings": False}, "text", 16, 1, {}),  # sincos: text + patches
    ("cogvideox", {"use_learned_positional_embeddings": True}, "width", 16, 2, {"height": 16, "frames": 3}),
]


def _bounded(family: str, overrides: dict):
    spec = L.get_family(family)
    model = build_tiny(family, [spec.denoiser], overrides={spec.denoiser: overrides})[spec.denoiser]
    bounded, why = spec.bounded({spec.denoiser: model.config})
    return spec, bounded, why, model


@pytest.mark.parametrize("family, overrides, axis, allowed, step, sizes", CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_the_bound_is_where_the_model_stops(family, overrides, axis, allowed, step, sizes):
    spec, bounded, why, model = _bounded(family, overrides)
    assert bounded.axes[axis].max == allowed and axis in why, why
    cspec = spec.component(spec.denoiser)
    sizes = {"batch": 1, **sizes}
    ok = example_inputs(bounded, cspec, model, torch.float32, "example", **{**sizes, axis: allowed})
    assert np.isfinite(run_torch(cspec, model, ok)[0]).all()
    beyond = example_inputs(bounded, cspec, model, torch.float32, "example", **{**sizes, axis: allowed + step})
    with pytest.raises(Exception):  # noqa: B017 - diffusers' own failure, whichever it is
        run_torch(cspec, model, beyond)


def test_tables_larger_than_the_axes_change_nothing():
    """Real-size tables (the configs' defaults) leave the family's axes as they are."""
    for family, overrides in (("sd3", {"pos_embed_max_size": 192}), ("lumina2", {"axes_lens": (300, 512, 512)}),
                              ("wan", {"rope_max_seq_len": 1024}), ("cogvideox", {})):
        spec = L.get_family(family)
        config = build_tiny(family, [spec.denoiser], overrides={spec.denoiser: overrides})[spec.denoiser].config
        bounded, why = spec.bounded({spec.denoiser: config})
        assert why == {} and bounded is spec, family


def _export(family, overrides, tmp_path):
    models = build_tiny(family, ["transformer", "text_encoder"], overrides={"transformer": overrides})
    out = tmp_path / family
    export.export_pipeline(family, models, [], out, components=list(models), progress=False)
    return models, out, engines.Manifest.read(out)


def test_cogvideox_2b_sincos_positions_export_and_validate(tmp_path):
    """CogVideoX-2b's layout (no rotary embedding, sincos positions over max_text_seq_length text
    rows): the text axis is fixed at that length, static in both graphs; height, width and frames
    stay dynamic (validated at other sizes than traced), and at the config's sample size, where
    diffusers uses its stored table instead of recomputing it, the engine still equals it."""
    models, out, manifest = _export("cogvideox", {"use_rotary_positional_embeddings": False}, tmp_path)
    assert manifest.axes["text"] == {"min": 16, "opt": 16, "max": 16}
    assert manifest["axis_bounds"] == {"text": "transformer's max_text_seq_length fixes it at 16"}
    for comp, entry in manifest.components.items():
        assert entry["validation"]["passed"], comp
    shapes = {i["name"]: i["shape"] for i in manifest.components["transformer"]["inputs"]}
    assert shapes["encoder_hidden_states"][1] == 16 and shapes["hidden_states"][1:] == ["frames", 4, "height", "width"]
    assert manifest.components["text_encoder"]["inputs"][0]["shape"] == ["batch", 16]
    spec = L.get_family("cogvideox")
    cspec, model = spec.component("transformer"), models["transformer"]
    bounded, _ = spec.bounded({"transformer": model.config})
    feeds = example_inputs(bounded, cspec, model, torch.float32, "check", batch=1, height=16, width=16, frames=3)
    got = engines.load_engine(out / "transformer").infer({k: v.numpy() for k, v in feeds.items()})
    np.testing.assert_allclose(got[cspec.outputs[0].name], run_torch(cspec, model, feeds)[0], atol=1e-4, rtol=1e-4)


def test_auraflow_with_a_small_position_table_exports_and_validates(tmp_path):
    """Before: `IndexError: index 64 is out of bounds` while tracing. The table of 16 positions
    (4 x 4 patches) makes height and width one size, 8 latents: traced, validated, recorded."""
    _, out, manifest = _export("auraflow", {"pos_embed_max_size": 16}, tmp_path)
    assert manifest.axes["height"] == manifest.axes["width"] == {"min": 8, "opt": 8, "max": 8}
    assert all(e["validation"]["passed"] for e in manifest.components.values())
    shape = next(i["shape"] for i in manifest.components["transformer"]["inputs"] if i["name"] == "hidden_states")
    assert shape[2:] == [8, 8]


def test_a_table_no_export_can_serve_is_one_clear_error(tmp_path):
    """A position table with no room on an axis: `python -m export` says which field, exit 2, and
    writes nothing (the configs are read before any weights)."""
    spec = L.get_family("auraflow")
    config = dict(tiny_config(spec.component("transformer")), pos_embed_max_size=0,
                  _class_name="AuraFlowTransformer2DModel")
    model = tmp_path / "model"
    (model / "transformer").mkdir(parents=True)
    (model / "transformer" / "config.json").write_text(json.dumps(config))
    src = ModelSource(str(model), spec, ["transformer"])
    with pytest.raises(ValueError, match="pos_embed_max_size = 0"):
        spec.bounded({"transformer": src.config("transformer")})
    out = tmp_path / "out"
    proc = run("-m", "export", "--family", "auraflow", "--model", model, "--components", "transformer", "--out", out)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert "pos_embed_max_size = 0 leaves room for a height of 0" in line, line
    assert not out.exists()
    with pytest.raises(ValueError, match="max_text_seq_length gives the text axis a size of 1"):
        cog = L.get_family("cogvideox")
        model = build_tiny("cogvideox", ["transformer"], overrides={"transformer": {
            "use_rotary_positional_embeddings": False, "max_text_seq_length": 1}})["transformer"]
        cog.bounded({"transformer": model.config})


def test_two_bounds_that_disagree_are_one_error():
    """Two components whose tables fix one axis at different sizes: no export serves both."""
    import dataclasses

    spec = L.get_family("cogvideox")
    other = dataclasses.replace(spec.component("text_encoder"),
                                bounds={"text": L.families.Bound("n_positions", fixed=L.families.Cfg(fn=lambda c: 20))})
    spec = dataclasses.replace(spec, components={**spec.components, "text_encoder": other})
    model = build_tiny("cogvideox", ["transformer"], overrides={"transformer": {
        "use_rotary_positional_embeddings": False}})["transformer"]
    with pytest.raises(ValueError, match="n_positions asks for a text axis of 20, but transformer's "
                                         "max_text_seq_length fixes it at 16"):
        spec.bounded({"transformer": model.config, "text_encoder": object()})
