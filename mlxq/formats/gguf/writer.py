"""Streaming GGUF output through gguf-py's GGUFWriter: every tensor's name, shape and type is declared first, the
header, metadata and tensor index are written, then tensor data follows one tensor at a time, in declared order.
Memory stays at one tensor. The file is built under a hidden temporary name next to the target and renamed into
place only when complete; anything that fails on the way removes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlxq.errors import FormatError
from mlxq.formats.gguf.codecs import row_bytes


@dataclass(frozen=True)
class TensorOut:
    name: str
    shape: tuple[int, ...]  # logical shape, outermost first (numpy order)
    kind: str  # GGUF type name: F32, F16, BF16, Q4_K, ...

    @property
    def nbytes(self) -> int:
        rows = 1
        for d in self.shape[:-1]:
            rows *= d
        return rows * row_bytes(self.kind, self.shape[-1])


@dataclass(frozen=True)
class Value:
    """A metadata value with its GGUF type (gguf.GGUFValueType); `sub` is the element type of an array."""

    value: Any
    type: Any
    sub: Any = None


class GGUFOut:
    """Writes `tensors` (in this order) with `metadata` {key: Value} into `path`, atomically."""

    def __init__(self, path: Path, arch: str, metadata: dict[str, Value], tensors: list[TensorOut]):
        import gguf

        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        self._order = list(tensors)
        self._next = 0
        self._writer = gguf.GGUFWriter(None, arch)
        for key, v in metadata.items():
            if key == gguf.Keys.General.ARCHITECTURE:
                continue
            self._writer.add_key_value(key, v.value, v.type, sub_type=v.sub)
        for t in self._order:
            qtype = gguf.GGMLQuantizationType[t.kind]
            self._writer.add_tensor_info(t.name, t.shape, np.float32, t.nbytes, raw_dtype=qtype)

    def __enter__(self) -> GGUFOut:
        self._writer.write_header_to_file(self.tmp)
        self._writer.write_kv_data_to_file()
        self._writer.write_ti_data_to_file()
        return self

    def write(self, name: str, data: np.ndarray) -> None:
        if self._next >= len(self._order):
            raise FormatError(f"tensor '{name}': written after the last planned tensor")
        t = self._order[self._next]
        if name != t.name or data.nbytes != t.nbytes:
            raise FormatError(f"tensor '{name}' ({data.nbytes} bytes): expected '{t.name}' ({t.nbytes} bytes)")
        self._writer.write_tensor_data(np.ascontiguousarray(data))
        self._next += 1

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if kind is None and self._next != len(self._order):
                raise FormatError(f"tensor '{self._order[self._next].name}': planned but never written")
            if kind is None:
                for f in self._writer.fout or []:
                    f.flush()
                    os.fsync(f.fileno())
            self._writer.close()
            if kind is None:
                os.replace(self.tmp, self.path)  # the file appears complete or not at all
        finally:
            self.tmp.unlink(missing_ok=True)
