"""The family registry and the shared machinery: norm / IA3 targets through loaders,
export and refit, per-block weights in the Refitter, strict keyword arguments, hostile input."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engines
import export
import lora_loaders as L
import refit
from export.graph import example_inputs, run_torch
from export.tiny import build_tiny
from lora_files import peft_lora
from lora_loaders.dtypes import to_numpy
from refit_helpers import differing, initializers

ROOT = Path(__file__).resolve().parents[1]


def test_every_family_is_one_registry_entry():
    for name, spec in L.FAMILIES.items():
        assert spec.name == name and spec.denoisers, name
        assert set(spec.lora_components) <= set(spec.components)
        for c, cs in spec.components.items():
            used = {d for t in cs.inputs for d in t.dims if isinstance(d, str)}  # outputs may name their dims
            assert used <= set(spec.axes), (name, c, used - set(spec.axes))
    generic = ["export/graph.py", "export/onnx_export.py", "export/pipeline.py", "export/tensorrt.py",
               "engines/triton/repository.py", "refit/core.py", "refit/refitter.py", "lora_loaders/bind.py"]
    for f in generic:  # nothing outside a family's entry reads model-specific config fields
        text = (ROOT / f).read_text()
        for field in ("block_out_channels", "sample_size", "cross_attention_dim", "layers_per_block"):
            assert field not in text, (f, field)


# -- norm layers, IA3 and LyCORIS norm modules as targets -----------------------------------------


def ia3_and_norm_file(unet) -> dict:
    """LyCORIS IA3 (to_k / to_v per output row, ff.net.2 per input column), norm w_norm / b_norm, norm diff."""
    g = torch.Generator().manual_seed(3)
    sd = {}
    for name, m in unet.named_modules():
        key = "lora_unet_" + name.replace(".", "_")
        if name.endswith(("attn1.to_k", "attn2.to_v")):
            sd[f"{key}.weight"] = torch.randn(m.out_features, generator=g) * 0.2
            sd[f"{key}.on_input"] = torch.tensor(0)
        elif name.endswith("ff.net.2"):
            sd[f"{key}.weight"] = torch.randn(m.in_features, generator=g) * 0.2
            sd[f"{key}.on_input"] = torch.tensor(1)
        elif re.search(r"(resnets\.\d\.norm1|transformer_blocks\.0\.norm2)$", name):
            sd[f"{key}.w_norm"] = torch.randn(m.weight.shape[0], generator=g) * 0.1
            sd[f"{key}.b_norm"] = torch.randn(m.weight.shape[0], generator=g) * 0.1
        elif name.endswith("transformer_blocks.0.norm3"):
            sd[f"{key}.diff"] = torch.randn(m.weight.shape[0], generator=g) * 0.1
    return sd


def expected_params(unet, sd) -> dict[str, torch.Tensor]:
    """Each parameter the file changes, from the LyCORIS formulas."""
    out = {}
    for name, m in unet.named_modules():
        key = "lora_unet_" + name.replace(".", "_")
        w = m.weight.detach() if hasattr(m, "weight") and m.weight is not None else None
        if f"{key}.on_input" in sd:
            s = sd[f"{key}.weight"]
            out[f"{name}.weight"] = w * (1 + (s[None, :] if int(sd[f"{key}.on_input"]) else s[:, None]))
        if f"{key}.w_norm" in sd:
            out[f"{name}.weight"] = w + sd[f"{key}.w_norm"]
            out[f"{name}.bias"] = m.bias.detach() + sd[f"{key}.b_norm"]
        if f"{key}.diff" in sd:
            out[f"{name}.weight"] = w + sd[f"{key}.diff"]
    return out


def test_ia3_and_norm_targets_in_the_loader(tiny_models):
    unet = tiny_models("sd")["unet"]
    sd = ia3_and_norm_file(unet)
    want = expected_params(unet, sd)
    assert len(want) > 20 and any("norm" in p for p in want)
    base = {n: p.detach().clone() for n, p in unet.named_parameters()}
    loader = L.loader_for("sd", unet=unet)
    loader.load_lora_weights(sd, adapter_name="ia3")
    params = dict(unet.named_parameters())
    for p, w in want.items():
        torch.testing.assert_close(params[p].detach(), w, rtol=1e-6, atol=1e-7)
    loader.fuse_lora()
    loader.unfuse_lora()
    loader.set_adapters([])
    for n, p in unet.named_parameters():  # exact base again
        assert torch.equal(p.detach().view(torch.int32), base[n].view(torch.int32)), n


def test_ia3_and_norm_targets_through_export_and_refit(tmp_path):
    from safetensors.torch import save_file

    unet = build_tiny("sd", ["unet"])["unet"]
    path = tmp_path / "ia3.safetensors"
    save_file(ia3_and_norm_file(unet), str(path))
    out = tmp_path / "out"
    export.export_pipeline("sd", "tiny", [(str(path), 1.0)], out, components=["unet"], progress=False)
    wmap = engines.load_weights_map(out / "unet")
    assert "down_blocks.0.resnets.0.norm1.weight" in wmap and "down_blocks.0.resnets.0.norm1.bias" in wmap
    fused = build_tiny("sd", ["unet"])["unet"]
    L.loader_for("sd", unet=fused).load_lora_weights(str(path), adapter_name="a")
    spec = L.get_family("sd")
    feeds = example_inputs(spec, spec.component("unet"), fused, torch.float32, "check", seed=3)
    ref = run_torch(spec.component("unet"), fused, feeds)[0]
    engine = engines.load_engine(out / "unet")
    got = engine.infer({k: v.numpy() for k, v in feeds.items()})["out_sample"]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    baked = initializers(out / "unet" / "model.onnx", engine.weight_names())
    r = refit.Refitter(engine)
    r.set_adapters([])  # base: every mapped initializer is its base parameter, transformed as the map says
    base = dict(build_tiny("sd", ["unet"])["unet"].named_parameters())
    want = {e.initializer: to_numpy(e.to_onnx(base[p].detach())) for p, e in wmap.entries.items()}
    assert differing(engine.get_weights(), want) == []
    r.set_adapters([r.get_list_adapters()["unet"][0]])  # back to the baked adapter: the export's bits
    assert differing(engine.get_weights(), baked) == []


def test_refitter_takes_per_block_weights_like_the_mixin(tmp_path):
    """diffusers' per-block UNet weights, expanded once (the registry's hook) for mixins and Refitter alike."""
    from safetensors.torch import save_file

    unet = build_tiny("sd", ["unet"])["unet"]
    path = tmp_path / "x.safetensors"
    save_file(peft_lora({"unet": unet}, seed=4), str(path))
    out = tmp_path / "out"
    export.export_pipeline("sd", "tiny", [], out, components=["unet"], validate=False, progress=False)
    blocks = {"down": 0.5, "mid": 0.0, "up": {"block_1": [0.2, 0.4, 0.6]}}
    fused = build_tiny("sd", ["unet"])["unet"]
    loader = L.loader_for("sd", unet=fused)
    loader.load_lora_weights(str(path), adapter_name="x")
    loader.set_adapters(["x"], [{"unet": blocks}])
    engine = engines.load_engine(out / "unet")
    r = refit.Refitter(engine)
    r.load_lora(str(path), adapter_name="x")
    r.set_adapters(["x"], [{"unet": blocks}])
    wmap = r.files.map
    params = dict(fused.named_parameters())
    want = {e.initializer: to_numpy(e.to_onnx(params[p].detach())) for p, e in wmap.entries.items()}
    assert differing(engine.get_weights(), want) == []
    with pytest.raises(ValueError, match="block_7"):
        r.set_adapters(["x"], [{"unet": {"up": {"block_7": 1.0}}}])


# -- strictness ---------------------------------------------------------------------------------


def test_unknown_keyword_arguments_raise(tiny_models):
    models = tiny_models("sd")
    loader = L.loader_for("sd", **models)
    loader.load_lora_weights(peft_lora(models, seed=1), adapter_name="x")
    for call in (lambda: loader.fuse_lora(lora_scal=0.5), lambda: loader.unfuse_lora(component="unet"),
                 lambda: loader.load_lora_weights(peft_lora(models, seed=2), adapter_name="y", weight_nam="w")):
        with pytest.raises(TypeError, match="unexpected keyword"):
            call()
    assert loader.get_list_adapters() == {"unet": ["x"], "text_encoder": ["x"]}


def test_example_inputs_respect_the_config(tmp_path):
    """A CLIP config whose eos_token_id lies outside the vocabulary (49407 vs 1000) exports fine."""
    te = build_tiny("sd", ["text_encoder"])["text_encoder"]
    te.config.eos_token_id = 49407
    te.save_pretrained(tmp_path / "model" / "text_encoder")
    manifest = export.export_pipeline("sd", str(tmp_path / "model"), [], tmp_path / "out",
                                      components=["text_encoder"], progress=False)
    assert manifest["components"]["text_encoder"]["validation"]["passed"]


# -- hostile input: random keys, shapes, dtypes and values, for every family ----------------------

_SUFFIXES = [".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight", ".alpha", ".diff", ".diff_b",
             ".hada_w1_a", ".hada_w1_b", ".lokr_w1", ".lokr_w2_a", ".dora_scale", ".on_input", ".weight", ".w_norm",
             ".lora_magnitude_vector", ".scale", ".bias", ""]
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]
_MODELS: dict = {}


def _tiny(family):
    if family not in _MODELS:
        try:
            _MODELS[family] = build_tiny(family, [c for c in L.get_family(family).lora_components])
        except ValueError:  # no tiny model yet: bind without one
            _MODELS[family] = None
    return _MODELS[family]


def _targets(family) -> list[tuple[str, str, tuple]]:
    """(PEFT module key, kohya module key, weight shape) of real modules, plus made-up ones."""
    out = []
    for c, m in (_tiny(family) or {}).items():
        for n, mod in list(L.targetable_modules(m).items())[:40]:
            out.append((f"{c}.{n}", f"lora_unet_{n.replace('.', '_')}", tuple(mod.weight.shape)))
    spec = L.get_family(family)
    out += [(f"{ns.prefix}blocks.0.attn.to_q", f"{ns.prefix}blocks_0_attn_to_q", (8, 8)) for ns in spec.all_namespaces()]
    return out + [("x.y", "lora_te9_a", (4, 4)), ("unet..q", "lora_unet_", (2, 3))]


@st.composite
def state_dicts(draw, family):
    """LoRA layers for real (and made-up) modules, each valid or broken in one random way."""
    sd = {}
    n = draw(st.integers(1, 4))
    broken = draw(st.integers(0, n))  # the one layer (if any) that is broken
    for i in range(n):
        peft_key, kohya_key, shape = draw(st.sampled_from(_targets(family)))
        rank = draw(st.integers(1, 4))
        cols = int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else 1
        if draw(st.booleans()):
            layer = {f"{peft_key}.lora_A.weight": torch.randn(rank, cols), f"{peft_key}.lora_B.weight": torch.randn(shape[0], rank)}
        else:
            layer = {f"{kohya_key}.lora_down.weight": torch.randn(rank, cols),
                     f"{kohya_key}.lora_up.weight": torch.randn(shape[0], rank), f"{kohya_key}.alpha": torch.tensor(2.0)}
        key = draw(st.sampled_from(sorted(layer)))
        mutation = draw(st.sampled_from(["rename", "suffix", "shape", "dtype", "value", "drop", "junk"])) \
            if i == broken else "none"
        if mutation == "rename":
            layer[key.replace(".", draw(st.sampled_from(["_", "..", ".x."])), 1)] = layer.pop(key)
        elif mutation == "suffix":
            layer[key.rsplit(".", 1)[0] + draw(st.sampled_from(_SUFFIXES))] = layer.pop(key)
        elif mutation == "shape":
            layer[key] = torch.randn(tuple(draw(st.lists(st.integers(0, 5), max_size=4))))
        elif mutation == "dtype":
            layer[key] = layer[key].to(draw(st.sampled_from(_DTYPES)))
        elif mutation == "value":
            layer[key] = layer[key] * draw(st.sampled_from([float("nan"), float("inf"), 1e30, 0.0]))
        elif mutation == "drop":
            del layer[key]
        elif mutation == "junk":
            layer[draw(st.sampled_from(["model.conv.weight", "lora_unet_x.lokr_w1", "text_encoder_9.a.lora_A.weight"]))] = \
                torch.randn(3, 3)
        sd.update(layer)
    return sd


ALLOWED = (L.LoraError,)


@pytest.mark.parametrize("family", sorted(L.FAMILIES))
def test_hostile_input_gives_library_errors_and_leaves_the_model_alone(family):
    models = _tiny(family)
    snapshot = {c: {n: p.detach().clone() for n, p in m.named_parameters()} for c, m in (models or {}).items()}

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(state_dicts(family))
    def run(sd):
        loader = L.loader_for(family, **models) if models else None
        try:
            if loader is not None:
                loader.load_lora_weights(sd, adapter_name="h")
                loader.unload_lora_weights()  # a file that did load: back to the exact base
            else:
                L.read_lora(sd, family)
        except ALLOWED as e:
            assert _names_a_key(str(e), sd), str(e)
        for c, m in (models or {}).items():
            for n, p in m.named_parameters():
                assert torch.equal(p.detach(), snapshot[c][n]), (c, n)

    run()


def _names_a_key(msg: str, sd: dict) -> bool:
    from lora_loaders.formats import split_key

    modules = {split_key(k)[0] for k in sd if split_key(k)}
    return (any(k in msg for k in sd) or any(m and (m in msg or m.split(".", 1)[-1] in msg) for m in modules)
            or "no LoRA keys" in msg)
