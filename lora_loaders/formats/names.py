"""Module-name translation shared by the converters: flattened (kohya) names and SGM blocks."""

from __future__ import annotations

import re
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
    "norm_q", "norm_k", "norm_added_q", "norm_added_k", "ff_context", "attn_out",
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


# ---- SGM (original Stable Diffusion / kohya SDXL) UNet names -> diffusers names ----

_SGM_TOP = [
    (r"^input_blocks_0_0_", "conv_in_"),
    (r"^time_embed_0_", "time_embedding_linear_1_"),
    (r"^time_embed_2_", "time_embedding_linear_2_"),
    (r"^label_emb_0_0_", "add_embedding_linear_1_"),
    (r"^label_emb_0_2_", "add_embedding_linear_2_"),
    (r"^out_0_", "conv_norm_out_"),
    (r"^out_2_", "conv_out_"),
]
_SGM_RESNET = [
    ("in_layers_0", "norm1"), ("in_layers_2", "conv1"), ("out_layers_0", "norm2"),
    ("out_layers_3", "conv2"), ("emb_layers_1", "time_emb_proj"), ("skip_connection", "conv_shortcut"),
]
_SGM_BLOCK = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$")
_SGM_MIDDLE = re.compile(r"^middle_block_(\d+)_(.+)$")


def sgm_to_diffusers(flat: str, layers_per_block: int) -> str:
    """Map one flattened SGM UNet name (without `lora_unet_`) to a flattened diffusers name."""
    for pattern, repl in _SGM_TOP:
        if re.match(pattern, flat + "_"):
            return re.sub(pattern, repl, flat + "_")[:-1]
    m = _SGM_MIDDLE.match(flat)
    if m:
        outer, rest = int(m.group(1)), m.group(2)
        prefix = {0: "mid_block_resnets_0", 1: "mid_block_attentions_0", 2: "mid_block_resnets_1"}.get(outer)
        if prefix is None:
            raise ValueError(f"invalid middle_block index {outer} in {flat!r}")
        return _resnet_names(f"{prefix}_{rest}") if outer != 1 else f"{prefix}_{rest}"
    m = _SGM_BLOCK.match(flat)
    if not m:
        return flat
    kind, outer, inner, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    per = layers_per_block + 1
    if kind == "input_blocks":
        block, layer = (outer - 1) // per, (outer - 1) % per
        if inner == 0 and rest.startswith("op"):
            return f"down_blocks_{block}_downsamplers_0_conv"
        if inner == 0:
            return _resnet_names(f"down_blocks_{block}_resnets_{layer}_{rest}")
        return f"down_blocks_{block}_attentions_{layer}_{rest}"
    block, layer = outer // per, outer % per
    if inner == 0:
        return _resnet_names(f"up_blocks_{block}_resnets_{layer}_{rest}")
    if rest == "conv" or inner == 2:
        return f"up_blocks_{block}_upsamplers_0_{rest}"
    return f"up_blocks_{block}_attentions_{layer}_{rest}"


def _resnet_names(flat: str) -> str:
    for old, new in _SGM_RESNET:
        flat = flat.replace(old, new)
    return flat
