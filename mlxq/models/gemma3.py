"""Gemma 3 text: interleaved sliding-window and global attention, four norms per block, GeGLU (tanh),
embeddings scaled by sqrt(hidden), q/k norms, zero-centred norm weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxq.engine.cache import KVCache, RotatingKVCache
from mlxq.models.base import CausalLM
from mlxq.models.layers import Attention, BaseArgs, Embedding, GatedMLP, RoPE, rope_settings


@dataclass
class Args(BaseArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    head_dim: int = 256
    num_key_value_heads: int = 1
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096
    sliding_window_pattern: int = 6
    layer_types: list[str] = field(default_factory=list)
    final_logit_softcapping: float | None = None
    rope_local_base_freq: float = 10000.0

    def __post_init__(self):
        if not self.layer_types:  # older configs give only the period: every Nth layer is global
            p = self.sliding_window_pattern
            self.layer_types = [
                "full_attention" if (i + 1) % p == 0 else "sliding_attention" for i in range(self.num_hidden_layers)
            ]


class Block(nn.Module):
    def __init__(self, a: Args, rope: RoPE, sliding: bool):
        super().__init__()
        self.sliding = sliding
        self.self_attn = Attention(
            a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, rope,
            qk_norm_eps=a.rms_norm_eps, scale=a.query_pre_attn_scalar**-0.5,
        )
        self.mlp = GatedMLP(a.hidden_size, a.intermediate_size, act=nn.gelu_approx)
        norm = lambda: nn.RMSNorm(a.hidden_size, eps=a.rms_norm_eps)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def __call__(self, x: mx.array, cache) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Body(nn.Module):
    def __init__(self, a: Args, config: dict[str, Any]):
        super().__init__()
        self.embed_tokens = Embedding(a.vocab_size, a.hidden_size)
        local = {**rope_settings(config, "sliding_attention")}
        if "sliding_attention" not in (config.get("rope_parameters") or {}):
            local = {"rope_type": "default", "rope_theta": a.rope_local_base_freq}
        ropes = {
            "sliding_attention": RoPE(a.head_dim, local),
            "full_attention": RoPE(a.head_dim, rope_settings(config, "full_attention")),
        }
        self.layers = [Block(a, ropes[t], t == "sliding_attention") for t in a.layer_types]
        self.norm = nn.RMSNorm(a.hidden_size, eps=a.rms_norm_eps)


class Model(CausalLM):
    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.args = a = Args.from_config(config)
        self.model = Body(a, config)

    def embed(self, tokens: mx.array) -> mx.array:
        x = self.model.embed_tokens(tokens)
        return x * mx.array(self.args.hidden_size**0.5, x.dtype)

    def head(self, x: mx.array) -> mx.array:
        logits = self.model.embed_tokens.as_linear(x)
        if cap := self.args.final_logit_softcapping:
            logits = mx.tanh(logits / cap) * cap
        return logits

    def make_cache(self) -> list:
        return [RotatingKVCache(self.args.sliding_window) if l.sliding else KVCache() for l in self.model.layers]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        out = {}
        for name, w in weights.items():
            # Multimodal checkpoints nest the text model; the vision tower is not ours to run.
            for old in ("model.language_model.", "language_model.model."):
                if name.startswith(old):
                    name = "model." + name[len(old) :]
            if not name.startswith("model.") or "rotary_emb" in name:
                continue  # vision tower, projector, tied lm_head
            if name.endswith("norm.weight"):
                w = w + 1  # HF stores Gemma norms zero-centred: y = norm(x) * (1 + w)
            out[name] = w
        return out
