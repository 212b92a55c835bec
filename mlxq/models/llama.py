"""Llama 2/3 and SmolLM2; Qwen2 (q/k/v bias) and Qwen3 (q/k norm) are the same network with flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxq.engine.cache import KVCache
from mlxq.models.layers import Attention, BaseArgs, Embedding, GatedMLP, RoPE, rope_settings


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

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads


FAMILY_FLAGS = {  # what distinguishes the families sharing this file
    "llama": dict(qkv_bias=None, qk_norm=False),
    "qwen2": dict(qkv_bias=True, qk_norm=False),
    "qwen3": dict(qkv_bias=None, qk_norm=True),
}


class Block(nn.Module):
    def __init__(self, a: Args, rope: RoPE):
        super().__init__()
        flags = FAMILY_FLAGS[a.model_type]
        bias = a.attention_bias if flags["qkv_bias"] is None else flags["qkv_bias"]
        self.self_attn = Attention(
            a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, rope,
            bias=bias, out_bias=a.attention_bias, qk_norm_eps=a.rms_norm_eps if flags["qk_norm"] else None,
        )
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
        self.layers = [block(a, rope) for _ in range(a.num_hidden_layers)]
        self.norm = nn.RMSNorm(a.hidden_size, eps=a.rms_norm_eps)


class Model(nn.Module):
    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.args = a = Args.from_config(config)
        rope = RoPE(a.head_dim, rope_settings(config))
        self.model = Body(a, rope, self.block_for(config))
        if not a.tie_word_embeddings:
            self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)

    def block_for(self, config: dict[str, Any]):
        return Block

    def embed(self, tokens: mx.array) -> mx.array:
        return self.model.embed_tokens(tokens)

    def __call__(self, tokens: mx.array, cache: list) -> mx.array:
        x = self.embed(tokens)
        for layer, c in zip(self.model.layers, cache, strict=True):
            x = layer(x, c)
        x = self.model.norm(x)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(x)
        return self.lm_head(x)

    def make_cache(self) -> list:
        return [KVCache() for _ in self.model.layers]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        # Rotary tables are computed, never loaded; a tied model may still ship lm_head.
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        return weights
