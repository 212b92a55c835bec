"""Streaming GGUF output: every tensor's name, shape and type is declared first, the
header, metadata and tensor index are written, then tensor data follows one tensor at a time, in declared order.
Memory stays at one tensor. Each tensor's place in the file is known from the header, so its bytes may also be
written there by someone else (the export's worker processes, `place`). The file is built under a hidden temporary
name next to the target and renamed into place only when complete; anything that fails on the way removes it.
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGUF_MAGIC, GGUF_VERSION, GGMLQuantizationType, GGUFValueType, Keys

from mlxq.errors import FormatError
from mlxq.formats.gguf.codecs import row_bytes
from mlxq.glibc import WriteBehind


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


@dataclass(frozen=True)
class PackedStrings:
    """A string array's elements already in GGUF's encoding (each a uint64 length, then its UTF-8 bytes), as a source
    file holds them (`reader.Strings.packed`): written as they are."""

    count: int
    data: bytes

    def __len__(self) -> int:
        return self.count


class GGUFOut:
    """Writes `tensors` (in this order) with `metadata` {key: Value} into `path`, atomically. The header is packed
    here in one pass (gguf-py's writer packs a vocabulary's strings one call tree at a time: most of an export's
    fixed cost); the bytes are the same as gguf-py's GGUFWriter writes."""

    def __init__(self, path: Path, arch: str, metadata: dict[str, Value], tensors: list[TensorOut]):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        self._order = list(tensors)
        self._next = 0
        self._behind: WriteBehind | None = None
        self.fd = -1
        self._header = _header(arch, metadata, self._order)
        self._offsets, end = [], len(self._header)
        for t in self._order:
            self._offsets.append(end)
            end += t.nbytes + _pad(t.nbytes)
        self._size = end

    def __enter__(self) -> GGUFOut:
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._behind = WriteBehind(self.fd)
        try:
            write_at(self.fd, np.frombuffer(self._header, np.uint8), 0)
            os.ftruncate(self.fd, self._size)  # the padding between tensors reads as zeros, as gguf-py writes it
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def write(self, name: str, data: np.ndarray) -> None:
        t = self._order[self._next] if self._next < len(self._order) else None
        if t is not None and (name != t.name or data.nbytes != t.nbytes):
            raise FormatError(f"tensor '{name}' ({data.nbytes} bytes): expected '{t.name}' ({t.nbytes} bytes)")
        write_at(self.fd, data, self.place(name))

    def place(self, name: str) -> int:
        """Where tensor `name`'s data starts in the file; it is the next planned one, and counts as written (by the
        caller, before this file is closed)."""
        if self._next >= len(self._order):
            raise FormatError(f"tensor '{name}': written after the last planned tensor")
        if name != self._order[self._next].name:
            raise FormatError(f"tensor '{name}': expected '{self._order[self._next].name}' next")
        self._next += 1
        at = self._offsets[self._next - 1]
        self._behind.wrote(at)  # what comes before `at` is written, or being written (by the export's workers)
        return at

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if kind is None and self._next != len(self._order):
                raise FormatError(f"tensor '{self._order[self._next].name}': planned but never written")
            if kind is None:
                os.fsync(self.fd)
            os.close(self.fd)
            if kind is None:
                os.replace(self.tmp, self.path)  # the file appears complete or not at all
        finally:
            self.tmp.unlink(missing_ok=True)


def write_at(fd: int, data: np.ndarray, at: int) -> None:
    """All of `data`'s bytes into `fd` from byte `at` on (pwrite may write less than asked)."""
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n


ALIGNMENT = 32  # gguf-py's and llama.cpp's default; exports never set general.alignment


def _pad(n: int) -> int:
    return -n % ALIGNMENT


def _header(arch: str, metadata: dict[str, Value], tensors: list[TensorOut]) -> bytes:
    """Magic, version, counts, metadata (general.architecture first), tensor records, padding to the data."""
    kv = {Keys.General.ARCHITECTURE: Value(arch, T.STRING)}
    kv.update((k, v) for k, v in metadata.items() if k != Keys.General.ARCHITECTURE)
    out = [struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(tensors), len(kv))]
    for key, v in kv.items():
        out.append(_string(key))
        out.append(struct.pack("<I", v.type))
        out.append(_value(v.value, v.type, v.sub))
    offset = 0
    for t in tensors:
        qtype = GGMLQuantizationType[t.kind]
        out += [_string(t.name), struct.pack(f"<I{len(t.shape)}QIQ", len(t.shape), *reversed(t.shape), qtype, offset)]
        offset += t.nbytes + _pad(t.nbytes)
    head = b"".join(out)
    return head + bytes(_pad(len(head)))


T = GGUFValueType
_NUMBERS = {T.UINT8: "<u1", T.INT8: "<i1", T.UINT16: "<u2", T.INT16: "<i2", T.UINT32: "<u4", T.INT32: "<i4",
            T.FLOAT32: "<f4", T.BOOL: "?", T.UINT64: "<u8", T.INT64: "<i8", T.FLOAT64: "<f8"}


def _string(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _value(value: Any, kind: int, sub: int | None) -> bytes:
    if kind in _NUMBERS:
        return np.asarray(value, _NUMBERS[kind]).tobytes()
    if kind == T.STRING:
        return _string(value)
    if kind != T.ARRAY or sub is None or not len(value):
        raise FormatError(f"metadata value of type {kind} ({str(value)[:40]}): not writable")
    head = struct.pack("<IQ", sub, len(value))
    if sub == T.STRING:
        return head + (value.data if isinstance(value, PackedStrings) else b"".join(map(_string, value)))
    if sub in _NUMBERS:
        return head + np.asarray(value, _NUMBERS[sub]).tobytes()
    raise FormatError(f"metadata array of value type {sub}: not writable")
