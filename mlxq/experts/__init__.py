"""Running MoE models bigger than memory: routed experts streamed from expert packs on SSD, everything else
resident. `pack` (the on-disk format), `write` (the quantizer's side), `io` (reads), `pool` (the slot pool
shared by all layers), `stream` (the MoE block that uses them).

    mlxq quantize SRC -o OUT --recipe experts-2bit --stream-experts [--order coactivation]
    mlxq.load(OUT, expert_memory="8GB")        # or "25%" of the experts; None: all experts resident
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import mlx.nn as nn

from mlxq.errors import ConfigError
from mlxq.experts.pack import Packs, check_model, has_packs, open_packs
from mlxq.experts.pool import ExpertStats, SlotPool, experts_nbytes
from mlxq.experts.stream import StreamedMoE
from mlxq.models.moe import SparseMoE

__all__ = ["ExpertStats", "expert_stats", "Packs", "SlotPool", "StreamOptions", "has_packs", "open_packs", "parse_size",
           "moe_blocks", "stream_blocks", "start_pool"]


def expert_stats(net: nn.Module) -> ExpertStats | None:
    """Streaming counters so far of a loaded model (hits, misses, bytes, read / stall / compute time; subtract
    two snapshots for one run), or None when its experts are not streamed."""
    pool = getattr(net, "expert_pool", None)
    return None if pool is None else pool.snapshot()


@dataclass
class StreamOptions:
    threads: int = 4  # reader threads (reads in flight)
    # while decoding, read the next `prefetch` layers' likely experts (their routers on this layer's input) while
    # this one computes (True: 1): it helps on bench/experts.py's synthetic model, whose routing is predictable
    # from layer to layer; flash-moe measured a loss on the real Qwen3.5-397B (cache pollution, ~30 % accurate
    # predictions), and at 30 % right guesses (the bench's arm prefetch_1/0.3) most bytes read ahead are wasted, so
    # it is off by default. (A prompt always reads the next layer ahead: `stream`.)
    prefetch: int = 0
    policy: str = "lru"
    direct: bool = True  # O_DIRECT / F_NOCACHE: reads bypass the page cache
    verify: bool = True  # check each block's CRC-32 as it is read

    @classmethod
    def of(cls, options: StreamOptions | dict[str, Any] | None) -> StreamOptions:
        if isinstance(options, cls):
            return options
        try:
            return cls(**(options or {}))
        except TypeError as e:
            raise ConfigError(f"expert streaming options: {e}") from None


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b|%)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 1024, "mi": 1024**2, "gi": 1024**3,
          "ti": 1024**4}


def parse_size(value: str | int | float, whole: int | None = None) -> int:
    """'8GB', '512MiB', 1e9 or '25%' (of `whole`) -> bytes."""
    if isinstance(value, int | float):
        return int(value)
    m = _SIZE.match(str(value))
    if not m:
        raise ConfigError(f"expert memory '{value}': expected a size such as 8GB, 512MiB or 25%")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    if unit == "%":
        if whole is None:
            raise ConfigError(f"expert memory '{value}': a percentage needs the experts' total size")
        return int(whole * number / 100)
    return int(number * _UNITS[unit.removesuffix("b")])


def moe_blocks(model: nn.Module) -> dict[str, SparseMoE]:
    return {path: m for path, m in model.named_modules() if isinstance(m, SparseMoE)}


def stream_blocks(model: nn.Module, packs: Packs) -> list[StreamedMoE]:
    """Swap every MoE block the packs cover for a `StreamedMoE` (before the resident weights are bound, so the
    model no longer expects expert tensors); returned in layer order, each knowing the next."""
    blocks = moe_blocks(model)
    check_model(packs, blocks)
    modules = dict(model.named_modules())
    streamed = []
    for lp in sorted(packs.layers.values(), key=lambda lp: lp.layer):
        parent, _, leaf = lp.module.rpartition(".")
        block = StreamedMoE(blocks[lp.module], lp.layer)
        setattr(modules[parent], leaf, block)
        streamed.append(block)
    for a, b in zip(streamed, streamed[1:], strict=False):
        a.next = b
    return streamed


def start_pool(streamed: list[StreamedMoE], packs: Packs, expert_memory: str | int, dtype, fuse: bool,
               options: StreamOptions | dict | None = None) -> SlotPool:
    """The slot pool for `expert_memory` bytes (or a share of all experts' memory, '25%'), attached to the blocks."""
    opts = StreamOptions.of(options)
    budget = parse_size(expert_memory, experts_nbytes(packs, dtype))
    top_k = max(b.top_k for b in streamed)
    pool = SlotPool(packs, budget, top_k, dtype=dtype, threads=opts.threads, prefetch=opts.prefetch,
                    policy=opts.policy, direct=opts.direct, verify=opts.verify, fuse=fuse)
    for block in streamed:
        block.pool = pool
    return pool
