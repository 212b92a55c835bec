"""GGUF files (llama.cpp, Ollama): HF config and HF-named tensors, read lazily one tensor at a time.

Containers go through gguf-py (llama.cpp's own reader). Every type `gguf.quants` can dequantize loads as float;
with `keep_quantized`, Q4_0, Q4_1 and Q8_0 blocks become MLX affine quantized weights with no loss: their
values are exactly `scale * q + bias` with one scale (and offset) per 32 weights, which is what MLX's affine
mode stores, once the 4-bit nibbles are put in MLX's order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlxq.errors import FormatError, UnsupportedModel
from mlxq.formats.base import Checkpoint, TensorInfo, TensorSource
from mlxq.formats.gguf.checks import check_gguf
from mlxq.formats.gguf.names import ARCHITECTURES, CONFIG_KEYS, hf_name, to_hf_all, transforms

GROUP = 32  # weights per Q4_0 / Q4_1 / Q8_0 block


def _affine_q4_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    return _pack4(blocks[..., 2:18]), d, -8 * d.astype(np.float32)


def _affine_q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    return _pack4(blocks[..., 4:20]), d, m


def _affine_q8_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    q = (blocks[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)  # signed -> offset by 128
    return q.reshape(*q.shape[:-2], -1).view(np.uint32), d, -128 * d.astype(np.float32)


def _pack4(qs: np.ndarray) -> np.ndarray:
    """GGUF keeps weight j in the low nibble and j+16 in the high nibble of byte j; MLX keeps weight i in
    bits 4*(i%8) of uint32 word i//8, i.e. two consecutive weights per byte, low first."""
    q = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # [..., blocks, 32] in weight order
    pairs = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return pairs.reshape(*pairs.shape[:-2], -1).view(np.uint32)


# GGML type name -> (bits, block splitter) for the types that map to MLX affine without loss
AFFINE_TYPES = {"Q4_0": (4, _affine_q4_0), "Q4_1": (4, _affine_q4_1), "Q8_0": (8, _affine_q8_0)}


def open_gguf(path: Path, keep_quantized: bool = False) -> Checkpoint:
    import gguf

    path = Path(path)
    check_gguf(path)  # gguf-py trusts the file: its structure is checked first
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not a readable GGUF file, truncated or corrupt ({e})") from None
    meta = _metadata(reader, path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModel(f"{path}: GGUF architecture '{arch}' is not supported "
                               f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    spec = ARCHITECTURES[arch]
    raw = {t.name: t for t in reader.tensors}
    try:  # values of the wrong type or missing companions (a linear rope scaling without its factor)
        config = _config(meta, arch, spec, raw, path)
    except (KeyError, ValueError, TypeError, ZeroDivisionError) as e:
        what = f"field {e} is missing" if isinstance(e, KeyError) else f"{type(e).__name__}: {str(e)[:200]}"
        raise FormatError(f"{path}: the metadata does not make a model config ({what})") from None

    infos: dict[str, TensorInfo] = {}
    loaders: dict[str, Any] = {}
    quant: dict[str, Any] = {}
    for name, t in raw.items():
        if name == "rope_freqs.weight":  # read into the config above
            continue
        hf = hf_name(arch, name)
        if hf is None:
            raise FormatError(f"{path}: tensor '{name}' has no known meaning for architecture '{arch}'")
        kind = t.tensor_type.name
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        if keep_quantized and kind in AFFINE_TYPES and hf.endswith(".weight") and len(shape) == 2:
            bits, split = AFFINE_TYPES[kind]
            module = hf.removesuffix(".weight")
            quant[module] = {"group_size": GROUP, "bits": bits}
            rows, groups = shape[0], shape[1] // GROUP
            shapes = {"weight": (rows, shape[1] * bits // 32), "scales": (rows, groups), "biases": (rows, groups)}
            for part, part_shape in shapes.items():
                infos[f"{module}.{part}"] = TensorInfo(f"{module}.{part}", part_shape, kind, int(t.n_bytes))
                loaders[f"{module}.{part}"] = (name, part)
        else:
            infos[hf] = TensorInfo(hf, shape, kind, int(t.n_bytes))
            loaders[hf] = (name, None)
    if quant:
        config["quantization"] = {"group_size": GROUP, "bits": 4, "mode": "affine", **quant}

    def load(hf: str) -> mx.array:
        name, part = loaders[hf]
        t = raw[name]
        try:
            if part is None:
                arr = mx.array(_dequantize(t, gguf))
            else:
                parts = AFFINE_TYPES[t.tensor_type.name][1](_blocks(t))
                packed = dict(zip(("weight", "scales", "biases"), parts, strict=True))
                arr = mx.array(packed[part])
            source = hf if part is None else hf.rsplit(".", 1)[0] + ".weight"  # packed parts move with their rows
            return to_hf_all(transforms(arch, source), arr, config)
        except (ValueError, TypeError, NotImplementedError) as e:  # the metadata's heads may not fit the rows
            raise FormatError(f"{path}: tensor '{name}' ({t.tensor_type.name}) cannot be decoded ({e})") from None

    chat_template = meta.get("tokenizer.chat_template")
    return Checkpoint(path, "gguf", config, TensorSource(infos, load), gguf_file=path,
                      chat_template=chat_template, extra={"gguf_metadata": meta})


def _metadata(reader, path: Path) -> dict[str, Any]:
    """Scalar and string metadata (the big tokenizer arrays are left to the tokenizer loader)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                                          "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            continue
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise FormatError(f"{path}: metadata field '{key}' is malformed ({e})") from None
    return meta


def _config(meta: dict, arch: str, spec: dict, raw: dict, path: Path) -> dict[str, Any]:
    config: dict[str, Any] = {"model_type": spec.model_type, **spec.defaults}
    for key, field in CONFIG_KEYS.items():
        if f"{arch}.{key}" in meta:
            config[field] = meta[f"{arch}.{key}"]
    if "vocab_size" not in config:
        embd = raw.get("token_embd.weight")
        if embd is None:
            raise FormatError(f"{path}: no tensor 'token_embd.weight'")
        config["vocab_size"] = int(embd.shape[1])
    config["tie_word_embeddings"] = "output.weight" not in raw
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    if "rope_freqs.weight" in raw:  # Llama 3.1+: the frequency factors stored as a tensor
        factors = np.asarray(raw["rope_freqs.weight"].data, dtype=np.float32).reshape(-1)
        config["rope_scaling"] = {"rope_type": "freq_factors", "factors": factors.tolist()}
    if arch == "gemma3":
        heads, hidden = config.get("num_attention_heads", 1), config.get("hidden_size", 0)
        head_dim = config.get("head_dim", hidden // max(heads, 1))
        # llama.cpp: the 62-layer (27B) model scales queries by hidden/heads, the others by head_dim
        config["query_pre_attn_scalar"] = hidden // heads if config.get("num_hidden_layers") == 62 else head_dim
    for needed in ("num_hidden_layers", "hidden_size", "num_attention_heads"):
        if needed not in config:
            raise FormatError(f"{path}: metadata field '{arch}.{_key_for(needed)}' is missing")
    return config


def _key_for(field: str) -> str:
    return next(k for k, v in CONFIG_KEYS.items() if v == field)


def _blocks(t) -> np.ndarray:
    """Raw bytes [rows, blocks, bytes per block] of a block-quantized 2D tensor."""
    data = np.asarray(t.data)
    rows = int(t.shape[1])
    return data.reshape(rows, int(t.shape[0]) // GROUP, -1)


def _dequantize(t, gguf) -> np.ndarray:
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(t.shape))
    if t.tensor_type.name in ("F32", "F16", "BF16"):
        data = np.asarray(t.data)
        if t.tensor_type.name == "BF16":
            data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return data.astype(np.float32).reshape(shape)
    return dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
