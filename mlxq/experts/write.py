"""The quantizer's side of `--stream-experts`: routed experts go into expert packs (one layer at a time) instead
of shards, and with `--order coactivation` each layer's experts are renumbered and its router rows permuted."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlxq.errors import InvalidRequest
from mlxq.experts.order import coactivation_order
from mlxq.experts.pack import PackWriter
from mlxq.quant.roles import layer_of
from mlxq.quant.source import module_path

ORDERS = ("identity", "coactivation")
_EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")


def expert_target(base: str) -> tuple[str, str, int | None]:
    """A quantized expert tensor's module base (any naming) -> (MoE block path as the model names it, projection,
    expert index for one expert's tensor or None for a stacked [experts, ...] one)."""
    block, _, proj = module_path(base).rpartition(".experts.")
    m = _EXPERT_INDEX.search(base + ".")
    return block, proj, int(m.group(1)) if m else None


class PackSink:
    """Receives the pipeline's quantized expert tensors and routers; writes packs under `root`."""

    def __init__(self, root: Path, plan, order: str = "identity", coactivation: dict[str, mx.array] | None = None,
                 top_k: int = 1):
        if order not in ORDERS:
            raise InvalidRequest(f"--order {order}: unknown (known: {', '.join(ORDERS)})")
        expected: dict[int, int] = {}
        for item in (it for it in plan.items if it.pack):
            experts = item.outputs[0].shape[0] if len(item.outputs[0].shape) == 3 else 1
            layer = layer_of(item.name)
            expected[layer] = expected.get(layer, 0) + experts * len(item.parts)
        if not expected:
            raise InvalidRequest("--stream-experts: the model has no routed experts")
        self.writer = PackWriter(root, uuid.uuid4().hex, order, expected)
        self.permutations: dict[str, list[int]] = {}  # MoE block path -> perm
        if order == "coactivation":
            if not coactivation:
                raise InvalidRequest("--order coactivation: the calibration pass recorded no routing")
            for block, counts in coactivation.items():
                self.permutations[block] = coactivation_order(np.array(counts), window=top_k)
        for block, perm in self.permutations.items():
            layer = layer_of(block + ".")
            self.writer.permutations[layer] = perm

    def add(self, item, base: str, weight: mx.array, scales: mx.array, biases: mx.array, spec) -> None:
        block, proj, index = expert_target(base)
        parts = {"weight": weight, "scales": scales, "biases": biases}
        parts = {k: np.array(v if index is None else v[None]) for k, v in parts.items()}
        self.writer.add(layer_of(item.name), block, proj, index or 0, parts,
                        {"bits": spec.bits, "group_size": spec.group_size})

    def permute_router(self, item, w: mx.array) -> mx.array:
        """A router's rows in the pack's expert order (identity: unchanged)."""
        block = module_path(item.name.removesuffix(".weight")).rpartition(".")[0]
        perm = self.permutations.get(block)
        return w if perm is None else w[mx.array(perm)]

    def close(self, config: dict[str, Any]) -> dict[str, Any]:
        model = {k: config.get(k) for k in ("model_type", "num_hidden_layers", "hidden_size")}
        return self.writer.close(model)

