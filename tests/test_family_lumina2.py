"""Lumina-Image 2.0 LoRA layouts against diffusers + PEFT (float32, tiny Lumina2: grouped-query attention
with 4 query and 2 key/value heads, one noise refiner, one context refiner and one main block).

diffusers reads PEFT files itself (an unprefixed one it loads as nothing: checked). Its
`_convert_non_diffusers_lumina2_lora_to_diffusers` reads `diffusion_model.` files only at
Lumina-Image 2.0's sizes: it splits the fused `attention.qkv` at the fixed rows [2304, 768, 768],
so on any other model (the tiny one included) `torch.split` raises; it also wants `lora_A/B` (a
`lora_down` or `.alpha` key raises), every one of qkv, out, w1-3 (and adaLN) in every block from
0 to the number of blocks it finds, and no other key (`final_layer`, the embedders: "`state_dict`
should be empty"), all checked below. At 2304 / 768 / 768 its split equals ours (checked on a
file of that size, no model needed). So the original-name files of the tiny model
(`diffusion_model.`, ComfyUI's `transformer.` / `lycoris_` / no prefix, sd-scripts' `lora_unet_`)
are compared with diffusers + PEFT on the same factors in PEFT names, the fused qkv split by
rows at the model's own q / k / v sizes. sd-scripts' Gemma LoRAs (`lora_te_`), which diffusers
does not load, are compared with W + up @ down * alpha / rank.
"""

import re
from functools import partial

import pytest
import torch

import lora_loaders as L
from export.graph import example_inputs, run_torch
from export.tiny import build_tiny
from family_files import fused_kohya
from peft_layouts import check_peft, check_unprefixed, models, raises_on_unknown_module
from reference import assert_close, assert_differs, diffusers_loader, outputs

FAMILY = "lumina2"

_BLOCK = {"attn.to_q": ("attention.qkv", 0), "attn.to_k": ("attention.qkv", 1), "attn.to_v": ("attention.qkv", 2),
          "attn.to_out.0": ("attention.out", None), "norm1.linear": ("adaLN_modulation.1", None),
          **{f"feed_forward.linear_{i}": (f"feed_forward.w{i}", None) for i in (1, 2, 3)}}
_TOP = {"x_embedder": "x_embedder", "time_caption_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_caption_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_caption_embed.caption_embedder.1": "cap_embedder.1",
        "norm_out.linear_1": "final_layer.adaLN_modulation.1", "norm_out.linear_2": "final_layer.linear"}


def original(name: str):
    """diffusers module name -> (Alpha-VLLM NextDiT name, index in the fused qkv or None, swap halves)."""
    m = re.fullmatch(r"((?:layers|noise_refiner|context_refiner)\.\d+)\.(.+)", name)
    if m and m[2] in _BLOCK:
        orig, index = _BLOCK[m[2]]
        return f"{m[1]}.{orig}", index, False
    return (_TOP[name], None, False) if name in _TOP else None


_models = partial(models, FAMILY)


def _files(model, seed: int, alpha=2.0) -> tuple[dict, dict]:
    """(the LoRA in every original-name layout, the same factors in PEFT names)."""
    kohya, peft = fused_kohya(model, original, "lora_unet_", alpha=alpha, seed=seed)
    dotted, _ = fused_kohya(model, original, "", alpha=alpha, seed=seed, flat=False)
    plain = {}  # lora_A/B without alpha: alpha / rank folded into B
    for k, v in dotted.items():
        if k.endswith(".lora_up.weight"):
            plain[k.replace(".lora_up.", ".lora_B.")] = v * (alpha / v.shape[1])
        elif k.endswith(".lora_down.weight"):
            plain[k.replace(".lora_down.", ".lora_A.")] = v
    return {"sd-scripts": kohya, "lycoris_": {k.replace("lora_unet_", "lycoris_", 1): v for k, v in kohya.items()},
            "diffusion_model. down/alpha": {f"diffusion_model.{k}": v for k, v in dotted.items()},
            "diffusion_model. A/B": {f"diffusion_model.{k}": v for k, v in plain.items()},
            "transformer.": {f"transformer.{k}": v for k, v in plain.items()}, "unprefixed": plain}, \
        {f"transformer.{k}": v for k, v in peft.items()}


def test_graph_forward_is_diffusers_forward():
    """The exported forward keeps captions at their padded length; diffusers packs them by length."""
    t = build_tiny(FAMILY, ["transformer"])["transformer"]
    spec = L.get_family(FAMILY)
    cspec = spec.component("transformer")
    feeds = example_inputs(spec, cspec, t, torch.float32, "check", seed=1, batch=3)
    feeds["encoder_attention_mask"][:] = 1
    feeds["encoder_attention_mask"][1, 7:] = 0
    feeds["encoder_attention_mask"][2, 2:] = 0
    for mask in (feeds["encoder_attention_mask"], torch.ones_like(feeds["encoder_attention_mask"])):
        x = {**feeds, "encoder_attention_mask": mask}
        with torch.no_grad():
            want = t(**x, return_dict=False)[0]
        got = torch.from_numpy(run_torch(cspec, t, x)[0])
        assert_close({"out": got}, {"out": want})


def test_peft_matches_diffusers_with_two_adapters():
    check_peft(FAMILY, must=("context_refiner.0.attn.to_k", "noise_refiner.0.norm1.linear", "norm_out.linear_1",
                             "time_caption_embed.caption_embedder.1"))


def test_unprefixed_file_is_the_transformers():
    check_unprefixed(FAMILY)


def test_original_layouts_match_diffusers_on_the_same_factors():
    m, _, ref = _models()
    layouts, peft = _files(ref["transformer"], seed=2)
    assert "lora_unet_layers_0_attention_qkv.lora_down.weight" in layouts["sd-scripts"]
    assert "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight" in layouts["sd-scripts"]
    assert "diffusion_model.context_refiner.0.attention.qkv.lora_A.weight" in layouts["diffusion_model. A/B"]
    assert "diffusion_model.t_embedder.mlp.0.alpha" in layouts["diffusion_model. down/alpha"]
    diffusers_loader(FAMILY, ref).load_lora_weights(peft, adapter_name="x")
    want = outputs(FAMILY, ref)
    assert_differs(want, outputs(FAMILY, m), "transformer")
    for name, file in layouts.items():
        _, ours, _ = _models()
        L.loader_for(FAMILY, **ours).load_lora_weights(dict(file), adapter_name="x")
        try:
            assert_close(outputs(FAMILY, ours), want)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def test_diffusers_converter_at_lumina_image_2_sizes_and_its_limits():
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lumina2_lora_to_diffusers as convert

    g = torch.Generator().manual_seed(3)
    dims = {"attention.qkv": (2304, 3840), "attention.out": (2304, 2304), "feed_forward.w1": (2304, 6144),
            "feed_forward.w2": (6144, 2304), "feed_forward.w3": (2304, 6144), "adaLN_modulation.1": (1024, 9216)}
    file = {}
    for block in ("layers.0", "context_refiner.0"):
        for module, (cin, cout) in dims.items():
            if block.startswith("context") and module.startswith("adaLN"):
                continue  # the context refiner has no modulation
            file[f"diffusion_model.{block}.{module}.lora_A.weight"] = torch.randn(4, cin, generator=g)
            file[f"diffusion_model.{block}.{module}.lora_B.weight"] = torch.randn(cout, 4, generator=g)
    theirs = convert(dict(file))
    ours = L.read_lora(dict(file), FAMILY)  # no model: the fused qkv split 3 : 1 : 1
    assert len(ours.layers) == len(theirs) // 2 == 15
    for (component, module), layer in ours.layers.items():
        assert torch.equal(layer.tensors["down"], theirs[f"{component}.{module}.lora_A.weight"]), module
        assert torch.equal(layer.tensors["up"], theirs[f"{component}.{module}.lora_B.weight"]), module
        assert layer.alpha is None
    # what diffusers' converter cannot read
    tiny = _files(build_tiny(FAMILY, ["transformer"])["transformer"], seed=3)[0]["diffusion_model. A/B"]
    with pytest.raises(RuntimeError, match="split"):  # the tiny model's q / k / v rows: 32, 16, 16
        convert(dict(tiny))
    final = {"diffusion_model.final_layer.linear.lora_A.weight": torch.zeros(4, 2304),
             "diffusion_model.final_layer.linear.lora_B.weight": torch.zeros(64, 4)}
    with pytest.raises(ValueError, match="should be empty"):  # final_layer and the embedders
        convert({**file, **final})
    with pytest.raises(ValueError, match="should be empty"):  # alphas
        convert({**file, "diffusion_model.layers.0.attention.qkv.alpha": torch.tensor(2.0)})
    partial = {k: v for k, v in file.items() if "feed_forward.w3" not in k}
    with pytest.raises(KeyError):  # a LoRA on some modules of a block only
        convert(dict(partial))
    later = {k.replace("refiner.0.", "refiner.1."): v for k, v in file.items()}
    with pytest.raises(KeyError):  # blocks are counted, then read from 0: a LoRA on block 1 only
        convert(later)
    down = {k.replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v for k, v in file.items()}
    with pytest.raises(KeyError):
        convert(down)


def test_sd_scripts_gemma_lora_follows_the_lora_formula():
    """`lora_te_` + Gemma2Model's flattened names, as sd-scripts' lora_lumina writes: W + up @ down * alpha / r."""
    te = build_tiny(FAMILY, ["text_encoder"])["text_encoder"]
    base = {n: p.detach().clone() for n, p in te.named_parameters()}
    g = torch.Generator().manual_seed(4)
    file, want = {}, {}
    for name, module in te.named_modules():
        if isinstance(module, torch.nn.Linear) and re.search(r"(self_attn\.[qkvo]_proj|mlp\.\w+_proj)$", name):
            key = "lora_te_" + name.replace(".", "_")
            down = torch.randn(4, module.in_features, generator=g)
            up = torch.randn(module.out_features, 4, generator=g)
            file.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                         f"{key}.alpha": torch.tensor(2.0)})
            want[f"{name}.weight"] = base[f"{name}.weight"] + up @ down * 0.5
    assert "lora_te_layers_0_mlp_gate_proj.lora_down.weight" in file and len(want) == 14
    L.loader_for(FAMILY, text_encoder=te).load_lora_weights(file, adapter_name="te")
    params = dict(te.named_parameters())
    for p, w in want.items():
        torch.testing.assert_close(params[p].detach(), w, rtol=1e-5, atol=1e-6)


def test_unmatched_key_raises_naming_it():
    _, ours, _ = _models()
    file = _files(ours["transformer"], seed=5)[0]["diffusion_model. A/B"]
    raises_on_unknown_module(FAMILY, ours, file, "diffusion_model.layers.0.attention.qkvv", (64, 32))
