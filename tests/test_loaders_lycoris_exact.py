"""LyCORIS kinds against their formulas, exact unfuse in fp16/bf16, and read_lora sources."""

import copy

import pytest
import torch
from safetensors.torch import save_file

import lora_loaders as L
from lora_files import lycoris, peft_lora
from reference import diffusers_loader, outputs


def _expected(model, sd, prefix, fn):
    """{param name: expected weight}, computing each module's new weight with `fn` straight from the file."""
    expected = {}
    for name, module in model.named_modules():
        key = prefix + ("text_model." + name if prefix.startswith("lora_te") else name).replace(".", "_")
        if f"{key}.alpha" in sd or f"{key}.diff" in sd:
            expected[name] = fn(module.weight.detach().double(), {k.split(".", 1)[1]: v.double()
                                                                  for k, v in sd.items() if k.split(".")[0] == key})
    return expected


def loha(w, t):
    d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    return w + d.reshape(w.shape) * t["alpha"] / t["hada_w1_b"].shape[0]


def lokr(w, t):
    d = torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"])
    return w + d.reshape(w.shape) * t["alpha"] / t["lokr_w2_b"].shape[0]


def full(w, t):
    return w + t["diff"]


def lora_dora(w, t):
    """LyCORIS apply_weight_decompose with the scale on the output axis, at multiplier 1."""
    merged = w + (t["lora_up.weight"].flatten(1) @ t["lora_down.weight"].flatten(1)).reshape(w.shape) \
        * t["alpha"] / t["lora_down.weight"].shape[0]
    norm = merged.flatten(1).norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps
    return merged * (t["dora_scale"] / norm)


def _kohya_dora(model, seed):
    sd = {}
    g = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        if name.endswith(("to_q", "to_out.0", "ff.net.2")):
            k = "lora_unet_" + name.replace(".", "_")
            sd[f"{k}.lora_down.weight"] = torch.randn(4, m.in_features, generator=g) * 0.2
            sd[f"{k}.lora_up.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.2
            sd[f"{k}.alpha"] = torch.tensor(2.0)
            sd[f"{k}.dora_scale"] = m.weight.detach().norm(dim=1, keepdim=True) * 1.1
    return sd


@pytest.mark.parametrize("kind,fn", [("loha", loha), ("lokr", lokr), ("full", full), ("dora", lora_dora)])
def test_lycoris_kinds_follow_their_formulas(tiny_models, kind, fn):
    models = tiny_models("sdxl")
    unet = models["unet"]
    sd = _kohya_dora(unet, 1) if kind == "dora" else lycoris({"unet": unet}, kind, seed=1)
    expected = _expected(unet, sd, "lora_unet_", fn)
    assert expected
    biases = {name: m.bias.detach().clone() for name, m in unet.named_modules()
              if f"lora_unet_{name.replace('.', '_')}.diff_b" in sd}
    assert bool(biases) == (kind == "full")
    loader = L.loader_for("sdxl", unet=unet)
    loader.load_lora_weights(dict(sd), adapter_name=kind)
    modules = dict(unet.named_modules())
    for name, w in expected.items():
        torch.testing.assert_close(modules[name].weight.double(), w, rtol=1e-5, atol=1e-6)
    for name, b in biases.items():  # diff_b: b + diff_b
        torch.testing.assert_close(modules[name].bias.detach(), b + sd[f"lora_unet_{name.replace('.', '_')}.diff_b"])
    before = outputs("sdxl", tiny_models("sdxl"))
    loader.set_adapters([kind], 0.0)  # weight 0 is the base model again
    torch.testing.assert_close(outputs("sdxl", models)["unet"], before["unet"], rtol=0, atol=0)


def test_text_encoder_lycoris_and_diff_b(tiny_models):
    models = tiny_models("sd")
    te = models["text_encoder"]
    sd = lycoris({"text_encoder": te}, "full", seed=2, prefixes={"text_encoder": "lora_te_"})
    loader = L.loader_for("sd", text_encoder=te)
    base = {n: p.detach().clone() for n, p in te.named_parameters()}
    loader.load_lora_weights(dict(sd), adapter_name="f")
    for k, v in sd.items():
        module = k.split(".")[0].removeprefix("lora_te_text_model_")
        pname = [n for n in base if n.replace(".", "_") == module + ("_weight" if k.endswith(".diff") else "_bias")][0]
        torch.testing.assert_close(dict(te.named_parameters())[pname].detach(), base[pname] + v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unfuse_is_bit_exact_where_diffusers_drifts(tiny_models, dtype):
    models = {k: v.to(dtype) for k, v in tiny_models("sdxl").items()}
    ref = copy.deepcopy(models)
    base = {c: {n: p.detach().clone() for n, p in m.state_dict().items()} for c, m in models.items()}
    sd = {k: v.to(dtype) for k, v in peft_lora(models, seed=3, rank=8).items()}
    sd = {k: v * 8 if "lora_B" in k else v for k, v in sd.items()}  # strong enough to round
    ours = L.loader_for("sdxl", **models)
    ours.load_lora_weights(dict(sd), adapter_name="x")
    ours.fuse_lora()
    ours.unfuse_lora()
    ours.unload_lora_weights()
    for c, m in models.items():
        for n, p in m.state_dict().items():
            assert torch.equal(p.view(torch.int16), base[c][n].view(torch.int16)), f"{c}.{n} not restored"
    # diffusers + PEFT subtract the delta again: the base drifts.
    theirs = diffusers_loader("sdxl", ref)
    theirs.load_lora_weights(dict(sd), adapter_name="x")
    theirs.fuse_lora()
    theirs.unfuse_lora()
    theirs.unload_lora_weights()
    drifted = sum(int((p.view(torch.int16) != base["unet"][n].view(torch.int16)).sum())
                  for n, p in ref["unet"].state_dict().items())
    assert drifted > 0, "diffusers + PEFT restored the base exactly here"


def test_residual_store_matches_full_copies(tiny_models):
    """The memory-light exact restore agrees bit for bit with keeping full base copies."""
    a_models = {k: v.half() for k, v in tiny_models("sd").items()}
    b_models = copy.deepcopy(a_models)
    sd = {k: v.half() * 4 for k, v in peft_lora(a_models, seed=4).items()}
    a = L.loader_for("sd", **a_models)
    b = L.loader_for("sd", **b_models)
    b.keep_base_copies = True
    for loader in (a, b):
        loader.load_lora_weights(dict(sd), adapter_name="x")
        loader.set_adapters("x", 0.7)
        loader.fuse_lora(lora_scale=0.9)
        loader.unfuse_lora()
        loader.set_adapters("x", 1.3)
    for c in a_models:
        for (n, p), q in zip(a_models[c].state_dict().items(), b_models[c].state_dict().values()):
            assert torch.equal(p.view(torch.int16), q.view(torch.int16)), n


def test_read_lora_sources(tiny_models, tmp_path, monkeypatch):
    models = tiny_models("sdxl")
    sd = peft_lora(models, seed=5)
    save_file(sd, tmp_path / "a.safetensors")
    save_file(sd, tmp_path / "pytorch_lora_weights.safetensors")
    by_path = L.read_lora(str(tmp_path / "a.safetensors"), "sdxl")
    by_dir = L.read_lora(tmp_path, "sdxl", weight_name="a.safetensors")
    by_default_name = L.read_lora(tmp_path, "sdxl")
    by_dict = L.read_lora(sd, "sdxl")
    assert by_path.fingerprint() == by_dir.fingerprint() == by_default_name.fingerprint() == by_dict.fingerprint()
    assert by_path.format == "diffusers" and set(by_path.components) == {"unet", "text_encoder", "text_encoder_2"}
    # A hub repo id, served from a local Hugging Face cache (offline).
    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny-lora" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (cache / "models--someone--tiny-lora" / "refs").mkdir()
    (cache / "models--someone--tiny-lora" / "refs" / "main").write_text("0" * 40)
    save_file(sd, snap / "lora.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    by_hub = L.read_lora("someone/tiny-lora", "sdxl", weight_name="lora.safetensors", cache_dir=str(cache),
                         local_files_only=True)
    assert by_hub.fingerprint() == by_path.fingerprint()
    loader = L.loader_for("sdxl", **models)
    loader.load_lora_weights("someone/tiny-lora", weight_name="lora.safetensors", cache_dir=str(cache),
                             local_files_only=True, adapter_name="hub")
    assert loader.get_active_adapters() == ["hub"]
