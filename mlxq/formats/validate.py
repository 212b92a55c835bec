"""The config of every opened checkpoint, checked against itself and against the tensors actually present,
before any model is built.

A config is metadata: a damaged or hostile one can ask for 10^9 layers or a 2^40-wide embedding, and building
that model would exhaust memory long before the weights show the mistake. So every size must be a positive
integer, heads must divide as attention needs, and each size is bounded by what the tensors can hold: the layer
count by the layer indices found in tensor names, the vocabulary and hidden size by the embedding, every other
size by the largest tensor dimension (times 32: one packed uint32 word holds at most 32 one-bit weights).
The families still check what is theirs (layer kinds, expert layout); `loading.check_weights` checks every shape.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from mlxq.errors import ConfigError
from mlxq.formats.base import Checkpoint

# size field -> smallest value allowed (0 where a family reads 0 as "none", e.g. no dense MLP in a MoE model)
SIZES: dict[str, int] = {
    "vocab_size": 1, "hidden_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
    "head_dim": 1, "intermediate_size": 0, "moe_intermediate_size": 0, "shared_expert_intermediate_size": 0,
    "num_experts": 0, "num_experts_per_tok": 0, "linear_num_key_heads": 1, "linear_num_value_heads": 1,
    "linear_key_head_dim": 1, "linear_value_head_dim": 1, "linear_conv_kernel_dim": 1, "full_attention_interval": 1,
    "decoder_sparse_step": 1, "sliding_window": 0, "sliding_window_pattern": 1, "max_position_embeddings": 1,
}
# sizes that are not tensor dimensions, bounded only so positions stay 32-bit integers
UNBOUNDED_BY_TENSORS = ("max_position_embeddings", "sliding_window")
INT32_MAX = (1 << 31) - 1
PACKING = 32  # weights per uint32 word at 1 bit: a packed dimension understates the size it holds by at most this

# real field -> (smallest value, whether the smallest is allowed, largest value)
REALS: dict[str, tuple[float, bool, float]] = {
    "rms_norm_eps": (0.0, True, 1.0), "layer_norm_eps": (0.0, True, 1.0), "rope_theta": (0.0, False, math.inf),
    "rope_local_base_freq": (0.0, False, math.inf), "query_pre_attn_scalar": (0.0, False, math.inf),
    "final_logit_softcapping": (0.0, False, math.inf), "partial_rotary_factor": (0.0, False, 1.0),
}
FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "norm_topk_prob")
OBJECTS = ("rope_scaling", "rope_parameters", "quantization", "quantization_config")

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_config(ckpt: Checkpoint) -> None:
    """Raises ConfigError (naming the file and the field) unless `ckpt.config` describes a model its tensors can
    be: see the module doc."""
    source = _Source(ckpt)
    config = ckpt.config
    if not isinstance(config, dict):
        raise ConfigError(f"{source.where}: the config must be a JSON object")
    inner = config.get("text_config")
    if inner is not None and not isinstance(inner, dict):
        raise source.bad("text_config", inner, "must be an object")
    cfg = {**config, **(inner or {})}
    if not isinstance(cfg.get("model_type"), (str, type(None))):
        raise source.bad("model_type", cfg["model_type"], "must be a string")
    for name in FLAGS:
        if cfg.get(name) is not None and not isinstance(cfg[name], bool):
            raise source.bad(name, cfg[name], "must be true or false")
    for name in OBJECTS:
        if cfg.get(name) is not None and not isinstance(cfg[name], dict):
            raise source.bad(name, cfg[name], "must be an object")
    if cfg.get("layer_types") is not None and not _list_of(cfg["layer_types"], str):
        raise source.bad("layer_types", cfg["layer_types"], "must be a list of strings")
    for name, (low, closed, high) in REALS.items():
        value = cfg.get(name)
        if value is None:
            continue
        ok = _is_real(value) and (value >= low if closed else value > low) and value <= high
        if not ok:
            lowest = f"{'>=' if closed else '>'} {low:g}"
            raise source.bad(name, value, f"must be a number {lowest}" + (f" and <= {high:g}" if high < math.inf
                                                                             else ""))
    _check_sizes(source, cfg, ckpt)
    _check_quantization(source, cfg.get("quantization"))


def _check_sizes(source: _Source, cfg: dict[str, Any], ckpt: Checkpoint) -> None:
    present = Present(ckpt)
    for name, low in SIZES.items():
        value = cfg.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < low:
            raise source.bad(name, value, f"must be an integer >= {low}")
        if name in UNBOUNDED_BY_TENSORS:
            bound, why = INT32_MAX, "the largest position mlxq can index"
        elif name == "num_hidden_layers":
            bound, why = present.layers, (f"the tensors hold layers 0..{present.layers - 1}" if present.layers
                                          else "no tensor belongs to a numbered layer")
        else:
            bound = PACKING * present.largest
            why = f"no tensor here is that large (largest dimension {present.largest})"
        if value > bound:
            raise source.bad(name, value, f"too large: {why}")
    if present.embedding is not None:
        rows, cols, packed = present.embedding
        if _is_int(cfg.get("vocab_size")) and cfg["vocab_size"] != rows:
            raise source.bad("vocab_size", cfg["vocab_size"], f"the embedding has {rows} rows")
        if _is_int(cfg.get("hidden_size")) and not packed and cfg["hidden_size"] != cols:
            raise source.bad("hidden_size", cfg["hidden_size"], f"the embedding has {cols} columns")
    heads, kv, hidden = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads"), cfg.get("hidden_size")
    if cfg.get("head_dim") is None and heads is not None and hidden is not None and hidden % heads:
        raise source.bad("num_attention_heads", heads, f"must divide hidden_size ({hidden})")
    if heads is not None and kv is not None and heads % kv:
        raise source.bad("num_key_value_heads", kv, f"must divide num_attention_heads ({heads})")
    experts, per_token = cfg.get("num_experts") or 0, cfg.get("num_experts_per_tok")
    if experts and per_token is not None and not 1 <= per_token <= experts:
        raise source.bad("num_experts_per_tok", per_token, f"must be in 1..num_experts ({experts})")
    # Token ids past the vocabulary are left alone: tiny test models keep their family's real ids, and an id no
    # token has only never matches.
    eos = cfg.get("eos_token_id")
    if eos is not None:
        ids = eos if isinstance(eos, list) else [eos]
        if not ids or not all(_is_int(i) and i >= 0 for i in ids):
            raise source.bad("eos_token_id", eos, "must be a token id (or a list of them)")


def _check_quantization(source: _Source, quant: dict | None) -> None:
    """The global bits and group size of an mlx-lm quantized checkpoint (per-module entries are read off the
    tensors' shapes when they load)."""
    if not quant:
        return
    for name, allowed in (("bits", range(1, 9)), ("group_size", range(1, 1 << 16))):
        value = quant.get(name)
        if value is not None and not (_is_int(value) and value in allowed):
            what = f"must be an integer in {allowed.start}..{allowed.stop - 1}"
            raise source.bad(f"quantization.{name}", value, what)


def _ggml_blocks(dtype: str) -> bool:
    """Whether a tensor's dtype is a GGML block type (a GGUF tensor kept as its raw blocks, rows of bytes)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    kind = GGMLQuantizationType.__members__.get(dtype)
    return kind is not None and GGML_QUANT_SIZES[kind][0] > 1


class Present:
    """What the tensors say about sizes: layer count, embedding shape, largest dimension."""

    def __init__(self, ckpt: Checkpoint):
        infos = ckpt.tensors.infos()
        names = {i.name for i in infos}
        indices = [int(m.group(1)) for i in infos if not i.name.startswith("mtp.") and (m := _LAYER.search(i.name))]
        self.layers = max(indices) + 1 if indices else 0
        self.largest = max((max(i.shape) for i in infos if i.shape and math.prod(i.shape)), default=0)
        self.embedding: tuple[int, int, bool] | None = None
        for i in infos:
            if i.name.endswith("embed_tokens.weight") and not i.name.startswith("mtp.") and len(i.shape) == 2:
                # mlx-lm's packed words (with scales), or a GGUF's blocks kept: columns are not weights
                packed = i.name.removesuffix(".weight") + ".scales" in names or _ggml_blocks(i.dtype)
                self.embedding = (i.shape[0], i.shape[1], packed)
                break


class _Source:
    """Where a config field comes from, for messages: config.json, or the GGUF metadata key it was read from."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.where = Path(ckpt.path) / "config.json" if ckpt.format != "gguf" else Path(ckpt.path)

    def bad(self, field: str, value: Any, why: str) -> ConfigError:
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        return ConfigError(f"{self.where}: {self._name(field)} is {shown}; {why}")

    def _name(self, field: str) -> str:
        if self.ckpt.format == "gguf":
            from mlxq.formats.gguf.names import CONFIG_KEYS

            arch = self.ckpt.extra.get("gguf_metadata", {}).get("general.architecture")
            key = next((k for k, v in CONFIG_KEYS.items() if v == field), None)
            if arch and key:
                return f"metadata '{arch}.{key}' ({field})"
        return f"'{field}'"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _list_of(x: Any, kind: type) -> bool:
    return isinstance(x, list) and all(isinstance(v, kind) for v in x)
