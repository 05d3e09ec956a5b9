"""Wan 2.1 / 2.2 LoRA layouts against diffusers + PEFT (float32, tiny Wan T2V, I2V and 2.2).

diffusers loads PEFT, original (`diffusion_model.`) and musubi files itself; where it drops
keys (norm and full `diff` deltas, LyCORIS DoRA) or cannot read a layout (LyCORIS LoKr,
musubi names with dots after the block), the expected weights are computed from the file.
"""

import copy
import re

import pytest
import torch

import lora_loaders as L
from export.tiny import build_tiny
from family_files import wan_original
from lora_files import lycoris, peft_lora
from reference import assert_close, assert_differs, diffusers_loader, outputs

FAMILY = "wan"
BLOCK = re.compile(r"blocks\.\d+\.(attn1\.to_(q|k|v|out\.0)|attn2\.to_(q|k|v|out\.0)|ffn\.net\.(0\.proj|2))$")
I2V = {"image_dim": 16, "added_kv_proj_dim": 16}


def _models(components=("transformer",), i2v=False):
    m = build_tiny(FAMILY, list(components), overrides={c: I2V for c in components} if i2v else None)
    return m, copy.deepcopy(m), copy.deepcopy(m)


def original_file(model, prefix="diffusion_model.", rank=4, alpha=2.0, seed=0, pattern=BLOCK, spell="down",
                  flat=False):
    """(file in original Wan names, the same factors in PEFT names for diffusers)."""
    sd = peft_lora({"transformer": model}, pattern=pattern, rank=rank, seed=seed)
    file, peft = {}, {}
    for k, v in sd.items():
        module, _, role = k.removeprefix("transformer.").rpartition(".lora_")
        orig = wan_original(module)
        assert orig, module
        key = prefix + (orig.replace(".", "_") if flat else orig)
        a, b = ("lora_down", "lora_up") if spell == "down" else ("lora_A", "lora_B")
        if role == "A.weight":
            file[f"{key}.{a}.weight"] = v
            file[f"{key}.alpha"] = torch.tensor(alpha)
            peft[k] = v
        else:
            file[f"{key}.{b}.weight"] = v
            peft[k] = v * (alpha / rank)
    return file, peft


def _copy(sd):  # diffusers' Wan converter scales the tensors it is given in place
    return {k: v.clone() for k, v in sd.items()}


def _both(ours, ref, file_ours, file_ref, **kw):
    L.loader_for(FAMILY, **ours).load_lora_weights(_copy(file_ours), adapter_name="x", **kw)
    diffusers_loader(FAMILY, ref).load_lora_weights(_copy(file_ref), adapter_name="x", **kw)
    assert_close(outputs(FAMILY, ours), outputs(FAMILY, ref))


def test_peft_and_diffusion_model_prefix_match_diffusers():
    m, ours, ref = _models()
    sd = peft_lora({"transformer": ours["transformer"]}, pattern=BLOCK, seed=1)
    _both(ours, ref, sd, sd)
    assert_differs(outputs(FAMILY, ours), outputs(FAMILY, m), "transformer")
    # diffusers/PEFT names under diffusion_model. (ComfyUI): diffusers would read them as original names
    _, ours2, _ = _models()
    L.loader_for(FAMILY, **ours2).load_lora_weights({k.replace("transformer.", "diffusion_model.", 1): v
                                                     for k, v in sd.items()}, adapter_name="x")
    assert_close(outputs(FAMILY, ours2), outputs(FAMILY, ref))


@pytest.mark.parametrize("spell", ["down", "A"])
def test_original_names_match_diffusers(spell):
    m, ours, ref = _models()
    file, _ = original_file(ours["transformer"], seed=2, spell=spell)
    _both(ours, ref, file, file)
    assert_differs(outputs(FAMILY, ours), outputs(FAMILY, m), "transformer")


def test_norm_and_full_diffs_which_diffusers_drops():
    """diffusers drops norm `.diff`/`.diff_b` and ignores full `.diff` deltas: we apply them (W + diff)."""
    m, ours, _ = _models()
    t = ours["transformer"]
    g = torch.Generator().manual_seed(3)
    file = {"diffusion_model.blocks.0.norm3.diff": torch.randn(16, generator=g) * 0.1,  # diffusers' norm2
            "diffusion_model.blocks.0.norm3.diff_b": torch.randn(16, generator=g) * 0.1,
            "diffusion_model.blocks.1.self_attn.norm_q.diff": torch.randn(16, generator=g) * 0.1,
            "diffusion_model.blocks.1.self_attn.q.diff": torch.randn(16, 16, generator=g) * 0.1,
            "diffusion_model.blocks.1.self_attn.q.diff_b": torch.randn(16, generator=g) * 0.1,  # diffusers fails on it
            "diffusion_model.head.head.diff_b": torch.randn(16, generator=g) * 0.1}
    params = {n: p.detach().clone() for n, p in t.named_parameters()}
    L.loader_for(FAMILY, transformer=t).load_lora_weights(dict(file), adapter_name="d")
    now = dict(t.named_parameters())
    for key, param in [("blocks.0.norm3.diff", "blocks.0.norm2.weight"), ("blocks.0.norm3.diff_b", "blocks.0.norm2.bias"),
                       ("blocks.1.self_attn.norm_q.diff", "blocks.1.attn1.norm_q.weight"),
                       ("blocks.1.self_attn.q.diff", "blocks.1.attn1.to_q.weight"),
                       ("blocks.1.self_attn.q.diff_b", "blocks.1.attn1.to_q.bias"),
                       ("head.head.diff_b", "proj_out.bias")]:
        torch.testing.assert_close(now[param].detach(), params[param] + file[f"diffusion_model.{key}"])


def test_musubi_matches_diffusers_and_dora_follows_its_formula():
    m, ours, ref = _models()
    file, _ = original_file(ours["transformer"], prefix="lora_unet_", flat=True, seed=4)
    assert "lora_unet_blocks_0_self_attn_q.lora_down.weight" in file
    _both(ours, ref, file, file)
    # LyCORIS DoRA (diffusers drops dora_scale): W' = (W + dW) * dora_scale / ||W + dW|| per output row
    t = copy.deepcopy(m["transformer"])
    base = dict(t.named_modules())
    dora = dict(file)
    expected = {}
    for k in [k for k in file if k.endswith(".lora_down.weight")][:6]:
        key = k.removesuffix(".lora_down.weight")
        module = L.read_lora({k: file[k], f"{key}.lora_up.weight": file[f"{key}.lora_up.weight"]}, FAMILY).layers
        (_, name), = module
        w = base[name].weight.detach()
        merged = w + file[f"{key}.lora_up.weight"] @ file[k] * 2.0 / file[k].shape[0]
        scale = w.norm(dim=1, keepdim=True) * 1.05
        dora[f"{key}.dora_scale"] = scale
        expected[name] = merged * scale / (merged.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps)
    L.loader_for(FAMILY, transformer=t).load_lora_weights(dora, adapter_name="dora")
    now = dict(t.named_modules())
    for name, w in expected.items():
        torch.testing.assert_close(now[name].weight.detach(), w, rtol=1e-5, atol=1e-6)


def test_musubi_names_with_dots_after_the_block():
    """`lora_unet_blocks_0.self_attn.q.lora_down.weight` (kijai/ComfyUI-WanVideoWrapper#869): the same layers."""
    _, ours, _ = _models()
    file, _ = original_file(ours["transformer"], prefix="lora_unet_", flat=True, seed=5)
    dotted = {re.sub(r"^lora_unet_blocks_(\d+)_(self_attn|cross_attn|ffn)_(\w+?)\.", r"lora_unet_blocks_\1.\2.\3.", k): v
              for k, v in file.items()}
    assert any("blocks_0.self_attn.q.lora_down" in k for k in dotted)
    index = L.TargetIndex.from_models(ours)
    a, b = L.read_lora(file, FAMILY, index=index), L.read_lora(dotted, FAMILY, index=index)
    assert set(a.layers) == set(b.layers) and len(a.layers) == 20
    for k in a.layers:
        assert torch.equal(a.layers[k].tensors["up"], b.layers[k].tensors["up"])


def test_lycoris_lokr_follows_its_formula():
    _, ours, _ = _models()
    t = ours["transformer"]
    sd = lycoris({"transformer": t}, "lokr", pattern=BLOCK, seed=6, prefixes={"transformer": "lycoris_"})
    expected = {}
    for name, module in t.named_modules():
        key = "lycoris_" + name.replace(".", "_")
        if f"{key}.lokr_w1" in sd:
            d = torch.kron(sd[f"{key}.lokr_w1"], sd[f"{key}.lokr_w2_a"] @ sd[f"{key}.lokr_w2_b"])
            expected[name] = module.weight.detach() + d * sd[f"{key}.alpha"] / sd[f"{key}.lokr_w2_b"].shape[0]
    assert len(expected) == 20
    L.loader_for(FAMILY, transformer=t).load_lora_weights(sd, adapter_name="k")
    modules = dict(t.named_modules())
    for name, w in expected.items():
        torch.testing.assert_close(modules[name].weight, w, rtol=1e-5, atol=1e-6)


def test_t2v_lora_into_i2v_model():
    """A T2V LoRA (no k_img / v_img) loads into I2V as is; diffusers pads zero LoRAs there: same outputs."""
    m, ours, ref = _models(i2v=True)
    t2v = build_tiny(FAMILY, ["transformer"])["transformer"]
    file, _ = original_file(t2v, seed=7)
    _both(ours, ref, file, file)
    assert_differs(outputs(FAMILY, ours), outputs(FAMILY, m), "transformer")
    i2v_file, _ = original_file(ours["transformer"], seed=8, pattern=re.compile(r"attn2\.add_[kv]_proj$"))
    assert any("cross_attn.k_img" in k for k in i2v_file)
    _, ours2, ref2 = _models(i2v=True)
    _both(ours2, ref2, i2v_file, i2v_file)


def test_wan22_load_into_transformer_2():
    m, ours, ref = _models(("transformer", "transformer_2"))
    x, _ = original_file(ours["transformer"], seed=9)
    y, _ = original_file(ours["transformer_2"], seed=10)
    a, b = L.loader_for(FAMILY, **ours), diffusers_loader(FAMILY, ref)
    for loader in (a, b):
        loader.load_lora_weights(_copy(x), adapter_name="high")
        loader.load_lora_weights(_copy(y), adapter_name="low", load_into_transformer_2=True)
    assert a.get_list_adapters() == {"transformer": ["high"], "transformer_2": ["low"]}
    for loader in (a, b):
        loader.set_adapters(["high", "low"], [0.7, 1.3])
    o = outputs(FAMILY, ours)
    assert_close(o, outputs(FAMILY, ref))
    base = outputs(FAMILY, m)
    assert_differs(o, base, "transformer")
    assert_differs(o, base, "transformer_2")


def test_unmatched_key_raises_naming_it():
    _, ours, _ = _models()
    file, _ = original_file(ours["transformer"], seed=11)
    file["diffusion_model.blocks.0.self_attn.qq.lora_down.weight"] = torch.zeros(4, 16)
    file["diffusion_model.blocks.0.self_attn.qq.lora_up.weight"] = torch.zeros(16, 4)
    with pytest.raises(L.LoraKeyError, match=r"self_attn\.qq"):
        L.loader_for(FAMILY, **ours).load_lora_weights(file, adapter_name="bad")
