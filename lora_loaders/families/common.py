"""Pieces several family entries share: text encoders, example-value samplers, axes."""

from __future__ import annotations

import torch

from .spec import Axis, Cfg, ComponentSpec, TensorSpec

CLIP_SEQ = Cfg(fn=lambda c: min(77, c.max_position_embeddings))
BATCH = Axis(1, 2, 8, example=2, check=1)


def timesteps(shape, g, ctx) -> torch.Tensor:
    """Integer-valued diffusion timesteps in [0, 999], as float32."""
    return (torch.rand(shape, generator=g) * 999).round()


def token_ids(shape, g, ctx) -> torch.Tensor:
    """Token ids inside the model's vocabulary, the last one the end-of-text token when it fits."""
    cfg = ctx.config
    vocab = int(cfg.vocab_size)
    ids = torch.randint(0, vocab, shape, generator=g)
    eos = getattr(cfg, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    # A config whose eos_token_id lies outside the vocabulary (seen in exported CLIP configs)
    # would index past the embedding table.
    ids[..., -1] = eos if isinstance(eos, int) and 0 <= eos < vocab else vocab - 1
    return ids


def clip(name: str, class_name: str, outputs: tuple[tuple[str, str], ...], lora: bool = True,
         tiny: dict | None = None) -> ComponentSpec:
    """A CLIP text encoder: `input_ids` [batch, 77] -> `outputs` ((name, source), ...)."""
    dims = {"last_hidden_state": ("batch", CLIP_SEQ, Cfg("hidden_size")),
            "hidden_states": ("batch", CLIP_SEQ, Cfg("hidden_size")),
            "pooler_output": ("batch", Cfg("hidden_size")),
            "text_embeds": ("batch", Cfg("projection_dim"))}
    return ComponentSpec(
        name=name, library="transformers", class_name=class_name, role="text_encoder", lora=lora,
        inputs=(TensorSpec("input_ids", ("batch", CLIP_SEQ), dtype="int64", sample=token_ids,
                           doc="token ids from the family's CLIP tokenizer, padded to 77"),),
        outputs=tuple(TensorSpec(n, dims[n], source=s) for n, s in outputs),
        call_kwargs={"output_hidden_states": True, "return_dict": True},
        tiny=tiny or CLIP_TINY, config_class="CLIPTextConfig", aliases=("text_model.",),
        # attention-processor era text-encoder names (`to_q_lora`) -> CLIP's
        renames=((r"\.self_attn\.to_(q|k|v)$", r".self_attn.\1_proj"), (r"\.self_attn\.to_out\.0$", ".self_attn.out_proj")),
    )


def hf_encoder(name: str, class_name: str, config_class: str, tiny: dict, seq: str = "text",
               lora: bool = False) -> ComponentSpec:
    """A Hugging Face text encoder (T5, UMT5, Gemma, Qwen, ...): `input_ids` [batch, seq] -> last hidden state."""
    return ComponentSpec(
        name=name, library="transformers", class_name=class_name, role="text_encoder", lora=lora,
        inputs=(TensorSpec("input_ids", ("batch", seq), dtype="int64", sample=token_ids,
                           doc="token ids from the family's tokenizer"),),
        outputs=(TensorSpec("last_hidden_state", ("batch", seq, Cfg(fn=_hidden)), source="last_hidden_state"),),
        call_kwargs={"return_dict": True}, tiny=tiny, config_class=config_class,
    )


def _hidden(config) -> int:
    return int(getattr(config, "d_model", None) or config.hidden_size)


CLIP_TINY = dict(
    vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, projection_dim=32, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
T5_TINY = dict(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
               relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
