"""The streaming MoE block: a `SparseMoE` whose routed experts live in packs on disk and in the slot pool.

Per call: route (the one sync a layer needs: the reads depend on it), start the reads of the missing experts at
once, then the reads ahead (below), run the shared expert meanwhile, wait, then compute every (token, expert) pair
with the same `SwitchGLU` code as resident experts, over slot indices instead of expert indices: the same
arithmetic on the same bytes, hence bit-identical output. When a call routes to more experts than the layer's slots
hold (a long prompt under a small budget), the experts are taken in rounds and each pair's output is kept from its
round.

Reads ahead: the next layers' routers applied to this layer's input predict what they will want (the residual
stream changes little from one layer to the next), and those experts are read while this layer computes, into
slots this layer does not use. A prompt always reads the next layer ahead when this one fits in one round: a long
prompt routes to most of a layer's experts, so the prediction is nearly the whole of what it will read anyway, and
the layer's reads become one pass overlapped with the previous layer's compute. Decoding reads `prefetch` layers
ahead (StreamOptions; 0: off).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxq.experts.pool import PREFETCH_MAX_TOKENS, SlotPool
from mlxq.models.moe import SparseMoE, combine


class StreamedMoE(SparseMoE):
    def __init__(self, moe: SparseMoE, layer: int):
        nn.Module.__init__(self)
        self.top_k, self.norm_topk = moe.top_k, moe.norm_topk
        self.gate = moe.gate
        if "shared_expert" in moe:
            self.shared_expert, self.shared_expert_gate = moe.shared_expert, moe.shared_expert_gate
        self.layer = layer
        self.pool: SlotPool | None = None  # set once the pool exists (a plain attribute, not a parameter)
        self.next: StreamedMoE | None = None  # the next streamed block, for prefetch
        self.first = 0  # the routed expert its pack position 0 holds (a rank of an experts split holds a share)

    def __setattr__(self, key, value):
        if key in ("pool", "next"):  # keep them out of the module tree (no parameters, no recursion)
            object.__setattr__(self, key, value)
        else:
            super().__setattr__(key, value)

    def __call__(self, x: mx.array) -> mx.array:
        experts, weights = self.route(x)
        ids = self.pool.routed(self.layer, experts)
        shared = self.shared(x)
        if shared is not None:
            mx.async_eval(shared)  # computed while the reads run
        return combine(self.run_experts(x, ids, ahead=True), weights, shared)

    def run_experts(self, x: mx.array, ids: np.ndarray, ahead: bool = False) -> mx.array:
        """x [..., dim] through the experts `ids` [..., k] (pack positions, on the host) -> [..., k, dim], the missing
        ones read first. `ahead`: x is this layer's whole input, from which the next layers' experts may be read
        ahead. (A rank of an experts split runs only its own pairs through here, `mlxq.distributed.split`.)"""
        pool, layer = self.pool, self.layer
        wanted = np.unique(ids)
        y, cap = None, pool.capacity(layer)
        decoding = ids.size // ids.shape[-1] <= PREFETCH_MAX_TOKENS
        depth = pool.prefetch if decoding else int(len(wanted) <= cap)
        for start in range(0, len(wanted), cap):
            chunk = wanted[start : start + cap]
            reads = pool.request(layer, chunk)
            if start == 0 and ahead and depth:
                self._read_ahead(x, depth)
            pool.wait(layer, reads)
            out = pool.experts(layer)(x, pool.slot_indices(layer, ids, chunk))
            pool.pending.append(out)
            y = out if y is None else mx.where(mx.array(np.isin(ids, chunk))[..., None], out, y)
        return y

    def _read_ahead(self, x: mx.array, depth: int) -> None:
        """Start reading what the next `depth` streamed layers' routers pick for x, nearest layer first."""
        blocks, nxt = [], self.next
        while nxt is not None and len(blocks) < depth:
            blocks.append(nxt)
            nxt = nxt.next
        if not blocks:
            return
        predicted = [b.route(x)[0] for b in blocks]
        mx.eval(predicted)
        for b, p in zip(blocks, predicted, strict=True):
            held = np.unique(np.array(p)) - b.first  # pack positions (a share's: only those it holds)
            held = held[(held >= 0) & (held < self.pool.packs.layers[b.layer].n_experts)]
            self.pool.request(b.layer, held[: self.pool.capacity(b.layer)], prefetch=True)
