"""Bad input gets a clear error naming what and where, and leaves the model unchanged."""

import pytest
import torch
from safetensors.torch import save_file

import lora_loaders as L
from lora_files import kohya_lora, peft_lora


def _snapshot(models):
    return {c: {n: p.detach().clone() for n, p in m.state_dict().items()} for c, m in models.items()}


def _unchanged(models, snap):
    for c, m in models.items():
        for n, p in m.state_dict().items():
            bits, before = p.flatten().view(torch.uint8), snap[c][n].flatten().view(torch.uint8)
            assert torch.equal(bits, before), f"{c}.{n} changed by a failed call"  # bits: NaN-safe


@pytest.fixture
def sdxl(tiny_models):
    models = tiny_models("sdxl")
    loader = L.loader_for("sdxl", **models)
    loader.load_lora_weights(peft_lora(models, seed=1), adapter_name="ok")
    return models, loader, _snapshot(models)


def test_unknown_key_names_it_and_the_closest_modules(sdxl):
    models, loader, snap = sdxl
    sd = peft_lora(models, seed=2)
    bad = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_qq"
    sd[f"{bad}.lora_A.weight"] = torch.zeros(4, 64)
    sd[f"{bad}.lora_B.weight"] = torch.zeros(64, 4)
    with pytest.raises(L.LoraKeyError) as e:
        loader.load_lora_weights(sd, adapter_name="bad")
    msg = str(e.value)
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_qq" in msg
    assert "closest: down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" in msg
    assert loader.get_list_adapters()["unet"] == ["ok"]
    _unchanged(models, snap)


def test_shape_mismatch_names_module_and_shapes(sdxl):
    models, loader, snap = sdxl
    sd = peft_lora({"unet": models["unet"]}, seed=2)
    key = next(k for k in sd if k.endswith("attn1.to_q.lora_B.weight"))
    sd[key] = torch.zeros(sd[key].shape[0] + 3, sd[key].shape[1])
    with pytest.raises(ValueError, match=r"(?s)shape mismatch.*attn1\.to_q: LoRA delta \(67, \d+\) vs weight \(64, \d+\)"):
        loader.load_lora_weights(sd, adapter_name="bad")
    _unchanged(models, snap)


def test_file_for_another_family_says_which(tiny_models, tmp_path):
    sdxl_models = tiny_models("sdxl")
    path = tmp_path / "sdxl.safetensors"
    save_file(peft_lora(sdxl_models, seed=3), path)
    sd_models = tiny_models("sd")
    snap = _snapshot(sd_models)
    with pytest.raises(ValueError, match="looks like a LoRA for sdxl, not for 'sd'"):
        L.loader_for("sd", **sd_models).load_lora_weights(str(path))
    _unchanged(sd_models, snap)
    kohya = kohya_lora(sdxl_models, seed=3)  # lora_te2_ keys
    with pytest.raises(KeyError, match="looks like a LoRA for sdxl"):
        L.read_lora(kohya, "sd")
    with pytest.raises(ValueError, match="looks like a LoRA for sd, not for 'sdxl'"):
        L.read_lora(peft_lora({"unet": sd_models["unet"]}, seed=4), "sdxl")


def test_no_lora_keys(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"unet.conv_in.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match=r"model\.safetensors: no LoRA keys found.*unet\.conv_in\.weight"):
        L.read_lora(str(path), "sdxl")
    save_file({}, tmp_path / "empty.safetensors")
    with pytest.raises(ValueError, match="holds no tensors"):
        L.read_lora(str(tmp_path / "empty.safetensors"), "sdxl")


def test_truncated_and_corrupt_files(tiny_models, tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(peft_lora(tiny_models("sd"), seed=5), good)
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(L.LoraFileError, match=r"trunc\.safetensors is truncated"):
        L.read_lora(str(tmp_path / "trunc.safetensors"), "sd")
    corrupt = bytearray(data)
    corrupt[8:12] = b"\xff\xfe{["
    (tmp_path / "corrupt.safetensors").write_bytes(bytes(corrupt))
    with pytest.raises(L.LoraFileError, match=r"corrupt\.safetensors has a corrupt safetensors header"):
        L.read_lora(str(tmp_path / "corrupt.safetensors"), "sd")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(L.LoraFileError, match="too short"):
        L.read_lora(str(tmp_path / "tiny.safetensors"), "sd")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        L.read_lora(str(tmp_path / "missing.safetensors"), "sd")


def test_pickles_refused_unless_opted_in(tiny_models, tmp_path):
    sd = peft_lora(tiny_models("sd"), seed=6)
    path = tmp_path / "lora.bin"
    torch.save(sd, path)
    with pytest.raises(L.LoraFileError, match="pickled checkpoint; refusing"):
        L.read_lora(str(path), "sd")
    adapter = L.read_lora(str(path), "sd", allow_pickle=True)  # loaded with weights_only=True
    assert adapter.fingerprint() == L.read_lora(sd, "sd").fingerprint()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(L.LoraFileError, match="cannot load pickled checkpoint"):
        L.read_lora(str(tmp_path / "evil.bin"), "sd", allow_pickle=True)


def test_nan_in_a_file_is_refused_naming_the_key(sdxl):
    models, loader, snap = sdxl
    sd = peft_lora({"unet": models["unet"]}, seed=7)
    key = next(k for k in sd if k.endswith("attn2.to_k.lora_B.weight"))
    sd[key][0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"{key} holds NaN or Inf values"):
        loader.load_lora_weights(sd, adapter_name="nan")
    assert "nan" not in loader.get_list_adapters()["unet"]
    _unchanged(models, snap)


def test_safe_fusing_names_adapter_and_module_and_writes_nothing(sdxl):
    models, loader, _ = sdxl
    sd = peft_lora({"unet": models["unet"]}, seed=7)
    key = next(k for k in sd if k.endswith("attn2.to_k.lora_B.weight"))
    sd[key][0, 0] = 3e38  # finite in the file; the product overflows float32
    sd[key.replace("lora_B", "lora_A")][:] = 3e38
    loader.load_lora_weights(sd, adapter_name="nan")
    snap = _snapshot(models)
    module = key.removeprefix("unet.").removesuffix(".lora_B.weight")
    with pytest.raises(ValueError, match=rf"adapter 'nan' gives NaN or Inf weights in unet\.{module}"):
        loader.fuse_lora(safe_fusing=True)
    assert loader.num_fused_loras == 0
    _unchanged(models, snap)
    loader_state = loader._lora
    assert not loader_state.fused


def test_unknown_names_and_components(sdxl):
    models, loader, snap = sdxl
    with pytest.raises(ValueError, match=r"\['nope'\] not in the list of present adapters"):
        loader.set_adapters(["nope"])
    with pytest.raises(ValueError, match="not in the list of present adapters"):
        loader.delete_adapters("nope")
    with pytest.raises(ValueError, match="not LoRA-loadable"):
        loader.fuse_lora(components=["vae"])
    with pytest.raises(ValueError, match="already in use"):
        loader.load_lora_weights(peft_lora(models, seed=1), adapter_name="ok")
    with pytest.raises(ValueError, match="unknown family 'sdx'"):
        L.loader_for("sdx")
    _unchanged(models, snap)
