"""GGUF files (llama.cpp, Ollama): HF config and HF-named tensors, read lazily one tensor at a time.

The header is parsed here (gguf-py's reader decodes every token string into numpy objects: seconds for a large
vocabulary); tensor bytes are read with `pread`, one tensor at a time, never mapped, so a loaded model costs its own
arrays and nothing more. Each tensor comes out in one of three forms:

- float: F32/F16/BF16 as stored, quantized types dequantized in MLX (`kernels.kquants`, bit-exact with gguf-py);
- affine (`keep_quantized`): types whose values are exactly `scale * code + bias` per 32 weights (Q4_0, Q4_1, Q5_0,
  Q5_1, Q8_0, and Q4_K / Q5_K) as MLX quantized weights, `.weight/.scales/.biases` (scales and biases float16
  where exact, as for the legacy types; else float32);
- blocks (`keep_quantized`): every other type (Q6_K, Q3_K, Q2_K, IQ*, TQ*) as its raw uint8 rows, bound to the
  block layers of `models.layers` / `models.moe`, which multiply on them.

What llama.cpp's converter changed (names, permutations, norm shifts, the hybrid's value-head order) is undone here
from the tables in `names`, so the model sees an HF checkpoint. Ollama's variants of the hybrid files read too:
`ssm_dt` without ".bias", a fused `ssm_ba`, 3-element rope sections, per-layer `head_count_kv`, vision tensors in
the same file (skipped).
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from mlxq.errors import FormatError, UnsupportedModel
from mlxq.formats.base import Checkpoint, TensorInfo, TensorSource, mapped_float
from mlxq.formats.gguf import names
from mlxq.formats.gguf.checks import check_gguf, skip_strings
from mlxq.formats.gguf.codecs import FLOAT_TYPES
from mlxq.formats.gguf.names import ARCHITECTURES, CONFIG_KEYS
from mlxq.formats.gguf.writer import PackedStrings
from mlxq.kernels import kquants
from mlxq.kernels.rows import cut_rows

GROUP = kquants.AFFINE_GROUP
AFFINE_TYPES = kquants.AFFINE_BITS  # GGML type -> bits of its exact MLX affine form


# ------------------------------------------------------------------------------------------------ header
@dataclass(frozen=True)
class Strings:
    """A string array left in the file (the tokenizer's tokens and merges): its length and where it starts and
    ends."""

    count: int
    offset: int
    end: int

    def read(self, path: Path) -> list[str]:
        raw = self.packed(path).data  # one copy, then slices of it
        out, pos, length = [], 0, struct.Struct("<Q").unpack_from
        for _ in range(self.count):
            (n,) = length(raw, pos)
            out.append(raw[pos + 8 : pos + 8 + n].decode("utf-8", errors="replace"))
            pos += 8 + n
        return out

    def packed(self, path: Path) -> PackedStrings:
        """The strings as the file encodes them, for a writer to copy (a vocabulary is never decoded and re-encoded:
        most of an export's fixed cost, and a string that is not valid UTF-8 stays byte for byte)."""
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return PackedStrings(self.count, data[self.offset : self.end])


@dataclass(frozen=True)
class TensorRecord:
    name: str
    shape: tuple[int, ...]  # numpy order (GGUF lists dimensions innermost first)
    kind: str  # GGML type name
    offset: int  # absolute, in the file
    nbytes: int


@dataclass
class Header:
    path: Path
    version: int
    meta: dict[str, Any]  # scalars, strings, numeric arrays as numpy, string arrays as `Strings`
    types: dict[str, tuple[int, int | None]]  # key -> (GGUFValueType, item type of an array)
    tensors: dict[str, TensorRecord]


_SCALARS = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
            GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
            GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
            GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}
_NUMPY = {GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
          GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
          GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
          GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8"}


def read_header(path: Path, check: bool = True) -> Header:
    """Metadata and tensor records of a GGUF file (the data is not touched). `check`: refuse what llama.cpp's loader
    refuses structurally first (`checks.check_gguf`); `doctor` reads damaged files without it, to report on them."""
    path = Path(path)
    string_ends = check_gguf(path) if check else {}
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse(data, path, string_ends)
    except (struct.error, ValueError, UnicodeDecodeError, IndexError, KeyError, OverflowError) as e:
        raise FormatError(f"{path}: not a readable GGUF file, truncated or corrupt ({e})") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None


def _parse(data, path: Path, string_ends: dict[int, int]) -> Header:
    if data[:4] != b"GGUF":
        raise FormatError(f"{path}: not a GGUF file (no GGUF magic)")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    pos = 24

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        if pos + 8 + n > len(data):
            raise ValueError("a string runs past the end of the file")
        pos += 8 + n
        return bytes(data[pos - n : pos]).decode("utf-8")

    def value(kind: int):
        nonlocal pos
        if kind in _SCALARS:
            (v,) = struct.unpack_from(_SCALARS[kind], data, pos)
            pos += struct.calcsize(_SCALARS[kind])
            return v
        if kind == GGUFValueType.STRING:
            return string()
        if kind != GGUFValueType.ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        item, n = struct.unpack_from("<IQ", data, pos)
        pos += 12
        if item in _NUMPY:
            width = np.dtype(_NUMPY[item]).itemsize
            if pos + n * width > len(data):
                raise ValueError("an array runs past the end of the file")
            arr = np.frombuffer(data, _NUMPY[item], n, pos).copy()
            pos += n * width
            return arr
        if item == GGUFValueType.STRING:
            start = pos
            pos = string_ends[start] if start in string_ends else skip_strings(data, start, n)  # walked by the check
            if pos > len(data):
                raise ValueError("a string array runs past the end of the file")
            return Strings(n, start, pos)
        raise ValueError(f"arrays of value type {item} are not allowed")

    meta: dict[str, Any] = {}
    types: dict[str, tuple[int, int | None]] = {}
    for _ in range(n_kv):
        key = string()
        (kind,) = struct.unpack_from("<I", data, pos)
        item = struct.unpack_from("<I", data, pos + 4)[0] if kind == GGUFValueType.ARRAY else None
        pos += 4
        meta[key] = value(kind)
        types[key] = (kind, item)
    records = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = struct.unpack_from("<I", data, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", data, pos + 4)
        kind, offset = struct.unpack_from("<IQ", data, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        records.append((name, tuple(reversed(dims)), kind, offset))
    alignment = int(meta.get("general.alignment", 32))
    start = pos + (-pos) % alignment
    tensors = {}
    for name, shape, kind, offset in records:
        try:
            qtype = GGMLQuantizationType(kind)
        except ValueError:  # kept for `doctor` to report; loading refuses it
            tensors[name] = TensorRecord(name, shape, f"type {kind}", start + offset, 0)
            continue
        block, size = GGML_QUANT_SIZES[qtype]
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        tensors[name] = TensorRecord(name, shape, qtype.name, start + offset, count // block * size)
    for t in tensors.values():
        if t.offset + t.nbytes > len(data):
            raise FormatError(f"{path}: truncated (tensor '{t.name}' ends past the end of the file)")
    return Header(path, version, meta, types, tensors)


def read_bytes(path: Path, record: TensorRecord) -> np.ndarray:
    """A tensor's bytes, read (not mapped: mapped pages would stay resident on top of the loaded arrays)."""
    buf = np.empty(record.nbytes, np.uint8)
    _read_into(path, record, buf)
    return buf


def buffers(sizes: list[int]) -> list[mx.array]:
    """Writable MLX arrays of `sizes` bytes to read tensors into (their own memory: one copy from the file, no
    staging buffer), allocated together with one wait, on a stream of their own: a wait on the default stream would
    last until every conversion queued there is done."""
    out = [mx.zeros((n,), mx.uint8, stream=_allocation_stream()) for n in sizes]
    mx.eval(out)
    return out


@functools.cache
def _allocation_stream() -> mx.ThreadLocalStream:
    return mx.new_thread_local_stream(mx.default_device())


def _read_into(path: Path, record: TensorRecord, buf: np.ndarray, rows: np.ndarray | None = None) -> None:
    """The tensor's bytes into `buf`; with `rows` (a 2-D tensor's HF row j is its row rows[j]), each of its rows
    into its place in `buf` [rows, row bytes] as it is read (a row permutation undone at no cost)."""
    views = [memoryview(buf).cast("B")]
    if rows is not None:  # the file's rows in order, each a slice of the bytes where it goes
        width = len(views[0]) // len(rows)
        views = [views[0][j * width : (j + 1) * width] for j in np.argsort(rows).tolist()]
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            offset, i = record.offset, 0
            while i < len(views):  # a read may stop short: it goes on from there
                n = os.preadv(fd, views[i : i + _IOV_MAX], offset)
                if n <= 0:
                    raise FormatError(f"{path}: truncated (tensor '{record.name}')")
                offset += n
                while i < len(views) and n >= len(views[i]):
                    n -= len(views[i])
                    i += 1
                if n:
                    views[i] = views[i][n:]
        finally:
            os.close(fd)
    except OSError as e:
        raise FormatError(f"{path}: cannot read tensor '{record.name}' ({e.strerror or e})") from None


_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024  # buffers one preadv takes


# ------------------------------------------------------------------------------------------------ open
def open_gguf(path: Path, keep_quantized: bool = False) -> Checkpoint:
    path = Path(path)
    header = read_header(path)
    meta = header.meta
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):  # a damaged header may hold a number or an array there
        what = "missing" if arch is None else f"a {type(arch).__name__}, not a string"
        raise FormatError(f"{path}: metadata 'general.architecture' is {what}")
    if arch not in ARCHITECTURES:
        raise UnsupportedModel(f"{path}: GGUF architecture '{arch}' is not supported "
                               f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    spec = ARCHITECTURES[arch]
    for t in header.tensors.values():
        if t.kind.startswith("type "):
            raise FormatError(f"{path}: tensor '{t.name}' has unknown {t.kind}")
    try:  # values of the wrong type or missing companions (a linear rope scaling without its factor)
        config = _config(meta, arch, spec, header.tensors, path)
        plan = _plan(header, arch, config, keep_quantized)
    except (KeyError, ValueError, TypeError, ZeroDivisionError, IndexError) as e:
        what = f"field {e} is missing" if isinstance(e, KeyError) else f"{type(e).__name__}: {str(e)[:200]}"
        raise FormatError(f"{path}: the metadata does not make a model config ({what})") from None
    quant = {}
    for p in plan.values():
        if p.form == "affine":
            quant[p.module] = {"group_size": GROUP, "bits": AFFINE_TYPES[p.record.kind]}
        elif p.form == "blocks":
            quant[p.module] = {"ggml_type": p.record.kind, "input_order": p.input_order is not None}
    if quant:
        config["quantization"] = {"group_size": GROUP, "bits": 4, "mode": "affine", **quant}

    infos = {hf: TensorInfo(hf, p.shape, p.record.kind if p.part in (None, "weight") else "float32",
                            p.record.nbytes if p.part in (None, "weight") else 0) for hf, p in plan.items()}
    converted: dict = {}  # the conversions of the last read, by key: each of a module's parts (.weight/.scales/
    # .biases) and each module of a joint read comes from one conversion, whichever read asks for it

    def read(hfs: list[str]) -> tuple[dict[str, mx.array | kquants.Narrowing], list[list[mx.array]]]:
        steps = {}  # key -> the part that converts it, for conversions not made yet
        for hf in hfs:
            p = plan[hf]
            if p.part != "input_order" and p.key not in converted:
                steps.setdefault(p.key, p)
        for (key, p), raw in zip(steps.items(), buffers([p.raw_nbytes for p in steps.values()]), strict=True):
            try:
                converted[key] = p.convert(path, config, raw)
            except (ValueError, TypeError, NotImplementedError) as e:  # the metadata's heads may not fit the rows
                raise FormatError(f"{path}: tensor '{p.record.name}' ({p.record.kind}) cannot be decoded "
                                  f"({e})") from None
        made = [[a for parts in converted[key].values() for v in parts.values() for a in _arrays(v)] for key in steps]
        out = {hf: plan[hf].pick(converted) for hf in hfs}
        last = plan[hfs[-1]].key if hfs else None
        for key in [k for k in converted if k != last]:  # a later read can need only the last (parts in order)
            del converted[key]
        return out, made

    def load(hf: str) -> mx.array:
        v = read([hf])[0][hf]
        v = v.resolve() if isinstance(v, kquants.Narrowing) else v
        mx.eval(v)  # one tensor at a time: its file bytes are freed before the next is read
        return v

    def stored(hf: str) -> tuple[np.ndarray, tuple[names.Transform, ...]] | None:
        p = plan[hf]
        if p.form != "float" or p.record.kind not in _HOST_DTYPES:
            return None
        w = mapped_float(path, p.record.offset, p.record.shape, _HOST_DTYPES[p.record.kind])
        return (w if p.rows is None else w[p.rows]), p.transforms

    def host(hf: str) -> np.ndarray | None:
        if (found := stored(hf)) is None:
            return None
        try:
            return names.to_hf_all(found[1], found[0], config)
        except (ValueError, TypeError, IndexError) as e:
            record = plan[hf].record
            raise FormatError(f"{path}: tensor '{record.name}' ({record.kind}) cannot be decoded ({e})") from None

    chat_template = meta.get("tokenizer.chat_template")
    small = {k: v for k, v in meta.items() if not isinstance(v, Strings)}
    tensors = TensorSource(infos, load, host=host, read=read, stored=stored)
    return Checkpoint(path, "gguf", config, tensors, gguf_file=path,
                      chat_template=chat_template if isinstance(chat_template, str) else None,
                      extra={"gguf_metadata": small, "gguf_header": header})


# ------------------------------------------------------------------------------------------------ config
def _scalar(meta: dict, key: str):
    v = meta.get(key)
    if isinstance(v, np.ndarray):  # Ollama: per-layer arrays where llama.cpp has one number
        return int(v.max()) if v.size else None
    return v


def _config(meta: dict, arch: str, spec: names.Architecture, tensors: dict, path: Path) -> dict[str, Any]:
    config: dict[str, Any] = {"model_type": spec.model_type, **spec.defaults}
    for key, field in CONFIG_KEYS.items():
        if (v := _scalar(meta, f"{arch}.{key}")) is not None:
            config[field] = v.item() if isinstance(v, np.generic) else v
    if "vocab_size" not in config:
        embd = tensors.get("token_embd.weight")
        if embd is None:
            raise FormatError(f"{path}: no tensor 'token_embd.weight'")
        config["vocab_size"] = int(embd.shape[0])
    config["tie_word_embeddings"] = "output.weight" not in tensors
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    if "rope_freqs.weight" in tensors:  # Llama 3.1+: the frequency factors stored as a tensor
        factors = read_bytes(path, tensors["rope_freqs.weight"]).view(np.float32)
        config["rope_scaling"] = {"rope_type": "freq_factors", "factors": factors.tolist()}
    for needed in ("num_hidden_layers", "hidden_size", "num_attention_heads"):
        if needed not in config:
            raise FormatError(f"{path}: metadata field '{arch}.{_key_for(needed)}' is missing")
    if arch == "gemma3":
        heads, hidden = config["num_attention_heads"], config["hidden_size"]
        head_dim = config.get("head_dim", hidden // max(heads, 1))
        # llama.cpp: the 62-layer (27B) model scales queries by hidden/heads, the others by head_dim
        config["query_pre_attn_scalar"] = hidden // heads if config.get("num_hidden_layers") == 62 else head_dim
    if spec.hybrid:
        _hybrid_config(meta, arch, config, path)
    return config


def _hybrid_config(meta: dict, arch: str, config: dict, path: Path) -> None:
    """Qwen3.5 / Qwen3-Next: fields llama.cpp stores as something else (see `names`)."""
    nextn = int(meta.get(f"{arch}.{names.NEXTN_LAYERS}", 0))
    blocks = config["num_hidden_layers"]
    config["num_hidden_layers"] = n = blocks - nextn
    config["mtp_num_hidden_layers"] = nextn
    for field in ("linear_num_value_heads", "linear_num_key_heads", "linear_key_head_dim"):
        if field not in config:
            raise FormatError(f"{path}: metadata field '{arch}.{_key_for(field)}' is missing")
    inner = meta.get(f"{arch}.{names.SSM_INNER_SIZE}")
    if inner is None:
        raise FormatError(f"{path}: metadata field '{arch}.{names.SSM_INNER_SIZE}' is missing")
    config["linear_value_head_dim"] = int(inner) // config["linear_num_value_heads"]
    head_dim = config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    rotary = meta.get(f"{arch}.{names.ROPE_DIMENSION_COUNT}")
    if rotary is not None:
        config["partial_rotary_factor"] = int(rotary) / head_dim
    recurrent = meta.get(f"{arch}.{names.RECURRENT_LAYERS}")
    kv_heads = meta.get(f"{arch}.attention.head_count_kv")
    if isinstance(recurrent, np.ndarray) and recurrent.size >= n:
        linear = [bool(x) for x in recurrent[:n]]
    elif isinstance(kv_heads, np.ndarray) and kv_heads.size >= n:  # Ollama: zero KV heads marks a DeltaNet layer
        linear = [int(x) == 0 for x in kv_heads[:n]]
    else:  # llama.cpp's rule when neither is stored
        interval = int(config.get("full_attention_interval", 4))
        linear = [(i + 1) % interval != 0 for i in range(n)]
    config["layer_types"] = ["linear_attention" if x else "full_attention" for x in linear]


def _key_for(field: str) -> str:
    return next(k for k, v in CONFIG_KEYS.items() if v == field)


def v_heads_tiled(meta: dict, arch: str) -> bool:
    """Whether the file's DeltaNet value heads are in llama.cpp's tiled order: Ollama says so in its own key;
    otherwise llama.cpp's rule (qwen35 / qwen35moe reordered, qwen3next not)."""
    flag = meta.get(f"{arch}.{names.OLLAMA_V_HEADS_TILED}")
    return bool(flag) if flag is not None else arch != "qwen3next"


# ------------------------------------------------------------------------------------------------ tensor plan
@dataclass
class _Part:
    """How to produce one HF tensor (or one part of a quantized one) from a GGUF tensor."""

    record: TensorRecord
    module: str  # the HF module (name without .weight / .bias), or the HF name of a non-module tensor
    form: str  # "float" | "affine" | "blocks"
    part: str | None  # affine: weight / scales / biases; blocks: weight / input_order; float: None
    shape: tuple[int, ...]
    transforms: tuple[names.Transform, ...]
    rows: np.ndarray | None = None  # a split: the rows of the GGUF tensor this HF tensor is
    column_units: np.ndarray | None = None  # packed forms: order of whole groups / blocks that undoes a permutation
    input_order: np.ndarray | None = None  # blocks whose columns could not be permuted: the layer gathers its input
    joint: _Joint | None = None  # a whole packed matrix: read that way, with the modules the model fuses it with

    @property
    def key(self) -> object:
        """What identifies the conversion this part comes from."""
        return self.joint or (self.record.name, self.module)

    @property
    def raw_nbytes(self) -> int:
        """Bytes of the file the conversion reads."""
        return self.joint.raw_nbytes if self.joint is not None else self.record.nbytes

    def convert(self, path: Path, config: dict, raw: mx.array) -> dict[str, dict[str, mx.array | kquants.Narrowing]]:
        """The conversion's parts by module, reading the file into `raw` (`raw_nbytes`), unevaluated."""
        return self.joint.convert(path, config, raw) if self.joint is not None else {
            self.module: self._convert(path, config, raw)}

    def pick(self, converted: dict) -> mx.array | kquants.Narrowing:
        if self.part == "input_order":
            return mx.array(self.input_order.astype(np.int32))
        return converted[self.key][self.module][self.part or "weight"]

    def _convert(self, path: Path, config: dict, raw: mx.array) -> dict[str, mx.array | kquants.Narrowing]:
        _read_into(path, self.record, np.asarray(raw))  # the array's own memory, before anything reads it
        raw = raw.reshape(*self.record.shape[:-1], -1)
        if self.rows is not None:
            raw = raw[mx.array(self.rows)]
        if self.form == "float":
            return {"weight": names.to_hf_all(self.transforms, _to_float(raw, self.record, self.rows), config)}
        parts = (dict(zip(("weight", "scales", "biases"), kquants.to_affine(raw, self.record.kind, defer=True),
                          strict=True)) if self.form == "affine" else {"weight": raw})
        if self.column_units is not None:
            parts = {k: _each(v, lambda a: _take_units(a, self.column_units)) for k, v in parts.items()}
        rows_only = tuple(t for t in self.transforms if not _moves_columns(t))  # columns were handled above
        return {k: _each(v, lambda a: names.to_hf_all(rows_only, a, config)) for k, v in parts.items()}


def _each(v: mx.array | kquants.Narrowing, f):
    """`f` on an array, or on a `Narrowing` (and its choice)."""
    return v.map(f) if isinstance(v, kquants.Narrowing) else f(v)


def _arrays(v: mx.array | kquants.Narrowing) -> list[mx.array]:
    return v.arrays if isinstance(v, kquants.Narrowing) else [v]


def _cut(v: mx.array | kquants.Narrowing, sizes: list[int]) -> list:
    """`cut_rows` of an array, or of a `Narrowing` (each block chooses as the whole does)."""
    return v.split(lambda a: cut_rows(a, sizes)) if isinstance(v, kquants.Narrowing) else cut_rows(v, sizes)


@dataclass(eq=False)
class _Joint:
    """Whole packed matrices read as one: the modules a model fuses after loading (`_FUSED`: q/k/v, gate/up) where
    they share a GGML type and row width, or a matrix on its own. Their rows go into one buffer (each module's row
    permutation undone as it is read) converted once, and each module's arrays are its block of rows of the result
    (`kernels.rows.cut_rows`), which fusing takes back whole. Before, fusing copied every part into a new array (a
    tenth of a load's page faults, and a pass over the weights), each part was converted on its own (twice the MLX
    calls), and permuted q/k rows were gathered after converting."""

    weights: tuple[_Part, ...]  # the modules' .weight parts, in the order the model fuses them

    @property
    def raw_nbytes(self) -> int:
        return sum(p.record.nbytes for p in self.weights)

    def convert(self, path: Path, config: dict, raw: mx.array) -> dict[str, dict[str, mx.array | kquants.Narrowing]]:
        first = self.weights[0]
        sizes = [p.record.shape[0] for p in self.weights]
        # numpy's view of the buffer: an MLX reshape would be evaluated on the default stream, after its queue
        rows, start = np.asarray(raw).reshape(sum(sizes), -1), 0
        raw = raw.reshape(rows.shape)
        for p, n in zip(self.weights, sizes, strict=True):
            order = names.to_hf_all(p.transforms, np.arange(n), config) if p.transforms else None
            _read_into(path, p.record, rows[start : start + n], order)
            start += n
        whole = (dict(zip(("weight", "scales", "biases"), kquants.to_affine(raw, first.record.kind, defer=True),
                          strict=True)) if first.form == "affine" else {"weight": raw})
        cut = {k: _cut(v, sizes) for k, v in whole.items()}
        return {p.module: {k: v[i] for k, v in cut.items()} for i, p in enumerate(self.weights)}


# Modules (within a decoder layer) that models fuse after loading (`models.layers.fuse_linears`), in their order
_FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def _joined(plan: dict[str, _Part], layers: int) -> dict[str, _Part]:
    """The plan with the modules each layer fuses read together (`_Joint`) where they are packed alike, their
    parts listed one after another (a load asks for them in this order; the last conversion is what is cached), and
    every other whole packed matrix read as a `_Joint` of its own."""
    names_of: dict[str, list[str]] = {}  # module -> its HF tensors in the plan
    for hf, p in plan.items():
        names_of.setdefault(p.module, []).append(hf)
    for layer in range(layers):
        for group in _FUSED:
            weights = [plan.get(f"model.layers.{layer}.{m}.weight") for m in group]
            if all(_joinable(p, weights[0]) for p in weights):
                joint = _Joint(tuple(weights))
                for hf in (hf for w in weights for hf in names_of[w.module]):
                    plan[hf].joint = joint
    for p in plan.values():  # the rest on their own, read the same way (a row permutation undone as read)
        if p.joint is None and p.part == "weight" and _joinable(p, p):
            joint = _Joint((p,))
            for k in names_of[p.module]:
                plan[k].joint = joint
    ordered: dict[str, _Part] = {}
    for hf, p in plan.items():
        members = [hf] if p.joint is None else [k for w in p.joint.weights for k in names_of[w.module]]
        ordered.update((k, plan[k]) for k in members if k not in ordered)
    return ordered


def _joinable(p: _Part | None, first: _Part | None) -> bool:
    """Whether `p` can be read into one array with `first`: both packed whole (not split, no column reordering), of
    one type and row width, moved by row permutations only."""
    return (p is not None and first is not None and p.form in ("affine", "blocks") and p.rows is None
            and p.column_units is None and p.input_order is None and p.record.kind == first.record.kind
            and p.form == first.form and len(p.record.shape) == 2 and p.record.shape[1] == first.record.shape[1]
            and all(isinstance(t, names.Permutation) and t.axis == 0 for t in p.transforms))


_HOST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # float tensors read without MLX


def _to_float(raw: mx.array, record: TensorRecord, rows: np.ndarray | None) -> mx.array:
    kind = record.kind
    shape = (len(rows), *record.shape[1:]) if rows is not None else record.shape
    if kind == "F32":
        return mx.view(raw, mx.float32).reshape(shape)
    if kind in ("F16", "BF16"):
        return mx.view(raw, mx.float16 if kind == "F16" else mx.bfloat16).reshape(shape).astype(mx.float32)
    if kquants.supports(kind):
        return kquants.dequantize(raw, kind).reshape(shape)
    from gguf.quants import dequantize  # types MLX has no path for (MXFP4, Q8_K, ...): gguf-py's numpy

    return mx.array(dequantize(np.array(raw), GGMLQuantizationType[kind]).reshape(shape))


def _moves_columns(t: names.Transform) -> bool:
    return isinstance(t, names.Permutation) and t.axis == 1


def _unit_order(order: np.ndarray, unit: int) -> np.ndarray | None:
    """A column permutation (gguf = hf.take(order)) as the order of runs of `unit` columns that undoes it
    (hf_units = gguf_units.take(result)), or None when it splits a run."""
    if order.size % unit:
        return None
    runs = order.reshape(-1, unit)
    if (runs[:, 0] % unit).any() or (runs - runs[:, :1] != np.arange(unit)).any():
        return None
    return np.argsort(runs[:, 0] // unit)


def _take_units(w: mx.array, units: np.ndarray) -> mx.array:
    """Reorders the last axis of packed data in `len(units)` equal units (a group's words, a scale, a block)."""
    *lead, n = w.shape
    return w.reshape(*lead, len(units), n // len(units))[..., mx.array(units), :].reshape(*lead, n)


# HF tensors the model's sanitize splits by rows into other modules (Qwen3-Next's ssm_ba; its legacy ssm_in is split
# here, by `names`): never kept as raw blocks (the module names they split into would lose the block type), affine or
# float is fine
_SPLIT_BY_SANITIZE = (".in_proj_ba.",)


def _plan(header: Header, arch: str, config: dict, keep_quantized: bool) -> dict[str, _Part]:
    spec = ARCHITECTURES[arch]
    tiled = v_heads_tiled(header.meta, arch)
    n_layers = config["num_hidden_layers"] if spec.hybrid else None
    plan: dict[str, _Part] = {}
    for name, rec in header.tensors.items():
        if name == "rope_freqs.weight" or name.startswith(names.FOREIGN_PREFIXES):  # read into the config; vision
            continue
        if (hit := names.split(arch, name)) is not None:
            block, fused = hit
            ts = _applicable(fused.transforms, tiled)
            for hf_part, rows in zip(fused.parts, fused.rows(rec.shape[0], config), strict=True):
                # each part in the form the whole would take: whole rows of blocks or groups split as numbers do
                for key, p in _parts(rec, f"model.layers.{block}.{hf_part}", ts, config, keep_quantized).items():
                    plan[key] = p if p.part == "input_order" else replace(p, rows=rows, shape=(len(rows), *p.shape[1:]))
            continue
        hf = names.hf_name(arch, name, n_layers)
        if hf is None:
            raise FormatError(f"{header.path}: tensor '{name}' has no known meaning for architecture '{arch}'")
        ts = _applicable(names.transforms(arch, hf), tiled)
        plan.update(_parts(rec, hf, ts, config, keep_quantized))
    return _joined(plan, config["num_hidden_layers"]) if keep_quantized else plan


def _applicable(transforms: tuple[names.Transform, ...], tiled: bool) -> tuple[names.Transform, ...]:
    return transforms if tiled else tuple(t for t in transforms if not isinstance(t, names.TiledVHeads))


def _parts(rec: TensorRecord, hf: str, ts: tuple, config: dict, keep: bool) -> dict[str, _Part]:
    """The HF tensors one GGUF tensor becomes, in the form `keep` and its type allow."""
    float_shape = rec.shape
    for t in ts:
        float_shape = t.hf_shape(float_shape)
    packable = (keep and rec.kind not in FLOAT_TYPES and len(rec.shape) >= 2 and hf.endswith(".weight")
                and all(isinstance(t, names.Permutation) for t in ts))
    if not packable:
        return {hf: _Part(rec, hf, "float", None, float_shape, ts)}
    module, cols = hf.removesuffix(".weight"), rec.shape[-1]
    order = next((t.order(cols, config) for t in ts if _moves_columns(t)), None)
    if rec.kind in AFFINE_TYPES:
        units = None if order is None else _unit_order(order, GROUP)
        if order is None or units is not None:
            bits = AFFINE_TYPES[rec.kind]
            lead = rec.shape[:-1]
            return {f"{module}.weight": _Part(rec, module, "affine", "weight", (*lead, cols * bits // 32), ts,
                                              column_units=units),
                    f"{module}.scales": _Part(rec, module, "affine", "scales", (*lead, cols // GROUP), ts,
                                              column_units=units),
                    f"{module}.biases": _Part(rec, module, "affine", "biases", (*lead, cols // GROUP), ts,
                                              column_units=units)}
    if not kquants.supports(rec.kind) or any(s in hf for s in _SPLIT_BY_SANITIZE):
        return {hf: _Part(rec, hf, "float", None, float_shape, ts)}
    units = None if order is None else _unit_order(order, kquants.BLOCK_SIZES[rec.kind][0])
    input_order = order if order is not None and units is None else None
    shape = (*rec.shape[:-1], kquants.row_bytes(rec.kind, cols))
    out = {f"{module}.weight": _Part(rec, module, "blocks", "weight", shape, ts, column_units=units,
                                     input_order=input_order)}
    if input_order is not None:
        out[f"{module}.input_order"] = _Part(rec, module, "blocks", "input_order", (cols,), ts,
                                             input_order=input_order)
    return out
