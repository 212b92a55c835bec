"""Affine group quantization in MLX's format (mlx-lm's weight / scales / biases triple), three ways:

- `rtn`: `mx.quantize` on the float16 weights, exactly what mlx_lm.convert does (round to nearest on each
  group's range, with the larger edge and zero made exactly representable);
- `search`: for each group, a search over clipped ranges, each followed by an importance-weighted least-squares
  refit of scale and bias, keeping whatever minimises sum_j h_j (w_j - w^_j)^2 with h the importance matrix
  (mean squared input activation per input channel). Errors in channels that carry large activations cost
  more in the layer's output, so that is the error worth minimising;
- ternary: BitNet b1.58 absmean, w^ = alpha * {-1, 0, 1} with one alpha per output channel, stored in mlxq's
  ternary packing (mlxq.kernels.ternary: GGUF TQ2_0's block payload, 2 bits a weight) for its ternary kernels.

Scales and biases are rounded to float16 (what is stored) before the codes are chosen, so the codes are the
best ones for the stored parameters. Large tensors are processed in row chunks to bound memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from mlxq.kernels import ternary as ternary_kernels

CHUNK_ELEMENTS = 1 << 22  # weights per row chunk (16 MB of float32): bounds the search's working memory
PARAM_DTYPE = mx.float16  # scales and biases on disk
SHRINK = tuple(1.0 - 0.025 * i for i in range(21))  # clip ranges tried by `search`: 100 % down to 50 %
REFITS = 2  # least-squares refit rounds after the clip search


@dataclass
class Quantized:
    weight: mx.array  # uint32 [..., out, in * bits / 32]
    scales: mx.array  # float16 [..., out, in / group]
    biases: mx.array  # float16 [..., out, in / group]


def pack(codes: mx.array, bits: int) -> mx.array:
    """Codes [..., n] (each < 2**bits) -> uint32 words [..., n * bits / 32], MLX's layout: one little-endian bit
    stream, value i in bits [i*bits, (i+1)*bits) (checked against mx.quantize for every width in the tests)."""
    *lead, n = codes.shape
    shifts = mx.arange(bits, dtype=mx.uint32)
    stream = (codes.astype(mx.uint32)[..., None] >> shifts) & 1  # [..., n, bits]
    stream = stream.reshape(*lead, n * bits // 32, 32)
    # distinct bit positions never carry, so the sum is the OR
    return (stream << mx.arange(32, dtype=mx.uint32)).sum(axis=-1).astype(mx.uint32)


def dequantize(q: Quantized, bits: int, group_size: int) -> mx.array:
    return mx.dequantize(q.weight, q.scales, q.biases, group_size=group_size, bits=bits)


def quantize(
    w: mx.array, bits: int, group_size: int, importance: mx.array | None = None, method: str = "rtn"
) -> Quantized:
    """w [..., out, in] -> packed codes, scales, biases. `importance` [in] (or broadcastable to w's leading
    dims + [in], e.g. [experts, 1, in]) weights the error in `search`; None means uniform."""
    if method not in ("rtn", "search"):
        raise ValueError(f"unknown method {method}")
    *lead, cols = w.shape
    rows = 1
    for d in lead:
        rows *= d
    h = None
    if importance is not None:
        h = mx.broadcast_to(importance.astype(mx.float32), (*lead, cols)).reshape(rows, cols)
    flat = w.reshape(rows, cols)
    step = max(1, CHUNK_ELEMENTS // cols)
    parts = []
    for r in range(0, rows, step):
        chunk = flat[r : r + step].astype(mx.float32)
        hc = h[r : r + step] if h is not None else None
        if method == "rtn":
            part = mx.quantize(chunk.astype(PARAM_DTYPE), group_size=group_size, bits=bits)
        else:
            part = _encode(chunk, *search_params(chunk, bits, group_size, hc), bits, group_size)
        mx.eval(*part)
        parts.append(part)
    weight, scales, biases = (
        mx.concatenate([p[i] for p in parts]) if len(parts) > 1 else parts[0][i] for i in range(3)
    )
    return Quantized(weight.reshape(*lead, -1), scales.reshape(*lead, -1), biases.reshape(*lead, -1))


@dataclass
class Ternary:
    weight: mx.array  # uint8 [..., out, packed_width(in)]: mlxq.kernels.ternary's packing
    scales: mx.array  # float32 [..., out]: one a row costs nothing, and a BitNet scale survives exactly


def ternary(w: mx.array, packing: str = "tq2") -> Ternary:
    """BitNet b1.58 absmean ternarisation with one scale per output channel: codes round(w / mean|w|) clipped to
    {-1, 0, 1}, then the scale refit by least squares for those codes (sum |w| over the nonzero codes / their
    count). On weights that are already ternary times a scale (a BitNet checkpoint) both steps are exact."""
    w = w.astype(mx.float32)
    alpha = mx.maximum(mx.abs(w).mean(axis=-1, keepdims=True), 1e-8)
    codes = mx.clip(mx.round(w / alpha), -1, 1)
    nonzero = mx.maximum(mx.abs(codes).sum(axis=-1), 1.0)
    scale = (w * codes).sum(axis=-1) / nonzero
    return Ternary(ternary_kernels.pack(codes.astype(mx.int8), packing), scale)


# ------------------------------------------------------------------------------------------- internals
def _fp16(scale: mx.array, bias: mx.array) -> tuple[mx.array, mx.array]:
    """Round to the stored precision; a zero scale (constant group) becomes tiny, not zero, so codes exist."""
    scale = scale.astype(PARAM_DTYPE).astype(mx.float32)
    scale = mx.where(scale == 0, 6e-8, scale)
    return scale, bias.astype(PARAM_DTYPE).astype(mx.float32)


def _codes(g: mx.array, scale: mx.array, bias: mx.array, bits: int) -> mx.array:
    return mx.clip(mx.round((g - bias[..., None]) / scale[..., None]), 0, 2**bits - 1)


def _encode(w: mx.array, scale: mx.array, bias: mx.array, bits: int, group_size: int):
    g = w.reshape(w.shape[0], -1, group_size)
    codes = _codes(g, scale, bias, bits).reshape(w.shape).astype(mx.uint32)
    return pack(codes, bits), scale.astype(PARAM_DTYPE), bias.astype(PARAM_DTYPE)


def _weighted_error(g, h, scale, bias, bits):
    q = _codes(g, scale, bias, bits)
    d = q * scale[..., None] + bias[..., None] - g
    return (h * d * d).sum(axis=-1)


def _refit(g: mx.array, h: mx.array, q: mx.array, scale: mx.array, bias: mx.array):
    """Weighted least squares for (scale, bias) given the codes: min sum h (s q + b - w)^2 per group."""
    sh, shq, shqq = h.sum(-1), (h * q).sum(-1), (h * q * q).sum(-1)
    shw, shqw = (h * g).sum(-1), (h * q * g).sum(-1)
    det = sh * shqq - shq * shq
    ok = det > 1e-12 * mx.maximum(sh * shqq, 1e-30)
    safe = mx.where(ok, det, 1.0)
    s = (sh * shqw - shq * shw) / safe
    b = (shqq * shw - shq * shqw) / safe
    good = ok & (s > 0)  # a degenerate or sign-flipped fit keeps the range it came from
    return mx.where(good, s, scale), mx.where(good, b, bias)


def search_params(w: mx.array, bits: int, group_size: int, h: mx.array | None) -> tuple[mx.array, mx.array]:
    """Per-group (scale, bias) minimising the importance-weighted error: clipped ranges, each refit by
    weighted least squares, best kept (RTN's own choice is the first candidate, so this never does worse);
    then a few refit rounds on the winner. w [rows, in], h [rows, in]."""
    g = w.reshape(w.shape[0], -1, group_size)
    hg = mx.ones_like(g) if h is None else mx.broadcast_to(h.reshape(-1, g.shape[1], group_size), g.shape)
    _, s0, b0 = mx.quantize(w.astype(PARAM_DTYPE), group_size=group_size, bits=bits)
    best_s, best_b = _fp16(s0, b0)
    best_e = _weighted_error(g, hg, best_s, best_b, bits)
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    levels = 2**bits - 1
    # candidates in batches of `per` (one pass each instead of one per candidate), bounded in memory
    per = max(1, min(len(SHRINK), CHUNK_ELEMENTS // max(g.size, 1)))
    for i in range(0, len(SHRINK), per):
        shrink = mx.array(SHRINK[i : i + per])[:, None, None]  # [k, 1, 1] against [rows, groups]
        s, b = _fp16(2 * half * shrink / levels, mid - half * shrink)
        s, b = _fp16(*_refit(g, hg, _codes(g, s, b, bits), s, b))
        e = _weighted_error(g, hg, s, b, bits)  # [k, rows, groups]
        pick = mx.argmin(e, axis=0, keepdims=True)
        s, b, e = (mx.take_along_axis(a, pick, axis=0)[0] for a in (s, b, e))
        better = e < best_e
        best_s, best_b, best_e = mx.where(better, s, best_s), mx.where(better, b, best_b), mx.minimum(e, best_e)
        mx.eval(best_s, best_b, best_e)
    for _ in range(REFITS):
        s, b = _fp16(*_refit(g, hg, _codes(g, best_s, best_b, bits), best_s, best_b))
        e = _weighted_error(g, hg, s, b, bits)
        better = e < best_e
        best_s, best_b, best_e = mx.where(better, s, best_s), mx.where(better, b, best_b), mx.minimum(e, best_e)
        mx.eval(best_s, best_b, best_e)
    return best_s, best_b
