"""Real weights with their quantized blocks kept: SmolLM2 re-quantized by llama.cpp's own quantizer to Q4_K, Q6_K
and Q2_K runs with every tensor in its own blocks (Q4_K as exact MLX affine, Q6_K / Q2_K as raw GGML blocks) and
gives the logits of the same file dequantized to float; a model whose float form would not fit keeps its blocks
on its own."""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from llama_cpp_run import llama_cpp_quantize
from mlx.utils import tree_flatten

from mlxq import loading
from mlxq.models.layers import BlockLinear

TOKENS = [1, 504, 3458, 314, 253, 1345, 30, 198, 2, 28, 5125, 7, 17, 96, 4530, 11]
# llama.cpp file type, and the GGML type SmolLM2's 1536-wide ffn_down rows take in it (576-wide rows fall back to
# 32-weight types: 576 is not a multiple of 256)
TYPES = {"Q4_K": "MOSTLY_Q4_K_S", "Q6_K": "MOSTLY_Q6_K", "Q2_K": "MOSTLY_Q2_K"}


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def requantize(smollm2_gguf, tmp_path_factory):
    """SmolLM2 in one of TYPES, made once per module by llama.cpp's quantizer (all tensors in that type where rows
    allow: `pure`), from the pinned Q4_1 file (dequantized first: `requantize`)."""
    made = {}

    def get(kind: str):
        if kind not in made:
            out = tmp_path_factory.mktemp("requantized") / f"smollm2-{kind}.gguf"
            llama_cpp_quantize(smollm2_gguf, out, TYPES[kind], pure=True, requantize=True)
            made[kind] = out
        return made[kind]

    return get


@pytest.fixture(params=sorted(TYPES))
def requantized(request, requantize):
    return request.param, requantize(request.param)


def logits(net, tokens=TOKENS) -> mx.array:
    return net(mx.array([tokens]), net.make_cache())[0]


def test_blocks_kept_give_the_dequantized_logits(requantized):
    kind, path = requantized
    kept = loading.load_model(loading.open_for_run(str(path), keep_quantized=True))
    down = kept.model.layers[0].mlp.down_proj
    if kind == "Q4_K":
        assert isinstance(down, nn.QuantizedLinear) and down.bits == 4 and down.group_size == 32
    else:
        assert isinstance(down, BlockLinear) and down.kind == kind
    float_model = loading.load_model(loading.open_for_run(str(path), keep_quantized=False))
    assert rel(logits(kept), logits(float_model)) < 1e-4
    # and the model holds its weights at about the file's size (MLX affine spends float32 scales and biases)
    held = sum(v.nbytes for _, v in tree_flatten(kept.parameters()))
    assert held < 1.35 * path.stat().st_size


def test_a_model_too_big_for_float_keeps_its_blocks(requantize, monkeypatch):
    path = requantize("Q6_K")
    monkeypatch.setattr(loading, "memory_available", lambda: 400 << 20)  # the float model (0.5 GB) does not fit
    small = loading.open_for_run(str(path))
    assert small.config["quantization"]["model.layers.0.mlp.down_proj"]["ggml_type"] == "Q6_K"
    monkeypatch.setattr(loading, "memory_available", lambda: 64 << 30)
    roomy = loading.open_for_run(str(path))
    quantized = "quantization" in roomy.config
    assert quantized == mx.metal.is_available()  # off Metal a model that fits runs in float32


_HEAPS = """
import ctypes, sys, threading
from mlxq.loading import _return_freed_memory
_return_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes, libc.fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]
def work():  # below the mmap threshold: from a heap
    for p in [libc.malloc(64 << 10) for _ in range(16)]:
        libc.free(p)
t = threading.Thread(target=work)
t.start()
t.join()
fp = libc.fopen(sys.argv[1].encode(), b"w")
libc.malloc_info(0, fp)
libc.fclose(fp)
"""


def test_threads_share_one_heap(tmp_path):
    """Loading sets glibc to one heap for every thread (a thread's own heap kept what it freed: ~37 MB on SmolLM2
    by the end of a short generation); glibc's malloc_info lists the heaps, in a fresh process."""
    out = tmp_path / "heaps.xml"
    subprocess.run([sys.executable, "-c", _HEAPS, str(out)], check=True, timeout=120)
    assert out.read_text().count("<heap nr=") == 1


_TRIM = """
import ctypes
from mlxq.loading import _return_freed_memory, trim_heap
_return_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
blocks = [libc.malloc(64 << 10) for _ in range(480)]  # 30 MB from the heap (below the mmap threshold)
for p in blocks:
    ctypes.memset(p, 1, 64 << 10)
for p in blocks[:-1]:  # the last one holds the heap's top: glibc trims a free top by itself, not the middle
    libc.free(p)
before = rss()
trim_heap()
print(before - rss())
"""


def test_trim_heap_hands_freed_memory_back():
    out = subprocess.run([sys.executable, "-c", _TRIM], check=True, timeout=120, capture_output=True, text=True)
    assert float(out.stdout) > 20  # MB of the 30 freed
