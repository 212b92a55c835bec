"""Qwen3.5 (dense and MoE) and Qwen3-Next: hybrid stacks of Gated DeltaNet and gated full attention.

The three are one network. Qwen3-Next differs only in how its checkpoint lays out the DeltaNet input
projection (q/k/v/z and b/a fused and grouped per key head), which `sanitize` splits into Qwen3.5's
separate projections; MoE layers sit wherever `num_experts` / `decoder_sparse_step` / `mlp_only_layers`
put them. Which layers are DeltaNet comes from `layer_types`, else from `full_attention_interval`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxq.engine.cache import KVCache, RecurrentCache
from mlxq.errors import ConfigError, FormatError
from mlxq.kernels.activations import exp, sigmoid, silu
from mlxq.kernels.deltanet import gated_delta_rule
from mlxq.models.base import CausalLM
from mlxq.models.layers import BaseArgs, Embedding, GatedMLP, Linear, RoPE, attention, fuse_linears, rope_settings
from mlxq.models.moe import SparseMoE, is_moe_layer, set_experts_per_tok, stack_experts
from mlxq.models.mtp import MTP

LAYER_KINDS = ("linear_attention", "full_attention")


@dataclass
class Args(BaseArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int = 4
    intermediate_size: int = 0
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    layer_types: list[str] | None = None
    full_attention_interval: int = 4
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] | None = field(default_factory=list)
    mtp_num_hidden_layers: int = 0  # Qwen3.5's multi-token-prediction layers (`mtp.*`)
    num_nextn_predict_layers: int = 0  # Qwen3-Next's name for them

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.mlp_only_layers = self.mlp_only_layers or []
        if self.layer_types is None:
            n = self.full_attention_interval
            self.layer_types = [LAYER_KINDS[(i + 1) % n == 0] for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_KINDS):
            raise ConfigError(
                f"config.json: 'layer_types' must list {self.num_hidden_layers} entries of {' / '.join(LAYER_KINDS)}"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError("config.json: 'linear_num_value_heads' must be a multiple of 'linear_num_key_heads'")

    def is_moe(self, i: int) -> bool:
        return is_moe_layer(self, i)


# ------------------------------------------------------------------------------------ gated DeltaNet
class CausalConv1d(nn.Module):
    """Depthwise causal conv over time that carries its last (kernel - 1) inputs between calls (applied in
    `_recurrence_inputs`). weight [channels, kernel, 1]: MLX's Conv1d layout, as mlx-lm checkpoints store it."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = mx.zeros((channels, kernel, 1))

    def initial_state(self, x: mx.array) -> mx.array:
        """The state before the first token: zeros, [B, kernel - 1, channels]."""
        return mx.zeros((x.shape[0], self.weight.shape[1] - 1, x.shape[2]), x.dtype)


@mx.compile
def _conv_silu(window: mx.array, w: mx.array) -> mx.array:
    """silu of the causal conv: out[t] = sum_j w[j] * window[t + j]. A few shifted multiply-adds beat a
    grouped convolution on the CPU, and the kernel is tiny (4)."""
    K, L = w.shape[0], window.shape[1] - w.shape[0] + 1
    out = window[:, :L] * w[0]
    for j in range(1, K):
        out = out + window[:, j : j + L] * w[j]
    return silu(out)


def _gates(A_log: mx.array, a: mx.array, dt_bias: mx.array, b: mx.array) -> tuple[mx.array, mx.array]:
    """log-decay g = -exp(A_log) softplus(a + dt_bias) (float32) and write strength beta = sigmoid(b)."""
    g = -mx.exp(A_log.astype(mx.float32)) * nn.softplus((a + dt_bias).astype(mx.float32))
    return g, mx.sigmoid(b)


def _l2_normalise(q: mx.array, k: mx.array, eps: float = 1e-6) -> tuple[mx.array, mx.array]:
    """x / sqrt(sum(x^2) + eps) for q and k, with q also scaled by Dk^-0.5; mx.fast.rms_norm divides by
    sqrt(mean + eps'), so eps' = eps / Dk and the result is rescaled by Dk^-0.5."""
    inv = q.shape[-1] ** -0.5
    return inv * inv * mx.fast.rms_norm(q, None, eps * inv * inv), inv * mx.fast.rms_norm(k, None, eps * inv * inv)


@mx.compile
def _recurrence_inputs(
    qkv: mx.array,
    conv_state: mx.array,
    conv_w: mx.array,
    a: mx.array,
    b: mx.array,
    A_log: mx.array,
    dt_bias: mx.array,
    Hk: int,
    Dk: int,
    Hv: int,
):
    """Everything between the input projection and the recurrence, as one compiled graph: a decode step
    would otherwise dispatch some thirty small ops per DeltaNet layer. Returns q, k, v, g, beta (the
    recurrence's inputs) and the conv's input window (the cache keeps its last kernel - 1 rows)."""
    B, L, _ = qkv.shape
    window = mx.concatenate([conv_state, qkv], axis=1)
    mixed = _conv_silu(window, conv_w[:, :, 0].T)
    q, k, v = mx.split(mixed, [Hk * Dk, 2 * Hk * Dk], axis=-1)
    q, k = _l2_normalise(q.reshape(B, L, Hk, Dk), k.reshape(B, L, Hk, Dk))
    g, beta = _gates(A_log, a, dt_bias, b)
    return q, k, v.reshape(B, L, Hv, -1), g, beta, window


class GatedRMSNorm(nn.Module):
    """norm(y) * weight * silu(z), per value head (the weight is not zero-centred)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps

    def __call__(self, y: mx.array, z: mx.array) -> mx.array:
        return _gated_norm(y, z, self.weight, self.eps)


@partial(mx.compile, shapeless=True)
def _gated_norm(y: mx.array, z: mx.array, weight: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(y, weight, eps) * silu(z)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet: projections, causal conv, L2-normalised q/k, decay and write gates, the gated delta
    rule (`mlxq.kernels.deltanet`, whichever backend), gated RMSNorm, output projection."""

    def __init__(self, a: Args):
        super().__init__()
        self.Hk, self.Hv = a.linear_num_key_heads, a.linear_num_value_heads
        self.Dk, self.Dv = a.linear_key_head_dim, a.linear_value_head_dim
        key_dim, value_dim = self.Hk * self.Dk, self.Hv * self.Dv
        self._split = [2 * key_dim + value_dim, 2 * key_dim + 2 * value_dim, 2 * key_dim + 2 * value_dim + self.Hv]
        self.in_proj_qkv = Linear(a.hidden_size, 2 * key_dim + value_dim, bias=False)
        self.in_proj_z = Linear(a.hidden_size, value_dim, bias=False)
        self.in_proj_b = Linear(a.hidden_size, self.Hv, bias=False)
        self.in_proj_a = Linear(a.hidden_size, self.Hv, bias=False)
        self.conv1d = CausalConv1d(2 * key_dim + value_dim, a.linear_conv_kernel_dim)
        self.dt_bias = mx.ones((self.Hv,))
        self.A_log = mx.zeros((self.Hv,))
        self.norm = GatedRMSNorm(self.Dv, a.rms_norm_eps)
        self.out_proj = Linear(value_dim, a.hidden_size, bias=False)

    def fuse(self) -> None:
        """All four input projections as one matmul (they share the input)."""
        parts = [self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a]
        if (fused := fuse_linears(parts)) is not None:
            self.in_proj = fused
            del self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a

    def __call__(self, x: mx.array, cache: RecurrentCache) -> mx.array:
        B, L, _ = x.shape
        if "in_proj" in self:
            qkv, z, b, a = mx.split(self.in_proj(x), self._split, axis=-1)
        else:
            qkv, z, b, a = self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)
        conv_state = self.conv1d.initial_state(qkv) if cache.conv is None else cache.conv
        q, k, v, g, beta, window = _recurrence_inputs(
            qkv, conv_state, self.conv1d.weight, a, b, self.A_log, self.dt_bias, self.Hk, self.Dk, self.Hv
        )
        real = cache.make_mask(L)  # [B, L] in a ragged batch (rows of different lengths), else None
        if real is not None:  # padding leaves the state as it is: no decay (g = 0), no write (beta = 0)
            g, beta = mx.where(real[..., None], g, 0.0), mx.where(real[..., None], beta, 0.0)
        y, state = gated_delta_rule(q, k, v, g, beta, cache.recurrent)
        cache.update(window, state, L)
        y = self.norm(y, z.reshape(B, L, self.Hv, self.Dv))
        return self.out_proj(y.reshape(B, L, -1))


# ----------------------------------------------------------------------------- gated full attention
class GatedAttention(nn.Module):
    """GQA with per-head q/k RMSNorm, partial rotary, and an output gate: o_proj(attn * sigmoid(gate)),
    the gate coming from q_proj alongside the query (per head: query then gate)."""

    def __init__(self, a: Args, rope: RoPE):
        super().__init__()
        self.H, self.Hk, self.D = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.q_proj = Linear(a.hidden_size, 2 * self.H * self.D, bias=a.attention_bias)
        self.k_proj = Linear(a.hidden_size, self.Hk * self.D, bias=a.attention_bias)
        self.v_proj = Linear(a.hidden_size, self.Hk * self.D, bias=a.attention_bias)
        self.o_proj = Linear(self.H * self.D, a.hidden_size, bias=a.attention_bias)
        self.q_norm = nn.RMSNorm(self.D, eps=a.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.D, eps=a.rms_norm_eps)
        self.rope = rope

    def fuse(self) -> None:
        if (fused := fuse_linears([self.q_proj, self.k_proj, self.v_proj])) is not None:
            self.qkv_proj = fused
            self._split = [2 * self.H * self.D, (2 * self.H + self.Hk) * self.D]
            del self.q_proj, self.k_proj, self.v_proj

    def __call__(self, x: mx.array, cache: KVCache) -> mx.array:
        B, L, _ = x.shape
        if "qkv_proj" in self:
            q, k, v = mx.split(self.qkv_proj(x), self._split, axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, gate = mx.split(q.reshape(B, L, self.H, 2 * self.D), 2, axis=-1)
        q = self.q_norm(q).transpose(0, 2, 1, 3)
        k = self.k_norm(k.reshape(B, L, self.Hk, self.D)).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.Hk, self.D).transpose(0, 2, 1, 3)
        mask = cache.make_mask(L)
        q, k = self.rope(q, offset=cache.offset), self.rope(k, offset=cache.offset)
        k, v = cache.update_and_fetch(k, v)
        if L > PREFILL_BLOCK and not _ON_METAL and isinstance(mask, str):  # one row, or rows of one length
            out = _blocked_causal_attention(q, k, v, self.D**-0.5)
        else:
            out = attention(q, k, v, self.D**-0.5, mask)
        return self.o_proj(_gate_heads(out.transpose(0, 2, 1, 3), gate).reshape(B, L, -1))


PREFILL_BLOCK = 128
_ON_METAL = mx.metal.is_available()


def _blocked_causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Causal GQA attention for a long chunk of queries (off Metal), one block of queries at a time against
    only the keys up to the block's end. MLX's CPU SDPA computes and exps every score, masked or not, and
    its exps dominate: blocks skip the masked upper part (about half the work at 2048 tokens), the r query
    heads of a KV head are stacked as rows so K and V are never repeated, the exps are the fast ones, and
    the rows are normalised after the product with V (a pass over [n, Dv] instead of [n, keys])."""
    B, H, L, D = q.shape
    Hk, past = k.shape[1], k.shape[2] - L
    r = H // Hk
    outs = []
    for s in range(0, L, PREFILL_BLOCK):
        n, end = min(PREFILL_BLOCK, L - s), past + min(s + PREFILL_BLOCK, L)
        rows = (q[:, :, s : s + n] * scale).reshape(B, Hk, r * n, D)
        scores = (rows @ k[:, :, :end].swapaxes(-1, -2)).reshape(B, Hk, r, n, end)
        visible = mx.arange(end)[None] <= mx.arange(end - n, end)[:, None]
        weights = _masked_exp(scores, visible)
        out = weights.reshape(B, Hk, r * n, end) @ v[:, :, :end]
        outs.append((out / weights.sum(axis=-1).reshape(B, Hk, r * n, 1)).reshape(B, H, n, -1))
    return mx.concatenate(outs, axis=2)


@mx.compile
def _masked_exp(scores: mx.array, visible: mx.array) -> mx.array:
    """exp(score - row max) where visible, 0 elsewhere: softmax before its normalisation."""
    scores = mx.where(visible, scores, -mx.inf)
    return exp(scores - scores.max(axis=-1, keepdims=True))


@partial(mx.compile, shapeless=True)
def _gate_heads(out: mx.array, gate: mx.array) -> mx.array:
    return out * sigmoid(gate)


# ---------------------------------------------------------------------------------------- the model
class Block(nn.Module):
    def __init__(self, a: Args, i: int, rope: RoPE):
        super().__init__()
        self.is_linear = a.layer_types[i] == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(a)
        else:
            self.self_attn = GatedAttention(a, rope)
        if a.is_moe(i):
            self.mlp = SparseMoE(
                a.hidden_size,
                a.moe_intermediate_size,
                a.num_experts,
                a.num_experts_per_tok,
                norm_topk=a.norm_topk_prob,
                shared_hidden=a.shared_expert_intermediate_size,
            )
        else:
            self.mlp = GatedMLP(a.hidden_size, a.intermediate_size, act=silu)
        self.input_layernorm = nn.RMSNorm(a.hidden_size, eps=a.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(a.hidden_size, eps=a.rms_norm_eps)

    def __call__(self, x: mx.array, cache) -> mx.array:
        mixer = self.linear_attn if self.is_linear else self.self_attn
        h = x + mixer(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Body(nn.Module):
    def __init__(self, a: Args, rope: RoPE):
        super().__init__()
        self.embed_tokens = Embedding(a.vocab_size, a.hidden_size)
        self.layers = [Block(a, i, rope) for i in range(a.num_hidden_layers)]
        self.norm = nn.RMSNorm(a.hidden_size, eps=a.rms_norm_eps)


class Model(CausalLM):
    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.args = a = Args.from_config(config)
        settings = rope_settings(config)
        # transformers defaults the factor to 0.25 for all three when neither place states it
        factor = settings.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.25))
        rope = RoPE(int(a.head_dim * factor), settings)
        self.model = Body(a, rope)
        if not a.tie_word_embeddings:
            self.lm_head = Linear(a.hidden_size, a.vocab_size, bias=False)
        if n := a.mtp_num_hidden_layers or a.num_nextn_predict_layers:  # full attention, experts as layer i's
            m = replace(a, num_hidden_layers=n, layer_types=["full_attention"] * n)
            self.mtp = MTP(a.hidden_size, a.rms_norm_eps, [Block(m, i, rope) for i in range(n)])

    def make_cache(self) -> list:
        return [RecurrentCache() if layer.is_linear else KVCache() for layer in self.model.layers]

    def set_experts_per_tok(self, k: int) -> None:
        set_experts_per_tok(self.model.layers, self.args.num_experts, k)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        weights = {_canonical_name(k): v for k, v in weights.items()}
        weights = {k: v for k, v in weights.items() if k and "rotary_emb.inv_freq" not in k}
        # The multi-token-prediction head, for speculative drafts: only when the config has one and the checkpoint
        # kept its weights (conversions often drop them).
        if "mtp" in self and not any(k.startswith("mtp.") for k in weights):
            del self["mtp"]
        if "mtp" not in self:
            weights = {k: v for k, v in weights.items() if not k.startswith("mtp.")}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        weights = _split_fused_in_proj(weights, self.args)
        weights = stack_experts(weights)
        # HF checkpoints store the conv as [C, 1, K] and the zero-centred norms as w (applied as 1 + w);
        # mlx-lm checkpoints as [C, K, 1] and 1 + w. The conv layout tells which one this is.
        convs = [v for k, v in weights.items() if k.endswith("conv1d.weight")]
        hf_layout = not convs or any(v.shape[1] == 1 and v.shape[2] != 1 for v in convs)
        for k, v in weights.items():
            if k.endswith("conv1d.weight") and v.shape[1] == 1 and v.shape[2] != 1:
                weights[k] = v.swapaxes(1, 2)
            elif hf_layout and _ZERO_CENTRED.search(k):
                weights[k] = v + 1.0
        return weights


_ZERO_CENTRED = re.compile(
    r"(input_layernorm|post_attention_layernorm|q_norm|k_norm|^(model|mtp)\.norm|^mtp\.pre_fc_norm_\w+)\.weight$"
)


def _canonical_name(name: str) -> str | None:
    """HF multimodal (`model.language_model.`), mlx-lm (`language_model.model.`, `switch_mlp`) and text-only
    names -> text-only HF names; vision tower weights -> None (dropped)."""
    for old, new in (
        ("model.language_model.", "model."),
        ("language_model.model.", "model."),
        ("language_model.", ""),
        ("model.mtp.", "mtp."),
    ):
        if name.startswith(old):
            name = new + name[len(old) :]
            break
    if name.startswith(("model.visual.", "visual.", "vision_tower.", "model.vision_tower.")):
        return None
    return name.replace(".mlp.switch_mlp.", ".mlp.experts.")


def _split_fused_in_proj(weights: dict[str, mx.array], a: Args) -> dict[str, mx.array]:
    """Qwen3-Next's in_proj_qkvz / in_proj_ba: rows grouped per key head as [q | k | v | z] and [b | a]
    (v, z, b, a holding that key head's Hv / Hk value heads) -> Qwen3.5's separate projections."""
    Hk, Dk, Dv, r = (
        a.linear_num_key_heads,
        a.linear_key_head_dim,
        a.linear_value_head_dim,
        a.linear_num_value_heads // a.linear_num_key_heads,
    )
    out = {}
    for name, w in weights.items():
        prefix, fused, suffix = (
            name.rpartition(".in_proj_qkvz.")
            if ".in_proj_qkvz." in name
            else name.rpartition(".in_proj_ba.")
            if ".in_proj_ba." in name
            else ("", "", "")
        )
        if not fused:
            out[name] = w
            continue
        sizes = [Dk, Dk, r * Dv, r * Dv] if "qkvz" in fused else [r, r]
        if w.shape[0] != Hk * sum(sizes):
            raise FormatError(f"tensor '{name}' has {w.shape[0]} rows, expected {Hk * sum(sizes)}")
        grouped = w.reshape(Hk, sum(sizes), *w.shape[1:])
        bounds = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]
        parts = [p.reshape(-1, *w.shape[1:]) for p in mx.split(grouped, bounds, axis=1)]
        if "qkvz" in fused:
            out[f"{prefix}.in_proj_qkv.{suffix}"] = mx.concatenate(parts[:3], axis=0)
            out[f"{prefix}.in_proj_z.{suffix}"] = parts[3]
        else:
            out[f"{prefix}.in_proj_b.{suffix}"], out[f"{prefix}.in_proj_a.{suffix}"] = parts
    return out
