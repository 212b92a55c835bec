"""GGUF <-> HF conventions as data: architectures, metadata keys, tensor names.

Facts from llama.cpp's converter (convert_hf_to_gguf.py, gguf-py's tensor map): which HF config field each
`{arch}.*` key holds, how block tensors are named, and what the converter changed in the numbers (llama's
rotary permutation of q/k rows, Gemma's +1 on norm weights) so the reader can undo it.
"""

from __future__ import annotations

import re

# GGUF metadata key (without the "{arch}." prefix) -> HF config field
CONFIG_KEYS: dict[str, str] = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "context_length": "max_position_embeddings",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.sliding_window": "sliding_window",
    "rope.freq_base": "rope_theta",
    "final_logit_softcapping": "final_logit_softcapping",
    "vocab_size": "vocab_size",
}


# GGUF architecture -> how to read it: the HF model_type, and what the converter did to the numbers
ARCHITECTURES: dict[str, dict] = {
    "llama": {"model_type": "llama", "permute_qk": True},
    "qwen2": {"model_type": "qwen2"},
    "qwen3": {"model_type": "qwen3"},
    "gemma3": {"model_type": "gemma3_text", "norm_shift": 1.0,
               # llama.cpp fixes these for Gemma 3 rather than storing them
               "defaults": {"rope_local_base_freq": 10000.0, "sliding_window_pattern": 6}},
}

# Top-level tensors: GGUF name -> HF name
GLOBAL_TENSORS: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Per-block tensors: GGUF suffix after "blk.N." -> HF suffix after "model.layers.N."
BLOCK_TENSORS: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Gemma 3 has four norms a block; llama.cpp names them by position around attention and the MLP.
BLOCK_TENSORS_BY_ARCH: dict[str, dict[str, str]] = {
    "gemma3": {
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}

_BLOCK = re.compile(r"blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")


def hf_name(arch: str, gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor, or None when the table has no entry."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    m = _BLOCK.match(gguf_name)
    if not m:
        return None
    layer, part, kind = m.groups()
    suffix = {**BLOCK_TENSORS, **BLOCK_TENSORS_BY_ARCH.get(arch, {})}.get(part)
    return None if suffix is None else f"model.layers.{layer}.{suffix}.{kind}"


def gguf_name(arch: str, hf: str) -> str | None:
    """The inverse of `hf_name` (writers and tests use it)."""
    for g, h in GLOBAL_TENSORS.items():
        if h == hf:
            return g
    m = re.match(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$", hf)
    if not m:
        return None
    layer, suffix, kind = m.groups()
    for g, h in {**BLOCK_TENSORS, **BLOCK_TENSORS_BY_ARCH.get(arch, {})}.items():
        if h == suffix:
            return f"blk.{layer}.{g}.{kind}"
    return None


# ---------------------------------------------------------------------------------------------- export
# HF model_type -> GGUF architecture (every model_type the reader produces, plus multimodal wrappers' names)
EXPORT_ARCHITECTURES: dict[str, str] = {
    **{spec["model_type"]: arch for arch, spec in ARCHITECTURES.items()},
    "gemma3": "gemma3",
}


def gguf_arch(model_type: str | None) -> str | None:
    return EXPORT_ARCHITECTURES.get(model_type or "")


def gguf_shape(arch: str, hf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a tensor has in the GGUF (numpy order)."""
    return shape


def to_gguf(arch: str, hf: str, w, config: dict):
    """What llama.cpp's converter does to a tensor (the forward of the reader's `_undo_conversion`)."""
    spec = ARCHITECTURES[arch]
    if spec.get("permute_qk") and (".self_attn.q_proj." in hf or ".self_attn.k_proj." in hf):
        key = "num_attention_heads" if ".q_proj." in hf else "num_key_value_heads"
        heads = config.get(key) or config["num_attention_heads"]
        w = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    if spec.get("norm_shift") and hf.endswith("norm.weight"):
        w = w + spec["norm_shift"]
    return w
