"""HiDream-I1 (`hidream`): a dual/single-stream DiT with mixture-of-experts feed-forwards
(`transformer`); CLIP-L and CLIP-G (pooled), T5 and Llama 3.1 (every layer's hidden states).

Layouts, all in diffusers module names (HiDream's original names are the same): diffusers/PEFT
under `transformer.` (also OneTrainer's OMI files: `lora_down/up`, `alpha`, DoRA `dora_scale`)
or `diffusion_model.` (ComfyUI, ai-toolkit); OneTrainer's legacy flat `lora_transformer_`
names; LyCORIS (`lycoris_`: LoKr, LoHa, ...). The graph patchifies the latents from their shape
(the pipeline's square-latent path, which pads nothing), unpatchifies the batch at once and runs
the experts densely (routed experts weighted, the others weight 0): diffusers loops over the
batch and the experts in Python, on tensor values.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack

import torch

from .common import (BATCH, CLIP_TINY, IMAGE_AXES, LLAMA_TINY, OUT_CHANNELS, T5_TINY, VAE_TINY, clip, denoiser,
                     hf_encoder, image_vae, original_prefixes, prediction, swapped, timestep)
from .spec import Axis, Cfg, FamilySpec, Namespace, TensorSpec


def _dense_moe(self, x):
    idx, weight, _ = self.gate(x)
    flat = x.reshape(-1, x.shape[-1])
    gates = torch.zeros(flat.shape[0], len(self.experts), dtype=weight.dtype).scatter(1, idx, weight)
    y = sum(gates[:, i, None] * expert(flat) for i, expert in enumerate(self.experts))
    return y.reshape(x.shape) + self.shared_experts(x)


def _unpatchify(self, x, img_sizes, is_training):
    (h, w), p = img_sizes, self.config.patch_size
    return x.reshape(x.shape[0], h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], -1, h * p, w * p)


def _forward(model, kwargs):
    x = kwargs.pop("hidden_states")
    b, c, h, w = x.shape
    p = model.config.patch_size
    h, w = h // p, w // p
    tokens = x.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, p * p * c)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(),
                                     indexing="ij"), -1).reshape(1, h * w, 3).expand(b, -1, -1)
    with ExitStack() as stack:
        stack.enter_context(swapped(model, "unpatchify", _unpatchify))
        for m in model.modules():
            if type(m).__name__ == "MOEFeedForwardSwiGLU":
                stack.enter_context(swapped(m, "forward", _dense_moe))
        return model(hidden_states=tokens, hidden_states_masks=torch.ones(b, h * w, dtype=x.dtype), img_ids=ids,
                     img_sizes=(h, w), **kwargs)


def _llama_states(values, config):
    """What HiDreamImagePipeline reads from Llama (`hidden_states[1:]`, then stacked), from the
    graph's stacked output."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return BaseModelOutputWithPast(hidden_states=(None, *values["hidden_states"].unbind(0)))


_LLAMA = dataclasses.replace(  # as the pipeline gives them to the transformer: every layer's hidden states, stacked
    hf_encoder("text_encoder_4", "LlamaForCausalLM", "LlamaConfig", LLAMA_TINY, seq="llama_text",
               output=("hidden_states", "hidden_states"), mask=True),  # the pipeline pads and masks
    graph_forward=lambda model, kwargs: (torch.stack(model(**kwargs).hidden_states[1:]),),
    pipeline_output=_llama_states,
    outputs=(TensorSpec("hidden_states", (Cfg("num_hidden_layers"), "batch", "llama_text", Cfg("hidden_size")),
                        source="0", doc="every decoder layer's output (not the embeddings')"),))

TRANSFORMER = denoiser(
    "HiDreamImageTransformer2DModel",
    inputs=(
        TensorSpec("hidden_states", ("batch", Cfg("in_channels"), "height", "width"), doc="noisy latents"),
        timestep("timesteps"),
        TensorSpec("encoder_hidden_states_t5", ("batch", "text", Cfg("caption_channels", index=0)), doc="T5 last hidden states"),
        TensorSpec("encoder_hidden_states_llama3", (Cfg(fn=lambda c: max(c.llama_layers) + 1), "batch", "llama_text",
                                                    Cfg("caption_channels", index=1)),
                   doc="Llama's per-layer hidden states (text_encoder_4's output)"),
        TensorSpec("pooled_embeds", ("batch", Cfg("text_emb_dim")), doc="CLIP-L and CLIP-G text_embeds, concatenated"),
    ),
    outputs=(prediction(("batch", OUT_CHANNELS, "height", "width")),),
    graph_forward=_forward,
    tiny=dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
              num_attention_heads=2, caption_channels=(32, 32), text_emb_dim=64, num_routed_experts=2,
              num_activated_experts=1, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1)),
)

_POOLED = (("text_embeds", "text_embeds"),)
# the pipeline pads its prompt for CLIP to max_sequence_length (default 128; its CLIPs hold 248 positions)
_CLIP = dict(seq=Cfg(fn=lambda c: min(128, c.max_position_embeddings)), padded="padded to 128",
             tiny={**CLIP_TINY, "max_position_embeddings": 128})
HIDREAM = FamilySpec(
    name="hidream", mixin="HiDreamImageLoraLoaderMixin", pipeline="HiDreamImagePipeline",
    components={
        "transformer": TRANSFORMER,
        "text_encoder": clip("text_encoder", "CLIPTextModelWithProjection", _POOLED, lora=False, **_CLIP),
        "text_encoder_2": clip("text_encoder_2", "CLIPTextModelWithProjection", _POOLED, lora=False,
                               tiny={**_CLIP["tiny"], "hidden_size": 48, "intermediate_size": 60},
                               **{k: v for k, v in _CLIP.items() if k != "tiny"}),
        "text_encoder_3": hf_encoder("text_encoder_3", "T5EncoderModel", "T5Config", T5_TINY, mask=True),
        "text_encoder_4": _LLAMA,
        # the Flux VAE: 16 latent channels (tiny: 4)
        **image_vae({**VAE_TINY, "shift_factor": 0.1159, "scaling_factor": 0.3611, "use_quant_conv": False,
                     "use_post_quant_conv": False}),
    },
    scheduler=("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0)),
    axes={
        **IMAGE_AXES,
        "batch": BATCH,
        "height": Axis(32, 128, 128, example=8, check=12),  # latents (pixels / 8), up to max_resolution
        "width": Axis(32, 128, 128, example=12, check=6),
        "text": Axis(1, 128, 128, example=6, check=9),  # T5 tokens
        "llama_text": Axis(1, 128, 128, example=5, check=7),  # Llama tokens
    },
    namespaces=(*original_prefixes(kohya=False, lycoris=True),
                Namespace("lora_transformer_", "transformer", flat=True, format="onetrainer")),
    markers=(r"double_stream_blocks", r"single_stream_blocks", r"\.ff_i\.experts\.",
             r"^transformer\.(t_embedder|p_embedder|x_embedder\.proj|caption_projection|final_layer)\."),
)

FAMILIES = (HIDREAM,)
