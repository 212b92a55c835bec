"""Tokenizer metadata for GGUF export: the `tokenizer.*` keys llama.cpp builds its vocabulary from.

A GGUF source hands its own keys over unchanged. A model directory's `tokenizer.json` (byte-level BPE, what the
supported families ship) becomes llama.cpp's "gpt2" vocabulary the way its converter builds it: one token per id
up to the model's vocab size (gaps filled with [PAD{id}]), added special tokens as control tokens, other added
tokens user-defined; merges, special token ids, add-BOS/EOS flags and the chat template through gguf-py's
SpecialVocab. llama.cpp also needs the name of the pre-tokenizer (the regex that splits text before BPE); it is
recognised from tokenizer.json's own description, and an unknown one falls back to llama.cpp's "default" with a
warning, since text would then be split differently from transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mlxq.errors import TokenizerError
from mlxq.formats.base import Checkpoint
from mlxq.formats.gguf.writer import Value

if TYPE_CHECKING:
    from mlxq.formats.gguf.reader import Header

# tokenizer.json's pre-tokenizer, as `_signature` spells it -> llama.cpp's pre-tokenizer name (the regexes are the
# "original regex from tokenizer.json" llama.cpp's llama-vocab.cpp lists for each)
PRE_TOKENIZERS: dict[str, str] = {
    r"split:(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+ bytelevel": "qwen2",
    r"split:(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+ bytelevel": "qwen35",
    r"split:(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+ bytelevel": "llama-bpe",
    "digits:individual bytelevel:regex": "smollm",
    "bytelevel:regex": "gpt-2",
}
CONTROL, USER_DEFINED, NORMAL = 3, 4, 1  # gguf.TokenType values


def tokenizer_metadata(ckpt: Checkpoint, vocab_size: int, warn) -> dict[str, Value]:
    """The `tokenizer.*` metadata for a model of `vocab_size` tokens; `warn(text)` reports what may differ."""
    if ckpt.gguf_file is not None:
        return _from_gguf(ckpt.gguf_file, ckpt.extra.get("gguf_header"))
    root = Path(ckpt.tokenizer_dir) if ckpt.tokenizer_dir else None
    if root is None or not (root / "tokenizer.json").exists():
        raise TokenizerError(f"{ckpt.path}: no tokenizer.json, so the GGUF would have no vocabulary "
                             "(llama.cpp cannot load a model without one)")
    return _from_tokenizer_json(root, vocab_size, warn, ckpt.chat_template)


def _from_gguf(path: Path, header: Header | None = None) -> dict[str, Value]:
    """The source file's `tokenizer.*` keys, typed as llama.cpp reads them (ids uint32, token types int32, scores
    float32; read with mlxq's own header parser: gguf-py's decodes a large vocabulary slowly), from its `header`
    when the checkpoint already parsed it."""
    import gguf

    from mlxq.formats.gguf.reader import Strings, read_header

    T = gguf.GGUFValueType
    arrays = {np.dtype("int32"): T.INT32, np.dtype("uint32"): T.UINT32, np.dtype("float32"): T.FLOAT32,
              np.dtype("bool"): T.BOOL, np.dtype("uint8"): T.UINT8, np.dtype("int64"): T.INT64}
    out = {}
    header = header or read_header(path, check=False)  # checked when its checkpoint was opened
    for key, v in header.meta.items():
        if not key.startswith("tokenizer."):
            continue
        if isinstance(v, Strings):
            out[key] = Value(v.packed(path), T.ARRAY, T.STRING)
        elif isinstance(v, np.ndarray):
            out[key] = Value(v.tolist(), T.ARRAY, arrays[v.dtype])
        elif isinstance(v, bool):
            out[key] = Value(v, T.BOOL)
        elif isinstance(v, int):
            out[key] = Value(v, T.UINT32)
        elif isinstance(v, float):
            out[key] = Value(v, T.FLOAT32)
        else:
            out[key] = Value(str(v), T.STRING)
    return out


def _signature(pre: dict | None) -> str:
    if not pre:
        return ""
    kind = pre.get("type")
    if kind == "Sequence":
        return " ".join(_signature(p) for p in pre.get("pretokenizers", []))
    if kind == "Split":
        return "split:" + str(pre.get("pattern", {}).get("Regex", pre.get("pattern", {}).get("String")))
    if kind == "ByteLevel":
        return "bytelevel:regex" if pre.get("use_regex", True) else "bytelevel"
    if kind == "Digits":
        return "digits:individual" if pre.get("individual_digits") else "digits"
    return kind or ""


def _from_tokenizer_json(root: Path, vocab_size: int, warn, chat_template: str | None) -> dict[str, Value]:
    import gguf

    path = root / "tokenizer.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        model = spec["model"]
    except (OSError, ValueError, KeyError) as e:
        raise TokenizerError(f"{path}: not a readable tokenizer.json ({e})") from None
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        what = f"{model.get('type')} tokenizer" + (" with byte fallback" if model.get("byte_fallback") else "")
        raise TokenizerError(f"{path}: a {what} (only byte-level BPE tokenizers are exported to GGUF)")
    by_id = {i: (t, NORMAL) for t, i in model["vocab"].items()}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    if max(by_id) >= vocab_size:
        raise TokenizerError(f"{path}: token id {max(by_id)} is past the model's vocab_size {vocab_size}")
    tokens = [by_id.get(i, (f"[PAD{i}]", USER_DEFINED)) for i in range(vocab_size)]
    signature = _signature(spec.get("pre_tokenizer"))
    pre = PRE_TOKENIZERS.get(signature)
    if pre is None:
        pre = "default"
        warn(f"{path}: pre-tokenizer not recognised; llama.cpp will split text its default way, which may "
             f"tokenize differently from transformers ({signature[:80] or 'none'})")
    s, a, i32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32
    K = gguf.Keys.Tokenizer
    out = {
        K.MODEL: Value("gpt2", s),
        K.PRE: Value(pre, s),
        K.LIST: Value([t for t, _ in tokens], a, s),
        K.TOKEN_TYPE: Value([k for _, k in tokens], a, i32),
    }
    special = gguf.SpecialVocab(root, load_merges=True, n_vocab=vocab_size)
    if special.merges:
        out[K.MERGES] = Value(list(special.merges), a, s)
    for kind, token_id in special.special_token_ids.items():
        key = getattr(K, f"{kind.upper()}_ID", None)
        if key is not None:
            out[key] = Value(int(token_id), gguf.GGUFValueType.UINT32)
    for kind, flag in special.add_special_token.items():
        key = getattr(K, f"ADD_{kind.upper()}", None)
        if key is not None:
            out[key] = Value(bool(flag), gguf.GGUFValueType.BOOL)
    template = chat_template or special.chat_template
    if isinstance(template, str) and template:
        out[K.CHAT_TEMPLATE] = Value(template, s)
    return out
