"""ggml's own quantizer (`ggml_quantize_chunk` in the libggml-base shipped inside llama-cpp-python), through
ctypes: the reference our GGUF block encoders must match byte for byte."""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import gguf
import numpy as np


@cache
def _lib() -> ctypes.CDLL:
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def ggml_quantize(w: np.ndarray, kind: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Rows w [rows, cols] -> ggml's bytes for block type `kind` (with `imatrix` [cols]: its weighted fits)."""
    w = np.ascontiguousarray(w, np.float32)
    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((w.shape[0], w.shape[1] // block * size), np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, np.float32)
    n = _lib().ggml_quantize_chunk(int(qtype), w.ctypes.data, out.ctypes.data, 0, w.shape[0], w.shape[1],
                                   None if im is None else im.ctypes.data)
    assert n == out.nbytes
    return out
