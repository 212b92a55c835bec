"""What every checkpoint format gives the rest of mlxq: an HF-style config and lazy tensors in HF names.

Format quirks (GGUF names, permuted Q/K, packed blocks) are undone here at the edge, so model code only
ever sees one convention: the transformers one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

if TYPE_CHECKING:
    from mlxq.kernels.kquants import Narrowing


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32", "bfloat16", "Q4_1", "uint32", ...
    nbytes: int


Ranges = list[tuple[int, int]]  # [start, stop) index ranges along one axis, read and concatenated in order


class TensorSource(Mapping[str, mx.array]):
    """name -> array, loaded only when asked for (one tensor at a time). A source that can read part of a tensor
    without the rest (`slicer`: safetensors files) offers `read_slice`; a rank of a distributed model reads its share
    of each tensor that way."""

    def __init__(self, infos: dict[str, TensorInfo], loader: Callable[[str], mx.array],
                 slicer: Callable[[str, int, Ranges], mx.array] | None = None,
                 host: Callable[[str], np.ndarray | None] | None = None,
                 read: Callable[[list[str]], tuple[dict[str, mx.array | Narrowing], list[mx.array]]] | None = None,
                 stored: Callable[[str], tuple[np.ndarray, tuple] | None] | None = None):
        self._infos = infos
        self._loader = loader
        self._slicer = slicer
        self._host = host
        self._read = read
        self._stored = stored

    def read(self, names: list[str]) -> tuple[dict[str, mx.array | Narrowing], list[mx.array]]:
        """Tensors `names` (in the source's order) together, and what the caller must evaluate (soon: it holds
        memory). A source that converts what it reads (GGUF) reads their bytes now and gives their conversions
        unevaluated, a float16 choice left as a `kernels.kquants.Narrowing` (resolved once evaluated); any other
        gives what `[name]` gives, nothing to evaluate."""
        for name in names:
            if name not in self._infos:
                raise KeyError(name)
        return self._read(names) if self._read is not None else ({name: self._loader(name) for name in names}, [])

    def host_float(self, name: str) -> np.ndarray | None:
        """Tensor `name` as a float32 numpy array read straight from the file (mapped, not copied, when it is stored
        as float32), for a float tensor the format can give that way; None where it must go through `[name]`."""
        if name not in self._infos:
            raise KeyError(name)
        return None if self._host is None else self._host(name)

    def stored_float(self, name: str) -> tuple[np.ndarray, tuple] | None:
        """Tensor `name` as `host_float` gives it but in the file's own layout, and the transforms (`to_hf`, in order)
        that bring it to HF's: for a format that stores tensors transformed (GGUF), so that a writer of that layout
        takes them as they are. None where the format has no such form."""
        if name not in self._infos:
            raise KeyError(name)
        return None if self._stored is None else self._stored(name)

    @property
    def can_slice(self) -> bool:
        return self._slicer is not None

    def read_slice(self, name: str, axis: int, ranges: Ranges) -> mx.array:
        """The parts `ranges` of tensor `name` along `axis`, concatenated, read without the rest of it (evaluated)."""
        if self._slicer is None or name not in self._infos:
            raise KeyError(name)
        return self._slicer(name, axis, ranges)

    def __getitem__(self, name: str) -> mx.array:
        if name not in self._infos:
            raise KeyError(name)
        return self._loader(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def infos(self) -> list[TensorInfo]:
        return list(self._infos.values())


@dataclass
class Checkpoint:
    """A model on disk, opened but not loaded."""

    path: Path
    format: str  # "hf" | "mlx" | "gguf"
    config: dict[str, Any]  # HF config.json content (text config merged in for multimodal wrappers)
    tensors: TensorSource  # HF tensor names; mlx-lm quantized triples keep their .weight/.scales/.biases
    tokenizer_dir: Path | None = None  # directory with tokenizer.json / tokenizer_config.json
    gguf_file: Path | None = None  # set for GGUF checkpoints (transformers builds the tokenizer from it)
    chat_template: str | None = None  # overrides the tokenizer's own when set
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def quantization(self) -> dict[str, Any] | None:
        return self.config.get("quantization") or self.config.get("quantization_config")


FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def mapped_float(path: Path, offset: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A float32/float16/bfloat16 tensor at `offset` in `path` as float32: float32 mapped copy-on-write (no copy, no
    read: the pages come from the page cache, and writes never reach the file), the others converted (exactly)."""
    count = 1
    for d in shape:
        count *= d
    if not count:
        return np.zeros(shape, np.float32)
    path = os.fspath(path)  # (numpy's memmap resolves a Path's links anew for every tensor: ~80 us each)
    if dtype == "float32":
        return np.asarray(np.memmap(path, np.float32, "c", offset, (count,))).reshape(shape)
    if dtype == "float16":
        return np.memmap(path, np.float16, "r", offset, (count,)).astype(np.float32).reshape(shape)
    bits = np.memmap(path, np.uint16, "r", offset, (count,)).astype(np.uint32)  # bfloat16: the high half of float32
    bits <<= 16
    return bits.view(np.float32).reshape(shape)
