"""SD3 LoRA layouts against diffusers + PEFT (float32, tiny SD3 / SD3.5 with dual attention).

diffusers' SD3 mixin reads only diffusers/PEFT keys: kohya (sd-scripts) and LyCORIS files
are compared with diffusers + PEFT loading the same factors in PEFT names (the fused `qkv`
split by rows, the last block's context modulation and `final_layer` with scale and shift
swapped), or with the LyCORIS formula where PEFT has no such layer type.
"""

import copy
import re

import pytest
import torch

import lora_loaders as L
from family_files import fused_kohya, sd3_original
from lora_files import lycoris, peft_lora
from reference import assert_close, assert_differs, diffusers_loader, outputs

FAMILY = "sd3"
LINEARS = re.compile(r"(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.\S+"
                     r"|norm1\.linear|norm1_context\.linear|norm_out\.linear|proj_out|context_embedder|pos_embed\.proj"
                     r"|linear_[12]|q_proj|k_proj|v_proj|out_proj|fc1|fc2)$")
CLIPS = ("text_encoder", "text_encoder_2")


def _pair(tiny_models, components=("transformer", *CLIPS)):
    m = {c: v for c, v in tiny_models(FAMILY).items() if c in components}
    return m, copy.deepcopy(m), copy.deepcopy(m)


def _last(transformer) -> int:
    return len(transformer.transformer_blocks) - 1


def peft_to_kohya(sd: dict, prefixes: dict, alpha: float) -> dict:
    """The same factors in kohya names (`lora_te1_<flat>.lora_down.weight`, up scaled by rank / alpha)."""
    out = {}
    for k, v in sd.items():
        component, rest = k.split(".", 1)
        module, _, role = rest.rpartition(".lora_")
        flat = prefixes[component] + module.replace(".", "_")
        if role == "A.weight":
            out[f"{flat}.lora_down.weight"] = v
            out[f"{flat}.alpha"] = torch.tensor(alpha)
        else:
            out[f"{flat}.lora_up.weight"] = v * (v.shape[1] / alpha)
    return out


def test_peft_matches_diffusers(tiny_models):
    m, ours, ref = _pair(tiny_models)
    sd = peft_lora(ours, pattern=LINEARS, seed=1)
    L.loader_for(FAMILY, **ours).load_lora_weights(dict(sd), adapter_name="x")
    diffusers_loader(FAMILY, ref).load_lora_weights(dict(sd), adapter_name="x")
    o = outputs(FAMILY, ours)
    assert_close(o, outputs(FAMILY, ref))
    assert_differs(o, outputs(FAMILY, m), "transformer")
    assert_differs(o, outputs(FAMILY, m), "text_encoder_2")


def test_kohya_matches_diffusers_on_the_same_factors(tiny_models):
    """sd-scripts' names: fused qkv (down shared, up split by rows), swapped modulations, lora_te1_/te2_."""
    m, ours, ref = _pair(tiny_models)
    t = ours["transformer"]
    file, peft = fused_kohya(t, lambda n: sd3_original(n, _last(t)), "lora_unet_", seed=2)
    assert any("x_block_attn_qkv" in k for k in file) and any("attn2_qkv" in k for k in file)
    assert any("final_layer_adaLN_modulation_1" in k for k in file)
    peft = {f"transformer.{k}": v for k, v in peft.items()}
    clip = peft_lora({c: ours[c] for c in CLIPS}, seed=3)
    file.update(peft_to_kohya(clip, {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}, alpha=2.0))
    peft.update(clip)
    L.loader_for(FAMILY, **ours).load_lora_weights(file, adapter_name="x")
    diffusers_loader(FAMILY, ref).load_lora_weights(peft, adapter_name="x")
    o = outputs(FAMILY, ours)
    assert_close(o, outputs(FAMILY, ref))
    assert_differs(o, outputs(FAMILY, m), "transformer")


def test_kohya_reads_the_same_without_the_model(tiny_models):
    """Model-free, fused layers split by ratio and the last block is the file's last: the same layers."""
    t = tiny_models(FAMILY)["transformer"]
    file, _ = fused_kohya(t, lambda n: sd3_original(n, _last(t)), "lora_unet_", seed=4)
    bound = L.read_lora(dict(file), FAMILY, index=L.TargetIndex.from_models({"transformer": t}))
    free = L.read_lora(dict(file), FAMILY)
    assert set(free.layers) == set(bound.layers)
    for k, layer in bound.layers.items():
        assert torch.equal(free.layers[k].tensors["up"], layer.tensors["up"]), k


def test_lycoris_lokr_follows_its_formula(tiny_models):
    """`lycoris_` + flattened diffusers names (SimpleTuner's SD3.5 LoKr): W + kron(w1, w2a @ w2b) * alpha / r."""
    t = tiny_models(FAMILY)["transformer"]
    sd = lycoris({"transformer": t}, "lokr", pattern=LINEARS, seed=5, prefixes={"transformer": "lycoris_"})
    expected = {}
    for name, module in t.named_modules():
        key = "lycoris_" + name.replace(".", "_")
        if f"{key}.lokr_w1" in sd:
            d = torch.kron(sd[f"{key}.lokr_w1"], sd[f"{key}.lokr_w2_a"] @ sd[f"{key}.lokr_w2_b"])
            w = module.weight.detach()
            expected[name] = w + d.reshape(w.shape) * sd[f"{key}.alpha"] / sd[f"{key}.lokr_w2_b"].shape[0]
    assert len(expected) > 20
    L.loader_for(FAMILY, transformer=t).load_lora_weights(sd, adapter_name="k")
    modules = dict(t.named_modules())
    for name, w in expected.items():
        torch.testing.assert_close(modules[name].weight, w, rtol=1e-5, atol=1e-6)


def test_t5_lora_te3_loads_into_text_encoder_3(tiny_models):
    """diffusers' SD3 mixin does not load T5 LoRAs; sd-scripts writes them as lora_te3_: W + up @ down * alpha / r."""
    t5 = tiny_models(FAMILY)["text_encoder_3"]
    base = {n: p.detach().clone() for n, p in t5.named_parameters()}
    sd = peft_to_kohya(peft_lora({"text_encoder_3": t5}, pattern=re.compile(r"(SelfAttention\.[qkvo]|wo|wi_[01]|wi)$"),
                                 seed=6), {"text_encoder_3": "lora_te3_"}, alpha=3.0)
    assert any(k.startswith("lora_te3_encoder_block_0_layer_0_SelfAttention_q") for k in sd)
    L.loader_for(FAMILY, text_encoder_3=t5).load_lora_weights(sd, adapter_name="t5")
    params = dict(t5.named_parameters())
    n = 0
    for k in sd:
        if k.endswith(".lora_down.weight"):
            flat = k.removeprefix("lora_te3_").removesuffix(".lora_down.weight")
            pname = next(p for p in params if p.replace(".", "_") == flat + "_weight")
            up = sd[k.replace("lora_down", "lora_up")]
            want = base[pname] + up @ sd[k] * 3.0 / sd[k].shape[0]
            torch.testing.assert_close(params[pname].detach(), want, rtol=1e-5, atol=1e-6)
            n += 1
    assert n >= 8


def test_unmatched_kohya_key_raises_naming_it(tiny_models):
    m = tiny_models(FAMILY)
    file, _ = fused_kohya(m["transformer"], lambda n: sd3_original(n, _last(m["transformer"])), "lora_unet_", seed=7)
    file["lora_unet_joint_blocks_0_x_block_attn_qkvv.lora_down.weight"] = torch.zeros(4, 32)
    file["lora_unet_joint_blocks_0_x_block_attn_qkvv.lora_up.weight"] = torch.zeros(96, 4)
    loader = L.loader_for(FAMILY, transformer=m["transformer"])
    with pytest.raises(L.LoraKeyError, match=r"joint_blocks_0_x_block_attn_qkvv"):
        loader.load_lora_weights(file, adapter_name="bad")
    assert loader.get_list_adapters() == {}
