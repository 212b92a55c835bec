"""The streaming MoE block: a `SparseMoE` whose routed experts live in packs on disk and in the slot pool.

Per call: route (the one sync a layer needs: the reads depend on it), start the reads of the missing experts at
once, run the shared expert meanwhile (and, when decoding with prefetch on, start the next layer's likely
experts: its router applied to this layer's input), wait, then compute every (token, expert) pair with the same
`SwitchGLU` code as resident experts, over slot indices instead of expert indices: the same arithmetic on the
same bytes, hence bit-identical output. When a call routes to more experts than the layer's slots hold (a long
prompt under a small budget), the experts are taken in rounds and each pair's output is kept from its round.
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
        ones read first. `ahead`: x is this layer's whole input, from which the next layer's experts may be
        prefetched. (A rank of an experts split runs only its own pairs through here, `mlxq.distributed.split`.)"""
        pool, layer = self.pool, self.layer
        wanted = np.unique(ids)
        y, cap = None, pool.capacity(layer)
        decoding = ids.size // ids.shape[-1] <= PREFETCH_MAX_TOKENS
        for start in range(0, len(wanted), cap):
            chunk = wanted[start : start + cap]
            reads = pool.request(layer, chunk)
            if start == 0 and ahead and pool.prefetch and decoding and self.next is not None:
                self._prefetch_next(x)
            pool.wait(layer, reads)
            out = pool.experts(layer)(x, pool.slot_indices(layer, ids, chunk))
            pool.pending.append(out)
            y = out if y is None else mx.where(mx.array(np.isin(ids, chunk))[..., None], out, y)
        return y

    def _prefetch_next(self, x: mx.array) -> None:
        nxt = self.next
        predicted, _ = nxt.route(x)
        mx.eval(predicted)
        self.pool.request(nxt.layer, np.unique(np.array(predicted))[: self.pool.capacity(nxt.layer)], prefetch=True)
