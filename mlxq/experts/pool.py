"""The slot pool: the expert memory budget, shared by every MoE layer.

The budget is a fixed number of expert-sized slots, allocated once as stacked arrays ([slots, out, in/...], the
layout `QuantizedSwitchLinear` computes with), so a layer's experts run as one `mx.gather_qmm` over slot indices
and the graph never changes shape. A per-layer table maps expert -> slot (-1: not in memory). Missing experts
are read straight into their slots' memory (numpy views of the MLX arrays) by the reader threads. Layers whose
experts have the same layout share one set of slots; a model with several layouts gets one set per layout,
the budget split in proportion to their size.

Safety: a slot is only overwritten when no queued computation reads it. Every gather built over the slots is
kept in `pending` and evaluated before the next demand read is issued (in a plain forward pass it already is:
the next layer's routing depends on it); the current request's slots and slots still loading are never chosen
as victims, so a prefetch cannot overwrite them either.

Memory: a streamed model holds its resident weights, the slots (at most the budget) and a stated overhead
(`SlotPool.overhead`): MLX's buffer cache, held to CACHE_SHARE of the budget while a pool lives (by default MLX keeps
every freed buffer up to the device's memory: 26-30 MB on the memory test's model, more than its 8 MB pool), and
the reader's staging buffers. Beyond that only the forward pass's working memory (activations, KV cache).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import mlx.core as mx
import numpy as np

from mlxq.errors import ConfigError
from mlxq.experts.io import PackReader, Read, finish, read_shape
from mlxq.experts.pack import LayerPack, Packs
from mlxq.models.moe import QuantizedSwitchLinear, SwitchGLU

PREFETCH_MAX_TOKENS = 8  # a call of at most this many tokens is decoding: it reads `prefetch` layers ahead
CACHE_SHARE = 1 / 16  # MLX's buffer cache while a pool lives, as a share of its budget


@dataclass
class ExpertStats:
    """Counters of a streaming run (a per-run figure is the difference of two snapshots)."""

    tokens: int = 0
    hits: int = 0  # experts a layer wanted that were in memory (or already on their way)
    misses: int = 0  # experts read on demand
    prefetch_reads: int = 0  # experts read ahead for the next layer
    prefetch_hits: int = 0  # of those, wanted while still in memory
    reads: int = 0  # read calls (adjacent experts merged into one)
    bytes_read: int = 0
    read_s: float = 0.0  # wall time with at least one read in flight
    read_sum_s: float = 0.0  # the reads' own times, summed (/ read_s: reads in flight on average while reading)
    stall_s: float = 0.0  # time the forward pass waited for reads
    compute_s: float = 0.0  # time the forward pass waited for MLX at the routing points

    def __sub__(self, other: ExpertStats) -> ExpertStats:
        return ExpertStats(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    @property
    def bytes_used(self) -> float:
        """Bytes read for experts a layer then computed with: every demand read, and the reads ahead that were wanted
        while still in memory (the rest of the reads ahead were wasted). Blocks of one layout are the same size, so
        the share of experts is the share of bytes; a read ahead still unused when the run ends counts as wasted, and
        one made before a window began (the prompt's) but used in it counts as used only up to what the window read."""
        read = self.misses + self.prefetch_reads
        return self.bytes_read * min(self.misses + self.prefetch_hits, read) / read if read else 0.0

    def as_dict(self) -> dict:
        wanted = self.hits + self.misses
        return {
            **asdict(self),
            "hit_rate": self.hits / wanted if wanted else 0.0,
            "bytes_per_token": self.bytes_read / self.tokens if self.tokens else 0.0,
            "read_gb_per_s": self.bytes_read / self.read_s / 1e9 if self.read_s else 0.0,
            "bytes_used": self.bytes_used,
            "bytes_wasted": self.bytes_read - self.bytes_used,
            "used_read_gb_per_s": self.bytes_used / self.read_s / 1e9 if self.read_s else 0.0,
            "experts_per_read": (self.misses + self.prefetch_reads) / self.reads if self.reads else 0.0,
            **read_shape(self.reads, self.read_sum_s, self.read_s),
        }

    def summary(self) -> str:
        d = self.as_dict()
        return (
            f"experts: {self.hits} hits, {self.misses} misses ({100 * d['hit_rate']:.1f}% hit), "
            f"{self.prefetch_hits}/{self.prefetch_reads} prefetched used; {self.bytes_read / 1e6:.1f} MB read in "
            f"{self.reads} reads ({d['bytes_per_token'] / 1e6:.2f} MB/token, {d['read_gb_per_s']:.2f} GB/s); "
            f"read {self.read_s:.2f} s, stall {self.stall_s:.2f} s, compute {self.compute_s:.2f} s"
        )


class LRU:
    """Least recently used slot goes first."""

    def __init__(self, n_slots: int):
        self.order = OrderedDict.fromkeys(range(n_slots))

    def touch(self, slot: int) -> None:
        self.order.move_to_end(slot)

    def victims(self, n: int, exclude: set[int]) -> list[int]:
        out = []
        for slot in self.order:
            if len(out) == n:
                break
            if slot not in exclude:
                out.append(slot)
        return out


POLICIES: dict[str, Callable[[int], LRU]] = {"lru": LRU}


class _Slots:
    """The slots of one expert layout: the arrays, what each slot holds, the eviction policy."""

    def __init__(self, lp: LayerPack, n_slots: int, dtype: mx.Dtype, policy: str, fuse: bool):
        self.n = n_slots
        q = lp.quantization
        dims = {proj: lp.dims(proj) for proj in q}
        fused = fuse and q["gate_proj"] == q["up_proj"]  # as SwitchGLU.fuse decides for resident experts
        out_h, dim = dims["gate_proj"]
        self.glu = SwitchGLU(dim, out_h, 1)  # placeholder projections, replaced below
        make = lambda proj, rows: QuantizedSwitchLinear.empty(  # noqa: E731
            n_slots, dims[proj][1], rows, q[proj]["group_size"], q[proj]["bits"], dtype)
        if fused:
            del self.glu.gate_proj, self.glu.up_proj
            self.glu.gate_up_proj = make("gate_proj", 2 * out_h)
            where = {"gate_proj": ("gate_up_proj", 0, out_h), "up_proj": ("gate_up_proj", out_h, 2 * out_h)}
        else:
            self.glu.gate_proj, self.glu.up_proj = make("gate_proj", out_h), make("up_proj", out_h)
            where = {"gate_proj": ("gate_proj", 0, out_h), "up_proj": ("up_proj", 0, out_h)}
        self.glu.down_proj = make("down_proj", dims["down_proj"][0])
        where["down_proj"] = ("down_proj", 0, dims["down_proj"][0])
        arrays = [self.glu[m][part] for m in dict.fromkeys(w[0] for w in where.values()) for part in
                  ("weight", "scales", "biases")]
        mx.eval(arrays)
        self.nbytes = sum(a.nbytes for a in arrays)
        self.slot_bytes = self.nbytes // n_slots
        # block tensor -> the numpy view of the rows it fills in every slot
        self.dest = []
        for t in lp.tensors:
            proj, part = t.name.split(".")
            module, lo, hi = where[proj]
            self.dest.append((t, np.array(self.glu[module][part], copy=False)[:, lo:hi]))
        self.owner: list[tuple[int, int] | None] = [None] * n_slots
        self.loading: dict[int, Read] = {}
        self.prefetched: set[int] = set()
        self.policy = POLICIES[policy](n_slots)

    def fill(self, slot: int, payload: memoryview) -> None:
        """Copy one expert's block into a slot (runs on a reader thread)."""
        for t, view in self.dest:
            src = np.frombuffer(payload, t.np_dtype, int(np.prod(t.shape)), t.offset).reshape(t.shape)
            view[slot] = src  # (float16 scales widen exactly to a float32 pool)


class SlotPool:
    """Expert slots for all layers of one model, a reader, and the statistics."""

    def __init__(self, packs: Packs, budget: int, top_k: int, *, dtype: mx.Dtype = mx.float32, threads: int = 4,
                 prefetch: int = 0, policy: str = "lru", direct: bool = True, verify: bool = True,
                 fuse: bool = True):
        if policy not in POLICIES:
            raise ConfigError(f"expert cache policy '{policy}': unknown (known: {', '.join(POLICIES)})")
        self.packs, self.budget, self.prefetch = packs, budget, int(prefetch)  # layers read ahead (True: 1)
        layouts: dict[tuple, list[LayerPack]] = {}
        for lp in packs.layers.values():
            layouts.setdefault(lp.layout_key(), []).append(lp)
        per_slot = {key: _slot_bytes(lps[0], dtype) for key, lps in layouts.items()}
        total = sum(per_slot[key] * sum(lp.n_experts for lp in lps) for key, lps in layouts.items())
        minimum = sum(per_slot[key] * min(top_k, lps[0].n_experts) for key, lps in layouts.items())
        if budget < minimum:
            raise ConfigError(
                f"expert memory {_size(budget)} is below the minimum {_size(minimum)}: one layer's step routes to "
                f"{top_k} experts of {_size(max(per_slot.values()))} each"
            )
        self.groups: dict[int, _Slots] = {}
        self._slots: list[_Slots] = []
        for key, lps in layouts.items():
            share = budget * per_slot[key] * sum(lp.n_experts for lp in lps) / total
            n = int(min(share // per_slot[key], sum(lp.n_experts for lp in lps)))
            n = max(n, min(top_k, lps[0].n_experts))
            slots = _Slots(lps[0], n, dtype, policy, fuse)
            self._slots.append(slots)
            for lp in lps:
                self.groups[lp.layer] = slots
        self.tables = {layer: np.full(lp.n_experts, -1, np.int32) for layer, lp in packs.layers.items()}
        # a thread's staging buffer is kept up to what one decode step's merged read can be (top-k adjacent experts)
        stride = max(lp.stride for lp in packs.layers.values())
        self.reader = PackReader(packs, threads, direct, verify, keep=top_k * stride)
        self.cache_limit = int(budget * CACHE_SHARE)
        _cache_limits.hold(self)
        self.pending: list[mx.array] = []
        self.pinned: set[int] = set()
        self.stats = ExpertStats()
        self.steps: deque[dict] = deque(maxlen=4096)  # per forward pass (a decode step is one token)
        self._step_start = ExpertStats()
        self._last_layer = -1

    # ------------------------------------------------------------------------------------------ sizes
    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._slots)

    @property
    def overhead(self) -> int:
        """What the pool lets the process hold beyond the slots: MLX's buffer cache and the staging buffers."""
        return self.cache_limit + self.reader.held_bound

    def capacity(self, layer: int) -> int:
        return self.groups[layer].n

    def experts(self, layer: int) -> SwitchGLU:
        """The layer's experts as computed: stacked over slots."""
        return self.groups[layer].glu

    # ------------------------------------------------------------------------------------------ one layer
    def routed(self, layer: int, experts: mx.array) -> np.ndarray:
        """Waits for the routing (the compute up to here), counts forward passes; the expert ids on the host."""
        t0 = time.perf_counter()
        mx.eval(experts)
        ids = np.array(experts)
        self.stats.compute_s += time.perf_counter() - t0
        if layer <= self._last_layer:
            self._end_step()
        if layer <= self._last_layer or self._last_layer < 0:
            self.stats.tokens += int(np.prod(ids.shape[:-1]))
        self._last_layer = layer
        return ids

    def settle(self) -> None:
        """Evaluate every computation built over the slots (so their slots may be overwritten)."""
        if self.pending:
            mx.eval(self.pending)
            self.pending.clear()

    def request(self, layer: int, wanted: np.ndarray, prefetch: bool = False) -> list[Read]:
        """Make sure experts `wanted` (sorted, at most `capacity`) of `layer` are in slots: missing ones are read.
        Returns the reads to wait for. A prefetch only reads what fits without touching the current request, into
        slots it marks recently used (so that the layers before the one it is for do not evict it)."""
        slots, table, lp = self.groups[layer], self.tables[layer], self.packs.layers[layer]
        if not prefetch:
            self.settle()
            self.pinned = set()
        for s in [s for s, f in slots.loading.items() if f.done() and f.error is None]:
            del slots.loading[s]
        futures, misses, held = [], [], set()
        for e in wanted.tolist():
            s = int(table[e])
            if s < 0:
                misses.append(e)
                continue
            held.add(s)
            if s in slots.loading:
                futures.append(slots.loading[s])
            if not prefetch:
                self.stats.hits += 1
                if s in slots.prefetched:
                    self.stats.prefetch_hits += 1
                    slots.prefetched.discard(s)
        if prefetch:
            victims = slots.policy.victims(len(misses), self.pinned | held | set(slots.loading))
            misses = misses[: len(victims)]
        else:
            self.pinned = held
            victims = slots.policy.victims(len(misses), held | set(slots.loading))
            if len(victims) < len(misses) and slots.loading:  # slots still filling with reads ahead: let them land
                self._land(slots)
                victims = slots.policy.victims(len(misses), held)
            if len(victims) < len(misses):  # only when more experts are asked for than fit (callers chunk)
                raise ConfigError(f"layer {layer}: {len(wanted)} experts asked for, {slots.n} slots")
        for e, s in zip(misses, victims, strict=False):
            old = slots.owner[s]
            if old is not None:
                self.tables[old[0]][old[1]] = -1
            slots.owner[s], table[e] = (layer, e), s
            slots.prefetched.discard(s)
            if prefetch:
                slots.prefetched.add(s)
                slots.policy.touch(s)
            else:
                self.pinned.add(s)
        for first, count in self.reader.runs(lp, misses):
            where = {p: int(table[p]) for p in range(first, first + count)}
            f = self.reader.submit(layer, first, count, lambda p, payload, w=where: slots.fill(w[p], payload))
            futures.append(f)
            for s in where.values():
                slots.loading[s] = f
        if prefetch:
            self.stats.prefetch_reads += len(misses)
        else:
            self.stats.misses += len(misses)
            for s in self.pinned:
                slots.policy.touch(s)
        return futures

    def wait(self, layer: int, futures: list[Read]) -> None:
        """Block until the reads are done; a failed read empties its slots and raises its error."""
        t0 = time.perf_counter()
        try:
            finish(futures)
        except BaseException:
            self._forget_failed(self.groups[layer])
            raise
        finally:
            self.stats.stall_s += time.perf_counter() - t0

    def _land(self, slots: _Slots) -> None:
        """Wait for every read into `slots` (a failed read ahead only empties its slots: a layer that wants the
        expert reads it again and reports the error then)."""
        t0 = time.perf_counter()
        for f in slots.loading.values():
            f.run()
            f.wait()
        self._forget_failed(slots)
        slots.loading.clear()
        self.stats.stall_s += time.perf_counter() - t0

    def _forget_failed(self, slots: _Slots) -> None:
        for s, f in list(slots.loading.items()):
            if f.done() and f.error is not None:
                owner = slots.owner[s]
                if owner is not None:
                    self.tables[owner[0]][owner[1]] = -1
                slots.owner[s] = None
                del slots.loading[s]

    def slot_indices(self, layer: int, ids: np.ndarray, chunk: np.ndarray) -> mx.array:
        """Expert ids [..., k] -> slot ids; experts outside `chunk` point at any of the chunk's slots (their
        outputs are discarded)."""
        table = self.tables[layer]
        slots = table[ids]
        if len(chunk) < len(np.unique(ids)):
            slots = np.where(np.isin(ids, chunk), slots, table[chunk[0]])
        return mx.array(slots.astype(np.uint32))

    # ------------------------------------------------------------------------------------------ statistics
    def snapshot(self) -> ExpertStats:
        reads, nbytes, summed, busy = self.reader.io.snapshot()
        return ExpertStats(**{**asdict(self.stats), "reads": reads, "bytes_read": nbytes, "read_s": busy,
                              "read_sum_s": summed})

    def _end_step(self) -> None:
        now = self.snapshot()
        self.steps.append((now - self._step_start).as_dict())
        self._step_start = now

    def close(self) -> None:
        self.reader.close()
        _cache_limits.release(self)


class _CacheLimits:
    """MLX's buffer cache limit (process-wide) held to the smallest of the live pools' `cache_limit`; the limit found
    before the first pool comes back when the last one closes."""

    def __init__(self):
        self.pools: dict[int, int] = {}
        self.before: int | None = None

    def hold(self, pool: SlotPool) -> None:
        if not self.pools:
            self.before = mx.set_cache_limit(pool.cache_limit)
        self.pools[id(pool)] = pool.cache_limit
        mx.set_cache_limit(min(self.pools.values()))

    def release(self, pool: SlotPool) -> None:
        if self.pools.pop(id(pool), None) is None:
            return
        mx.set_cache_limit(min(self.pools.values()) if self.pools else self.before)


_cache_limits = _CacheLimits()


def experts_nbytes(packs: Packs, dtype: mx.Dtype) -> int:
    """Memory every expert would take in slots: what a 100 % budget is."""
    return sum(_slot_bytes(lp, dtype) * lp.n_experts for lp in packs.layers.values())


def _slot_bytes(lp: LayerPack, dtype: mx.Dtype) -> int:
    """Memory one expert takes in a slot (scales and biases in the compute dtype)."""
    out = 0
    for t in lp.tensors:
        n = int(np.prod(t.shape))
        out += n * (4 if t.name.endswith(".weight") else dtype.size)
    return out


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
