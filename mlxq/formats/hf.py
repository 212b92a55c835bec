"""HF safetensors directories (fp32/fp16/bf16, sharded with an index) and mlx-lm quantized directories."""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxq.errors import ConfigError, FormatError, ModelNotFound
from mlxq.formats.base import FLOAT_DTYPES, Checkpoint, TensorInfo, TensorSource, mapped_float

# safetensors dtype code -> (our dtype name, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "U64": ("uint64", 8), "I32": ("int32", 4), "U32": ("uint32", 4), "I16": ("int16", 2),
    "U16": ("uint16", 2), "I8": ("int8", 1), "U8": ("uint8", 1), "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3", 1), "F8_E5M2": ("float8_e5m2", 1),
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, shapes and dtypes from the JSON header, checked as the safetensors format defines it: every
    entry well formed, its byte range as long as its shape and dtype say, and the ranges tiling the data section
    exactly (no overlap, no hole, nothing past the end), so a damaged header is refused rather than read."""
    return _read_header(path)[0]


def _read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, int]]:
    """`read_safetensors_header`, and where each tensor's bytes start in the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"header length {n} past end of file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error, UnicodeDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: not a readable safetensors file ({str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the header is not a JSON object")
    infos, ranges = {}, []
    for name, h in header.items():
        if name == "__metadata__":
            continue
        info, start, stop = _entry(path, name, h)
        infos[name] = info
        ranges.append((start, stop, name))
    end = 0
    for start, stop, name in sorted(ranges):
        if start != end:
            what = "overlaps the tensor before it" if start < end else "leaves a hole before it"
            raise FormatError(f"{path}: tensor '{name}' starts at byte {start}, which {what} (damaged header)")
        end = stop
    if 8 + n + end > size:
        raise FormatError(f"{path}: truncated ({size} bytes, header says {8 + n + end})")
    if 8 + n + end < size:
        raise FormatError(f"{path}: {size - 8 - n - end} bytes after the last tensor (damaged header)")
    return infos, {name: 8 + n + start for start, _, name in ranges}


def _entry(path: Path, name: str, h) -> tuple[TensorInfo, int, int]:
    """One header entry as (TensorInfo, start, stop), or a FormatError naming the tensor."""
    def bad(why: str) -> FormatError:
        return FormatError(f"{path}: tensor '{name}' has a malformed header entry ({why})")

    if not isinstance(h, dict):
        raise bad("not an object")
    dtype, shape, offsets = h.get("dtype"), h.get("shape"), h.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise bad(f"unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad("shape must be a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise bad("data_offsets must be two non-negative integers")
    start, stop = offsets
    kind, itemsize = SAFETENSORS_DTYPES[dtype]
    nbytes = itemsize
    for d in shape:
        nbytes *= d
    if stop - start != nbytes:
        raise bad(f"{stop - start} bytes for shape {shape} of {dtype}, which needs {nbytes}")
    return TensorInfo(name, tuple(shape), kind, nbytes), start, stop


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _shards(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise ValueError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise FormatError(f"{index}: malformed index ({str(e)[:200]})") from None
        files = set(weight_map.values())
        for f in files:  # a shard is a file beside the index, never a path elsewhere
            if not isinstance(f, str) or not f or Path(f).name != f or f in (".", ".."):
                raise FormatError(f"{index}: weight_map names {str(f)[:80]!r}, which is not a file in {root}")
        return [root / f for f in sorted(files)]
    return sorted(root.glob("*.safetensors"))


def open_safetensors(files: list[Path]) -> TensorSource:
    infos: dict[str, TensorInfo] = {}
    where: dict[str, Path] = {}
    starts: dict[str, int] = {}
    for f in files:
        if not f.exists():
            raise FormatError(f"{f}: shard listed in the index is missing")
        file_infos, file_starts = _read_header(f)
        for name, info in file_infos.items():
            infos[name] = info
            where[name] = f
        starts.update(file_starts)
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

    def read_slice(name: str, axis: int, ranges: list[tuple[int, int]]) -> mx.array:
        try:
            return _read_slice(where[name], starts[name], infos[name], axis, ranges)
        except OSError as e:
            raise FormatError(f"{where[name]}: cannot read tensor '{name}' ({e.strerror or e})") from None

    def host(name: str) -> np.ndarray | None:
        info = infos[name]
        return mapped_float(where[name], starts[name], info.shape, info.dtype) if info.dtype in FLOAT_DTYPES else None

    return TensorSource(infos, load, read_slice, host)


_NUMPY_CARRIERS = {"bfloat16": ("uint16", "bfloat16")}  # dtypes numpy lacks: read as same-width ints, viewed back
CHUNK_BYTES = 16 << 20  # a strided slice is read this many bytes at a time


def _read_slice(path: Path, start: int, info: TensorInfo, axis: int, ranges: list[tuple[int, int]]) -> mx.array:
    """Parts of one tensor along `axis`, read from the file without the rest: along the first axis they are
    contiguous byte ranges; along a later one the tensor is read CHUNK_BYTES of whole rows at a time, so memory
    stays near the slice (plus one chunk) whatever the tensor's size."""
    carrier, view = _NUMPY_CARRIERS.get(info.dtype, (info.dtype, None))
    itemsize = np.dtype(carrier).itemsize
    shape = info.shape
    outer, span, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])
    width = sum(b - a for a, b in ranges)
    with _scratch((outer, width, inner), carrier) as out, open(path, "rb", buffering=0) as f:
        if outer == 1:
            at = 0
            for a, b in ranges:
                _read_exact(f, start + a * inner * itemsize, out[0, at : at + b - a])
                at += b - a
        else:
            rows = max(1, min(outer, CHUNK_BYTES // max(1, span * inner * itemsize)))
            with _scratch((rows, span, inner), carrier) as buf:
                for first in range(0, outer, rows):
                    n = min(rows, outer - first)
                    _read_exact(f, start + first * span * inner * itemsize, buf[:n])
                    out[first : first + n] = np.concatenate([buf[:n, a:b] for a, b in ranges], axis=1)
        arr = mx.array(out.reshape(*shape[:axis], width, *shape[axis + 1 :]))
    return arr.view(getattr(mx, view)) if view else arr


@contextlib.contextmanager
def _scratch(shape: tuple[int, ...], dtype: str):
    """A numpy buffer in its own anonymous mapping, unmapped on exit. From the C heap instead, a large temporary
    raises glibc's mmap threshold when freed, and later buffers then stay in the heap after they are freed: the
    process would keep the memory of every part it read."""
    size = max(1, math.prod(shape) * np.dtype(dtype).itemsize)
    region = mmap.mmap(-1, size)
    try:
        yield np.frombuffer(region, dtype, count=math.prod(shape)).reshape(shape)
    finally:
        try:
            region.close()
        except BufferError:  # a view of it is still alive somewhere: the mapping goes when that does
            pass


def _read_exact(f, offset: int, into: np.ndarray) -> None:
    """Fills the contiguous array `into` with the file's bytes from `offset`."""
    view, done = memoryview(into).cast("B"), 0
    f.seek(offset)
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += n


def open_hf_dir(root: Path) -> Checkpoint:
    config_path = root / "config.json"
    if not config_path.exists():
        raise ModelNotFound(f"{root}: no config.json (not a model directory)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise FormatError(f"{config_path}: not readable JSON ({str(e)[:200]})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path}: must hold a JSON object, not {type(config).__name__}")
    files = _shards(root)
    if not files:
        raise FormatError(f"{root}: no *.safetensors weights")
    fmt = "mlx" if "quantization" in config else "hf"
    return Checkpoint(root, fmt, config, open_safetensors(files), tokenizer_dir=root)
