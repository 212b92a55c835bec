"""Mixture-of-experts blocks: stacked expert weights applied with `mx.gather_mm` / `mx.gather_qmm`.

Expert weights live stacked, [experts, out, in] per projection, so one gathered matmul runs every token
through the experts it was routed to. Quantized checkpoints swap in `QuantizedSwitchLinear` through
`nn.quantize` (it has `to_quantized`, like `nn.Linear`). On the CPU, loading moves unquantized experts to
[experts, in, out] (`transpose_weight`), and prompts run each expert's tokens as one matmul (`_grouped`).
"""

from __future__ import annotations

import re
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxq.errors import ConfigError, FormatError
from mlxq.kernels import kquants
from mlxq.kernels.activations import sigmoid, silu, silu_glu
from mlxq.models.layers import GatedMLP, Linear

# From this many (token, expert) pairs on, pairs are sorted by expert first, so each expert's weights are
# read once per call instead of once per token (prefill); below it the gather is cheaper than the sort.
SORT_FROM = 64
# On the CPU, from this many tokens on, each expert's tokens run as one plain matmul (see SwitchGLU._grouped).
GROUP_FROM = 32


class SwitchLinear(nn.Module):
    """One projection per expert, weight [experts, out, in]."""

    def __init__(self, dim_in: int, dim_out: int, n_experts: int):
        super().__init__()
        self.weight = mx.zeros((n_experts, dim_out, dim_in))
        self.num_experts = n_experts

    def __call__(self, x: mx.array, experts: mx.array, sorted_indices: bool = False) -> mx.array:
        w = self["weight_t"] if "weight_t" in self else self["weight"].swapaxes(-1, -2)
        return mx.gather_mm(x, w, rhs_indices=experts, sorted_indices=sorted_indices)

    def expert(self, x: mx.array, e: int) -> mx.array:
        """x [n, in] through expert e alone."""
        return x @ self["weight_t"][e] if "weight_t" in self else x @ self["weight"][e].T

    def transpose_weight(self) -> None:
        """[experts, in, out] contiguous: the CPU's sgemm packs it faster (see `layers.Linear`)."""
        if "weight" in self:
            self.weight_t = mx.contiguous(self["weight"].swapaxes(-1, -2))
            del self.weight

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine") -> QuantizedSwitchLinear:
        n_experts, dim_out, dim_in = self.weight.shape
        q = QuantizedSwitchLinear(dim_in, dim_out, n_experts, group_size, bits, mode)
        q.weight, q.scales, *biases = mx.quantize(self.weight, group_size, bits, mode=mode)
        if biases:
            q.biases = biases[0]
        return q


class QuantizedSwitchLinear(nn.Module):
    """`SwitchLinear` with weights packed by `mx.quantize` (mlx-lm's triple: weight, scales, biases)."""

    def __init__(
        self, dim_in: int, dim_out: int, n_experts: int, group_size: int = 64, bits: int = 4, mode: str = "affine"
    ):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.num_experts = n_experts
        self.weight, self.scales, *biases = mx.quantize(
            mx.zeros((n_experts, dim_out, dim_in)), group_size, bits, mode=mode
        )
        if biases:
            self.biases = biases[0]

    @classmethod
    def empty(cls, n_experts: int, dim_in: int, dim_out: int, group_size: int, bits: int,
              dtype: mx.Dtype = mx.float16) -> QuantizedSwitchLinear:
        """Zeroed affine storage of the packed shapes, scales and biases in `dtype` (no float weights are made
        first: these can be large)."""
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.group_size, q.bits, q.mode, q.num_experts = group_size, bits, "affine", n_experts
        q.weight = mx.zeros((n_experts, dim_out, dim_in * bits // 32), mx.uint32)
        q.scales = mx.zeros((n_experts, dim_out, dim_in // group_size), dtype)
        q.biases = mx.zeros((n_experts, dim_out, dim_in // group_size), dtype)
        return q

    def __call__(self, x: mx.array, experts: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.get("biases"),
            rhs_indices=experts,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )

    def expert(self, x: mx.array, e: int) -> mx.array:
        biases = self["biases"][e] if "biases" in self else None
        return mx.quantized_matmul(
            x,
            self.weight[e],
            self.scales[e],
            biases,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )


class BlockSwitchLinear(nn.Module):
    """`SwitchLinear` with each expert's weight in GGML blocks (`mlxq.kernels.kquants`): uint8
    [experts, out, row bytes] of type `kind`; the reference path dequantizes only the experts a call uses."""

    def __init__(self, dim_in: int, dim_out: int, n_experts: int, kind: str):
        super().__init__()
        self.kind, self.num_experts = kind, n_experts
        self.weight = mx.zeros((n_experts, dim_out, kquants.row_bytes(kind, dim_in)), mx.uint8)

    def __call__(self, x: mx.array, experts: mx.array, sorted_indices: bool = False) -> mx.array:
        return kquants.gather_matmul(x, self["weight"], self.kind, experts, sorted_indices)

    def expert(self, x: mx.array, e: int) -> mx.array:
        return kquants.matmul(x, self["weight"][e], self.kind)


class SwitchGLU(nn.Module):
    """The experts of a MoE layer: down(silu(gate(x)) * up(x)), each token through its top-k experts."""

    def __init__(self, dim: int, hidden: int, n_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(dim, hidden, n_experts)
        self.up_proj = SwitchLinear(dim, hidden, n_experts)
        self.down_proj = SwitchLinear(hidden, dim, n_experts)

    def fuse(self) -> None:
        """gate and up as one gathered matmul (same input, same experts) when their layouts agree."""
        gate, up = self.gate_proj, self.up_proj
        if type(gate) is not type(up) or any(
            getattr(gate, a, None) != getattr(up, a, None) for a in ("bits", "group_size", "mode", "kind")
        ):
            return
        fused = gate
        for key in ("weight", "scales", "biases"):
            if key in gate:
                fused[key] = mx.concatenate([gate[key], up[key]], axis=1)
        self.gate_up_proj = fused
        del self.gate_proj, self.up_proj

    def __call__(self, x: mx.array, experts: mx.array) -> mx.array:
        """x [..., dim], experts [..., k] -> [..., k, dim]."""
        *lead, dim = x.shape
        k = experts.shape[-1]
        if x.size // dim >= GROUP_FROM and mx.default_device() == mx.cpu:
            return self._grouped(x.reshape(-1, dim), experts.reshape(-1, k)).reshape(*lead, k, dim)
        x, experts = x.reshape(-1, 1, 1, dim), experts.reshape(-1, k)
        order = None
        if experts.size >= SORT_FROM:  # pairs sorted by expert: [n * k, 1, dim] against sorted expert ids
            flat = experts.flatten()
            order = mx.argsort(flat)
            x, experts = x.reshape(-1, 1, dim)[order // k], flat[order]
        sorted_indices = order is not None
        if "gate_up_proj" in self:
            gate, up = mx.split(self.gate_up_proj(x, experts, sorted_indices), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x, experts, sorted_indices), self.up_proj(x, experts, sorted_indices)
        y = self.down_proj(silu_glu(gate, up), experts, sorted_indices)
        if order is not None:
            y = y[mx.argsort(order)]
        return y.reshape(*lead, k, dim)

    def _grouped(self, x: mx.array, experts: mx.array) -> mx.array:
        """Many tokens on the CPU: MLX's CPU gather_mm runs one single-row sgemm per (token, expert) pair,
        re-reading the expert's weights every time (5.7 s for one layer of a 2048-token prompt here). Instead,
        pairs are sorted by expert and each expert runs its tokens as one matmul. The slice sizes must be
        known on the host, which costs one sync per layer: fine for prefill, not for a decode step."""
        n, k = experts.shape
        flat = experts.flatten()
        order = mx.argsort(flat)
        first = self.gate_up_proj if "gate_up_proj" in self else self.gate_proj
        counts = (flat[:, None] == mx.arange(first.num_experts)[None]).sum(axis=0)
        xs = x[order // k]
        outs, start = [], 0
        for e, count in enumerate(counts.tolist()):
            if not count:
                continue
            rows = xs[start : start + count]
            if "gate_up_proj" in self:
                gate, up = mx.split(self.gate_up_proj.expert(rows, e), 2, axis=-1)
            else:
                gate, up = self.gate_proj.expert(rows, e), self.up_proj.expert(rows, e)
            outs.append(self.down_proj.expert(silu_glu(gate, up), e))
            start += count
        return mx.concatenate(outs)[mx.argsort(order)]


class SparseMoE(nn.Module):
    """Softmax router, top-k experts (optionally renormalised), plus an optional shared expert scaled by
    sigmoid(shared_expert_gate(x)) (Qwen2-MoE, Qwen3-Next, Qwen3.5-MoE)."""

    def __init__(
        self, dim: int, hidden: int, n_experts: int, top_k: int, *, norm_topk: bool = True, shared_hidden: int = 0
    ):
        super().__init__()
        self.top_k, self.norm_topk = top_k, norm_topk
        self.gate = Linear(dim, n_experts, bias=False)
        self.experts = SwitchGLU(dim, hidden, n_experts)
        if shared_hidden:
            self.shared_expert = GatedMLP(dim, shared_hidden, act=silu)
            self.shared_expert_gate = Linear(dim, 1, bias=False)

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """The top-k experts of every token [..., k] and their weights [..., k] (float32)."""
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        experts = mx.argpartition(-probs, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        weights = mx.take_along_axis(probs, experts, axis=-1)
        if self.norm_topk:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return experts, weights

    def shared(self, x: mx.array) -> mx.array | None:
        """The shared expert's contribution (None when the block has none)."""
        if "shared_expert" not in self:
            return None
        return sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

    def __call__(self, x: mx.array) -> mx.array:
        experts, weights = self.route(x)
        return combine(self.experts(x, experts), weights, self.shared(x))


def combine(y: mx.array, weights: mx.array, shared: mx.array | None) -> mx.array:
    """The experts' outputs y [..., k, dim] weighted and summed, plus the shared expert's."""
    y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
    return y if shared is None else y + shared


def is_moe_layer(a: Any, i: int) -> bool:
    """Whether layer i routes to experts (HF's rule: `num_experts`, `decoder_sparse_step`, `mlp_only_layers`)."""
    return a.num_experts > 0 and i not in (a.mlp_only_layers or []) and (i + 1) % a.decoder_sparse_step == 0


def set_experts_per_tok(layers: list[nn.Module], n_experts: int, k: int) -> None:
    """Route every token to k experts instead of the configured number (flash-moe ran Qwen3.5-397B at k=4
    instead of 10); the kept experts' weights are renormalised as the model's router does."""
    if not n_experts or not 1 <= k <= n_experts:
        raise ConfigError(f"experts per token: {k} is not in 1..{n_experts}")
    for layer in layers:
        if isinstance(layer.mlp, SparseMoE):
            layer.mlp.top_k = k


_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)$")


def stack_experts(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Per-expert tensors (`experts.{e}.gate_proj.weight`) and HF's fused 3-D `experts.gate_up_proj` /
    `experts.down_proj` -> stacked `experts.{gate,up,down}_proj.weight` [experts, out, in]."""
    out, groups = {}, {}
    for name, w in weights.items():
        if m := _PER_EXPERT.match(name):
            prefix, e, proj, kind = m.groups()
            groups.setdefault(f"{prefix}.{proj}.{kind}", {})[int(e)] = w
        elif name.endswith(".mlp.experts.gate_up_proj"):
            gate, up = mx.split(w, 2, axis=1)
            out[name.replace("gate_up_proj", "gate_proj.weight")] = gate
            out[name.replace("gate_up_proj", "up_proj.weight")] = up
        elif name.endswith(".mlp.experts.down_proj"):
            out[name + ".weight"] = w
        else:
            out[name] = w
    for name, per_expert in groups.items():
        if sorted(per_expert) != list(range(len(per_expert))):
            raise FormatError(f"tensor '{name}': experts {sorted(per_expert)} are not 0..{len(per_expert) - 1}")
        out[name] = mx.stack([per_expert[e] for e in range(len(per_expert))])
    return out
