"""Flattened (kohya) module names: `down_blocks_0_attentions_0_proj_in` -> `down_blocks.0.attentions.0.proj_in`."""

from __future__ import annotations

from collections.abc import Iterable

# Multi-word names of diffusers / transformers modules, to un-flatten kohya names when the
# model is not at hand. With the model, names are resolved exactly against its modules.
_VOCAB = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "single_transformer_blocks",
    "to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "proj_in", "proj_out", "proj_mlp", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out",
    "conv_norm_out", "time_embedding", "linear_1", "linear_2", "add_embedding", "text_model",
    "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm", "text_projection",
    "token_embedding", "position_embedding", "layer_norm1", "layer_norm2", "norm_out", "x_embedder",
    "context_embedder", "time_text_embed", "timestep_embedder", "text_embedder", "guidance_embedder",
    "norm_q", "norm_k", "norm_added_q", "norm_added_k", "ff_context", "attn_out", "to_add_out", "pos_embed",
    "time_text_embed", "norm1_context", "condition_embedder", "time_embedder", "time_proj", "image_embedder",
    "patch_embedding", "add_k_proj", "add_v_proj", "SelfAttention", "DenseReluDense", "wi_0", "wi_1",
    "EncDecAttention", "scale_shift_table", "embed_tokens", "layer_norm", "final_layer_norm",
    "linear_in", "linear_out", "to_qkv_mlp_proj", "time_guidance_embed", "double_stream_modulation_img",
    "double_stream_modulation_txt", "single_stream_modulation",
}
_MAX_WORDS = max(len(v.split("_")) for v in _VOCAB)


def unflatten(flat: str, known: dict[str, str] | None = None) -> str:
    """`down_blocks_0_attentions_0_proj_in` -> `down_blocks.0.attentions.0.proj_in`.

    `known` maps flattened names to real module paths (from the model); it wins when it has the name.
    """
    if known and flat in known:
        return known[flat]
    words = flat.split("_")
    out, i = [], 0
    while i < len(words):
        for n in range(min(_MAX_WORDS, len(words) - i), 0, -1):
            candidate = "_".join(words[i : i + n])
            if n == 1 or candidate in _VOCAB:
                out.append(candidate)
                i += n
                break
    return ".".join(out)


def flat_index(module_names: Iterable[str]) -> dict[str, str]:
    """{flattened name: module path}; ambiguous flattenings are left out."""
    index: dict[str, str] = {}
    seen_twice = set()
    for name in module_names:
        flat = name.replace(".", "_")
        if flat in index and index[flat] != name:
            seen_twice.add(flat)
        index[flat] = name
    for flat in seen_twice:
        del index[flat]
    return index
