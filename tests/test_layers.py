"""Shared blocks: the CPU paths (rope table, grouped decode attention, fused projections) against MLX's
own fused ops and the unfused layout."""

from __future__ import annotations

import mlx.core as mx
import pytest
from tiny import make_tiny

from mlxq.formats import open_checkpoint
from mlxq.loading import load_model
from mlxq.models.layers import RoPE, attention, fuse_linears


@pytest.mark.parametrize("dims", [64, 32])
def test_rope_table_matches_fast_rope(dims):
    x = mx.random.normal((2, 4, 5, 64), key=mx.random.key(0))
    rope = RoPE(dims, {"rope_theta": 10000.0, "rope_type": "default"})
    want = mx.fast.rope(x, dims, traditional=False, base=10000.0, scale=1.0, offset=7)
    assert mx.allclose(rope(x, offset=7), want, atol=1e-5)
    # one offset per batch row (continuous batching)
    rows = mx.concatenate([mx.fast.rope(x[i : i + 1], dims, traditional=False, base=10000.0, scale=1.0, offset=o)
                           for i, o in enumerate([3, 11])])
    assert mx.allclose(rope(x, offset=mx.array([3, 11])), rows, atol=1e-5)


def test_rope_linear_scaling():
    x = mx.random.normal((1, 2, 3, 32), key=mx.random.key(1))
    rope = RoPE(32, {"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0})
    want = mx.fast.rope(x, 32, traditional=False, base=10000.0, scale=0.25, offset=5)
    assert mx.allclose(rope(x, offset=5), want, atol=1e-5)


@pytest.mark.parametrize("mask_kind", [None, "bool"])
def test_decode_attention_matches_fast_sdpa(mask_kind):
    k0, k1, k2 = mx.random.split(mx.random.key(2), 3)
    q = mx.random.normal((2, 8, 1, 16), key=k0)
    k = mx.random.normal((2, 2, 9, 16), key=k1)
    v = mx.random.normal((2, 2, 9, 16), key=k2)
    mask = None if mask_kind is None else (mx.arange(9)[None, None, None, :] >= mx.array([0, 4])[:, None, None, None])
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    assert mx.allclose(attention(q, k, v, 0.25, mask), want, atol=1e-5)


def test_fused_and_unfused_models_agree(tmp_path):
    make_tiny("qwen2", tmp_path)  # biases on q/k/v: fused biases too
    fused = load_model(open_checkpoint(str(tmp_path)), fuse=True)
    plain = load_model(open_checkpoint(str(tmp_path)), fuse=False)
    assert "qkv_proj" in fused.model.layers[0].self_attn and "q_proj" in plain.model.layers[0].self_attn
    tokens = mx.array([[1, 2, 3, 4, 5]])
    assert mx.allclose(fused(tokens, fused.make_cache()), plain(tokens, plain.make_cache()), atol=1e-5)


def test_quantized_fusion():
    import mlx.nn as nn

    a, c = nn.QuantizedLinear(64, 64, bits=4), nn.QuantizedLinear(64, 32, bits=4)
    assert fuse_linears([a, nn.QuantizedLinear(64, 64, bits=8)]) is None  # mixed bits cannot share a matmul
    fused = fuse_linears([a, c])
    x = mx.random.normal((1, 64), key=mx.random.key(3))
    assert mx.allclose(fused(x), mx.concatenate([a(x), c(x)], axis=-1), atol=1e-5)
