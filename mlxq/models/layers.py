"""Blocks shared by the model families: norms, rotary embeddings, attention, MLPs, config reading."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxq.errors import ConfigError


# ---------------------------------------------------------------------------------------------- config
@dataclass
class BaseArgs:
    """Model hyper-parameters read from an HF config dict; families subclass and add their fields."""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BaseArgs:
        names = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name not in config and _required(f)]
        if missing:
            raise ConfigError(f"config.json: missing field '{missing[0]}' for {config.get('model_type')}")
        return cls(**{k: v for k, v in config.items() if k in names})


def _required(f) -> bool:
    from dataclasses import MISSING

    return f.default is MISSING and f.default_factory is MISSING


def rope_settings(config: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    """Rope theta and scaling from either config style: transformers-5 `rope_parameters` (possibly keyed
    by layer type) or the older `rope_theta` + `rope_scaling`."""
    params = config.get("rope_parameters") or {}
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    scaling = dict(config.get("rope_scaling") or {})
    out = {**scaling, **params}
    out.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    out["rope_type"] = out.get("rope_type") or out.get("type") or "default"
    return out


# ---------------------------------------------------------------------------------------------- rope
class RoPE(nn.Module):
    """Rotary embedding over the first `dims` features (default, linear, llama3 and yarn-free kinds)."""

    def __init__(self, dims: int, settings: dict[str, Any], traditional: bool = False):
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        self.base: float | None = float(settings["rope_theta"])
        self.scale = 1.0
        kind = settings["rope_type"]
        if kind == "linear":
            self.scale = 1.0 / float(settings["factor"])
        elif kind == "llama3":
            self._freqs = _llama3_freqs(dims, self.base, settings)
            self.base = None
        elif kind != "default":
            raise ConfigError(f"config.json: rope_type '{kind}' is not supported")

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        freqs = getattr(self, "_freqs", None)
        return mx.fast.rope(
            x, self.dims, traditional=self.traditional, base=self.base, scale=self.scale, offset=offset,
            freqs=freqs,
        )


def _llama3_freqs(dims: int, base: float, s: dict[str, Any]) -> mx.array:
    """Llama 3.1 frequency scaling: long wavelengths slowed by `factor`, short kept, smooth between."""
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    inv = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)  # wavelength / 2pi
    wavelen = 2 * math.pi * inv
    smooth = (old_ctx / wavelen - low) / (high - low)
    scaled = mx.where(wavelen > old_ctx / low, inv * factor, inv)
    mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
    return mx.where(mid, inv / ((1 - smooth) / factor + smooth), scaled)


# ---------------------------------------------------------------------------------------------- blocks
class Attention(nn.Module):
    """GQA attention, optional q/k/v bias (Qwen2) and per-head q/k RMSNorm (Qwen3, Gemma 3)."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        rope: RoPE,
        *,
        bias: bool = False,
        out_bias: bool = False,
        qk_norm_eps: float | None = None,
        scale: float | None = None,
        norm_cls: type[nn.Module] = nn.RMSNorm,
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scale = scale if scale is not None else head_dim**-0.5
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=out_bias)
        if qk_norm_eps is not None:
            self.q_norm = norm_cls(head_dim, eps=qk_norm_eps)
            self.k_norm = norm_cls(head_dim, eps=qk_norm_eps)
        self.rope = rope

    def __call__(self, x: mx.array, cache) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        mask = cache.make_mask(L)
        q, k = self.rope(q, offset=cache.offset), self.rope(k, offset=cache.offset)
        k, v = cache.update_and_fetch(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU for Llama/Qwen, GeGLU (tanh) for Gemma."""

    def __init__(self, dim: int, hidden: int, act=nn.silu, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = act

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

