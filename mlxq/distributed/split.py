"""How a model is split over the ranks of a group (`--parallel`): which tensors, and which part of each, a rank
loads; what its network looks like; where the collectives go.

- pipeline: each rank holds a contiguous range of layers, the ranges balanced by bytes; rank 0 also holds the
  embedding, the final norm and the head, so activations go round the ring 0 -> 1 -> ... -> n-1 -> 0 (send/recv,
  `pipeline.py`).
- tensor: every rank holds every layer with a share of its attention heads, DeltaNet heads and MLP hidden units
  (every expert's too). Projections into a block are split by output (column-parallel), the block's output
  projection by input (row-parallel), so each rank's block output is a partial sum and one `all_sum` per block
  adds them (Megatron). The embedding is replicated; the head is on rank 0 only.
- experts: every rank holds the dense parts (replicated) and a contiguous share of each MoE layer's routed
  experts. Every rank routes every token (same hidden state, same router, so the same choice), computes the pairs
  routed to its own experts, and one collective per MoE block combines the ranks' parts: an `all_sum`, or an
  `all_gather` of only the rows each rank computed when that moves fewer bytes (`ExpertShard`).

A model whose experts are in expert packs (`mlxq.experts`) streams them on every rank: each opens only the pack
entries of the experts it holds (`Split.stream_share`: a share of every layer's, or all of its own layers') and
streams them within its own budget, with the same pool and the same `StreamedMoE` code as one process.

Which part of a tensor a rank holds is data: `TENSOR_RULES` keys (module class, parameter) to the axis and the
share, read off the unloaded network the checkpoint describes. The loader (`mlxq.loading.load_model(split=)`)
reads only that part of each tensor.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxq.engine.batch import stackable
from mlxq.engine.cache import KVCache
from mlxq.errors import ConfigError, UnsupportedModel
from mlxq.experts.pack import Packs, has_packs
from mlxq.experts.stream import StreamedMoE
from mlxq.formats.base import TensorInfo, TensorSource
from mlxq.models.base import CausalLM
from mlxq.models.moe import SparseMoE, SwitchGLU

MODES = ("pipeline", "tensor", "experts")

Ranges = tuple[tuple[int, int], ...]

# A decoder layer's tensors, as checkpoints name them (HF, mlx-lm, multimodal wrappers): group 1 is the index.
_LAYER = re.compile(r"^(?:model\.|model\.language_model\.|language_model\.model\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Placement:
    """Where one tensor of the checkpoint goes on this rank: its name in the rank's network and, when the rank holds
    only part of it, the `ranges` along `axis`, in units of the model's own size of that axis (`logical`; the packed
    columns of a quantized weight are scaled to it). `zero`: a row-parallel block's output bias on ranks > 0, held
    as zeros so the sum adds it once."""

    name: str
    axis: int | None = None
    ranges: Ranges = ()
    logical: int = 0
    zero: bool = False
    align: int = 1  # where the axis is packed (quantized), each boundary must fall on a multiple of this


def even_ranges(total: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """`total` units in `parts` contiguous ranges as even as `align` (a multiple every boundary keeps) allows."""
    if total % align:
        align = 1
    blocks = total // align
    if blocks < parts:
        raise ConfigError(f"cannot split {total} units over {parts} ranks")
    bounds = [r * blocks // parts * align for r in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def head_ranges(heads: int, kv_heads: int, parts: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Query-head and key/value-head ranges per rank for grouped heads (GQA, DeltaNet's value heads over key heads).
    A rank's query heads must use its key/value heads the way the kernel maps them (query i of r local heads over
    k local groups uses group i // (r / k)), so a rank holds whole groups or part of one group."""
    if parts > heads:
        raise ConfigError(f"cannot split {heads} heads over {parts} ranks")
    group = heads // kv_heads
    out = []
    for a, b in even_ranges(heads, parts):
        ka, kb = a // group, (b - 1) // group + 1
        local_group = (b - a) // (kb - ka) if (b - a) % (kb - ka) == 0 else 0
        if not local_group or any((a + i) // group - ka != i // local_group for i in range(b - a)):
            raise ConfigError(f"cannot split {heads} heads sharing {kv_heads} key/value heads over {parts} ranks")
        out.append(((a, b), (ka, kb)))
    return out


class Split:
    """The share of a model rank `rank` of `size` holds. Subclasses per mode; the loader calls `wants` (checkpoint
    names worth reading), `network` (the rank's unloaded network), `place` (where each sanitized tensor goes), then,
    once the weights are bound, `finish` (collectives in place)."""

    mode = ""

    def __init__(self, config: dict[str, Any], infos: list[TensorInfo], rank: int, size: int, group=None,
                 dequantized: bool = False):
        self.config, self.rank, self.size, self.group = config, rank, size, group
        self.quant_align = quant_align(config)
        self.dequantized = dequantized  # GGML blocks become floats at load: a tensor's bytes are then its elements'

    def wants(self, name: str) -> bool:
        return True

    def network(self, full: CausalLM, build) -> CausalLM:
        """The rank's network, unloaded. `full`: the whole model as the config describes it (nothing evaluated);
        `build(config)`: a fresh one for another config."""
        return full

    def place(self, name: str, shape: tuple[int, ...]) -> Placement | None:
        return Placement(name)

    def finish(self, net: CausalLM) -> CausalLM:
        raise NotImplementedError

    def stream_share(self, streamed: list[StreamedMoE], packs: Packs) -> tuple[list[StreamedMoE], Packs]:
        """Of a model whose experts stream from packs: the streamed blocks this rank runs, and the part of the packs
        it reads (only the experts it owns, so its budget, "25%" say, is a share of its own experts)."""
        owned = {}
        for block in streamed:
            share = self.expert_share(block.layer, packs.layers[block.layer].n_experts)
            if share is not None:
                owned[block.layer] = share
        kept = [b for b in streamed if b.layer in owned]
        for a, b in zip(kept, [*kept[1:], None], strict=False):  # prefetch looks ahead within the rank's own layers
            a.next, a.first = b, owned[a.layer][0]
        return kept, packs.share(owned)

    def expert_share(self, layer: int, n_experts: int) -> tuple[int, int] | None:
        """The routed experts [first, stop) of MoE layer `layer` this rank streams from its expert packs, or None
        when the layer is not on this rank."""
        raise UnsupportedModel(f"{self.mode} split: expert packs stream under --parallel experts or pipeline (a rank "
                               "reads whole experts)")

    def describe(self) -> dict:
        return {"parallel": self.mode, "rank": self.rank, "size": self.size}

    # ------------------------------------------------------------------------------------------ reading
    def take(self, full: CausalLM, build, weights: dict[str, mx.array], sources: dict[str, mx.array],
             tensors: TensorSource) -> tuple[CausalLM, dict[str, mx.array]]:
        """The rank's network and its share of `weights` (sanitized, lazy). Parts of tensors are read one at a time
        and evaluated at once, so the whole of a tensor the rank needs only part of never stays in memory: straight
        from the file where the tensor is as the checkpoint stores it (`TensorSource.read_slice`), else sliced from
        the lazy tensor and copied."""
        # Class names and shapes only: a module kept here would keep its weights once they are read.
        self._classes = {path: type(m).__name__ for path, m in full.named_modules()}
        self._shapes = {k: v.shape for k, v in _flat_parameters(full).items()}
        self.template = full.make_cache()  # the whole model's caches: what every rank's bookkeeping follows
        self.rewindable = all(type(c) is KVCache for c in self.template)
        net = self.network(full, build)
        origin = {id(a): n for n, a in sources.items()}  # tensors sanitize passed through untouched
        sources.clear()
        out: dict[str, mx.array] = {}
        for name in list(weights):
            arr = weights.pop(name)
            where = self.place(name, arr.shape)
            if where is None:
                continue
            if where.zero:
                out[where.name] = mx.zeros(arr.shape, arr.dtype)
            elif where.axis is None:
                out[where.name] = arr
            else:
                out[where.name] = _read_part(arr, where, origin.get(id(arr)), tensors)
            del arr
        return net, out

    def _logical(self, name: str) -> tuple[int, ...]:
        """The unquantized shape of the weight `name` belongs to (scales, biases and packed words included)."""
        base = name.rsplit(".", 1)[0]
        for key in (name, base + ".weight"):
            if key in self._shapes:
                return self._shapes[key]
        return ()

    def _block(self, name: str, rules) -> tuple[str, str] | None:
        """The (block class, name in the block) key of `rules` a tensor falls under: the block holding the
        projection the tensor belongs to (`self_attn` for `self_attn.q_proj.weight`), or the block holding the
        tensor itself (`linear_attn` for `linear_attn.dt_bias`); None for a tensor no rule names."""
        parts = name.split(".")
        for cut in (2, 1):
            key = (self._classes.get(".".join(parts[:-cut])), parts[-cut])
            if key in rules:
                return key
        return None


def quant_align(config: dict[str, Any]) -> int:
    """The run of values a quantized tensor packs together along its input axis (mlx-lm's group size; GGML blocks hold
    up to 256): a split must cut packed columns at multiples of it."""
    quant = config.get("quantization") or {}
    entries = [quant, *(v for v in quant.values() if isinstance(v, dict))]
    if any("ggml_type" in e for e in entries):
        return 256
    return max(int(e.get("group_size", 1)) for e in entries)


def _flat_parameters(net: nn.Module) -> dict[str, mx.array]:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(net.parameters()))


def _read_part(arr: mx.array, where: Placement, source_name: str | None, tensors: TensorSource) -> mx.array:
    axis = where.axis % arr.ndim
    scale = arr.shape[axis] / where.logical if where.logical else 1
    ranges = [(int(a * scale), int(b * scale)) for a, b in where.ranges]
    packed = scale != 1 and any(a % where.align or b % where.align for a, b in where.ranges)
    if packed or any(a != s * scale or b != e * scale for (a, b), (s, e) in zip(ranges, where.ranges, strict=True)):
        raise ConfigError(f"tensor '{where.name}': its quantized layout cannot be split at {list(where.ranges)} "
                          f"(packed by {where.align}); try fewer ranks or --parallel pipeline")
    if source_name is not None and tensors.can_slice:
        return tensors.read_slice(source_name, axis, ranges)
    part = mx.concatenate([mx.take(arr, mx.arange(a, b), axis=axis) for a, b in ranges], axis=axis)
    mx.eval(part)
    return part


class AllSum(nn.Module):
    """A row-parallel block: every rank computes a partial output; the block's output is their sum."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner = inner
        self._group = group

    def __call__(self, *args):
        return mx.distributed.all_sum(self.inner(*args), group=self._group)


class Shard(CausalLM):
    """A rank's network behind the `CausalLM` contract. Only rank 0 samples, so only its shard has the head; on the
    others it passes hidden states through (the engine's step still ends there, and must be evaluated for the
    collectives inside it to run). Every rank keeps the final norm: an MTP head (`mtp`, split like the layers)
    reads the normed hidden states on every rank."""

    def __init__(self, net: CausalLM, owns_head: bool):
        super().__init__()
        self.net = net
        self.owns_head = owns_head
        self._cache_template = net.make_cache()

    @property
    def layers(self) -> list[nn.Module]:
        return self.net.layers

    @property
    def norm(self):
        return self.net.norm

    @property
    def mtp(self) -> nn.Module | None:
        return mtp_head(self.net)

    def embed(self, tokens: mx.array) -> mx.array:
        return self.net.embed(tokens)

    def head(self, x: mx.array) -> mx.array:
        return self.net.head(x) if self.owns_head else x

    def make_cache(self) -> list:
        return copy.deepcopy(self._cache_template)


def mtp_head(net: nn.Module) -> nn.Module | None:
    """The network's multi-token-prediction head (`models.mtp`), if it has one."""
    return net["mtp"] if "mtp" in net else None


def decoder_layers(net: CausalLM) -> list[nn.Module]:
    """The layers a split puts its collectives in: the network's, and its MTP head's (split like them)."""
    mtp = mtp_head(net)
    return [*net.layers, *(mtp.layers if mtp is not None else [])]


def _drop_head(net: CausalLM) -> None:
    """Ranks other than 0 never compute logits: no head."""
    if "lm_head" in net:
        del net["lm_head"]


# ---------------------------------------------------------------------------------------------- pipeline
class PipelineSplit(Split):
    """Contiguous layers per rank, balanced by their bytes; rank 0 adds the embedding, final norm and head."""

    mode = "pipeline"

    def __init__(self, config, infos, rank, size, group=None, dequantized=False):
        super().__init__(config, infos, rank, size, group, dequantized)
        layer_bytes: dict[int, int] = {}
        extra = 0
        for info in infos:
            nbytes = 4 * math.prod(info.shape) if dequantized else info.nbytes  # as loaded (a GGUF's types differ)
            if m := _LAYER.match(info.name):
                layer_bytes[int(m.group(1))] = layer_bytes.get(int(m.group(1)), 0) + nbytes
            elif not info.name.startswith(("model.visual.", "vision_tower.", "visual.")):
                extra += nbytes  # rank 0's: the embedding, final norm, head and MTP head
        n_layers = int(config.get("num_hidden_layers") or len(layer_bytes))
        if n_layers < size:
            raise ConfigError(f"pipeline: {n_layers} layers cannot be split over {size} ranks")
        self.bounds = balance([layer_bytes.get(i, 0) for i in range(n_layers)], extra, size)
        self.first, self.stop = self.bounds[rank], self.bounds[rank + 1]
        # Rank 0 holds the MTP head (Qwen3.5's `mtp.*`, kept unless the experts stream from packs), beside the
        # embedding and head it shares: it reads the hidden state at every position fed, which the last rank then
        # sends back whole (`Stage.forward_out`).
        mtp_layers = config.get("mtp_num_hidden_layers") or config.get("num_nextn_predict_layers")
        self.mtp = bool(mtp_layers) and not has_packs(config) and any(
            info.name.startswith(("mtp.", "model.mtp.")) for info in infos)

    def wants(self, name: str) -> bool:
        if m := _LAYER.match(name):
            return self.first <= int(m.group(1)) < self.stop
        return self.rank == 0

    def network(self, full, build):
        if not stackable(self.template):
            raise UnsupportedModel("pipeline: the model's caches (sliding windows) do not batch; use --parallel tensor")
        full.model.layers = full.model.layers[self.first : self.stop]
        if self.rank:
            _drop_head(full)
            del full.model["embed_tokens"], full.model["norm"]
        return full

    def place(self, name, shape):
        if m := re.match(r"^model\.layers\.(\d+)\.(.*)$", name):
            i = int(m.group(1))
            return Placement(f"model.layers.{i - self.first}.{m.group(2)}") if self.first <= i < self.stop else None
        return Placement(name) if self.rank == 0 else None

    def finish(self, net):
        from mlxq.distributed.pipeline import Stage

        if self.rank == 0 and (mtp_head(net) is not None) != self.mtp:
            raise ConfigError(f"pipeline: the MTP head was {'not ' * self.mtp}expected on rank 0")
        return Stage(net, self.template[self.first : self.stop], self.rank, self.size, self.group, self.rewindable,
                     returns_hidden=self.mtp)

    def expert_share(self, layer, n_experts):
        return (0, n_experts) if self.first <= layer < self.stop else None

    def describe(self):
        return {**super().describe(), "layers": [self.first, self.stop]}


def balance(layer_bytes: list[int], extra: int, parts: int) -> list[int]:
    """Layer boundaries [0, b1, ..., L] giving each of `parts` ranks contiguous layers of about equal bytes, rank 0
    counting `extra` (embedding and head) too; every rank gets at least one layer."""
    cum = [extra]
    for b in layer_bytes:
        cum.append(cum[-1] + b)
    total, n = cum[-1], len(layer_bytes)
    bounds = [0]
    for r in range(1, parts):
        lo, hi = bounds[-1] + 1, n - (parts - r)
        bounds.append(min(range(lo, hi + 1), key=lambda i: abs(cum[i] - r * total / parts)))
    return bounds + [n]


# ---------------------------------------------------------------------------------------------- tensor
# (block class, parameter) -> (axis, share). Axis 0: the projection's outputs (column-parallel) or a per-head
# vector; -1: its inputs (row-parallel: the block's output is a partial sum). Shares are resolved per rank by
# `TensorSplit._ranges`.
TENSOR_RULES: dict[tuple[str, str], tuple[int, str]] = {
    ("Attention", "q_proj"): (0, "q"),
    ("Attention", "k_proj"): (0, "kv"),
    ("Attention", "v_proj"): (0, "kv"),
    ("Attention", "o_proj"): (-1, "o"),
    ("GatedAttention", "q_proj"): (0, "q_gated"),  # per head: the query, then its output gate
    ("GatedAttention", "k_proj"): (0, "kv"),
    ("GatedAttention", "v_proj"): (0, "kv"),
    ("GatedAttention", "o_proj"): (-1, "o"),
    ("GatedMLP", "gate_proj"): (0, "hidden"),
    ("GatedMLP", "up_proj"): (0, "hidden"),
    ("GatedMLP", "down_proj"): (-1, "hidden"),
    ("SwitchGLU", "gate_proj"): (1, "hidden"),
    ("SwitchGLU", "up_proj"): (1, "hidden"),
    ("SwitchGLU", "down_proj"): (-1, "hidden"),
    ("GatedDeltaNet", "in_proj_qkv"): (0, "delta_qkv"),
    ("GatedDeltaNet", "conv1d"): (0, "delta_qkv"),  # depthwise: one channel per q/k/v feature
    ("GatedDeltaNet", "in_proj_z"): (0, "delta_v"),
    ("GatedDeltaNet", "in_proj_b"): (0, "delta_heads"),
    ("GatedDeltaNet", "in_proj_a"): (0, "delta_heads"),
    ("GatedDeltaNet", "dt_bias"): (0, "delta_heads"),
    ("GatedDeltaNet", "A_log"): (0, "delta_heads"),
    ("GatedDeltaNet", "out_proj"): (-1, "delta_v"),
}
ROW_PARALLEL = ("Attention", "GatedAttention", "GatedDeltaNet", "GatedMLP", "SparseMoE")  # blocks ending in a sum


class TensorSplit(Split):
    """Heads and hidden units split over the ranks (see the module docstring)."""

    mode = "tensor"

    def __init__(self, config, infos, rank, size, group=None, dequantized=False):
        super().__init__(config, infos, rank, size, group, dequantized)
        c = config
        self.heads = int(c["num_attention_heads"])
        self.kv_heads = int(c.get("num_key_value_heads") or self.heads)
        self.head_dim = int(c.get("head_dim") or c["hidden_size"] // self.heads)
        (self.q, self.kv) = head_ranges(self.heads, self.kv_heads, size)[rank]
        self.delta = None
        if c.get("linear_num_value_heads"):
            hv, hk = int(c["linear_num_value_heads"]), int(c["linear_num_key_heads"])
            self.delta = dict(hk=hk, dk=int(c["linear_key_head_dim"]), dv=int(c["linear_value_head_dim"]),
                              v=head_ranges(hv, hk, size)[rank][0], k=head_ranges(hv, hk, size)[rank][1])

    def _hidden(self, total: int) -> tuple[int, int]:
        return even_ranges(total, self.size, self.quant_align)[self.rank]

    def local_config(self) -> dict[str, Any]:
        """The config of one rank's network: the same layers with its share of heads and hidden units."""
        c = dict(self.config)
        c["num_attention_heads"], c["num_key_value_heads"] = self.q[1] - self.q[0], self.kv[1] - self.kv[0]
        c["head_dim"] = self.head_dim
        for key in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
            if c.get(key):
                a, b = self._hidden(int(c[key]))
                c[key] = b - a
        if self.delta:
            c["linear_num_value_heads"] = self.delta["v"][1] - self.delta["v"][0]
            c["linear_num_key_heads"] = self.delta["k"][1] - self.delta["k"][0]
        return c

    def network(self, full, build):
        for _, m in full.named_modules():
            if "attn_sub_norm" in m or "ffn_sub_norm" in m:
                raise UnsupportedModel("tensor split: BitNet's sub-norms span every head; use --parallel pipeline")
        net = build(self.local_config())
        if self.rank:
            _drop_head(net)
        return net

    def _ranges(self, share: str, logical: int) -> Ranges:
        D = self.head_dim
        if share in ("q", "o"):
            return ((self.q[0] * D, self.q[1] * D),)
        if share == "q_gated":
            return ((self.q[0] * 2 * D, self.q[1] * 2 * D),)
        if share == "kv":
            return ((self.kv[0] * D, self.kv[1] * D),)
        if share == "hidden":
            return (self._hidden(logical),)
        d = self.delta
        (va, vb), (ka, kb) = d["v"], d["k"]
        if share == "delta_heads":
            return ((va, vb),)
        if share == "delta_v":
            return ((va * d["dv"], vb * d["dv"]),)
        key_dim = d["hk"] * d["dk"]  # delta_qkv: the q, k and v features of its heads
        return ((ka * d["dk"], kb * d["dk"]), (key_dim + ka * d["dk"], key_dim + kb * d["dk"]),
                (2 * key_dim + va * d["dv"], 2 * key_dim + vb * d["dv"]))

    def place(self, name, shape):
        if self.rank and name.startswith("lm_head."):
            return None
        key = self._block(name, TENSOR_RULES)
        if key is None:
            return Placement(name)  # replicated: norms, the embedding, routers
        axis, share = TENSOR_RULES[key]
        logical = self._logical(name)
        size = logical[axis] if logical else shape[axis]
        if axis != 0 and name.endswith(".bias"):  # the output bias of a row-parallel projection: added once
            return Placement(name, zero=self.rank > 0)
        if name.endswith(".bias"):
            axis = 0
        return Placement(name, axis, self._ranges(share, size), size, align=self.quant_align)

    def finish(self, net):
        for layer in decoder_layers(net):
            for key, child in list(layer.children().items()):
                if type(child).__name__ in ROW_PARALLEL:
                    layer[key] = AllSum(child, self.group)
        return Shard(net, owns_head=self.rank == 0)

    def describe(self):
        out = {**super().describe(), "heads": list(self.q), "kv_heads": list(self.kv)}
        if self.delta:
            out["delta_heads"] = list(self.delta["v"])
        return out


# ---------------------------------------------------------------------------------------------- experts
EXPERT_RULES = {("SwitchGLU", "gate_proj"), ("SwitchGLU", "up_proj"), ("SwitchGLU", "down_proj")}  # axis 0: experts


class ExpertsSplit(Split):
    """Each rank a contiguous share of every MoE layer's routed experts; everything else replicated."""

    mode = "experts"

    def __init__(self, config, infos, rank, size, group=None, dequantized=False):
        super().__init__(config, infos, rank, size, group, dequantized)
        n = int(config.get("num_experts") or config.get("num_local_experts") or 0)
        if not n:
            raise ConfigError("experts split: the model has no routed experts (use --parallel pipeline or tensor)")
        self.n_experts = n
        ranges = even_ranges(n, size)
        self.first, self.stop = ranges[rank]
        self.bounds = [a for a, _ in ranges] + [n]  # rank r owns experts bounds[r]..bounds[r + 1]

    def network(self, full, build):
        for _, m in full.named_modules():
            if isinstance(m, SparseMoE):
                if "experts" in m:  # (streamed blocks have none: `expert_share` picks what they read)
                    gate = m.experts.gate_proj.weight
                    m.experts = SwitchGLU(gate.shape[2], gate.shape[1], self.stop - self.first)
        if self.rank:
            _drop_head(full)
        return full

    def place(self, name, shape):
        if self.rank and name.startswith("lm_head."):
            return None
        if self._block(name, EXPERT_RULES) is not None:
            return Placement(name, 0, ((self.first, self.stop),), shape[0])
        return Placement(name)

    def finish(self, net):
        for layer in decoder_layers(net):
            for key, child in list(layer.children().items()):
                if isinstance(child, SparseMoE):
                    layer[key] = ExpertShard(child, self.bounds, self.rank, self.group)
        return Shard(net, owns_head=self.rank == 0)

    def expert_share(self, layer, n_experts):
        return self.first, self.stop

    def describe(self):
        return {**super().describe(), "experts": [self.first, self.stop], "of": self.n_experts}


COMBINES = ("auto", "sum", "gather")


class ExpertShard(nn.Module):
    """A MoE block of an experts split: this rank's experts [first, stop), resident or streamed from its own packs
    within its own budget (a `StreamedMoE`, whose packs hold only this rank's experts).

    Dispatch: the dense parts are replicated, so every rank already holds every token's hidden state and routes it
    (same state, same router, same choice); each computes only the (token, expert) pairs routed to its own experts,
    which takes one host sync per block to learn which pairs those are. Nothing is sent to dispatch.
    Combine: every rank needs every token's output (the next dense part runs everywhere). MLX has no all-to-all on
    the ring backend; it is built from its collectives, whichever moves fewer bytes out of each rank (`combine`):
    - "sum": one `all_sum` of the block's output [tokens, dim], each rank's part zero where it computed nothing; a
      ring moves 2 (p - 1) / p of it out of each rank, in 2 (p - 1) hops.
    - "gather": one `all_gather` of only the rows each rank computed (the tokens routed to at least one of its
      experts), padded to the most any rank computed, m; (p - 1) m rows out of each rank, in p - 1 hops. Every
      rank knows every rank's rows from the routing, so no index is sent. Pays when p m < 2 tokens: few experts
      per token against many ranks, or a prompt whose tokens keep to a few ranks' experts.
    "auto" takes gather when it moves fewer bytes (p m < 2 tokens), else sum (a decode step of one token: m = 1,
    so sum, at equal bytes on 2 ranks); every rank decides alike from the same routing. The shared expert is held
    by every rank: added once into the sum (rank 0), or by every rank after a gather."""

    def __init__(self, moe: SparseMoE, bounds: list[int], rank: int, group, combine: str = "auto"):
        super().__init__()
        self.moe = moe
        self.bounds, self.rank = np.array(bounds), rank  # (an array, not a list: kept out of the module tree)
        self.first, self.count = bounds[rank], bounds[rank + 1] - bounds[rank]
        self._group, self.combine = group, combine
        self.sums = self.gathers = 0  # calls combined each way

    def __call__(self, x: mx.array) -> mx.array:
        moe, dim = self.moe, x.shape[-1]
        experts, weights = moe.route(x)
        k = experts.shape[-1]
        streamed = isinstance(moe, StreamedMoE)
        ids = moe.pool.routed(moe.layer, experts) if streamed else np.array(experts)
        flat = ids.reshape(-1).astype(np.int64)
        local = flat - self.first
        pairs = np.flatnonzero((local >= 0) & (local < self.count))
        tokens = x.reshape(-1, dim)
        y = mx.zeros(tokens.shape, x.dtype)
        if pairs.size:
            rows, own = mx.array(pairs // k), local[pairs][:, None]
            if streamed:  # its own tokens predict what the next layers will want of its experts: read ahead
                out = moe.run_experts(tokens[rows], own, ahead=True)[:, 0]
            else:
                out = moe.experts(tokens[rows], mx.array(own.astype(np.uint32)))[:, 0]
            scale = weights.reshape(-1)[mx.array(pairs)][:, None].astype(x.dtype)
            y = y.at[rows].add(out * scale)
        shared = moe.shared(x)
        owner = (np.searchsorted(self.bounds, flat, side="right") - 1).reshape(-1, k)
        computed = [np.flatnonzero((owner == r).any(axis=-1)) for r in range(len(self.bounds) - 1)]
        if self._gathers(len(tokens), computed):
            self.gathers += 1
            y = self._gather(y, computed).reshape(x.shape)
            return y if shared is None else y + shared
        self.sums += 1
        y = y.reshape(x.shape)
        if shared is not None and self.rank == 0:
            y = y + shared
        return mx.distributed.all_sum(y, group=self._group)

    def _gathers(self, n: int, computed: list[np.ndarray]) -> bool:
        if self.combine == "auto":
            return len(computed) * max(len(c) for c in computed) < 2 * n
        return self.combine == "gather"

    def _gather(self, y: mx.array, computed: list[np.ndarray]) -> mx.array:
        """Each rank's computed rows to every rank, added up in rank order (the same sums on every rank)."""
        m = max(1, max(len(c) for c in computed))
        mine = computed[self.rank]
        block = y[mx.array(mine)] if len(mine) else mx.zeros((0, y.shape[-1]), y.dtype)
        if len(mine) < m:
            block = mx.concatenate([block, mx.zeros((m - len(mine), y.shape[-1]), y.dtype)])
        everyone = mx.distributed.all_gather(block, group=self._group)
        out = mx.zeros(y.shape, y.dtype)
        for r, rows in enumerate(computed):
            if len(rows):
                out = out.at[mx.array(rows)].add(everyone[r * m : r * m + len(rows)])
        return out


def expert_combines(net: nn.Module) -> dict[str, int]:
    """How many MoE block calls of an experts split combined by all_sum and by all_gather so far."""
    shards = [m for _, m in net.named_modules() if isinstance(m, ExpertShard)]
    return {"sum": sum(m.sums for m in shards), "gather": sum(m.gathers for m in shards)}


def set_expert_combine(net: nn.Module, combine: str) -> None:
    """How the experts split combines its blocks' outputs (`ExpertShard`): "auto" (the default), "sum" or "gather".
    Every rank must set the same, before its next step."""
    if combine not in COMBINES:
        raise ConfigError(f"expert combine '{combine}': expected one of {', '.join(COMBINES)}")
    for _, m in net.named_modules():
        if isinstance(m, ExpertShard):
            m.combine = combine


SPLITS = {"pipeline": PipelineSplit, "tensor": TensorSplit, "experts": ExpertsSplit}


def make_split(mode: str, config: dict[str, Any], infos: list[TensorInfo], rank: int, size: int, group=None,
               dequantized: bool = False) -> Split:
    """Rank `rank`'s share; `dequantized`: the checkpoint's quantized blocks become floats as they load."""
    if mode not in SPLITS:
        raise ConfigError(f"parallel: '{mode}' is not one of {', '.join(MODES)}")
    return SPLITS[mode](config, infos, rank, size, group, dequantized)


def auto_mode(config: dict[str, Any]) -> str:
    """What `--parallel` defaults to: experts for a MoE model (the experts are most of its bytes, and a token
    needs few of them), else pipeline (one hop per rank per token, whatever the link's latency)."""
    return "experts" if config.get("num_experts") or config.get("num_local_experts") else "pipeline"
