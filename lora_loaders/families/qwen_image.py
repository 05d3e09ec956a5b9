"""Qwen-Image (`qwen-image`): an MMDiT over packed 2x2 latent patches (`transformer`; the Qwen-Image and
Qwen-Image-Edit configs) and Qwen2.5-VL's language model as text encoder.

Layouts (diffusers module names throughout): diffusers/PEFT under `transformer.`, `diffusion_model.`
or no prefix (PEFT's `.default.` names too), `lora_A/B` or `lora_down/up`, `alpha` applied (alpha / rank)
in every spelling; musubi-tuner's kohya names (`lora_unet_transformer_blocks_0_attn_to_q`); LyCORIS
(`lycoris_`). The text-to-image graph takes and returns latents [batch, channels, height, width],
packed as the pipeline does, the rotary grid from their shape (an Edit model's: below).
Image-to-image and inpainting (QwenImageImg2ImgPipeline, QwenImageInpaintPipeline) add the VAE encoder.

Qwen-Image-Edit (the `edit` variant: QwenImageEditPipeline, QwenImageEditInpaintPipeline) passes the
condition image through the text encoder's vision tower and appends its latent tokens to the
transformer's sequence. Its configs are Qwen-Image's, so the export marks them (`Variant.marks`), and
the marked graphs take it: the transformer the condition latents (`image_latents`, unpacked), the
language model the image embeddings its image tokens stand for, and a third graph, `vision_encoder`,
is the vision tower (pixel patches -> image embeddings). What depends on `image_grid_thw` in Python
(rotary positions, window order, attention segments) is computed beside the graphs, as transformers'
own `vision_utils` does it. The tiny Edit transformer is Edit-2511's (`zero_cond_t`); the earlier Edit
models' (Qwen-Image's config) take the same graph without it. QwenImageEditPlusPipeline's several
condition images are not served (a clear error). Its prompts hold the image's tokens: a 1024 x 1024
condition image makes about 1300 more, beyond the `text` axis' TensorRT range (ONNX Runtime takes any
length).
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from dataclasses import replace

import torch

from .common import (BATCH, IMAGE_AXES, QWEN25_VL_TINY, _hidden, denoiser, hf_encoder, original_prefixes, prediction,
                     sigmas, swapped, text_mask, timestep, vae)
from .spec import IMAGE_TO_IMAGE, INPAINTING, Axis, Cfg, ComponentSpec, FamilySpec, Processor, TensorSpec, Variant

EDIT = "qwen_image_edit"  # the config field `Variant.marks` sets on a Qwen-Image-Edit model's components


def _edit(config) -> bool:
    """A Qwen-Image-Edit model's component (its config marked by the export)."""
    return bool(config.get(EDIT) if isinstance(config, dict) else getattr(config, EDIT, False))


def _rope(self, video_fhw, device=None, max_txt_seq_len=None):
    """QwenEmbedRope for one sample's images (the latents', then an Edit condition image's at frame index 1),
    tables built from real angles: diffusers' own casts the text length to int (fixing it at export) and
    slices complex tables (which ONNX export cannot)."""
    def angles(pos, dim):
        return torch.outer(pos.float(), 1.0 / torch.pow(self.theta, torch.arange(0, dim, 2).float().div(dim)))

    def centred(n):  # scale_rope: positions -n/2 .. n/2 - 1
        return torch.cat([torch.arange(-(n - n // 2), 0), torch.arange(n // 2)]) if self.scale_rope else torch.arange(n)

    imgs, start = [], None
    for index, (frame, height, width) in enumerate(video_fhw[0]):
        f, h, w = (angles(p, d) for p, d in zip((torch.arange(frame) + index, centred(height), centred(width)),
                                                 self.axes_dim))
        grid = (frame, height, width, -1)
        img = torch.cat([f[:, None, None].expand(grid), h[None, :, None].expand(grid), w[None, None].expand(grid)], -1)
        imgs.append(img.reshape(frame * height * width, -1))
        side = torch.sym_max(height // 2, width // 2) if self.scale_rope else torch.sym_max(height, width)
        start = side if start is None else torch.sym_max(start, side)
    txt = torch.cat([angles(torch.arange(max_txt_seq_len) + start, d) for d in self.axes_dim], -1)
    img = torch.cat(imgs) if len(imgs) > 1 else imgs[0]
    return torch.polar(torch.ones_like(img), img), torch.polar(torch.ones_like(txt), txt)


def _text_len(encoder_hidden_states, mask=None):
    """compute_text_seq_len_from_mask without its per-sample lengths (unused by the forward, and
    `torch.as_tensor(length)` there fixes the text length at export)."""
    return encoder_hidden_states.shape[1], None, None if mask is None else mask.bool()


def _pack(x, p: int):
    """The pipeline's `_pack_latents`: [b, c, h, w] -> [b, (h / p) (w / p), c p p]."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def _unpack(tokens, p: int, hp: int, wp: int):
    """`_pack` undone: [b, hp wp, c p p] -> [b, c, hp p, wp p]."""
    b = tokens.shape[0]
    return tokens.reshape(b, hp, wp, -1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, hp * p, wp * p)


def _forward(model, kwargs):
    """The pipeline's `_pack_latents`, the transformer, then `_unpack_latents`; an Edit model's condition
    latents (`image_latents`) packed after the latents, the prediction the latents' tokens. `zero_cond_t`
    (Edit-2511) modulates the condition's tokens with t = 0: its index tensor, which diffusers builds in
    Python from the sizes (fixing them at export), is built in the graph; without condition tokens it is
    the same model, so it is off."""
    x, cond = kwargs.pop("hidden_states"), kwargs.pop("image_latents", None)
    b, _, h, w = x.shape
    p = model.config.patch_size
    tokens, shapes = _pack(x, p), [(1, h // p, w // p)]
    n = tokens.shape[1]
    if cond is not None:
        tokens = torch.cat([tokens, _pack(cond, p)], 1)
        shapes.append((1, cond.shape[2] // p, cond.shape[3] // p))
    zero = cond is not None and bool(model.config.zero_cond_t)
    with ExitStack() as stack:
        for m in (model, *model.transformer_blocks):
            stack.enter_context(swapped(m, "zero_cond_t", False))
        if zero:  # diffusers' zero_cond_t steps: its image modulation over the embeddings of t and of t = 0,
            # the condition's tokens taking the latter (the index it builds in Python, here from the token
            # counts), the rest on t's, without its `chunk`s over the batch (which ONNX export cannot fold)
            index = (torch.arange(tokens.shape[1]) >= n).int()[None].expand(b, -1)
            state = {}
            block, embed, mod = (type(m).forward for m in (model.transformer_blocks[0], model.time_text_embed,
                                                            model.transformer_blocks[0].img_mod))

            def embed_both(self, t, *args):
                state["zero"] = embed(self, t * 0, *args)
                return embed(self, t, *args)

            stack.enter_context(swapped(model.time_text_embed, "forward", embed_both))
            for m in model.transformer_blocks:
                stack.enter_context(swapped(m, "forward", lambda self, *a, **k: block(self, *a, **{
                    **k, "modulate_index": index})))
                stack.enter_context(swapped(m.img_mod, "forward", lambda self, temb: mod(
                    self, torch.cat([temb, state["zero"]]))))
        stack.enter_context(swapped(model.pos_embed, "forward", _rope))
        stack.enter_context(swapped(sys.modules[type(model).__module__], "compute_text_seq_len_from_mask", _text_len))
        out = model(hidden_states=tokens, img_shapes=[shapes], **kwargs)[0]
    return (_unpack(out[:, :n], p, h // p, w // p),)


def _packed(run, args, config):
    """QwenImagePipeline passes packed latents [batch, (h / 2) (w / 2), 4 c] with `img_shapes`: unpacked
    for the graph (its `_pack_latents` undone), the prediction packed back. An Edit pipeline's tokens
    go on with the condition image's (`img_shapes`' second entry): unpacked as the graph's `image_latents`;
    the prediction is the latents' (what the pipeline keeps of it)."""
    shapes = args["img_shapes"][0]
    tokens, (_, hp, wp) = args["hidden_states"], shapes[0]
    p = config.patch_size
    extra = {}
    if len(shapes) > 1:
        if not _edit(config):
            raise ValueError("this export's transformer takes no condition image (QwenImageEditPipeline's): export "
                             "a Qwen-Image-Edit model (its model_index.json names QwenImageEditPipeline; --model "
                             "tiny:edit)")
        if len(shapes) > 2:
            raise ValueError(f"the exported Qwen-Image-Edit transformer takes one condition image, not "
                             f"{len(shapes) - 1} (QwenImageEditPlusPipeline's several are not served)")
        (_, ch, cw), n = shapes[1], hp * wp
        extra = {"image_latents": _unpack(tokens[:, n:n + ch * cw], p, ch, cw)}
        tokens = tokens[:, :n]
    text = args["encoder_hidden_states"]
    mask = args.get("encoder_hidden_states_mask")
    out = run(hidden_states=_unpack(tokens, p, hp, wp), encoder_hidden_states=text, timestep=args["timestep"],
              encoder_hidden_states_mask=torch.ones(text.shape[:2], dtype=torch.int64) if mask is None else mask,
              **extra)
    return (_pack(out["out_sample"], p),)


TRANSFORMER = denoiser(
    "QwenImageTransformer2DModel",
    inputs=(
        TensorSpec("hidden_states", ("batch", Cfg(fn=lambda c: c.in_channels // c.patch_size ** 2), "height", "width"),
                   doc="noisy latents (unpacked)"),
        TensorSpec("encoder_hidden_states", ("batch", "text", Cfg("joint_attention_dim")),
                   doc="Qwen2.5-VL last hidden states, the prompt template's prefix dropped"),
        text_mask("the prompt tokens' attention mask", name="encoder_hidden_states_mask"),
        timestep(sample=sigmas, doc="the pipeline's timestep / 1000"),
        TensorSpec("image_latents", ("batch", Cfg(fn=lambda c: c.in_channels // c.patch_size ** 2), "condition_height",
                                     "condition_width"), when=_edit,
                   doc="an Edit model's condition-image latents (unpacked), their tokens after the latents'"),
    ),
    outputs=(prediction(("batch", Cfg("out_channels"), "height", "width"), doc="predicted velocity (unpacked)"),),
    graph_forward=_forward,
    pipeline_call=_packed,
    tiny=dict(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
              joint_attention_dim=32, axes_dims_rope=(2, 2, 4)),
)


def _text_forward(model, kwargs):
    """Qwen2.5-VL's forward; with `image_embeds` (an Edit model's) those placed at the image tokens, in
    token order (its `masked_scatter`), then the language model at the positions diffusers' call gets
    (it passes no `mm_token_type_ids`, so transformers computes no 3-D rotary positions)."""
    embeds = kwargs.pop("image_embeds", None)
    if embeds is None:
        return model(**kwargs)
    ids = kwargs["input_ids"]
    inputs = model.model.get_input_embeddings()(ids)
    image = ids == model.config.image_token_id
    index = (torch.cumsum(image.reshape(-1).long(), 0) - 1).clamp(0, embeds.shape[0] - 1).reshape(ids.shape)
    inputs = torch.where(image[..., None], embeds[index].to(inputs.dtype), inputs)
    out = model.model.language_model(inputs_embeds=inputs, return_dict=True).last_hidden_state
    return {"last_hidden_state": out, "hidden_states": (out,)}


def _encode(run, args, config):
    """The text encoder's call: input_ids alone (Qwen-Image), or with an Edit pipeline's image
    (pixel_values, image_grid_thw): the vision tower's graph on the patches in its window order, its
    index tensors from `image_grid_thw` as transformers computes them, then the language model's."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    pixels, extra = args.get("pixel_values"), {}
    if pixels is not None:
        if not _edit(config):
            raise ValueError("this export's text encoder takes no image (QwenImageEditPipeline's): export a "
                             "Qwen-Image-Edit model (its model_index.json names QwenImageEditPipeline; --model "
                             "tiny:edit)")
        index = _vision_index(args["image_grid_thw"], config.vision_config)
        order = index.pop("order")
        extra["image_embeds"] = run.graph("vision_encoder")(pixel_values=pixels[order], **index)["image_embeds"]
    out = run(input_ids=args["input_ids"], **extra)["last_hidden_state"]
    result = BaseModelOutputWithPooling(hidden_states=(out,))
    return result if args.get("return_dict", True) is not False else result.to_tuple()


def _vision_index(grid_thw, vision) -> dict:
    """What Qwen2.5-VL's vision tower computes from `image_grid_thw` in Python (transformers' vision_utils),
    as tensors the graph takes: the patch order of its windows, the patches' (row, column) in that order,
    the order undone, and each patch's attention segment (its image; its window) in that order."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    merge = vision.spatial_merge_size
    positions = get_vision_position_ids(grid_thw, merge)
    windows, cu_windows = get_vision_window_index(grid_thw, merge, vision.window_size, vision.patch_size)
    unit = merge * merge  # the window order is over merged tokens, each `unit` consecutive patches
    order = (windows[:, None] * unit + torch.arange(unit)).reshape(-1)
    patches = torch.arange(order.shape[0])
    segments = lambda cu: torch.searchsorted(cu[1:].long(), patches, right=True)
    return {"order": order, "position_ids": positions[order], "window_inverse": torch.argsort(order),
            "image_segments": segments(get_vision_cu_seqlens(grid_thw)), "window_segments": segments(cu_windows)}


def _vision_attention(mask):
    """Qwen2_5_VLVisionAttention.forward over one sequence with a mask of its segments, for its loop over
    `cu_seqlens` chunks (sizes from `.tolist()`, which the graph cannot take)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    def forward(self, hidden_states, cu_seqlens=None, position_embeddings=None, **kwargs):
        n = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        return self.proj(out[0].transpose(0, 1).reshape(n, -1))

    return forward


def _vision_forward(model, kwargs):
    """Qwen2.5-VL's vision tower (`visual.forward`) on patches already in window order: full-attention
    blocks within an image, the others within a window, the order undone before the merger."""
    visual = model.model.visual
    x = visual.patch_embed(kwargs["pixel_values"])
    rotary = visual.rotary_pos_emb(x, kwargs["position_ids"])
    masks = {s: kwargs[f"{s}_segments"][:, None] == kwargs[f"{s}_segments"][None, :] for s in ("image", "window")}
    with ExitStack() as stack:
        for i, block in enumerate(visual.blocks):
            mask = masks["image" if i in visual.fullatt_block_indexes else "window"]
            stack.enter_context(swapped(block.attn, "forward", _vision_attention(mask)))
        for block in visual.blocks:
            x = block(x, cu_seqlens=None, position_embeddings=rotary)
    return (visual.merger(x[kwargs["window_inverse"]]),)


def _patch_dim(config) -> int:
    v = config.vision_config
    return v.in_channels * v.temporal_patch_size * v.patch_size ** 2


_PATCHES = lambda name, doc: TensorSpec(name, ("patches",), dtype="int64", doc=doc)
TEXT_ENCODER = replace(
    hf_encoder("text_encoder", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", QWEN25_VL_TINY,
               output=("last_hidden_state", "hidden_states.-1")),
    graph_forward=_text_forward, pipeline_call=_encode)
TEXT_ENCODER = replace(TEXT_ENCODER, inputs=(*TEXT_ENCODER.inputs, TensorSpec(
    "image_embeds", ("image_tokens", Cfg(fn=_hidden)), when=_edit,
    doc="an Edit model's image embeddings (the vision_encoder's), one per image token")))
# an Edit model's vision tower: the text encoder's (its folder and weights), a graph of its own
VISION_ENCODER = ComponentSpec(
    name="vision_encoder", library="transformers", class_name="Qwen2_5_VLForConditionalGeneration",
    role="text_encoder", lora=False, export=False, when=_edit, subfolder="text_encoder", method="get_image_features",
    tiny=QWEN25_VL_TINY, config_class="Qwen2_5_VLConfig", graph_forward=_vision_forward,
    inputs=(TensorSpec("pixel_values", ("patches", Cfg(fn=_patch_dim)), doc="the processor's patches, in window order"),
            TensorSpec("position_ids", ("patches", 2), dtype="int64", doc="each patch's (row, column)"),
            TensorSpec("window_inverse", ("patches",), dtype="int64", doc="the window order undone",
                       sample=lambda shape, g, ctx: torch.arange(shape[0])),
            _PATCHES("image_segments", "each patch's image (full-attention blocks)"),
            _PATCHES("window_segments", "each patch's window (the other blocks)")),
    outputs=(TensorSpec("image_embeds", ("image_tokens", Cfg(fn=lambda c: c.vision_config.out_hidden_size)),
                        source="0", doc="one embedding per image token (merged patches)"),),
)
# the tiny Qwen2.5-VL's vision tokens: a byte-level tokenizer's 514 ids, then these four
VISION_TOKENS = {"vision_start_token_id": 514, "vision_end_token_id": 515, "image_token_id": 516,
                 "video_token_id": 517}
# its Edit vision tower: a windowed block then a full-attention one, 2 x 2 patches merged (as the real
# one), windows of 2 x 2 merged tokens
EDIT_VISION = {**QWEN25_VL_TINY["vision_config"], "depth": 2, "fullatt_block_indexes": [1], "spatial_merge_size": 2,
               "window_size": 8}
EDIT_TEXT_TINY = {**VISION_TOKENS, "vision_config": EDIT_VISION}


def _tiny_processor(path, tiny_tokenizer) -> None:
    """The tiny Qwen2VLProcessor's files, written without building one (which, from transformers 5, takes a
    video processor that needs torchvision): the byte-level tiny tokenizer with the vision tokens, the
    image processor at the tiny vision tower's patch sizes, few pixels."""
    import json

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = tiny_tokenizer(path)
    tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                          "<|video_pad|>"]})
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                   "<|video_pad|>")]
    if ids != sorted(VISION_TOKENS.values()):  # the tiny text encoder's config names these ids
        raise RuntimeError(f"the tiny tokenizer gave the vision tokens ids {ids}, not {sorted(VISION_TOKENS.values())}")
    tok.save_pretrained(path)
    v = EDIT_VISION
    Qwen2VLImageProcessorPil(patch_size=v["patch_size"], merge_size=v["spatial_merge_size"],
                             temporal_patch_size=v["temporal_patch_size"], min_pixels=64, max_pixels=320
                             ).save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}) + "\n")


def _vae(latent: tuple, image: tuple) -> tuple:
    """Both VAE halves (`common.vae`); the encoder's latent channels are the config's `z_dim`."""
    decoder, encoder = vae(latent, image, dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                                               temperal_downsample=[False], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                               latents_std=[1.5, 0.8, 1.2, 2.0]), "AutoencoderKLQwenImage")
    params = replace(encoder.outputs[0], dims=(image[0], Cfg(fn=lambda c: 2 * c.z_dim), *latent[2:]))
    return decoder, replace(encoder, outputs=(params,))


EDIT_TINY = {"zero_cond_t": True}  # Qwen-Image-Edit-2511's transformer (earlier Edit configs equal Qwen-Image's)

QWEN_IMAGE = FamilySpec(
    name="qwen-image", mixin="QwenImageLoraLoaderMixin", pipeline="QwenImagePipeline",
    components={
        "transformer": TRANSFORMER,
        # the pipeline reads the language model's last hidden states; the vision tower is a graph of its
        # own, exported for Edit models only (their pipelines pass the condition image through it)
        "text_encoder": TEXT_ENCODER,
        "vision_encoder": VISION_ENCODER,
        # its causal 3D VAE (Wan's, per-channel latent statistics) on one frame: an image is one chunk;
        # the encoder (image-to-image, inpainting) gives the mean and log-variance of z_dim channels each
        **{c.name: c for c in _vae(("batch", Cfg("z_dim"), 1, "height", "width"),
                                   ("batch", Cfg("input_channels"), 1, "image_height", "image_width"))},
    },
    tasks={IMAGE_TO_IMAGE: ("QwenImageImg2ImgPipeline", "QwenImageEditPipeline"),
           INPAINTING: ("QwenImageInpaintPipeline", "QwenImageEditInpaintPipeline")},
    variants={
        # Qwen-Image-Edit (tiny: Edit-2511's zero_cond_t): its configs marked, its vision tower exported;
        # the processor is its Qwen2VLProcessor (the tiny one: vision tokens at ids 514-517)
        "edit": Variant("QwenImageEditPipeline",
                        tiny={"transformer": EDIT_TINY, "text_encoder": EDIT_TEXT_TINY,
                              "vision_encoder": EDIT_TEXT_TINY},
                        marks={c: {EDIT: True} for c in ("transformer", "text_encoder", "vision_encoder")},
                        processors={"processor": Processor("transformers", "Qwen2VLProcessor",
                                                           write=_tiny_processor)},
                        tasks={IMAGE_TO_IMAGE: "QwenImageEditPipeline", INPAINTING: "QwenImageEditInpaintPipeline"}),
    },
    scheduler=("FlowMatchEulerDiscreteScheduler", dict(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")),
    axes={
        **IMAGE_AXES,
        "batch": BATCH,
        "height": Axis(32, 128, 256, example=8, check=12),  # latents (pixels / 8), multiples of the patch size 2
        "width": Axis(32, 128, 256, example=12, check=6),
        "text": Axis(1, 256, 1058, example=6, check=9),  # prompt tokens (the template adds 34 to the encoder's)
        # an Edit model's condition image: its latents (pixels / 8), its patches and image tokens (merged
        # patches) in the vision tower
        "condition_height": Axis(32, 128, 256, example=6, check=10),
        "condition_width": Axis(32, 128, 256, example=10, check=8),
        "patches": Axis(4, 4096, 16384, example=8, check=12),
        "image_tokens": Axis(1, 1024, 4096, example=2, check=3),
    },
    namespaces=original_prefixes(lycoris=True),
    # every module a Qwen-Image LoRA may name (its attention names are Flux's and SD3's too)
    markers=(r"^transformer\.transformer_blocks\.\d+\.(attn|img_mlp|txt_mlp|img_mod|txt_mod)\.",
             r"^transformer\.(img_in|txt_in|proj_out|norm_out|time_text_embed)\b", r"\.(img|txt)_(mlp|mod)\."),
)

FAMILIES = (QWEN_IMAGE,)
