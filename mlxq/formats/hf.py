"""HF safetensors directories (fp32/fp16/bf16, sharded with an index) and mlx-lm quantized directories."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx

from mlxq.errors import FormatError, ModelNotFound
from mlxq.formats.base import Checkpoint, TensorInfo, TensorSource

_SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2,
                       "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, shapes and dtypes from the JSON header, with the file's size checked against it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError("header length past end of file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not a readable safetensors file ({e})") from None
    infos, end = {}, 0
    for name, h in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = h["data_offsets"]
            infos[name] = TensorInfo(name, tuple(h["shape"]), h["dtype"].lower(), stop - start)
            end = max(end, stop)
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: tensor '{name}' has a malformed header entry") from None
    if 8 + n + end > size:
        raise FormatError(f"{path}: truncated ({size} bytes, header says {8 + n + end})")
    return infos


def _shards(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise FormatError(f"{index}: malformed index ({e})") from None
        return [root / f for f in files]
    return sorted(root.glob("*.safetensors"))


def open_safetensors(files: list[Path]) -> TensorSource:
    infos: dict[str, TensorInfo] = {}
    where: dict[str, Path] = {}
    for f in files:
        if not f.exists():
            raise FormatError(f"{f}: shard listed in the index is missing")
        for name, info in read_safetensors_header(f).items():
            infos[name] = info
            where[name] = f
    opened: dict[Path, dict[str, mx.array]] = {}

    def load(name: str) -> mx.array:
        f = where[name]
        if name not in opened.get(f, {}):  # mx.load maps lazily: a tensor is read when it is evaluated
            try:
                opened[f] = mx.load(str(f))
            except (RuntimeError, ValueError) as e:
                raise FormatError(f"{f}: cannot read ({e})") from None
        # Each lazy array is handed out once (popped), so the source never keeps an evaluated tensor
        # alive: streaming a checkpoint tensor by tensor stays near one tensor's memory.
        return opened[f].pop(name)

    return TensorSource(infos, load)


def open_hf_dir(root: Path) -> Checkpoint:
    config_path = root / "config.json"
    if not config_path.exists():
        raise ModelNotFound(f"{root}: no config.json (not a model directory)")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise FormatError(f"{config_path}: invalid JSON ({e})") from None
    files = _shards(root)
    if not files:
        raise FormatError(f"{root}: no *.safetensors weights")
    fmt = "mlx" if "quantization" in config else "hf"
    return Checkpoint(root, fmt, config, open_safetensors(files), tokenizer_dir=root)
