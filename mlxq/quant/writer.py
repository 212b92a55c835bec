"""Streaming safetensors shards: every tensor's name, shape and dtype is known before the first byte is written,
so each shard's header is written first and tensors follow one at a time, in plan order. Memory stays at one
tensor whatever the shard size (mx.save_safetensors would need a whole shard in memory).

Layout as mlx-lm writes it: `model.safetensors` or `model-0000i-of-0000n.safetensors`, metadata
{"format": "mlx"}, and `model.safetensors.index.json` with the weight map.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxq.errors import FormatError
from mlxq.glibc import WriteBehind

SAFETENSORS_DTYPE: dict[mx.Dtype, str] = {
    mx.float32: "F32",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.uint32: "U32",
    mx.int32: "I32",
    mx.int64: "I64",
    mx.uint64: "U64",
    mx.uint16: "U16",
    mx.int16: "I16",
    mx.uint8: "U8",
    mx.int8: "I8",
    mx.bool_: "BOOL",
}
DEFAULT_SHARD_BYTES = 5 << 30  # mlx-lm's shard size


@dataclass(frozen=True)
class OutTensor:
    name: str
    shape: tuple[int, ...]
    dtype: mx.Dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.size
        for d in self.shape:
            n *= d
        return n


class ShardWriter:
    """Writes `tensors` (in this order) into shards of at most `shard_bytes` (a larger tensor gets its own)."""

    def __init__(self, root: Path, tensors: list[OutTensor], shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.root = root
        self.shards: list[list[OutTensor]] = []
        size = 0
        for t in tensors:
            if not self.shards or (size + t.nbytes > shard_bytes and self.shards[-1]):
                self.shards.append([])
                size = 0
            self.shards[-1].append(t)
            size += t.nbytes
        n = len(self.shards)
        numbered = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.files = ["model.safetensors"] if n == 1 else numbered
        self._order = [(i, t) for i, shard in enumerate(self.shards) for t in shard]
        self._next = 0
        self._f = None
        self._behind: WriteBehind | None = None
        self._shard = -1

    def write(self, name: str, array: mx.array) -> None:
        if self._next >= len(self._order):
            raise FormatError(f"tensor '{name}': written after the last planned tensor")
        shard, t = self._order[self._next]
        if name != t.name or tuple(array.shape) != t.shape or array.dtype != t.dtype:
            raise FormatError(
                f"tensor '{name}' {tuple(array.shape)} {array.dtype}: expected '{t.name}' {t.shape} {t.dtype}"
            )
        if shard != self._shard:
            self._open(shard)
        data = np.asarray(array.view(mx.uint16) if array.dtype == mx.bfloat16 else array)
        self._f.write(memoryview(np.ascontiguousarray(data)).cast("B"))
        self._behind.wrote(self._f.tell())
        self._next += 1

    def close(self) -> dict[str, str]:
        """Finishes the last shard and writes the index; returns the weight map."""
        if self._next != len(self._order):
            raise FormatError(f"tensor '{self._order[self._next][1].name}': planned but never written")
        self._finish()
        weight_map = {t.name: self.files[i] for i, t in self._order}
        index = {
            "metadata": {"total_size": sum(t.nbytes for _, t in self._order)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.root / "model.safetensors.index.json").write_text(json.dumps(index, indent=4) + "\n")
        return weight_map

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def _open(self, shard: int) -> None:
        self._finish()
        header, offset = {}, 0
        for t in self.shards[shard]:
            header[t.name] = {
                "dtype": SAFETENSORS_DTYPE[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        header["__metadata__"] = {"format": "mlx"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # tensor data starts 8-byte aligned
        self._f = open(self.root / self.files[shard], "wb")  # noqa: SIM115 (closed in _finish)
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._behind = WriteBehind(self._f.fileno())
        self._shard = shard

    def _finish(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
