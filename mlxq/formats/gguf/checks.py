"""Structural checks of a GGUF file, before gguf-py reads it: what llama.cpp's loader (ggml/src/gguf.cpp) refuses
is refused here too, with one line naming the file and the field or tensor.

gguf-py trusts the file: an array length of 10^12 makes it loop for hours, a tensor offset of 2^64-1 wraps to a
valid-looking position, and tensors that overlap or sit at the wrong offset load as garbage. So the header is walked
here first with every count bounded by the bytes left in the file, and the tensor data is checked to be laid out as
llama.cpp requires: each tensor at the offset where the previous one ends (padded to `general.alignment`), its byte
size what its shape and type say, and the file ending with the last tensor.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from mlxq.errors import FormatError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 counted with 32-bit integers; neither llama.cpp nor gguf-py reads it any more
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME, with the terminating zero
INT64_MAX = (1 << 63) - 1

# value type -> struct format of one scalar (strings and arrays are walked separately)
SCALARS: dict[int, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
STRING_MIN = 8  # a string is its u64 length, then its bytes

# metadata holding token ids: each must name a token of `tokenizer.ggml.tokens`
TOKEN_ID_KEYS = tuple(f"tokenizer.ggml.{k}_token_id" for k in
                      ("bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "mask", "cls"))


class _Walker:
    """Reads the header front to back, never past the end of the file."""

    def __init__(self, data: bytes | mmap.mmap, path: Path):
        self.data, self.path, self.pos = data, path, 0
        self.string_ends: dict[int, int] = {}  # where each string array walked starts -> where it ends

    def fail(self, why: str) -> FormatError:
        return FormatError(f"{self.path}: not a valid GGUF file: {why}")

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        if n > self.left:
            raise self.fail(f"truncated inside the header (reading {what})")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        if n > self.left:
            raise self.fail(f"{what}: a string of {n} bytes runs past the end of the file")
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what}: not UTF-8") from None

    def skip_string(self, what: str) -> None:
        n = self.scalar("<Q", what)
        if n > self.left:
            raise self.fail(f"{what}: a string of {n} bytes runs past the end of the file")
        self.pos += n

    def value(self, kind: int, key: str):
        """A metadata value: scalars and strings as themselves, arrays skipped over and stood for by their length."""
        if kind in SCALARS:
            return self.scalar(SCALARS[kind], key)
        if kind == GGUFValueType.STRING:
            return self.string(key)
        if kind == GGUFValueType.ARRAY:
            item = self.scalar("<I", key)
            n = self.scalar("<Q", key)
            if item in SCALARS:
                width = struct.calcsize(SCALARS[item])
                if n > self.left // width:
                    raise self.fail(f"metadata '{key}': an array of {n} values runs past the end of the file")
                self.pos += n * width
            elif item == GGUFValueType.STRING:
                if n > self.left // STRING_MIN:
                    raise self.fail(f"metadata '{key}': an array of {n} strings runs past the end of the file")
                start, self.pos = self.pos, skip_strings(self.data, self.pos, n)
                self.string_ends[start] = self.pos
                if self.pos > len(self.data):
                    raise self.fail(f"metadata '{key}': a string runs past the end of the file")
            else:  # arrays of arrays: gguf.cpp refuses them
                raise self.fail(f"metadata '{key}': arrays of value type {item} are not allowed")
            return _Array(n)
        raise self.fail(f"metadata '{key}': unknown value type {kind}")


_LENGTH = struct.Struct("<Q").unpack_from


def skip_strings(data, pos: int, n: int) -> int:
    """Where `n` strings starting at `pos` end (one tight loop: a vocabulary holds 10^5 of them); past the end of
    `data` when one of them runs past it (a length that does not fit stops the loop: struct's own bounds check, so
    the loop makes none; a damaged length may also put the next offset past what an index can hold)."""
    length = _LENGTH
    try:
        for _ in range(n):
            pos += 8 + length(data, pos)[0]
    except (struct.error, OverflowError):
        return len(data) + 1
    return pos


class _Array:
    """An array value walked over: only its length is kept."""

    def __init__(self, n: int):
        self.n = n


def check_gguf(path: Path) -> dict[int, int]:
    """Raises FormatError unless `path` is a GGUF file llama.cpp would accept structurally (see the module doc).
    Returns where each metadata string array starts -> where it ends, so a reader need not walk them again."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.seek(0, 2) == 0:
                raise FormatError(f"{path}: empty file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _check(data, path)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None


def _check(data, path: Path) -> dict[int, int]:
    w = _Walker(data, path)
    if bytes(data[:4]) != MAGIC:
        raise w.fail("no GGUF magic")
    w.pos = 4
    version = w.scalar("<I", "the version")
    if version not in VERSIONS:
        why = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise w.fail(f"version {version} is not supported{why}")
    n_tensors = w.scalar("<Q", "the tensor count")
    n_kv = w.scalar("<Q", "the metadata count")
    if n_kv > w.left // (STRING_MIN + 4) or n_tensors > w.left // (STRING_MIN + 4 + 4 + 8):
        raise w.fail(f"{n_kv} metadata entries and {n_tensors} tensors cannot fit in the file")

    meta: dict[str, object] = {}
    for i in range(n_kv):
        key = w.string(f"metadata key {i}")
        if not key:
            raise w.fail(f"metadata key {i} is empty")
        if key in meta:
            raise w.fail(f"metadata key '{key}' appears twice")
        kind = w.scalar("<I", key)
        meta[key] = (kind, w.value(kind, key))
    alignment = _alignment(w, meta)
    _check_token_ids(w, meta)

    expected = 0  # where the next tensor must start, relative to the data section
    last_end = 0
    names: set[str] = set()
    for i in range(n_tensors):
        name = w.string(f"tensor name {i}")
        if len(name.encode()) >= MAX_NAME:
            raise w.fail(f"tensor name '{name[:80]}' is longer than {MAX_NAME - 1} bytes")
        if name in names:
            raise w.fail(f"tensor '{name}' appears twice")
        names.add(name)
        n_dims = w.scalar("<I", name)
        if n_dims > MAX_DIMS:
            raise w.fail(f"tensor '{name}' has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = [w.scalar("<Q", name) for _ in range(n_dims)]
        count = 1
        for d in dims:
            if d > INT64_MAX or (d and count > INT64_MAX // d):
                raise w.fail(f"tensor '{name}' has shape {dims}, too large to address")
            count *= d
        kind = w.scalar("<I", name)
        try:
            qtype = GGMLQuantizationType(kind)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise w.fail(f"tensor '{name}' has unknown type {kind}") from None
        if dims and dims[0] % block:
            raise w.fail(f"tensor '{name}' of type {qtype.name} has rows of {dims[0]} values, "
                         f"not a multiple of its block size {block}")
        nbytes = count // block * type_size
        offset = w.scalar("<Q", name)
        if offset != expected:
            raise w.fail(f"tensor '{name}' is at data offset {offset}; after the tensors before it, "
                         f"it must be at {expected} (shifted, overlapping or reordered data)")
        last_end = expected + nbytes
        expected = last_end + (-nbytes) % alignment
    if n_tensors:
        start = w.pos + (-w.pos) % alignment
        size = len(data)
        if start + last_end > size:
            raise FormatError(f"{path}: truncated (the tensors end at byte {start + last_end}, "
                              f"the file has {size})")
        if size > start + expected:
            raise FormatError(f"{path}: {size - start - last_end} unexpected bytes after the last tensor "
                              f"(a damaged tensor record: its type or shape says less data than the file holds)")
    return w.string_ends


def _alignment(w: _Walker, meta: dict) -> int:
    if "general.alignment" not in meta:
        return DEFAULT_ALIGNMENT
    kind, value = meta["general.alignment"]
    if kind != GGUFValueType.UINT32:
        raise w.fail("metadata 'general.alignment' must be a uint32")
    if value == 0 or value & (value - 1):
        raise w.fail(f"metadata 'general.alignment' is {value}, not a power of two")
    return value


def _check_token_ids(w: _Walker, meta: dict) -> None:
    tokens = meta.get("tokenizer.ggml.tokens", (None, None))[1]
    n = tokens.n if isinstance(tokens, _Array) else None
    for key in TOKEN_ID_KEYS:
        if key not in meta:
            continue
        kind, value = meta[key]
        if kind not in SCALARS or isinstance(value, (bool, float)):
            raise w.fail(f"metadata '{key}' must be an integer token id")
        if value < 0 or (n is not None and value >= n):
            raise w.fail(f"metadata '{key}' is {value}, not a token id (the vocabulary has {n} tokens)")
