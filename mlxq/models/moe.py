"""Mixture-of-experts blocks: stacked expert weights applied with `mx.gather_mm` / `mx.gather_qmm`.

Expert weights live stacked, [experts, out, in] per projection, so one gathered matmul runs every token
through the experts it was routed to. Quantized checkpoints swap in `QuantizedSwitchLinear` through
`nn.quantize` (it has `to_quantized`, like `nn.Linear`). On the CPU, loading moves unquantized experts to
[experts, in, out] (`transpose_weight`), and prompts run each expert's tokens as one matmul (`_grouped`).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

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

    def __call__(self, x: mx.array) -> mx.array:
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        experts = mx.argpartition(-probs, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        weights = mx.take_along_axis(probs, experts, axis=-1)
        if self.norm_topk:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        y = (self.experts(x, experts) * weights[..., None].astype(x.dtype)).sum(axis=-2)
        if "shared_expert" in self:
            y = y + sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y
