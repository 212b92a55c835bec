"""GGUF <-> HF conventions as data: architectures, metadata keys, tensor names, and the transforms llama.cpp's
converter applies to tensors.

Facts from llama.cpp's converter (convert_hf_to_gguf.py, conversion/qwen.py, gguf-py's tensor map) and Ollama's
(convert/convert_qwen3next.go): which HF config field each `{arch}.*` key holds, how tensors are named, and what the
converter changed in the numbers. Every transform is defined once with both directions: `to_gguf` is what the
converter does, `to_hf` undoes it (the reader uses `to_hf`, writers `to_gguf`). A tensor's transforms are listed
in the order the converter applies them; `to_hf_all` undoes them in reverse.

Names are given without the block prefix: "attn_q.weight" stands for "blk.{i}.attn_q.weight" and
"self_attn.q_proj.weight" for "model.layers.{i}.self_attn.q_proj.weight". A table entry without a ".weight" or
".bias" suffix maps both suffixes (attn_q -> self_attn.q_proj covers weight and bias).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf.constants import MODEL_TENSOR, TENSOR_NAMES, Keys


def _name(t: MODEL_TENSOR) -> str:
    """gguf-py's name for a tensor kind, without the block prefix."""
    return TENSOR_NAMES[t].removeprefix("blk.{bid}.")


def _key(template: str) -> str:
    """gguf-py's metadata key, without the "{arch}." prefix."""
    return template.removeprefix("{arch}.")


# ------------------------------------------------------------------------------------------------ metadata
# GGUF metadata key (without the "{arch}." prefix) -> HF config field, where one holds the other as it is
CONFIG_KEYS: dict[str, str] = {
    _key(Keys.LLM.BLOCK_COUNT): "num_hidden_layers",
    _key(Keys.LLM.EMBEDDING_LENGTH): "hidden_size",
    _key(Keys.LLM.FEED_FORWARD_LENGTH): "intermediate_size",
    _key(Keys.LLM.CONTEXT_LENGTH): "max_position_embeddings",
    _key(Keys.Attention.HEAD_COUNT): "num_attention_heads",
    _key(Keys.Attention.HEAD_COUNT_KV): "num_key_value_heads",
    _key(Keys.Attention.KEY_LENGTH): "head_dim",
    _key(Keys.Attention.LAYERNORM_RMS_EPS): "rms_norm_eps",
    _key(Keys.Attention.SLIDING_WINDOW): "sliding_window",
    _key(Keys.Rope.FREQ_BASE): "rope_theta",
    _key(Keys.LLM.FINAL_LOGIT_SOFTCAPPING): "final_logit_softcapping",
    _key(Keys.LLM.VOCAB_SIZE): "vocab_size",
    # Gated DeltaNet (qwen35, qwen35moe, qwen3next): llama.cpp reuses Mamba's ssm.* keys
    _key(Keys.SSM.CONV_KERNEL): "linear_conv_kernel_dim",
    _key(Keys.SSM.STATE_SIZE): "linear_key_head_dim",
    _key(Keys.SSM.GROUP_COUNT): "linear_num_key_heads",
    _key(Keys.SSM.TIME_STEP_RANK): "linear_num_value_heads",
    _key(Keys.LLM.FULL_ATTENTION_INTERVAL): "full_attention_interval",
    # mixture of experts
    _key(Keys.LLM.EXPERT_COUNT): "num_experts",
    _key(Keys.LLM.EXPERT_USED_COUNT): "num_experts_per_tok",
    _key(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH): "moe_intermediate_size",
    _key(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH): "shared_expert_intermediate_size",
    _key(Keys.LLM.EXPERT_WEIGHTS_NORM): "norm_topk_prob",
    "norm_top_k_prob": "norm_topk_prob",  # Ollama's name for the same flag
}

# The keys of CONFIG_KEYS llama.cpp reads (the others are other writers' spellings, read on import only)
WRITTEN_KEYS = tuple(k for k in CONFIG_KEYS if k != "norm_top_k_prob")

BLOCK_COUNT = _key(Keys.LLM.BLOCK_COUNT)  # the model's own blocks plus its MTP blocks

# Keys that are not one HF field each (the reader derives fields from them; writers compute them)
SSM_INNER_SIZE = _key(Keys.SSM.INNER_SIZE)  # linear_value_head_dim * linear_num_value_heads
ROPE_DIMENSION_COUNT = _key(Keys.Rope.DIMENSION_COUNT)  # rotary width = head_dim * partial_rotary_factor
ROPE_SECTIONS = _key(Keys.Rope.DIMENSION_SECTIONS)  # llama.cpp's qwen35 requires 4 (its loader: "wrong array length")
NEXTN_LAYERS = _key(Keys.LLM.NEXTN_PREDICT_LAYERS)  # MTP blocks appended after the model's own blocks
RECURRENT_LAYERS = "attention.recurrent_layers"  # per-block bools (newer gguf-py than the one on PyPI has the key)
OLLAMA_V_HEADS_TILED = "ssm.v_head_reordered"  # Ollama's flag: DeltaNet V heads stored in llama.cpp's tiled order
OLLAMA_ROPE_SECTIONS = ("mrope_sections", "rope.mrope_section")  # Ollama's copies of the 3 HF sections
OLLAMA_MROPE_INTERLEAVED = "rope.mrope_interleaved"  # Ollama's flag: Qwen3.5's interleaved M-RoPE (its default: not)


# ------------------------------------------------------------------------------------------------ transforms
def _xp(w):
    """numpy or mlx.core, whichever `w` belongs to, so one transform serves readers (MLX) and writers (numpy)."""
    if isinstance(w, np.ndarray):
        return np
    import mlx.core as mx

    return mx


class Transform:
    """A change the converter makes to one tensor, both ways. `config` is the HF config (a dict)."""

    def to_gguf(self, w, config: dict[str, Any]):
        raise NotImplementedError

    def to_hf(self, w, config: dict[str, Any]):
        raise NotImplementedError

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape `to_hf` gives a tensor of this (GGUF-side) shape."""
        return shape

    def gguf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape `to_gguf` gives a tensor of this (HF-side) shape."""
        return shape


@dataclass(frozen=True)
class Shift(Transform):
    """Norm weights stored as `amount + w` (Gemma's and Qwen3.5's zero-centred RMSNorms)."""

    amount: float = 1.0

    def to_gguf(self, w, config):
        return w + self.amount

    def to_hf(self, w, config):
        return w - self.amount


@dataclass(frozen=True)
class NegExp(Transform):
    """Gated DeltaNet's decay rate stored as A = -exp(A_log), what the graph multiplies by."""

    def to_gguf(self, w, config):
        return -_xp(w).exp(w)

    def to_hf(self, w, config):
        return _xp(w).log(-w)


@dataclass(frozen=True)
class Squeeze(Transform):
    """A size-1 axis dropped: the depthwise conv [channels, 1, kernel] stored as [channels, kernel]."""

    axis: int = 1

    def to_gguf(self, w, config):
        return w.reshape(*w.shape[: self.axis], *w.shape[self.axis + 1 :])

    def to_hf(self, w, config):
        return w.reshape(*w.shape[: self.axis], 1, *w.shape[self.axis :])

    def hf_shape(self, shape):
        return (*shape[: self.axis], 1, *shape[self.axis :])

    def gguf_shape(self, shape):
        return (*shape[: self.axis], *shape[self.axis + 1 :])


@dataclass(frozen=True)
class AsRow(Transform):
    """A [1, n] weight (the shared expert's gate), which llama.cpp keeps as it is and Ollama stores as [n]."""

    def to_gguf(self, w, config):
        return w

    def to_hf(self, w, config):
        return w.reshape(1, -1)

    def hf_shape(self, shape):
        return (1, shape[-1])


class Permutation(Transform):
    """Entries along `axis` reordered: gguf = hf.take(order, axis). Reorders whole rows (or columns), so readers
    can apply it to packed quantized rows too, and to packed columns when the moved runs are whole blocks."""

    axis: int = 0

    def order(self, size: int, config: dict[str, Any]) -> np.ndarray:
        raise NotImplementedError

    def to_gguf(self, w, config):
        return _take(w, self.order(w.shape[self.axis], config), self.axis)

    def to_hf(self, w, config):
        return _take(w, np.argsort(self.order(w.shape[self.axis], config)), self.axis)


def _take(w, index: np.ndarray, axis: int):
    xp = _xp(w)
    return xp.take(w, index if xp is np else xp.array(index), axis=axis)


@dataclass(frozen=True)
class RopeInterleave(Permutation):
    """llama.cpp's llama q/k rows: each head's two rotary halves interleaved (rows 0, d/2, 1, d/2+1, ...), so
    its GPT-J style rope sees HF's rotate-half layout. `heads` is the config field with the head count."""

    heads: str = "num_attention_heads"
    axis: int = 0

    def order(self, size, config):
        heads = config.get(self.heads) or config["num_attention_heads"]
        return np.arange(size).reshape(heads, 2, size // heads // 2).swapaxes(1, 2).reshape(-1)


@dataclass(frozen=True)
class TiledVHeads(Permutation):
    """Gated DeltaNet value heads, from HF's order grouped by key head (k0: v0..v{r-1}, k1: ...) to llama.cpp's
    tiled order (v0 of every key head, then v1 of every key head, ...), which lets ggml broadcast the key heads
    with a plain repeat; without it llama.cpp's output is garbage whenever key heads != value heads.
    `width` is the entries per value head (a config field or 1); the first `skip` entries (q and k in the
    fused qkv, conv channels) stay where they are."""

    axis: int = 0
    width: str | int = 1
    skip: str | int = 0

    def order(self, size, config):
        hk, hv = config["linear_num_key_heads"], config["linear_num_value_heads"]
        width = self.width if isinstance(self.width, int) else config[self.width]
        skip = self.skip if isinstance(self.skip, int) else 2 * hk * config["linear_key_head_dim"]
        v = np.arange(hv * width).reshape(hk, hv // hk, width).swapaxes(0, 1).reshape(-1)
        return np.concatenate([np.arange(skip), skip + v])


def to_hf_all(transforms: tuple[Transform, ...], w, config: dict[str, Any]):
    for t in reversed(transforms):
        w = t.to_hf(w, config)
    return w


def to_gguf_all(transforms: tuple[Transform, ...], w, config: dict[str, Any]):
    for t in transforms:
        w = t.to_gguf(w, config)
    return w


KEY_DIMS = "key_dims"  # TiledVHeads.skip: q and k (2 * key heads * key head dim) come first
V_HEAD_DIM = "linear_value_head_dim"
PLUS_ONE = Shift(1.0)


# Sizes the tables name that are not one config field
_DERIVED_SIZES = {
    "value_dims_per_key_head": lambda c: c["linear_num_value_heads"] // c["linear_num_key_heads"]
    * c["linear_value_head_dim"],
}


def _size(size: str | int, config: dict[str, Any]) -> int:
    if isinstance(size, int):
        return size
    return _DERIVED_SIZES[size](config) if size in _DERIVED_SIZES else int(config[size])


@dataclass(frozen=True)
class Split:
    """One GGUF tensor that holds several HF tensors' rows. Import: the file's tensor is cut into `parts`; export: a
    fused source tensor of the same layout is written as its parts (llama.cpp's current names keep them apart).
    Without `segments` the parts follow one another in equal shares. With them, the rows come in groups (one per
    key head) of `segments` (sizes: config fields or ints), and part i is segments `take[i]` of every group, segment
    by segment. `transforms` apply to each part."""

    parts: tuple[str, ...]
    transforms: tuple[Transform, ...] = ()
    segments: tuple[str | int, ...] = ()
    take: tuple[tuple[int, ...], ...] = ()

    def rows(self, n: int, config: dict[str, Any]) -> list[np.ndarray]:
        """The fused tensor's rows that make each part (of `n` rows), in the part's order."""
        if not self.segments:
            return np.array_split(np.arange(n), len(self.parts))
        starts = np.cumsum([0, *(_size(s, config) for s in self.segments)])
        group = int(starts[-1])
        if n % group:
            raise ValueError(f"{n} rows are not groups of {group}")
        return [np.concatenate([g * group + np.arange(starts[s], starts[s + 1]) for s in segs
                                for g in range(n // group)]) for segs in self.take]


# ------------------------------------------------------------------------------------------------ tensor names
# Top-level tensors: GGUF name -> HF name
GLOBAL_TENSORS: dict[str, str] = {
    TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight": "model.embed_tokens.weight",
    TENSOR_NAMES[MODEL_TENSOR.OUTPUT_NORM] + ".weight": "model.norm.weight",
    TENSOR_NAMES[MODEL_TENSOR.OUTPUT] + ".weight": "lm_head.weight",
}

# Per-block tensors, shared by every architecture
BLOCK_TENSORS: dict[str, str] = {
    _name(MODEL_TENSOR.ATTN_NORM): "input_layernorm",
    _name(MODEL_TENSOR.ATTN_Q): "self_attn.q_proj",
    _name(MODEL_TENSOR.ATTN_K): "self_attn.k_proj",
    _name(MODEL_TENSOR.ATTN_V): "self_attn.v_proj",
    _name(MODEL_TENSOR.ATTN_OUT): "self_attn.o_proj",
    _name(MODEL_TENSOR.ATTN_Q_NORM): "self_attn.q_norm",
    _name(MODEL_TENSOR.ATTN_K_NORM): "self_attn.k_norm",
    _name(MODEL_TENSOR.FFN_NORM): "post_attention_layernorm",
    _name(MODEL_TENSOR.FFN_GATE): "mlp.gate_proj",
    _name(MODEL_TENSOR.FFN_UP): "mlp.up_proj",
    _name(MODEL_TENSOR.FFN_DOWN): "mlp.down_proj",
}

_GEMMA3_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm")

# Routed experts (stacked [experts, out, in]) and their router
_MOE_BLOCK: dict[str, str] = {
    _name(MODEL_TENSOR.FFN_GATE_INP): "mlp.gate",
    _name(MODEL_TENSOR.FFN_GATE_EXP): "mlp.experts.gate_proj",
    _name(MODEL_TENSOR.FFN_UP_EXP): "mlp.experts.up_proj",
    _name(MODEL_TENSOR.FFN_DOWN_EXP): "mlp.experts.down_proj",
}

# Hybrid Qwen (Gated DeltaNet + gated attention): names shared by qwen35, qwen35moe and qwen3next
_HYBRID_BLOCK: dict[str, str] = {
    **_MOE_BLOCK,
    _name(MODEL_TENSOR.ATTN_POST_NORM): "post_attention_layernorm",
    _name(MODEL_TENSOR.SSM_CONV1D): "linear_attn.conv1d",
    _name(MODEL_TENSOR.SSM_NORM): "linear_attn.norm",
    _name(MODEL_TENSOR.SSM_OUT): "linear_attn.out_proj",
    _name(MODEL_TENSOR.SSM_A): "linear_attn.A_log",
    _name(MODEL_TENSOR.SSM_DT) + ".bias": "linear_attn.dt_bias",
    _name(MODEL_TENSOR.SSM_DT): "linear_attn.dt_bias",  # Ollama: no ".bias" (llama.cpp refuses it; doctor fixes)
    _name(MODEL_TENSOR.ATTN_QKV): "linear_attn.in_proj_qkv",
    _name(MODEL_TENSOR.ATTN_GATE): "linear_attn.in_proj_z",
    _name(MODEL_TENSOR.SSM_BETA): "linear_attn.in_proj_b",
    _name(MODEL_TENSOR.SSM_ALPHA): "linear_attn.in_proj_a",
    _name(MODEL_TENSOR.FFN_GATE_INP_SHEXP): "mlp.shared_expert_gate",
    _name(MODEL_TENSOR.FFN_GATE_SHEXP): "mlp.shared_expert.gate_proj",
    _name(MODEL_TENSOR.FFN_UP_SHEXP): "mlp.shared_expert.up_proj",
    _name(MODEL_TENSOR.FFN_DOWN_SHEXP): "mlp.shared_expert.down_proj",
}

# What the converter does to Qwen3.5's numbers (conversion/qwen.py: Qwen3NextModel, _LinearAttentionVReorderBase):
# every RMSNorm but the DeltaNet's gated one is stored as 1 + w, A_log as -exp(A_log), the conv squeezed, and (qwen35,
# qwen35moe only) the value heads of every DeltaNet tensor moved to tiled order.
_QWEN35_TRANSFORMS: dict[str, tuple[Transform, ...]] = {
    "input_layernorm.weight": (PLUS_ONE,),
    "post_attention_layernorm.weight": (PLUS_ONE,),
    "self_attn.q_norm.weight": (PLUS_ONE,),
    "self_attn.k_norm.weight": (PLUS_ONE,),
    "linear_attn.A_log": (NegExp(), TiledVHeads()),
    "linear_attn.dt_bias": (TiledVHeads(),),
    "linear_attn.conv1d.weight": (Squeeze(1), TiledVHeads(0, V_HEAD_DIM, KEY_DIMS)),
    "linear_attn.in_proj_qkv.weight": (TiledVHeads(0, V_HEAD_DIM, KEY_DIMS),),
    "linear_attn.in_proj_z.weight": (TiledVHeads(0, V_HEAD_DIM),),
    "linear_attn.in_proj_b.weight": (TiledVHeads(),),
    "linear_attn.in_proj_a.weight": (TiledVHeads(),),
    "linear_attn.out_proj.weight": (TiledVHeads(1, V_HEAD_DIM),),
    "mlp.shared_expert_gate.weight": (AsRow(),),
}
_QWEN3NEXT_TRANSFORMS = {name: tuple(t for t in ts if not isinstance(t, TiledVHeads))
                         for name, ts in _QWEN35_TRANSFORMS.items()}


@dataclass(frozen=True)
class Architecture:
    """How one GGUF architecture maps to HF: model_type, tensor names, transforms, config defaults."""

    model_type: str
    block: dict[str, str] = field(default_factory=dict)  # added to / overriding BLOCK_TENSORS
    transforms: dict[str, tuple[Transform, ...]] = field(default_factory=dict)  # by HF name (block or global)
    splits: dict[str, Split] = field(default_factory=dict)  # fused GGUF tensors (import only)
    defaults: dict[str, Any] = field(default_factory=dict)  # HF config fields llama.cpp fixes instead of storing
    hybrid: bool = False  # Gated DeltaNet layers, ssm.* metadata, MTP blocks after the model's own

    def block_tensors(self) -> dict[str, str]:
        """The architecture's own names first (writers pick the first name that fits), then the shared ones."""
        return {**self.block, **{k: v for k, v in BLOCK_TENSORS.items() if k not in self.block}}


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", transforms={
        "self_attn.q_proj.weight": (RopeInterleave("num_attention_heads"),),
        "self_attn.q_proj.bias": (RopeInterleave("num_attention_heads"),),
        "self_attn.k_proj.weight": (RopeInterleave("num_key_value_heads"),),
        "self_attn.k_proj.bias": (RopeInterleave("num_key_value_heads"),),
    }),
    "qwen2": Architecture("qwen2"),
    "qwen3": Architecture("qwen3"),
    "qwen3moe": Architecture("qwen3_moe", block=_MOE_BLOCK),
    # llama.cpp's bitnet is 1bitLLM's bitnet_b1_58: SiLU, sub-norms before o_proj and down_proj, rotate-half rope
    "bitnet": Architecture("bitnet", block={_name(MODEL_TENSOR.ATTN_SUB_NORM): "self_attn.attn_sub_norm",
                                            _name(MODEL_TENSOR.FFN_SUB_NORM): "mlp.ffn_sub_norm"},
                           defaults={"hidden_act": "silu"}),
    "gemma3": Architecture(
        "gemma3_text",
        # Gemma 3 has four norms a block; llama.cpp names them by position around attention and the MLP
        block={_name(MODEL_TENSOR.ATTN_POST_NORM): "post_attention_layernorm",
               _name(MODEL_TENSOR.FFN_NORM): "pre_feedforward_layernorm",
               _name(MODEL_TENSOR.FFN_POST_NORM): "post_feedforward_layernorm"},
        transforms={**{f"{n}.weight": (PLUS_ONE,) for n in _GEMMA3_NORMS}, "model.norm.weight": (PLUS_ONE,)},
        # llama.cpp fixes these for Gemma 3 rather than storing them
        defaults={"rope_local_base_freq": 10000.0, "sliding_window_pattern": 6}),
    "qwen35": Architecture(
        "qwen3_5_text", block=_HYBRID_BLOCK, hybrid=True,
        transforms={**_QWEN35_TRANSFORMS, "model.norm.weight": (PLUS_ONE,)},
        # Ollama's (unreleased) Qwen3.5 converter fused b and a as one tensor, b's rows first
        splits={_name(MODEL_TENSOR.SSM_BETA_ALPHA) + ".weight": Split(
            ("linear_attn.in_proj_b.weight", "linear_attn.in_proj_a.weight"), transforms=(TiledVHeads(),))}),
    "qwen35moe": Architecture(
        "qwen3_5_moe_text", block=_HYBRID_BLOCK, hybrid=True,
        transforms={**_QWEN35_TRANSFORMS, "model.norm.weight": (PLUS_ONE,)},
        splits={_name(MODEL_TENSOR.SSM_BETA_ALPHA) + ".weight": Split(
            ("linear_attn.in_proj_b.weight", "linear_attn.in_proj_a.weight"), transforms=(TiledVHeads(),))}),
    # Qwen3-Next: no value-head reordering. ssm_ba is HF's in_proj_ba (grouped per key head as [b | a]; the model's
    # sanitize splits it, as llama.cpp's graph does). HF's in_proj_qkvz (grouped per key head as [q | k | v | z]) is
    # what llama.cpp's first converter wrote as ssm_in, which its graph splits by views (the "legacy" path); its
    # converter now writes q, k, v of all heads as attn_qkv and z as attn_gate, and so do we.
    "qwen3next": Architecture(
        "qwen3_next", hybrid=True,
        block={**_HYBRID_BLOCK, _name(MODEL_TENSOR.SSM_IN): "linear_attn.in_proj_qkvz",
               _name(MODEL_TENSOR.SSM_BETA_ALPHA): "linear_attn.in_proj_ba"},
        transforms={**_QWEN3NEXT_TRANSFORMS, "model.norm.weight": (PLUS_ONE,)},
        splits={_name(MODEL_TENSOR.SSM_IN) + ".weight": Split(
            ("linear_attn.in_proj_qkv.weight", "linear_attn.in_proj_z.weight"),
            segments=("linear_key_head_dim", "linear_key_head_dim", "value_dims_per_key_head",
                      "value_dims_per_key_head"),
            take=((0, 1, 2), (3,)))}),
}

# Multi-token-prediction blocks (qwen35, qwen35moe, qwen3next): llama.cpp appends them as blocks after the model's
# own (`nextn_predict_layers` of them); their decoder-layer tensors keep the block names, plus these.
MTP_TENSORS: dict[str, str] = {
    _name(MODEL_TENSOR.NEXTN_EH_PROJ) + ".weight": "fc.weight",
    _name(MODEL_TENSOR.NEXTN_ENORM) + ".weight": "pre_fc_norm_embedding.weight",
    _name(MODEL_TENSOR.NEXTN_HNORM) + ".weight": "pre_fc_norm_hidden.weight",
    _name(MODEL_TENSOR.NEXTN_SHARED_HEAD_NORM) + ".weight": "norm.weight",
    _name(MODEL_TENSOR.NEXTN_EMBED_TOKENS) + ".weight": "embed_tokens.weight",
    _name(MODEL_TENSOR.NEXTN_SHARED_HEAD_HEAD) + ".weight": "shared_head.head.weight",
}
_MTP_NORMS = ("pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight", "norm.weight")
_MTP_LAYER = re.compile(r"^mtp\.layers\.(\d+)\.")


def mtp_layers(hf_names) -> int:
    """How many MTP blocks these HF tensors hold (the count llama.cpp's converter takes when the config has none)."""
    found = [name for name in hf_names if name.startswith("mtp.")]
    return max((int(m.group(1)) + 1 for n in found if (m := _MTP_LAYER.match(n))), default=1 if found else 0)

# Tensors of other models that share a file with the text model (Ollama puts the vision tower in the same GGUF)
FOREIGN_PREFIXES = ("v.", "mm.", "a.")

_BLOCK = re.compile(r"blk\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)$")
_SUFFIX = re.compile(r"^(.*)\.(weight|bias)$")


def _lookup(table: dict[str, str], part: str) -> str | None:
    """`part` through a name table: an exact entry first, else the entry for its stem, suffix carried over."""
    if part in table:
        return table[part]
    m = _SUFFIX.match(part)
    return f"{table[m.group(1)]}.{m.group(2)}" if m and m.group(1) in table else None


def hf_name(arch: str, gguf_name: str, n_layers: int | None = None) -> str | None:
    """The HF name of a GGUF tensor, or None when the tables have no entry. Blocks from `n_layers` on are MTP
    blocks (`mtp.layers.{i}.*`, `mtp.fc.weight`, ...)."""
    spec = ARCHITECTURES[arch]
    if gguf_name in GLOBAL_TENSORS:
        return _lookup(GLOBAL_TENSORS, gguf_name)
    m = _BLOCK.match(gguf_name)
    if not m:
        return None
    layer, part = int(m.group(1)), m.group(2)
    if n_layers is not None and layer >= n_layers and spec.hybrid:
        if part in MTP_TENSORS:
            return f"mtp.{MTP_TENSORS[part]}"
        inner = _lookup(spec.block_tensors(), part)
        return None if inner is None else f"mtp.layers.{layer - n_layers}.{inner}"
    inner = _lookup(spec.block_tensors(), part)
    return None if inner is None else f"model.layers.{layer}.{inner}"


def gguf_name(arch: str, hf: str, n_layers: int | None = None) -> str | None:
    """The inverse of `hf_name`, in llama.cpp's naming (writers and tests use it). MTP tensors (`mtp.*`) take the
    blocks after the model's `n_layers`, as llama.cpp's converter puts them: the MTP decoder layers' tensors keep
    the block names, the rest (fc, its norms) go to the first MTP block as `nextn.*`."""
    spec = ARCHITECTURES[arch]
    for g in GLOBAL_TENSORS:
        if _lookup(GLOBAL_TENSORS, g) == hf:
            return g
    if hf.startswith("mtp.") and spec.hybrid and n_layers is not None:
        rest = hf.removeprefix("mtp.")
        if (g := next((g for g, h in MTP_TENSORS.items() if h == rest), None)) is not None:
            return f"blk.{n_layers}.{g}"
        m = re.match(r"layers\.(\d+)\.(.+)$", rest)
        part = None if m is None else _block_part(spec, m.group(2))
        return None if part is None else f"blk.{n_layers + int(m.group(1))}.{part}"
    m = _HF_BLOCK.match(hf)
    if not m:
        return None
    part = _block_part(spec, m.group(2))
    return None if part is None else f"blk.{m.group(1)}.{part}"


def _block_part(spec: Architecture, part: str) -> str | None:
    """The GGUF name (without "blk.N.") of a decoder layer's tensor (HF name without "model.layers.N.")."""
    table = spec.block_tensors()
    aliases = {_name(MODEL_TENSOR.SSM_DT)}  # Ollama's spelling: read, never written
    for g in table:
        if g in aliases:
            continue
        if _lookup(table, g) == part:
            return g
        if (s := _SUFFIX.match(part)) and "." not in g and _lookup(table, f"{g}.{s.group(2)}") == part:
            return f"{g}.{s.group(2)}"
    return None


def transforms(arch: str, hf: str) -> tuple[Transform, ...]:
    """What the converter did to the tensor with this HF name (model or MTP block), in its order."""
    spec = ARCHITECTURES[arch]
    if hf in spec.transforms:
        return spec.transforms[hf]
    m = re.match(r"(?:model|mtp)\.layers\.\d+\.(.+)$", hf)
    if m:
        return spec.transforms.get(m.group(1), ())
    if spec.hybrid and hf.startswith("mtp.") and hf.removeprefix("mtp.") in _MTP_NORMS:
        return (PLUS_ONE,)
    return ()


def split(arch: str, gguf_name: str) -> tuple[int, Split] | None:
    """(block, Split) when this GGUF tensor holds several HF tensors, else None."""
    m = _BLOCK.match(gguf_name)
    if not m:
        return None
    hit = ARCHITECTURES[arch].splits.get(m.group(2))
    return None if hit is None else (int(m.group(1)), hit)


# ---------------------------------------------------------------------------------------------- export
# HF model_type -> GGUF architecture: every model_type the reader gives, and the multimodal wrappers' own names
EXPORT_ARCHITECTURES: dict[str, str] = {
    **{spec.model_type: arch for arch, spec in ARCHITECTURES.items()},
    "gemma3": "gemma3", "qwen3_5": "qwen35", "qwen3_5_moe": "qwen35moe",
}


def gguf_arch(model_type: str | None) -> str | None:
    return EXPORT_ARCHITECTURES.get(model_type or "")


def to_gguf(arch: str, hf: str, w, config: dict[str, Any]):
    """The tensor as llama.cpp's converter writes it."""
    return to_gguf_all(transforms(arch, hf), w, config)


def gguf_shape(arch: str, hf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    for t in transforms(arch, hf):
        shape = t.gguf_shape(shape)
    return shape


def column_order(arch: str, hf: str, cols: int, config: dict[str, Any]) -> np.ndarray | None:
    """Where the converter moves a matrix's columns (input channels), as gguf = hf[:, order]; None when it
    leaves them in place. Calibration statistics are per input channel, so they move the same way."""
    order = None
    for t in transforms(arch, hf):
        if isinstance(t, Permutation) and t.axis in (1, -1):
            step = t.order(cols, config)
            order = step if order is None else order[step]
    return order
