"""diffusers + PEFT as the reference, and model outputs on fixed inputs (test helpers)."""

from __future__ import annotations

import torch


def diffusers_loader(family: str, models: dict):
    """An object with diffusers' own LoRA mixin of the family over these components (the reference)."""
    import diffusers.loaders

    from lora_loaders.families import get_family

    base = getattr(diffusers.loaders, get_family(family).mixin)
    cls = type("RefPipe", (base,), {"hf_device_map": None, "components": property(
        lambda self: {c: getattr(self, c) for c in base._lora_loadable_modules if getattr(self, c) is not None})})
    pipe = cls.__new__(cls)
    for c in base._lora_loadable_modules:
        setattr(pipe, c, models.get(c))
    return pipe


def inputs(family: str, models: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    unet = models["unet"]
    cross = unet.config.cross_attention_dim
    out = {"sample": torch.randn(2, 4, 16, 16, generator=g), "timestep": torch.tensor([3.0, 500.0]),
           "encoder_hidden_states": torch.randn(2, 7, cross, generator=g),
           "input_ids": torch.randint(0, 1000, (2, 12), generator=g)}
    if family == "sdxl":
        out["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g),
                                    "time_ids": torch.randn(2, 6, generator=g)}
    return out


@torch.no_grad()
def outputs(family: str, models: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    if family not in ("sd", "sdxl"):
        return graph_outputs(family, models, seed)
    x = inputs(family, models, seed)
    res = {}
    unet = models.get("unet")
    if unet is not None:
        kw = {"added_cond_kwargs": x["added_cond_kwargs"]} if "added_cond_kwargs" in x else {}
        res["unet"] = unet(x["sample"], x["timestep"], x["encoder_hidden_states"], **kw).sample.float()
    for c in ("text_encoder", "text_encoder_2"):
        if models.get(c) is not None:
            o = models[c](x["input_ids"], output_hidden_states=True)
            res[c] = o.hidden_states[-2].float()
            if hasattr(o, "text_embeds"):
                res[c + ".text_embeds"] = o.text_embeds.float()
    return res


def assert_close(ours: dict, ref: dict, rel: float = 1e-5):
    assert ours.keys() == ref.keys()
    for k in ref:
        scale = ref[k].abs().max().item() + 1e-12
        err = (ours[k] - ref[k]).abs().max().item()
        assert err <= rel * scale, f"{k}: max abs diff {err:.3g} > {rel} x output scale {scale:.3g}"


def assert_differs(a: dict, b: dict, key: str):
    assert (a[key] - b[key]).abs().max().item() > 1e-4, f"{key}: the LoRA had no effect"


@torch.no_grad()
def graph_outputs(family: str, models: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """{component[.output]: tensor} of each component's exported graph (the registry's I/O) on seeded inputs."""
    from export.graph import example_inputs, run_torch
    from lora_loaders.families import get_family

    spec = get_family(family)
    res = {}
    for c, model in models.items():
        if model is None:
            continue
        cspec = spec.component(c)
        feeds = example_inputs(spec, cspec, model, torch.float32, "check", seed=seed)
        for o, value in zip(cspec.outputs, run_torch(cspec, model, feeds)):
            res[c if o is cspec.outputs[0] else f"{c}.{o.name}"] = torch.from_numpy(value)
    return res
