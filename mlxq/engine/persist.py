"""Caches on disk: a conversation's cache (`Session.save`) and prompt-cache entries spilled from memory.

One file is one safetensors file: the arrays of every layer's cache (attention keys and values up to their
length, recurrent conv and state whole) and of its checkpoints, with in the metadata the tokens they hold, how the
arrays fit back into caches, what the caller keeps there (a conversation), the model's fingerprint and a sha256
of every array's bytes. Files appear complete or not at all (written to a temporary name, then renamed); a file
that is truncated, altered, or from another model is refused with one line naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxq.engine.cache import KVCache
from mlxq.errors import FormatError, InvalidRequest

FORMAT = "mlxq.cache/1"


def fingerprint(net: Any) -> str:
    """What tells one model's weights from another's, cheaply: every parameter's name, shape and dtype, and the
    bytes of the embedding's first rows (two checkpoints of one architecture differ there)."""
    h = hashlib.sha256()
    for name, a in tree_flatten(net.parameters()):
        h.update(f"{name}:{a.shape}:{a.dtype}\n".encode())
    h.update(_bytes(net.model.embed_tokens.weight[:4]))
    return h.hexdigest()[:32]


def _bytes(a: mx.array) -> bytes:
    import numpy as np

    return np.asarray(mx.contiguous(a).reshape(-1).view(mx.uint8)).tobytes()


# ------------------------------------------------------------------------------------------------ cache states
def _whole(cache: Any) -> Any:
    """Everything a single-row cache holds, as a checkpoint-like structure (attention keys and values included)."""
    if isinstance(cache, KVCache):
        n = cache.offset
        return ("kv", n, None, None) if cache.keys is None or not n else ("kv", n, cache.keys[..., :n, :],
                                                                            cache.values[..., :n, :])
    return cache.checkpoint()


def _fill(cache: Any, state: Any) -> None:
    if isinstance(cache, KVCache):
        _, n, keys, values = state
        if keys is not None:
            cache.update_and_fetch(keys, values)
        cache.offset = n
    else:
        cache.restore(state)


def _flatten(state: Any, name: str, arrays: dict[str, mx.array]) -> Any:
    """A nest of tuples/lists of ints, strings, None and arrays -> JSON, the arrays moved into `arrays`."""
    if isinstance(state, mx.array):
        arrays[name] = state
        return {"array": name}
    if isinstance(state, (tuple, list)):
        return {"items": [_flatten(s, f"{name}.{i}", arrays) for i, s in enumerate(state)]}
    if state is None or isinstance(state, (int, float, str)):
        return state
    raise TypeError(f"cannot save a cache state of type {type(state).__name__}")


def _unflatten(doc: Any, arrays: dict[str, mx.array]) -> Any:
    if isinstance(doc, dict) and "array" in doc:
        return arrays[doc["array"]]
    if isinstance(doc, dict):
        return tuple(_unflatten(d, arrays) for d in doc["items"])
    return doc


# ------------------------------------------------------------------------------------------------ files
def save(path: str | Path, model: str, tokens: list[int], caches: list | None, marks: dict[int, list],
         extra: dict) -> int:
    """Writes `caches` (single-row, holding `tokens`; None for none), their checkpoints `marks` and the caller's
    JSON-able `extra` to `path`, atomically, for the model whose `fingerprint` is `model`; returns the file's size."""
    path = Path(path)
    arrays: dict[str, mx.array] = {}
    doc = {
        "tokens": list(tokens),
        "caches": None if caches is None else [_flatten(_whole(c), f"cache.{i}", arrays) for i, c in enumerate(caches)],
        "marks": {str(p): _flatten(m, f"mark.{p}", arrays) for p, m in marks.items()},
        "extra": extra,
    }
    arrays = {k: mx.contiguous(a) for k, a in arrays.items()}
    mx.eval(list(arrays.values()))
    digest = hashlib.sha256()
    for k in sorted(arrays):
        digest.update(k.encode() + _bytes(arrays[k]))
    meta = {"format": FORMAT, "model": model, "sha256": digest.hexdigest(), "doc": json.dumps(doc)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".safetensors", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise InvalidRequest(f"{path}: cannot be written: {e.strerror or e}") from None
    try:
        mx.save_safetensors(tmp, arrays or {"empty": mx.zeros((0,))}, metadata=meta)
        os.replace(tmp, path)
        return path.stat().st_size
    except OSError as e:
        raise InvalidRequest(f"{path}: cannot be written: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: str | Path, model: str, make_cache: Callable[[], list]) -> tuple[list[int], list | None,
                                                                              dict[int, list], dict]:
    """(tokens, caches, marks, extra) from a file `save` wrote for the model whose fingerprint is `model` (its caches
    built by `make_cache`); one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InvalidRequest(f"{path}: no such file")
    try:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:
        raise FormatError(f"{path}: not a readable cache file ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise FormatError(f"{path}: not an mlxq cache file (format {meta.get('format')!r}, want {FORMAT!r})")
    if meta.get("model") != model:
        raise InvalidRequest(f"{path}: was saved from another model (fingerprint {meta.get('model')}, this model's "
                             f"is {model})")
    arrays.pop("empty", None)
    mx.eval(list(arrays.values()))  # read now, on this thread: the engine thread takes them as they are
    digest = hashlib.sha256()
    for k in sorted(arrays):
        digest.update(k.encode() + _bytes(arrays[k]))
    if digest.hexdigest() != meta.get("sha256"):
        raise FormatError(f"{path}: is corrupt (its arrays do not match their checksum)")
    try:
        doc = json.loads(meta["doc"])
        tokens = [int(t) for t in doc["tokens"]]
        caches = None
        if doc["caches"] is not None:
            caches = make_cache()
            if len(caches) != len(doc["caches"]):
                raise ValueError(f"{len(doc['caches'])} layers, the model has {len(caches)}")
            for cache, state in zip(caches, doc["caches"], strict=True):
                _fill(cache, _unflatten(state, arrays))
            mx.eval([a for c in caches for a in c.state])
        marks = {int(p): list(_unflatten(m, arrays)) for p, m in doc["marks"].items()}
        return tokens, caches, marks, doc["extra"]
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{path}: is corrupt ({type(e).__name__}: {e})") from None
