"""Our loaders against diffusers + PEFT on the same LoRA files (float32, tiny SD and SDXL)."""

import copy
import re

import pytest

import lora_loaders as L
from lora_files import kohya_lora, peft_lora, to_sgm
from reference import assert_close, assert_differs, diffusers_loader, outputs

FAMILIES = ["sd", "sdxl"]
CONVS = re.compile(r"(conv1|conv2|conv_shortcut|proj_in|proj_out|downsamplers\.0\.conv|upsamplers\.0\.conv)$")
WITH_BIAS = re.compile(r"(to_out\.0|ff\.net\.0\.proj|ff\.net\.2|q_proj|k_proj|v_proj|out_proj|fc1|fc2)$")
EMBEDS = re.compile(r"(time_embedding\.linear_[12]|conv_in|conv_out|text_projection)$")
# diffusers mangles kohya `add_embedding_linear_N` names and silently drops them (tested separately).
ADD_EMBED = re.compile(r"add_embedding\.linear_[12]$")


def _pair(tiny_models, family):
    m = tiny_models(family)
    ours, ref = copy.deepcopy(m), copy.deepcopy(m)
    return m, L.loader_for(family, **ours), ours, diffusers_loader(family, ref), ref


def _check(family, ours, ref, base=None, rel=1e-5):
    o, r = outputs(family, ours), outputs(family, ref)
    assert_close(o, r, rel)
    if base is not None:
        assert_differs(o, base, "unet")
    return o


def _both(a, b, method, *args, **kwargs):
    getattr(a, method)(*args, **kwargs)
    getattr(b, method)(*args, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["plain", "bias", "dora", "old_names", "conv"])
def test_peft_format_matches_diffusers(tiny_models, family, variant):
    m, a, ours, b, ref = _pair(tiny_models, family)
    base = outputs(family, m)
    if variant == "conv":
        sd = peft_lora({"unet": ours["unet"]}, pattern=CONVS, seed=3)
    elif variant == "bias":  # diffusers' lora_bias needs every target to have a bias
        sd = peft_lora(ours, pattern=WITH_BIAS, seed=1, bias=True)
    else:
        sd = peft_lora(ours, seed=1, dora=variant == "dora")
    if variant == "old_names":  # pre-PEFT diffusers names: lora.down (UNet), lora_linear_layer.down (text)
        def old(k):
            layer = "lora" if k.startswith("unet.") else "lora_linear_layer"
            return k.replace("lora_A.weight", f"{layer}.down.weight").replace("lora_B.weight", f"{layer}.up.weight")
        sd = {old(k): v for k, v in sd.items()}
    _both(a, b, "load_lora_weights", dict(sd), adapter_name="x")
    _check(family, ours, ref, base)


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_format_matches_diffusers(tiny_models, family):
    m, a, ours, b, ref = _pair(tiny_models, family)
    base = outputs(family, m)
    sd = kohya_lora(ours, seed=2, alpha=2.0)
    sd.update(kohya_lora({"unet": ours["unet"]}, pattern=CONVS, seed=4, alpha=3.0))  # LoCon 3x3 and 1x1
    sd.update(kohya_lora(ours, pattern=EMBEDS, seed=5, alpha=1.0))  # time/label embeddings, text_projection
    _both(a, b, "load_lora_weights", dict(sd), adapter_name="x")
    _check(family, ours, ref, base)


def test_kohya_add_embedding_which_diffusers_drops(tiny_models):
    m, a, ours, b, ref = _pair(tiny_models, "sdxl")
    base = outputs("sdxl", m)
    sd = kohya_lora({"unet": ours["unet"]}, pattern=ADD_EMBED, seed=9, alpha=2.0, rank=4)
    a.load_lora_weights(dict(sd), adapter_name="x")
    # The same factors in PEFT names (alpha / rank folded into B), which diffusers does load.
    peft = {}
    for k, v in sd.items():
        module = k.split(".")[0].removeprefix("lora_unet_").replace("add_embedding_", "add_embedding.")
        if k.endswith("lora_down.weight"):
            peft[f"unet.{module}.lora_A.weight"] = v
        elif k.endswith("lora_up.weight"):
            peft[f"unet.{module}.lora_B.weight"] = v * 0.5
    b.load_lora_weights(peft, adapter_name="x")
    _check("sdxl", ours, ref, base)


def test_kohya_sgm_names_match_diffusers(tiny_models):
    m, a, ours, b, ref = _pair(tiny_models, "sdxl")
    base = outputs("sdxl", m)
    lpb = ours["unet"].config.layers_per_block
    pattern = re.compile(r"(to_q|to_k|to_v|to_out\.0|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out|conv1|conv2"
                         r"|time_emb_proj|conv_shortcut)$")
    sd = kohya_lora({"unet": ours["unet"]}, pattern=pattern, seed=6, alpha=2.0, rename=lambda c, n: to_sgm(n, lpb))
    assert any("input_blocks" in k for k in sd) and any("output_blocks" in k for k in sd)
    assert any("middle_block" in k for k in sd)
    a.load_lora_weights(dict(sd), adapter_name="x")
    # diffusers' SGM path maps resnet names only partly; compare against the same LoRA in diffusers names.
    sd_diffusers = kohya_lora({"unet": ours["unet"]}, pattern=pattern, seed=6, alpha=2.0)
    b.load_lora_weights(sd_diffusers, adapter_name="x")
    _check("sdxl", ours, ref, base)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_sequences_match_diffusers(tiny_models, family):
    m, a, ours, b, ref = _pair(tiny_models, family)
    base = outputs(family, m)
    x = peft_lora(ours, seed=1, every=2)
    # (diffusers drops kohya text-encoder v_proj keys in some subsets, so y is in PEFT names too)
    y = peft_lora(ours, seed=2, every=3, offset=1)
    _both(a, b, "load_lora_weights", dict(x), adapter_name="x")
    _both(a, b, "load_lora_weights", dict(y), adapter_name="y")
    assert a.get_active_adapters() == b.get_active_adapters() == ["y"]
    _check(family, ours, ref, base)
    up_block = "block_1" if family == "sd" else "block_0"  # the up block with attentions
    steps = [
        ("set_adapters", (["x", "y"], [1.0, 0.5]), {}),
        ("set_adapters", (["x", "y"], [{"unet": 0.7, "text_encoder": 0.3}, 1.2]), {}),
        ("set_adapters", (["x", "y"], [{"unet": {"down": 0.9, "mid": 1.0, "up": {up_block: [0.4, 0.8, 1.0]}}},
                                        0.5]), {}),
        ("fuse_lora", (), {"lora_scale": 0.8}),
        ("unfuse_lora", (), {}),
        ("disable_lora", (), {}),
        ("enable_lora", (), {}),
        ("fuse_lora", (), {"adapter_names": ["x"]}),
        ("unfuse_lora", (), {}),
        ("delete_adapters", (["y"],), {}),
        ("set_adapters", ("x", 0.5), {}),
        ("unload_lora_weights", (), {}),
    ]
    for method, args, kwargs in steps:
        _both(a, b, method, *args, **kwargs)
        assert a.get_active_adapters() == b.get_active_adapters(), method
        o = _check(family, ours, ref)
    assert_close(o, base, 1e-6)  # unloaded: back to the base model


def test_fuse_then_unload_keeps_fused_weights_like_diffusers(tiny_models):
    m, a, ours, b, ref = _pair(tiny_models, "sdxl")
    base = outputs("sdxl", m)
    sd = peft_lora(ours, seed=7)
    _both(a, b, "load_lora_weights", dict(sd), adapter_name="x")
    _both(a, b, "fuse_lora")
    _both(a, b, "unload_lora_weights")
    assert a.get_list_adapters() == {} and a.get_active_adapters() == []
    _check("sdxl", ours, ref, base)


def test_save_lora_weights_is_read_by_diffusers(tiny_models, tmp_path):
    m, a, ours, b, ref = _pair(tiny_models, "sdxl")
    base = outputs("sdxl", m)
    a.load_lora_weights(kohya_lora(ours, seed=8, alpha=2.0), adapter_name="k")
    path = a.save_lora_weights(tmp_path, adapter_name="k")
    assert path.name == "pytorch_lora_weights.safetensors"
    b.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="k")
    _check("sdxl", ours, ref, base)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_get_list_adapters_and_component_subsets(tiny_models):
    m = tiny_models("sdxl")
    a = L.loader_for("sdxl", unet=m["unet"])  # a subset of components
    a.load_lora_weights(peft_lora(m, seed=1), adapter_name="x")
    assert a.get_list_adapters() == {"unet": ["x"]}
    with pytest.raises(ValueError, match="no LoRA-loadable component"):
        L.loader_for("sdxl", transformer=m["unet"])


def test_loader_for_pipeline_hotswap_and_lora_device(tiny_models):
    m, _, ours, b, ref = _pair(tiny_models, "sdxl")
    base = outputs("sdxl", m)
    pipe = diffusers_loader("sdxl", ours)  # any object using a diffusers LoRA mixin
    a = L.loader_for_pipeline(pipe)
    assert type(a).__name__ == "StableDiffusionXLLoraLoaderMixin"
    with pytest.raises(ValueError, match="cannot tell the family"):
        L.loader_for_pipeline(object())
    x, y = peft_lora(ours, seed=1), peft_lora(ours, seed=2, every=2)
    a.load_lora_weights(dict(x), adapter_name="x")
    a.set_adapters("x", 0.6)
    a.load_lora_weights(dict(y), adapter_name="x", hotswap=True)  # same name, new weights, same settings
    a.set_lora_device(["x"], "cpu")
    b.load_lora_weights(dict(y), adapter_name="x")
    b.set_adapters("x", 0.6)
    _check("sdxl", ours, ref, base)
