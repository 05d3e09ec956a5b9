"""Z-Image (`z-image`): a single-stream DiT with noise and caption refiners (`transformer`) and Qwen3.

Layouts: diffusers/PEFT under `transformer.`, `diffusion_model.` (ai-toolkit) or no prefix
(LyCORIS LoKr files), in diffusers names or Z-Image's original ones (fused `attention.qkv`,
`attention.out`, `x_embedder`, `final_layer`: ComfyUI, musubi-tuner's ComfyUI export); musubi-tuner's
kohya names (`lora_unet_layers_0_attention_to_q`); LyCORIS (`lycoris_`). The graph runs the
batch as one tensor [batch, channels, height, width]: diffusers' forward takes Python lists
and pads each sample in loops; here every sample has the same size, padded the same way.
"""

from __future__ import annotations

import torch

from .common import (BATCH, IMAGE_AXES, VAE_TINY, denoiser, hf_encoder, image_vae, original_prefixes, prediction,
                     rope_table, sigmas, timestep)
from .spec import Axis, Cfg, FamilySpec, NameTable, Rule, Split, TensorSpec

_B = r"(layers|noise_refiner|context_refiner)\.(\d+)\.attention"
ORIGINAL = NameTable(rules=(
    Rule(rf"{_B}\.qkv", Split((r"\1.\2.attention.to_q", r"\1.\2.attention.to_k", r"\1.\2.attention.to_v"))),
    Rule(rf"{_B}\.out", r"\1.\2.attention.to_out.0"),
    Rule(rf"{_B}\.(q|k)_norm", r"\1.\2.attention.norm_\3"),
    Rule(r"x_embedder", "all_x_embedder.2-1"),
    Rule(r"final_layer\.linear", "all_final_layer.2-1.linear"),
    Rule(r"final_layer\.adaLN_modulation\.1", "all_final_layer.2-1.adaLN_modulation.1"),
))
SEQ_MULTIPLE = 32  # diffusers' SEQ_MULTI_OF: each sample's image and caption tokens are padded to it


def _forward(model, kwargs):
    """ZImageTransformer2DModel.forward (basic mode) for a batch of equal-size samples."""
    x, t, cap = kwargs["x"], kwargs["t"], kwargs["cap_feats"]
    p, pf = model.all_patch_size[0], model.all_f_patch_size[0]
    key = f"{p}-{pf}"
    b, c, hh, ww = x.shape
    h, w = hh // p, ww // p
    adaln = model.t_embedder(t * model.t_scale).type_as(x)
    # the rotary tables, not the model's lazily cached ones: made while tracing they would be
    # folded into the graph or not depending on whether the model ran before (refits then differ)
    tables = type(model.rope_embedder).precompute_freqs_cis(model.axes_dims, model.axes_lens, model.rope_theta)

    def rope(ids):
        return torch.cat([table[ids[:, i]] for i, table in enumerate(tables)], -1).unsqueeze(0).expand(b, -1, -1)

    n_cap = cap.shape[1]
    cap_len = n_cap + (-n_cap) % SEQ_MULTIPLE
    n_img = h * w
    img_pad = (-n_img) % SEQ_MULTIPLE
    # rotary positions: caption (1 + i, 0, 0) for every padded caption token; image (cap_len + 1, y, x), padding 0
    cap_ids = torch.stack([torch.arange(1, cap_len + 1), torch.zeros(cap_len, dtype=torch.long),
                           torch.zeros(cap_len, dtype=torch.long)], -1)
    grid = torch.meshgrid(torch.arange(cap_len + 1, cap_len + 2), torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.cat([torch.stack(grid, -1).reshape(n_img, 3), torch.zeros(img_pad, 3, dtype=torch.long)])
    tokens = x.reshape(b, c, 1, h, p, w, p).permute(0, 2, 3, 5, 4, 6, 1).reshape(b, n_img, p * p * c)
    img = model.all_x_embedder[key](tokens)
    img = torch.cat([img, model.x_pad_token.to(img.dtype).expand(b, img_pad, -1)], 1)
    img_freqs = rope(img_ids)
    for layer in model.noise_refiner:
        img = layer(img, None, img_freqs, adaln)
    txt = model.cap_embedder(cap)
    txt = torch.cat([txt, model.cap_pad_token.to(txt.dtype).expand(b, cap_len - n_cap, -1)], 1)
    txt_freqs = rope(cap_ids)
    for layer in model.context_refiner:
        txt = layer(txt, None, txt_freqs)
    seq, freqs = torch.cat([img, txt], 1), torch.cat([img_freqs, txt_freqs], 1)
    for layer in model.layers:
        seq = layer(seq, None, freqs, adaln)
    out = model.all_final_layer[key](seq, c=adaln)[:, :n_img]
    return (out.reshape(b, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(b, -1, hh, ww),)


def _per_sample(run, args, config):
    """ZImagePipeline's call: lists of per-sample latents [C, 1, H, W] and captions [L, D] (the prompt's
    and the negative prompt's of different lengths): one graph run per sample, the outputs back as
    the list the pipeline reads."""
    t = args["t"].reshape(-1)
    outs = []
    for i, (x, cap) in enumerate(zip(args["x"], args["cap_feats"])):
        out = run(x=x[None, :, 0], t=t[i:i + 1] if t.numel() > 1 else t, cap_feats=cap[None])
        outs.append(out["out_sample"][0, :, None])
    return (outs,)


TRANSFORMER = denoiser(
    "ZImageTransformer2DModel",
    inputs=(
        TensorSpec("x", ("batch", Cfg("in_channels"), "height", "width"), doc="noisy latents"),
        timestep("t", sample=sigmas, doc="the pipeline's (1000 - timestep) / 1000"),
        TensorSpec("cap_feats", ("batch", "text", Cfg("cap_feat_dim")), doc="Qwen3's second-to-last hidden states"),
    ),
    outputs=(prediction(("batch", Cfg("in_channels"), "height", "width"), doc="the model output (the pipeline negates it)"),),
    graph_forward=_forward,
    pipeline_call=_per_sample,
    tiny=dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
              n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=(4, 6, 6), axes_lens=(256, 64, 64)),
    # rotary tables of axes_lens positions: the caption (padded to a multiple of 32) at 1 .. n and the
    # image at n + 1 on the first, patch rows and columns on the others
    bounds=rope_table("axes_lens", text=lambda c: (c.axes_lens[0] - 2) // 32 * 32,
                      height=lambda c: c.axes_lens[1] * c.all_patch_size[0],
                      width=lambda c: c.axes_lens[2] * c.all_patch_size[0]),
)

Z_IMAGE = FamilySpec(
    name="z-image", mixin="ZImageLoraLoaderMixin", pipeline="ZImagePipeline",
    components={
        "transformer": TRANSFORMER,
        "text_encoder": hf_encoder("text_encoder", "Qwen3Model", "Qwen3Config", dict(
            vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=256),
            output=("hidden_states", "hidden_states.-2"), seq="prompt"),  # the pipeline's prompt embeddings
        # the Flux VAE: 16 latent channels (tiny: 4)
        **image_vae({**VAE_TINY, "shift_factor": 0.1159, "scaling_factor": 0.3611, "use_quant_conv": False,
                     "use_post_quant_conv": False}),
    },
    scheduler=("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0)),
    tasks={"image-to-image": ("ZImageImg2ImgPipeline",), "inpainting": ("ZImageInpaintPipeline",)},
    axes={
        **IMAGE_AXES,
        "batch": BATCH,
        # the prompt as tokenized (padded to max_sequence_length, 512): the causal Qwen3 needs no mask
        # for the real tokens, which the pipeline then selects as the caption (`text`)
        "prompt": Axis(1, 512, 512, example=7, check=10),
        "height": Axis(32, 128, 256, example=8, check=12),  # latents (pixels / 8), multiples of the patch size 2
        "width": Axis(32, 128, 256, example=12, check=6),
        "text": Axis(1, 256, 512, example=6, check=9),  # caption tokens
    },
    namespaces=original_prefixes(ORIGINAL, lycoris=True),
    markers=(r"\.(noise|context)_refiner\.", r"all_(x_embedder|final_layer)", r"^transformer\.(cap|t)_embedder\.",
             r"^transformer\.layers\.\d+\.(attention|feed_forward\.w[123]|adaLN_modulation)\."),
)

FAMILIES = (Z_IMAGE,)
