"""Llama 2/3 and SmolLM2; Qwen2 (q/k/v bias) and Qwen3 (q/k norm) are the same network with flags, and so are
the plain MoE families: Mixtral (Llama attention) and Qwen3-MoE (Qwen3 attention), whose MLPs are routed experts
(`models/moe.py`) wherever `num_experts` / `decoder_sparse_step` / `mlp_only_layers` put them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxq.engine.cache import KVCache, RotatingKVCache
from mlxq.models.base import CausalLM
from mlxq.models.layers import Attention, BaseArgs, Embedding, GatedMLP, RoPE, rope_settings
from mlxq.models.moe import SparseMoE, is_moe_layer, set_experts_per_tok, stack_experts


@dataclass
class Args(BaseArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # MoE families: Qwen3-MoE names the expert count num_experts, Mixtral num_local_experts
    num_experts: int = 0
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # Mixtral's experts are intermediate_size wide
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] | None = field(default_factory=list)
    sliding_window: int | None = None
    use_sliding_window: bool = True  # Qwen configs carry a window they do not use unless this is set

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.num_experts = self.num_experts or self.num_local_experts
        self.moe_intermediate_size = self.moe_intermediate_size or self.intermediate_size
        if not self.use_sliding_window or not FAMILY_FLAGS.get(self.model_type, {}).get("sliding"):
            self.sliding_window = None


# What distinguishes the families sharing this file. norm_topk: whether the kept experts' weights are renormalised
# (None: the config's norm_topk_prob); sliding: whether a config's sliding_window applies.
FAMILY_FLAGS = {
    "llama": dict(qkv_bias=None, qk_norm=False, norm_topk=None, sliding=False),
    "qwen2": dict(qkv_bias=True, qk_norm=False, norm_topk=None, sliding=False),
    "qwen3": dict(qkv_bias=None, qk_norm=True, norm_topk=None, sliding=False),
    "qwen3_moe": dict(qkv_bias=None, qk_norm=True, norm_topk=None, sliding=False),
    "mixtral": dict(qkv_bias=None, qk_norm=False, norm_topk=True, sliding=True),
}


class Block(nn.Module):
    def __init__(self, a: Args, rope: RoPE, layer: int = 0):
        super().__init__()
        flags = FAMILY_FLAGS[a.model_type]
        bias = a.attention_bias if flags["qkv_bias"] is None else flags["qkv_bias"]
        self.self_attn = Attention(
            a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, rope,
            bias=bias, out_bias=a.attention_bias, qk_norm_eps=a.rms_norm_eps if flags["qk_norm"] else None,
        )
        if is_moe_layer(a, layer):
            norm_topk = a.norm_topk_prob if flags["norm_topk"] is None else flags["norm_topk"]
            self.mlp = SparseMoE(a.hidden_size, a.moe_intermediate_size, a.num_experts, a.num_experts_per_tok,
                                 norm_topk=norm_topk)
        else:
            self.mlp = GatedMLP(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.input_layernorm = nn.RMSNorm(a.hidden_size, eps=a.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(a.hidden_size, eps=a.rms_norm_eps)

    def __call__(self, x: mx.array, cache) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Body(nn.Module):
    def __init__(self, a: Args, rope: RoPE, block):
        super().__init__()
        self.embed_tokens = Embedding(a.vocab_size, a.hidden_size)
        self.layers = [block(a, rope, layer=i) for i in range(a.num_hidden_layers)]
        self.norm = nn.RMSNorm(a.hidden_size, eps=a.rms_norm_eps)


class Model(CausalLM):
    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.args = a = Args.from_config(config)
        rope = RoPE(a.head_dim, rope_settings(config))
        self.model = Body(a, rope, self.block_for(config))
        if not a.tie_word_embeddings:
            self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)

    def block_for(self, config: dict[str, Any]):
        return Block

    def make_cache(self) -> list:
        window = self.args.sliding_window
        return [RotatingKVCache(window) if window else KVCache() for _ in self.model.layers]

    def set_experts_per_tok(self, k: int) -> None:
        set_experts_per_tok(self.model.layers, self.args.num_experts, k)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        # Rotary tables are computed, never loaded; a tied model may still ship lm_head.
        weights = {_canonical_name(k): v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        return stack_experts(weights) if self.args.num_experts else weights


# Mixtral's older checkpoints (and mlx-lm's) name the MoE block and its experts differently
_RENAMES = [(re.compile(p), r) for p, r in (
    (r"\.block_sparse_moe\.", ".mlp."), (r"\.switch_mlp\.", ".experts."),
    (r"(\.experts\.\d+)\.w1\.", r"\1.gate_proj."), (r"(\.experts\.\d+)\.w2\.", r"\1.down_proj."),
    (r"(\.experts\.\d+)\.w3\.", r"\1.up_proj."),
)]


def _canonical_name(name: str) -> str:
    for pattern, repl in _RENAMES:
        name = pattern.sub(repl, name)
    return name
