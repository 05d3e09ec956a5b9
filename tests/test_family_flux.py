"""FLUX.1 LoRA layouts against diffusers + PEFT (float32, tiny FLUX.1 dev: 1 double + 1 single block).

Where diffusers reads a layout correctly for the tiny model (PEFT, XLabs, kohya without fused
single blocks, civitai `lora_transformer_` mixtures) the file itself goes to diffusers. Where it
cannot, the reference is diffusers + PEFT on the same factors in PEFT names, or the trainer's
formula:

- kohya / `diffusion_model.` files beyond the double blocks: `_convert_kohya_flux_lora_to_diffusers`
  splits `linear1` with FLUX.1's sizes written in (`dims=[3072, 3072, 3072, 12288]`, then
  `assert sum(dims) == up_weight.shape[0]`); it names img_in / txt_in / time_in / vector_in /
  guidance_in `x_embedder`, `context_embedder`, `time_text_embed...` without the `transformer.`
  prefix the loader selects by, so those LoRAs are dropped without a word; and it drops
  `final_layer` alphas (`# TODO: alphas.`: `assign_remaining_weights` copies lora_down / lora_up
  without them), so those layers load at alpha / rank = 1 whatever the file says;
- BFL Control and fal Kontext files: the converters loop over `range(19)` / `range(38)` double /
  single blocks and pop each key (KeyError for any other depth) with `inner_dim = 3072` written in;
- BFL names in `lora_A` / `lora_B` spelling (ai-toolkit, ComfyUI) without BFL Control's norm scales:
  `FluxLoraLoaderMixin.lora_state_dict` tries kohya (`.lora_down.weight`), XLabs (`processor`), Control
  (`query_norm.scale`) and fal (`base_model`) in turn; none claims them, so the keys go to PEFT as they
  are and, having no `transformer.` prefix, are all dropped with an info log (the model is unchanged);
- LoKr on BFL names or `lycoris_` names: "Invalid LoRA checkpoint" (diffusers has Flux LoKr only for FLUX.2);
- `diff` / `diff_b` deltas, T5 keys (`lora_te3_`, `lora_te2_`, `text_encoders.t5xxl.`), LyCORIS
  DoRA `dora_scale` and LoHa / LoKr: diffusers drops them (logged, or a warning) or cannot read them;
- `lora_unet_` keys in a mixture with `lora_transformer_` ones: `_convert_mixture_state_dict_to_diffusers`
  pops them without a word when they are all that remains (`remaining_all_unet`).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import lora_loaders as L
from export.tiny import build_tiny
from family_files import fused_kohya
from lora_files import lycoris, peft_lora
from lora_loaders.dtypes import to_numpy
from reference import assert_close, assert_differs, diffusers_loader, outputs

FAMILY = "flux"
EPS = torch.finfo(torch.float32).eps
LINEARS = re.compile(r"(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out|ff(_context)?\.net\.(0\.proj|2)|norm1(_context)?"
                     r"\.linear|norm\.linear|proj_mlp|proj_out|norm_out\.linear|x_embedder|context_embedder|linear_[12]"
                     r"|q_proj|k_proj|v_proj|out_proj|fc1|fc2)$")
T5 = re.compile(r"(SelfAttention\.[qkvo]|wo|wi_[01]|wi)$")


# ---- diffusers module name -> BFL's (name, part of a fused layer or None, (shift, scale) swapped) ----
# From BFL's flux/model.py and modules/layers.py, independently of lora_loaders.families.flux.

_DOUBLE_PARTS = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
                 "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
                 "attn.add_v_proj": ("txt_attn.qkv", 2)}
_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
           "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
           "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.norm_q": "img_attn.norm.query_norm",
           "attn.norm_k": "img_attn.norm.key_norm", "attn.norm_added_q": "txt_attn.norm.query_norm",
           "attn.norm_added_k": "txt_attn.norm.key_norm"}
_SINGLE_PARTS = {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
                 "proj_mlp": ("linear1", 3)}
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin", "attn.norm_q": "norm.query_norm",
           "attn.norm_k": "norm.key_norm"}
_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}


def bfl(name: str):
    m = re.fullmatch(r"(single_)?transformer_blocks\.(\d+)\.(.+)", name)
    if m is None:
        if name == "norm_out.linear":
            return "final_layer.adaLN_modulation.1", None, True
        return (_TOP[name], None, False) if name in _TOP else None
    block = f"{'single' if m[1] else 'double'}_blocks.{m[2]}"
    parts, plain = (_SINGLE_PARTS, _SINGLE) if m[1] else (_DOUBLE_PARTS, _DOUBLE)
    if m[3] in parts:
        return f"{block}.{parts[m[3]][0]}", parts[m[3]][1], False
    return (f"{block}.{plain[m[3]]}", None, False) if m[3] in plain else None


def _models(components=("transformer", "text_encoder"), **overrides):
    m = build_tiny(FAMILY, list(components), overrides={"transformer": overrides} if overrides else None)
    return m, copy.deepcopy(m), copy.deepcopy(m)


def _both(ours, ref, file_ours, file_ref=None, loaders=None):
    a, b = loaders or (L.loader_for(FAMILY, **ours), diffusers_loader(FAMILY, ref))
    a.load_lora_weights(dict(file_ours), adapter_name="x")
    b.load_lora_weights(dict(file_ref if file_ref is not None else file_ours), adapter_name="x")
    o = outputs(FAMILY, ours)
    assert_close(o, outputs(FAMILY, ref))
    return o


def to_kohya(sd: dict, prefixes: dict, alpha: float) -> dict:
    """PEFT keys -> kohya keys (`<prefix><flat>.lora_down.weight`, up scaled by rank / alpha: the same delta)."""
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


def _linear(model, name) -> nn.Linear:
    return model.get_submodule(name)


# ---- diffusers/PEFT ----

def test_peft_with_alphas_and_norm_out_matches_diffusers():
    """PEFT keys with kohya-style `.alpha` entries (TheLastBen's Flux LoRAs), norm_out included."""
    m, ours, ref = _models()
    sd = peft_lora(ours, pattern=LINEARS, seed=1)
    assert "transformer.norm_out.linear.lora_A.weight" in sd
    for k in [k for k in sd if k.endswith(".lora_A.weight")]:
        sd[k.replace(".lora_A.weight", ".alpha")] = torch.tensor(2.0)
    o = _both(ours, ref, sd)
    base = outputs(FAMILY, m)
    assert_differs(o, base, "transformer")
    assert_differs(o, base, "text_encoder")


def test_base_model_model_anywhere():
    """fal Kontext's `base_model.model.` and SimpleTuner's older `transformer.base_model.model.`: the same layers."""
    _, ours, ref = _models(("transformer",))
    sd = peft_lora(ours, pattern=LINEARS, seed=2)
    older = {k.replace("transformer.", "transformer.base_model.model.", 1): v for k, v in sd.items()}
    _both(ours, ref, older, sd)
    index = L.TargetIndex.from_models(ours)
    bare = {k.replace("transformer.", "base_model.model.", 1): v for k, v in sd.items()}
    a, b = L.read_lora(sd, FAMILY, index=index), L.read_lora(bare, FAMILY, index=index)
    assert set(a.layers) == set(b.layers)


# ---- kohya sd-scripts ----

def test_kohya_double_blocks_and_clip_match_diffusers():
    """sd-scripts' names for what diffusers' converter reads at any size: double blocks (fused qkv), lora_te1_."""
    _, ours, ref = _models()
    file, _ = fused_kohya(ours["transformer"], lambda n: (o if (o := bfl(n)) and o[0].startswith("double_blocks")
                                                          else None), "lora_unet_", seed=3)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in file
    assert "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight" in file
    file.update(to_kohya(peft_lora({"text_encoder": ours["text_encoder"]}, seed=4), {"text_encoder": "lora_te1_"}, 3.0))
    _both(ours, ref, file)


def test_kohya_fused_single_blocks_and_final_layer_on_the_same_factors():
    """linear1 -> to_q / to_k / to_v / proj_mlp (1:1:1:4), final modulation with (shift, scale) swapped."""
    m, ours, ref = _models(("transformer",))
    file, peft = fused_kohya(ours["transformer"], bfl, "lora_unet_", seed=5)
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in file
    assert "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight" in file
    o = _both(ours, ref, file, {f"transformer.{k}": v for k, v in peft.items()})
    assert_differs(o, outputs(FAMILY, m), "transformer")
    # model-free: split by the ratios, the same layers
    free = L.read_lora(dict(file), FAMILY)
    bound = L.read_lora(dict(file), FAMILY, index=L.TargetIndex.from_models(ours))
    assert set(free.layers) == set(bound.layers)
    for k, layer in bound.layers.items():
        assert torch.equal(free.layers[k].tensors["up"], layer.tensors["up"]), k


def test_t5_keys_load_into_text_encoder_2():
    """sd-scripts' `lora_te3_`, OneTrainer's `lora_te2_`, ComfyUI's `text_encoders.t5xxl.transformer.` (diffusers drops all)."""
    t5 = build_tiny(FAMILY, ["text_encoder_2"])["text_encoder_2"]
    sd = peft_lora({"text_encoder_2": t5}, pattern=T5, seed=6)
    base = {n: p.detach().clone() for n, p in t5.named_parameters()}
    want = {}
    for k in sd:
        if k.endswith(".lora_A.weight"):
            module = k.removeprefix("text_encoder_2.").removesuffix(".lora_A.weight")
            want[f"{module}.weight"] = base[f"{module}.weight"] + sd[k.replace("lora_A", "lora_B")] @ sd[k]
    assert len(want) >= 8
    comfy = {k.replace("text_encoder_2.", "text_encoders.t5xxl.transformer.", 1): v for k, v in sd.items()}
    for file in (to_kohya(sd, {"text_encoder_2": "lora_te3_"}, 4.0), to_kohya(sd, {"text_encoder_2": "lora_te2_"}, 4.0),
                 comfy):
        model = copy.deepcopy(t5)
        loader = L.loader_for(FAMILY, text_encoder_2=model)
        loader.load_lora_weights(file, adapter_name="t5")
        params = dict(model.named_parameters())
        for p, w in want.items():
            torch.testing.assert_close(params[p].detach(), w, rtol=1e-5, atol=1e-6)


# ---- BFL original names (ai-toolkit, ComfyUI) ----

@pytest.mark.parametrize("prefix,spell", [("diffusion_model.", "A"), ("", "down"), ("model.diffusion_model.", "A")])
def test_bfl_names_on_the_same_factors(prefix, spell):
    _, ours, ref = _models(("transformer",))
    file, peft = fused_kohya(ours["transformer"], bfl, prefix, seed=7, flat=False)
    if spell == "A":
        file = {k.replace("lora_down", "lora_A").replace("lora_up", "lora_B"): v for k, v in file.items()}
    assert f"{prefix}single_blocks.0.linear1.lora_{'A' if spell == 'A' else 'down'}.weight" in file
    _both(ours, ref, file, {f"transformer.{k}": v for k, v in peft.items()})


def test_bfl_full_deltas_on_fused_layers_and_norms():
    """`diff` / `diff_b` (diffusers drops them): W + diff, rows of the fused qkv / linear1 to their modules."""
    _, ours, _ = _models(("transformer",))
    t = ours["transformer"]
    g = torch.Generator().manual_seed(8)
    p = "diffusion_model."
    qkv, linear1 = t.transformer_blocks[0].attn.to_q.weight.shape, (224, 32)
    file = {f"{p}double_blocks.0.img_attn.qkv.diff": torch.randn(3 * qkv[0], qkv[1], generator=g) * 0.1,
            f"{p}double_blocks.0.img_attn.qkv.diff_b": torch.randn(3 * qkv[0], generator=g) * 0.1,
            f"{p}single_blocks.0.linear1.diff": torch.randn(*linear1, generator=g) * 0.1,
            f"{p}double_blocks.0.img_attn.norm.query_norm.scale.diff": torch.randn(16, generator=g) * 0.1,
            f"{p}final_layer.adaLN_modulation.1.diff_b": torch.randn(64, generator=g) * 0.1}
    base = {n: q.detach().clone() for n, q in t.named_parameters()}
    L.loader_for(FAMILY, transformer=t).load_lora_weights(dict(file), adapter_name="d")
    now = {n: q.detach() for n, q in t.named_parameters()}
    d = file[f"{p}double_blocks.0.img_attn.qkv.diff"]
    db = file[f"{p}double_blocks.0.img_attn.qkv.diff_b"]
    for i, n in enumerate(("to_q", "to_k", "to_v")):
        rows = slice(i * 32, (i + 1) * 32)
        torch.testing.assert_close(now[f"transformer_blocks.0.attn.{n}.weight"],
                                   base[f"transformer_blocks.0.attn.{n}.weight"] + d[rows])
        torch.testing.assert_close(now[f"transformer_blocks.0.attn.{n}.bias"],
                                   base[f"transformer_blocks.0.attn.{n}.bias"] + db[rows])
    d1 = file[f"{p}single_blocks.0.linear1.diff"]
    for n, rows in (("attn.to_q", slice(0, 32)), ("attn.to_k", slice(32, 64)), ("attn.to_v", slice(64, 96)),
                    ("proj_mlp", slice(96, 224))):
        torch.testing.assert_close(now[f"single_transformer_blocks.0.{n}.weight"],
                                   base[f"single_transformer_blocks.0.{n}.weight"] + d1[rows])
    torch.testing.assert_close(now["transformer_blocks.0.attn.norm_q.weight"], base["transformer_blocks.0.attn.norm_q.weight"]
                               + file[f"{p}double_blocks.0.img_attn.norm.query_norm.scale.diff"])
    shift_scale = file[f"{p}final_layer.adaLN_modulation.1.diff_b"]
    torch.testing.assert_close(now["norm_out.linear.bias"],
                               base["norm_out.linear.bias"] + torch.cat([shift_scale[32:], shift_scale[:32]]))


# ---- XLabs ----

@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_xlabs_matches_diffusers(prefix):
    m, ours, ref = _models(("transformer",))
    t = ours["transformer"]
    g = torch.Generator().manual_seed(9)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2
    file = {}
    for i in range(len(t.transformer_blocks)):
        for name, out in (("qkv_lora1", 96), ("qkv_lora2", 96), ("proj_lora1", 32), ("proj_lora2", 32)):
            file[f"{prefix}double_blocks.{i}.processor.{name}.down.weight"] = r(4, 32)
            file[f"{prefix}double_blocks.{i}.processor.{name}.up.weight"] = r(out, 4)
    for i in range(len(t.single_transformer_blocks)):
        file[f"{prefix}single_blocks.{i}.processor.qkv_lora.down.weight"] = r(4, 32)
        file[f"{prefix}single_blocks.{i}.processor.qkv_lora.up.weight"] = r(96, 4)
        file[f"{prefix}single_blocks.{i}.processor.proj_lora.down.weight"] = r(4, 160)
        file[f"{prefix}single_blocks.{i}.processor.proj_lora.up.weight"] = r(32, 4)
    o = _both(ours, ref, file)
    assert_differs(o, outputs(FAMILY, m), "transformer")
    assert L.read_lora(dict(file), FAMILY).format == ("original" if prefix else "diffusers")


# ---- unmatched keys ----

def test_unmatched_keys_raise_naming_them():
    _, ours, _ = _models(("transformer",))
    file, _ = fused_kohya(ours["transformer"], bfl, "lora_unet_", seed=10)
    file["lora_unet_double_blocks_0_img_attn_qkvv.lora_down.weight"] = torch.zeros(4, 32)
    file["lora_unet_double_blocks_0_img_attn_qkvv.lora_up.weight"] = torch.zeros(96, 4)
    loader = L.loader_for(FAMILY, **ours)
    with pytest.raises(L.LoraKeyError, match=r"double_blocks_0_img_attn_qkvv"):
        loader.load_lora_weights(file, adapter_name="bad")
    assert loader.get_list_adapters() == {}
    xlabs = {"double_blocks.0.processor.qkv_lora3.down.weight": torch.zeros(4, 32),
             "double_blocks.0.processor.qkv_lora3.up.weight": torch.zeros(96, 4)}
    with pytest.raises(L.LoraKeyError, match=r"qkv_lora3"):
        loader.load_lora_weights(xlabs, adapter_name="bad")


# ---- BFL Control (widens x_embedder), fal Kontext ----

def _bfl_peft(model, prefix: str, seed: int, widen: int = 0, bias=()):
    """(BFL-named file in lora_A / lora_B, the same factors in PEFT names): scale 1 (no alphas), as BFL writes."""
    file, peft = fused_kohya(model, bfl, prefix, seed=seed, alpha=4.0, flat=False)
    file = {k.replace("lora_down", "lora_A").replace("lora_up", "lora_B"): v for k, v in file.items()
            if not k.endswith(".alpha")}
    peft = {f"transformer.{k}": v for k, v in peft.items()}
    g = torch.Generator().manual_seed(seed + 100)
    if widen:
        file[f"{prefix}img_in.lora_A.weight"] = peft["transformer.x_embedder.lora_A.weight"] = \
            torch.randn(4, widen, generator=g) * 0.2
    for orig, targets in bias:  # lora_B.bias: a bias delta, split like lora_B
        b = torch.randn(sum(model.get_submodule(t).out_features for t in targets), generator=g) * 0.1
        file[f"{prefix}{orig}.lora_B.bias"] = b
        i = 0
        for t in targets:
            n = model.get_submodule(t).out_features
            peft[f"transformer.{t}.lora_B.bias"] = b[i:i + n]
            i += n
    if bias:  # PEFT's lora_bias gives every adapted module one: zeros where the file has none
        for k in [k for k in peft if k.endswith(".lora_B.weight")]:
            peft.setdefault(k.replace(".weight", ".bias"), torch.zeros(peft[k].shape[0]))
    return file, peft


_CONTROL_BIAS = (("double_blocks.0.img_attn.qkv", ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                                 "transformer_blocks.0.attn.to_v")),
                 ("img_in", ("x_embedder",)), ("single_blocks.0.linear2", ("single_transformer_blocks.0.proj_out",)))
_NORMS = {"double_blocks.0.img_attn.norm.query_norm.scale": "transformer_blocks.0.attn.norm_q.weight",
          "double_blocks.0.txt_attn.norm.key_norm.scale": "transformer_blocks.0.attn.norm_added_k.weight",
          "single_blocks.0.norm.query_norm.scale": "single_transformer_blocks.0.attn.norm_q.weight"}


def control_file(model, seed=11):
    file, peft = _bfl_peft(model, "", seed, widen=2 * model.config.in_channels, bias=_CONTROL_BIAS)
    g = torch.Generator().manual_seed(seed)
    for k, p in _NORMS.items():  # BFL Control LoRAs ship their own qk-norm scales
        file[k] = peft[f"transformer.{p}"] = 1 + torch.randn(16, generator=g) * 0.1
    return file, peft


def test_bfl_control_widens_x_embedder_like_diffusers_and_unload_restores_it():
    m, ours, ref = _models(("transformer",))
    t = ours["transformer"]
    original = t.x_embedder.weight.detach().clone()
    file, peft = control_file(t)
    loader, dref = L.loader_for(FAMILY, **ours), diffusers_loader(FAMILY, ref)
    o = _both(ours, ref, file, peft, (loader, dref))
    assert t.x_embedder.in_features == 32 and t.config.in_channels == 32 == ref["transformer"].config.in_channels
    assert o["transformer"].shape[-1] == 16  # the output keeps the latent width
    assert torch.equal(t.transformer_blocks[0].attn.norm_q.weight, file["double_blocks.0.img_attn.norm.query_norm.scale"])
    # a LoRA trained on the narrow x_embedder is zero-padded to the widened one (diffusers pads it too)
    plain = peft_lora({"transformer": m["transformer"]}, pattern=re.compile(r"(x_embedder|to_q)$"), seed=12)
    assert plain["transformer.x_embedder.lora_A.weight"].shape[1] == 16
    for lo in (loader, dref):
        lo.load_lora_weights(dict(plain), adapter_name="y")
        lo.set_adapters(["x", "y"], [1.0, 0.7])
    assert_close(outputs(FAMILY, ours), outputs(FAMILY, ref))
    loader.unload_lora_weights()
    assert t.x_embedder.in_features == 16 and t.config.in_channels == 16
    assert torch.equal(t.x_embedder.weight.view(torch.int32), original.view(torch.int32))
    assert_close(outputs(FAMILY, ours), outputs(FAMILY, m), rel=0)


def test_fal_kontext_on_the_same_factors():
    _, ours, ref = _models(("transformer",))
    file, peft = _bfl_peft(ours["transformer"], "base_model.model.", seed=13)
    assert "base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight" in file
    _both(ours, ref, file, peft)


# ---- lora_transformer_ (civitai mixtures, OneTrainer) ----

ATTN_TOP = re.compile(r"(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|^context_embedder|^x_embedder|^proj_out"
                      r"|^norm_out\.linear|time_text_embed\.\w+\.linear_[12]|q_proj|k_proj|v_proj|out_proj|fc1|fc2)$")


def test_lora_transformer_mixture_matches_diffusers():
    """The civitai mixture diffusers reads: attention and top-level layers, lora_te1_."""
    _, ours, ref = _models()
    sd = peft_lora(ours, pattern=ATTN_TOP, seed=14)
    file = to_kohya(sd, {"transformer": "lora_transformer_", "text_encoder": "lora_te1_"}, alpha=2.0)
    assert "lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight" in file
    _both(ours, ref, file)


def test_lora_transformer_everything_and_lora_unet_keys_on_the_same_factors():
    """Block feed-forwards, proj_mlp, norms (diffusers' mixture converter names them `transformer_blocks.N`
    alone) and `lora_unet_` keys beside them (popped without a word): all applied."""
    _, ours, ref = _models(("transformer",))
    t = ours["transformer"]
    sd = peft_lora({"transformer": t}, pattern=re.compile(r"(ff\.net\.2|proj_mlp|norm1\.linear|norm\.linear)$"), seed=15)
    file = to_kohya(sd, {"transformer": "lora_transformer_"}, alpha=2.0)
    extra, peft = fused_kohya(t, lambda n: o if (o := bfl(n)) and o[0].endswith("attn.qkv") else None,
                              "lora_unet_", seed=16)
    file.update(extra)
    sd.update({f"transformer.{k}": v for k, v in peft.items()})
    _both(ours, ref, file, sd)


def test_onetrainer_dora_follows_its_formula():
    """OneTrainer DoRA (`dora_scale` over input columns, its default) on `lora_transformer_`, `lora_te1_`, `lora_te2_`:
    W' = (W + up @ down * alpha / r) * dora_scale / ||W + up @ down * alpha / r||, norms per input column."""
    models = build_tiny(FAMILY, list(L.get_family(FAMILY).lora_components))
    prefixes = {"transformer": "lora_transformer_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    patterns = {"transformer": re.compile(r"(to_[qkv]|proj_mlp|ff\.net\.2)$"), "text_encoder": re.compile(r"q_proj$"),
                "text_encoder_2": re.compile(r"SelfAttention\.q$")}
    file, want = {}, {}
    g = torch.Generator().manual_seed(17)
    for c, model in models.items():
        sd = to_kohya(peft_lora({c: model}, pattern=patterns[c], seed=18), prefixes, alpha=2.0)
        for k in [k for k in sd if k.endswith(".lora_down.weight")]:
            key = k.removesuffix(".lora_down.weight")
            name = next(n for n, _ in model.named_modules() if prefixes[c] + n.replace(".", "_") == key
                        or prefixes[c] + "text_model_" + n.replace(".", "_") == key)
            w = _linear(model, name).weight.detach()
            merged = w + sd[f"{key}.lora_up.weight"] @ sd[k] * 2.0 / sd[k].shape[0]
            sd[f"{key}.dora_scale"] = w.norm(dim=0, keepdim=True) * (1 + 0.1 * torch.randn(1, w.shape[1], generator=g))
            want[(c, name)] = merged * sd[f"{key}.dora_scale"] / (merged.norm(dim=0, keepdim=True) + EPS)
        file.update(sd)
    L.loader_for(FAMILY, **models).load_lora_weights(file, adapter_name="dora")
    assert {c for c, _ in want} == set(models) and len(want) >= 8
    for (c, name), w in want.items():
        torch.testing.assert_close(_linear(models[c], name).weight.detach(), w, rtol=1e-5, atol=1e-6)


def test_onetrainer_omi_names_are_the_peft_layers():
    """OneTrainer's OMI layout: `lora_transformer.` over BFL names with the fused layers' parts numbered
    (`img_attn.qkv.0`, `linear1.3`), `lora_clip_l_`, `lora_t5_`."""
    models = build_tiny(FAMILY, list(L.get_family(FAMILY).lora_components))
    sd = peft_lora(models, pattern=re.compile(LINEARS.pattern[:-2] + r"|SelfAttention\.[qo])$"), seed=19)
    omi = {}
    for k, v in sd.items():
        component, rest = k.split(".", 1)
        module, _, role = rest.rpartition(".lora_")
        role = "lora_down.weight" if role == "A.weight" else "lora_up.weight"
        if component == "transformer":
            o = bfl(module)
            name = o[0] if o[1] is None else f"{o[0]}.{o[1]}"
            if o[2]:
                v = torch.cat([v[v.shape[0] // 2:], v[:v.shape[0] // 2]]) if role == "lora_up.weight" else v
            omi[f"lora_transformer.{name}.{role}"] = v
        else:
            omi[f"{'lora_clip_l_' if component == 'text_encoder' else 'lora_t5_'}{module.replace('.', '_')}.{role}"] = v
    assert "lora_transformer.single_blocks.0.linear1.3.lora_down.weight" in omi
    index = L.TargetIndex.from_models(models)
    a, b = L.read_lora(sd, FAMILY, index=index), L.read_lora(omi, FAMILY, index=index)
    assert set(a.layers) == set(b.layers) and len(a.layers) > 30
    for k, layer in a.layers.items():
        assert torch.equal(layer.delta(torch.Size(layer.delta_shape())), b.layers[k].delta(torch.Size(layer.delta_shape()))), k


# ---- LyCORIS: LoKr on diffusers names, LoHa and DoRA on BFL's fused layers ----

def test_lycoris_lokr_follows_its_formula():
    t = build_tiny(FAMILY, ["transformer"])["transformer"]
    sd = lycoris({"transformer": t}, "lokr", pattern=LINEARS, seed=20, prefixes={"transformer": "lycoris_"})
    want = {}
    for name, module in t.named_modules():
        key = "lycoris_" + name.replace(".", "_")
        if f"{key}.lokr_w1" in sd:
            d = torch.kron(sd[f"{key}.lokr_w1"], sd[f"{key}.lokr_w2_a"] @ sd[f"{key}.lokr_w2_b"])
            want[name] = module.weight.detach() + d * sd[f"{key}.alpha"] / sd[f"{key}.lokr_w2_b"].shape[0]
    assert len(want) > 20
    L.loader_for(FAMILY, transformer=t).load_lora_weights(sd, adapter_name="k")
    for name, w in want.items():
        torch.testing.assert_close(_linear(t, name).weight.detach(), w, rtol=1e-5, atol=1e-6)


def _fused(t, names):
    return torch.cat([_linear(t, n).weight.detach() for n in names])


QKV = [f"transformer_blocks.0.attn.to_{x}" for x in "qkv"]
LINEAR1 = [f"single_transformer_blocks.0.{x}" for x in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_loha_and_lokr_on_fused_layers_are_materialised_and_sliced(kind):
    """sd-scripts LoHa and ai-toolkit LoKr on BFL's fused qkv / linear1: the fused delta by LyCORIS' formula
    (alpha / rank), its rows to the split modules."""
    t = build_tiny(FAMILY, ["transformer"])["transformer"]
    g = torch.Generator().manual_seed(21)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    file, want = {}, {}
    keys = (("double_blocks.0.img_attn.qkv", QKV), ("single_blocks.0.linear1", LINEAR1))
    for key, names in keys:
        key = f"lora_unet_{key.replace('.', '_')}" if kind == "loha" else f"diffusion_model.{key}"
        w = _fused(t, names)
        if kind == "loha":
            parts = {"hada_w1_a": r(w.shape[0], 4), "hada_w1_b": r(4, w.shape[1]), "hada_w2_a": r(w.shape[0], 4),
                     "hada_w2_b": r(4, w.shape[1])}
            delta = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
        else:
            parts = {"lokr_w1": r(2, 2), "lokr_w2_a": r(w.shape[0] // 2, 4), "lokr_w2_b": r(4, w.shape[1] // 2)}
            delta = torch.kron(parts["lokr_w1"], parts["lokr_w2_a"] @ parts["lokr_w2_b"])
        file.update({f"{key}.{k}": v for k, v in parts.items()})
        file[f"{key}.alpha"] = torch.tensor(2.0)
        fused = w + delta * 0.5
        i = 0
        for n in names:
            rows = _linear(t, n).out_features
            want[n] = fused[i:i + rows]
            i += rows
    L.loader_for(FAMILY, transformer=t).load_lora_weights(file, adapter_name="h")
    for n, w in want.items():
        torch.testing.assert_close(_linear(t, n).weight.detach(), w, rtol=1e-5, atol=1e-6)


def fused_dora_file(t, per_input: bool, seed=22):
    """LyCORIS DoRA through sd-scripts on BFL's fused qkv / linear1, and each module's weight as the trainer
    computes it: on the fused weight, norms per input column (wd_on_out=False) or per output row."""
    g = torch.Generator().manual_seed(seed)
    file, want = {}, {}
    for key, names in (("lora_unet_double_blocks_0_img_attn_qkv", QKV), ("lora_unet_single_blocks_0_linear1", LINEAR1)):
        w = _fused(t, names)
        down, up = torch.randn(4, w.shape[1], generator=g) * 0.2, torch.randn(w.shape[0], 4, generator=g) * 0.2
        merged = w + up @ down * 2.0 / 4
        axis = 0 if per_input else 1
        scale = w.norm(dim=axis, keepdim=True) * (1 + 0.1 * torch.randn(w.norm(dim=axis, keepdim=True).shape,
                                                                       generator=g))
        file.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0),
                     f"{key}.dora_scale": scale})
        fused = merged * scale / (merged.norm(dim=axis, keepdim=True) + EPS)
        i = 0
        for n in names:
            rows = _linear(t, n).out_features
            want[n] = fused[i:i + rows]
            i += rows
    return file, want


@pytest.mark.parametrize("per_input", [True, False])
def test_dora_on_fused_layers_normalises_the_fused_weight(per_input):
    t = build_tiny(FAMILY, ["transformer"])["transformer"]
    base = {n: p.detach().clone() for n, p in t.named_parameters()}
    file, want = fused_dora_file(t, per_input)
    loader = L.loader_for(FAMILY, transformer=t)
    loader.load_lora_weights(file, adapter_name="dora")
    for n, w in want.items():
        torch.testing.assert_close(_linear(t, n).weight.detach(), w, rtol=1e-5, atol=1e-6)
    loader.set_adapters(["dora"], [0.5])  # ComfyUI's blend: W + 0.5 (W_dora - W)
    for n, w in want.items():
        torch.testing.assert_close(_linear(t, n).weight.detach(), (base[f"{n}.weight"] + w) / 2, rtol=1e-5, atol=1e-6)
    loader.unload_lora_weights()
    for n, p in t.named_parameters():
        assert torch.equal(p.detach(), base[n]), n


# ---- configs of the family: schnell (no guidance), Fill (wider input, latent-width output) ----

def test_schnell_and_fill_are_configs_of_the_family():
    from export.graph import example_inputs, run_torch

    spec = L.get_family(FAMILY)
    cspec = spec.component("transformer")
    for overrides, inputs, out in (({"guidance_embeds": False}, 6, 16),
                                   ({"in_channels": 48, "out_channels": 16}, 7, 16)):
        t = build_tiny(FAMILY, ["transformer"], overrides={"transformer": overrides})["transformer"]
        feeds = example_inputs(spec, cspec, t, torch.float32, "check")
        assert len(feeds) == inputs and ("guidance" in feeds) == t.config.guidance_embeds
        (y,) = run_torch(cspec, t, feeds)
        assert y.shape == (1, spec.axes["image"].check, out)


# ---- export and refit ----

def _save(sd, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def xlabs_file(t, seed=30):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2
    return {"double_blocks.0.processor.qkv_lora1.down.weight": r(4, 32), "double_blocks.0.processor.qkv_lora1.up.weight":
            r(96, 4), "double_blocks.0.processor.proj_lora2.down.weight": r(4, 32),
            "double_blocks.0.processor.proj_lora2.up.weight": r(32, 4),
            "single_blocks.0.processor.qkv_lora.down.weight": r(4, 32), "single_blocks.0.processor.qkv_lora.up.weight":
            r(96, 4)}


SCHNELL = {"guidance_embeds": False}


@pytest.fixture(scope="module")
def flux_exports(tmp_path_factory):
    """kohya- and XLabs-baked fp16 transformer exports (FLUX.1 dev), and the LoRA files. (fp32 exports of
    every Flux component are checked in test_family_exports.py and test_pipelines.py.)"""
    import export

    root = tmp_path_factory.mktemp("flux_refit")
    t = build_tiny(FAMILY, ["transformer"])["transformer"]
    kohya, _ = fused_kohya(t, bfl, "lora_unet_", seed=31)
    files = {"kohya": _save(kohya, root / "kohya.safetensors"), "xlabs": _save(xlabs_file(t), root / "xlabs.safetensors"),
             "peft": _save(peft_lora({"transformer": t}, pattern=LINEARS, seed=32, every=2), root / "peft.safetensors")}
    out = {}
    for name, validate in (("kohya", True), ("xlabs", False)):
        out[name] = root / name
        export.export_pipeline(FAMILY, "tiny", [(files[name], 1.0)], out[name], components=["transformer"],
                               dtype="fp16", validate=validate, progress=False)
    return dict(root=root, files=files, out=out, model=t)


def _no_doubles(model_path):
    import onnx

    m = onnx.shape_inference.infer_shapes(onnx.load(str(model_path), load_external_data=False))
    double = onnx.TensorProto.DOUBLE
    types = [v.type.tensor_type.elem_type for v in (*m.graph.value_info, *m.graph.input, *m.graph.output)]
    types += [t.data_type for t in m.graph.initializer]
    types += [a.i for n in m.graph.node for a in n.attribute if a.name == "to"]
    return double not in types


def test_export_has_no_float64_and_matches_torch(flux_exports):
    """diffusers computes Flux's RoPE in float64; the graph computes it in float32 and still matches (fp16,
    validated at other batch and image sizes than traced: the axes are dynamic)."""
    import engines

    out = flux_exports["out"]["kohya"]
    manifest = engines.Manifest.read(out)
    entry = manifest.components["transformer"]
    assert entry["dtype"] == "float16" and entry["validation"]["passed"]
    assert _no_doubles(out / "transformer" / "model.onnx")
    inputs = {i["name"]: i for i in entry["inputs"]}
    assert list(inputs) == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids",
                            "txt_ids", "guidance"]
    assert inputs["hidden_states"]["dynamic_axes"] == {"0": "batch", "1": "image"}
    assert inputs["img_ids"]["dynamic_axes"] == {"0": "image"} and inputs["txt_ids"]["dynamic_axes"] == {"0": "text"}


def _fused_params(files, family=FAMILY, dtype=torch.float32, overrides=None):
    """The mixin's weights after loading these adapters in turn (the last one active), as {param: tensor}."""
    t = build_tiny(family, ["transformer"], dtype=dtype,
                   overrides={"transformer": overrides} if overrides else None)["transformer"]
    loader = L.loader_for(family, transformer=t)
    for i, f in enumerate(files):
        loader.load_lora_weights(f, adapter_name=f"a{i}")
    return {n: p.detach() for n, p in t.named_parameters()}


def test_refit_between_kohya_xlabs_and_peft_is_a_fresh_export(flux_exports):
    from refit_helpers import differing, initializers

    import engines
    import refit

    f, out = flux_exports["files"], flux_exports["out"]
    engine = engines.load_engine(out["kohya"] / "transformer")
    r = refit.Refitter(engine)
    assert r.get_active_adapters() == ["kohya"]
    r.load_lora(f["xlabs"], adapter_name="xlabs")
    assert differing(engine.get_weights(), initializers(out["xlabs"] / "transformer" / "model.onnx",
                                                        engine.weight_names())) == []
    r.load_lora(f["peft"], adapter_name="peft")
    params = _fused_params([f["peft"]], dtype=torch.float16)
    want = {e.initializer: to_numpy(e.to_onnx(params[p])) for p, e in r.files.map.entries.items()}
    assert differing(engine.get_weights(), want) == []
    r.set_adapters([])  # back to base: the exact base bits, whatever was baked and refitted before
    base = _fused_params([], dtype=torch.float16)
    want = {e.initializer: to_numpy(e.to_onnx(base[p])) for p, e in r.files.map.entries.items()}
    assert differing(engine.get_weights(), want) == []
    other = refit.Refitter(engines.load_engine(out["xlabs"] / "transformer"))
    other.load_lora(f["kohya"], adapter_name="kohya")
    assert differing(other.engine.get_weights(), initializers(out["kohya"] / "transformer" / "model.onnx",
                                                              engine.weight_names())) == []


def test_control_and_fused_dora_bake_and_refit_exactly(flux_exports, tmp_path):
    """A Control LoRA baked at export widens the graph's hidden_states (recorded in the manifest); refitting
    one into an engine exported without it is refused, naming the input. DoRA over the fused qkv / linear1
    is computed from the exact base weights by the export and by refit alike (the same bits). The wide
    engine refits narrow LoRAs (zero-padded, as the loaders do). The model is a schnell config: no guidance
    input; fp32 (fp16 in the fixture, bf16 below)."""
    from refit_helpers import differing, initializers

    import engines
    import export
    import refit

    narrow_ctrl = _save(control_file(flux_exports["model"], seed=33)[0], tmp_path / "canny_dev.safetensors")
    narrow = refit.Refitter(engines.load_engine(flux_exports["out"]["xlabs"] / "transformer"))
    before = narrow.engine.get_weights()
    with pytest.raises(refit.RefitError, match=r"x_embedder \(from img_in\): the LoRA widens it from 16 to 32 .*"
                                               r"'hidden_states'.*export a new one") as e:
        narrow.load_lora(narrow_ctrl, adapter_name="canny")
    assert "looks like" not in str(e.value)
    assert differing(narrow.engine.get_weights(), before) == [] and narrow.get_active_adapters() == ["xlabs"]

    t = build_tiny(FAMILY, ["transformer"], overrides={"transformer": SCHNELL})["transformer"]
    ctrl = _save(control_file(t, seed=33)[0], tmp_path / "canny.safetensors")
    dora = _save(fused_dora_file(t, per_input=True)[0], tmp_path / "dora.safetensors")
    peft = _save(peft_lora({"transformer": t}, pattern=LINEARS, seed=34, every=2), tmp_path / "peft.safetensors")
    m = export.export_pipeline(FAMILY, {"transformer": copy.deepcopy(t)}, [(ctrl, 1.0), (dora, 0.8)], tmp_path / "ctrl",
                               components=["transformer"], progress=False)
    entry = m.components["transformer"]
    assert entry["widened"] == {"x_embedder": {"from": 16, "to": 32, "config": "in_channels"}}
    assert entry["inputs"][0]["shape"] == ["batch", "image", 32] and entry["validation"]["passed"]
    assert entry["dtype"] == "float32" and "guidance" not in [i["name"] for i in entry["inputs"]]
    assert _no_doubles(tmp_path / "ctrl" / "transformer" / "model.onnx")
    engine = engines.load_engine(tmp_path / "ctrl" / "transformer")
    baked = initializers(tmp_path / "ctrl" / "transformer" / "model.onnx", engine.weight_names())
    wide = refit.Refitter(engine)
    assert wide.get_active_adapters() == ["canny", "dora"]
    wide.set_adapters([])
    assert differing(engine.get_weights(), baked) != []
    wide.set_adapters(["canny", "dora"], [1.0, 0.8])
    assert differing(engine.get_weights(), baked) == []
    wide.load_lora(peft, adapter_name="peft")  # its x_embedder LoRA is zero-padded
    params = _fused_params([ctrl, peft], overrides=SCHNELL)
    want = {e.initializer: to_numpy(e.to_onnx(params[p])) for p, e in wide.files.map.entries.items()}
    assert differing(engine.get_weights(), want) == []


def test_bf16_export_matches_torch(flux_exports, tmp_path):
    """bf16 with a kohya LoRA and DoRA on the fused layers (ONNX Runtime on CPU has no bfloat16 MatMul: the
    validation runs the graph's float32 copy against the bf16 model cast to float32, see export.validate)."""
    import export

    t = flux_exports["model"]
    dora = _save(fused_dora_file(t, per_input=False)[0], tmp_path / "dora.safetensors")
    m = export.export_pipeline(FAMILY, "tiny", [(flux_exports["files"]["kohya"], 1.0), (dora, 0.5)], tmp_path / "out",
                               components=["transformer"], dtype="bf16", progress=False)
    entry = m.components["transformer"]
    assert entry["dtype"] == "bfloat16" and entry["validation"]["passed"]
    assert set(entry["validation"]["graph_float_types"]["outputs"].values()) == {"bfloat16"}
    assert [a["format"] for a in m.adapters] == ["kohya", "kohya"]
    assert _no_doubles(tmp_path / "out" / "transformer" / "model.onnx")


@pytest.mark.slow
def test_real_width_transformer_with_a_kohya_lora_exports_in_bf16(tmp_path):
    """FLUX.1 dev's widths (3072 = 24 heads x 128, T5 4096, CLIP 768, 64 packed channels), 2 double + 2 single
    blocks (1.03 B parameters), a kohya LoRA on every fused and plain layer: bf16 export, validated in ONNX
    Runtime. The model comes from a factory (built in bf16 on demand, freed after its export) and the LoRA's
    shapes from a meta-device copy, so no float32 copy is held beside the export: peak memory stays near
    three float32 copies of the weights (the validation's torch reference, graph and session)."""
    from diffusers import FluxTransformer2DModel

    import export

    config = {"num_layers": 2, "num_single_layers": 2, "guidance_embeds": True}
    with torch.device("meta"):
        shapes = FluxTransformer2DModel(**config)
    file, _ = fused_kohya(shapes, bfl, "lora_unet_", rank=8, seed=40)
    assert "lora_unet_single_blocks_1_linear1.lora_down.weight" in file
    path = _save(file, tmp_path / "kohya.safetensors")

    def build(component, dtype):
        torch.manual_seed(0)
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            return FluxTransformer2DModel(**config).eval()
        finally:
            torch.set_default_dtype(old)

    m = export.export_pipeline(FAMILY, build, [(path, 1.0)], tmp_path / "out", components=["transformer"],
                               dtype="bf16", progress=False)
    entry = m.components["transformer"]
    assert entry["validation"]["passed"], entry["validation"]
    assert len(entry["baked_params"]) > 40
    widths = {i["name"]: i["shape"][-1] for i in entry["inputs"]}
    assert (widths["hidden_states"], widths["encoder_hidden_states"], widths["pooled_projections"]) == (64, 4096, 768)
    assert _no_doubles(tmp_path / "out" / "transformer" / "model.onnx")
