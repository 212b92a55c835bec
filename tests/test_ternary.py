"""Ternary packings: bit-exact with GGUF's TQ2_0 / TQ1_0 block payloads (gguf-py), both ways; ragged K pads."""

from __future__ import annotations

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from mlxq.kernels import ternary

GGUF_TYPES = {"tq2": gguf.GGMLQuantizationType.TQ2_0, "tq1": gguf.GGMLQuantizationType.TQ1_0}


@pytest.mark.parametrize("packing", sorted(GGUF_TYPES))
def test_packing_is_ggufs_block_payload(packing):
    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 2, size=(5, 768)).astype(np.int8)
    ours = np.asarray(ternary.pack(mx.array(codes), packing)).reshape(5, 3, -1)
    theirs = quantize(codes.astype(np.float32), GGUF_TYPES[packing]).reshape(5, 3, -1)
    assert (theirs[..., :-2] == ours).all()  # a GGUF block is our payload followed by its float16 d (1.0 here)
    d_one = np.broadcast_to(np.frombuffer(np.float16(1).tobytes(), np.uint8), (5, 3, 2))
    blocks = np.concatenate([ours, d_one], axis=-1).reshape(5, -1)
    assert (dequantize(blocks, GGUF_TYPES[packing]) == codes).all()


@pytest.mark.parametrize("packing", sorted(GGUF_TYPES))
@pytest.mark.parametrize("k", [1, 255, 300])
def test_ragged_rows_round_trip(packing, k):
    codes = np.random.default_rng(k).integers(-1, 2, size=(3, k)).astype(np.int8)
    packed = ternary.pack(mx.array(codes), packing)
    assert packed.shape == (3, ternary.packed_width(k, packing))
    assert (np.asarray(ternary.unpack(packed, k, packing)) == codes).all()


@pytest.mark.parametrize("packing", sorted(GGUF_TYPES))
@pytest.mark.parametrize("m", [1, 3, 20])
@pytest.mark.parametrize("integer", [False, True], ids=["float", "int8"])
def test_mlx_path_matches_the_oracle(packing, m, integer):
    """The CPU path (the codes as 2-bit words, tq1 re-packed with padding slots, then MLX's 2-bit affine matmul
    for few tokens, a decode + BLAS otherwise) equals the oracle (unpack, matmul) within float32 rounding,
    per-channel and per-tensor scales, ragged K (tq1 rows padded to whole groups)."""
    rng = np.random.default_rng(m)
    n, k = 24, 300
    codes = mx.array(rng.integers(-1, 2, (n, k)).astype(np.int8))
    x = mx.array(rng.normal(size=(2, m, k)).astype(np.float32))
    x_scale = None
    if integer:
        x, x_scale = ternary.quantize_activations(x)
    for scales in (mx.array(rng.uniform(0.5, 2, n).astype(np.float32)), mx.array([0.7])):
        w = ternary.TernaryWeight(ternary.pack(codes, packing), scales, k, packing)
        want = ternary.reference_matmul(x, w, x_scale)
        got = ternary.ternary_matmul(x, w, x_scale, backend="mlx")
        assert got.shape == (2, m, n)
        assert float(mx.abs(got - want).max() / mx.abs(want).max()) < 1e-5


def test_tq1_layer_repacks_to_tq2_off_metal():
    """The CPU layout of a tq1 layer: same codes as tq2 (what MLX's 2-bit matmul reads), same outputs."""
    from mlxq.models.layers import TernaryLinear

    codes = mx.array(np.random.default_rng(4).integers(-1, 2, (16, 300)).astype(np.int8))
    layer = TernaryLinear(300, 16, packing="tq1")
    layer.weight = ternary.pack(codes, "tq1")
    x = mx.random.normal((2, 300), key=mx.random.key(0))
    want = layer(x)
    layer.cpu_layout()
    assert layer.packing == "tq2" and layer.weight.shape == (16, ternary.packed_width(300, "tq2"))
    assert (np.asarray(ternary.unpack(layer.weight, 300, "tq2")) == np.asarray(codes)).all()
    assert float(mx.abs(layer(x) - want).max()) < 1e-4
