"""Ternary (1.58-bit) weights: the two packings, activation quantization and the matmul, by backend.

A ternary weight W [N, K] is codes t in {-1, 0, +1} times a scale per output channel (per-channel, [N])
or one for the whole tensor (BitNet b1.58 2B4T, [1]). The codes are stored code + 1 in {0, 1, 2}, in
256-value blocks laid out exactly as the `qs` (and `qh`) of GGUF's blocks, so one codec serves the kernels
and the GGUF writer (which adds a float16 `d` per block):

- "tq2": 2 bits a value, 64 bytes a block (TQ2_0): in each 32-byte half, byte m holds values m, m+32, m+64,
  m+96 of the half's 128 in bits 0-1, 2-3, 4-5, 6-7;
- "tq1": base 3, 5 values a byte, 52 bytes a block (TQ1_0, 1.625 bits a value): bytes 0-31 hold values
  m + 32 n (n = 0..4), bytes 32-47 values 160 + m + 16 n, bytes 48-51 values 240 + m + 4 n (n = 0..3), each
  byte the fixed-point fraction ceil(q * 256 / 243) of q = the values as base-3 digits, first most
  significant. Digit n comes back as ((byte * 3^n mod 256) * 3) >> 8: a multiply and a shift.

K is padded to whole blocks with zero codes (stored 1), so any K packs. Activations go in as float or as
int8 with one scale per token (BitNet's absmax quantization); with int8 the sum over K is exact in integers.

`ternary_matmul` runs the Metal kernels (`metal/ternary.metal`) on Metal and the pure-MLX reference
everywhere else; the reference is also the oracle the kernels are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import mlx.core as mx

from mlxq.errors import ConfigError
from mlxq.kernels import metal

BLOCK = 256
PACKINGS = {"tq2": 64, "tq1": 52}  # bytes per 256-value block
_POW3 = (81, 27, 9, 3, 1)


def packed_width(k: int, packing: str) -> int:
    """Bytes per row of K values in `packing`."""
    return -(-k // BLOCK) * PACKINGS[packing]


# ----------------------------------------------------------------------------------------------- codecs
def pack(codes: mx.array, packing: str) -> mx.array:
    """Codes in {-1, 0, 1} [..., K] -> uint8 [..., packed_width(K)]."""
    if packing not in PACKINGS:
        raise ConfigError(f"ternary packing '{packing}': unknown (known: {', '.join(PACKINGS)})")
    *lead, k = codes.shape
    nb = -(-k // BLOCK)
    c = (codes.astype(mx.int32) + 1).astype(mx.uint32)
    if nb * BLOCK != k:
        c = mx.pad(c, [(0, 0)] * len(lead) + [(0, nb * BLOCK - k)], constant_values=1)
    c = c.reshape(*lead, nb, BLOCK)
    if packing == "tq2":
        q = c.reshape(*lead, nb, 2, 4, 32) << (2 * mx.arange(4, dtype=mx.uint32))[:, None]
        out = q.sum(axis=-2).reshape(*lead, nb, 64)
    else:
        pow3 = mx.array(_POW3, mx.uint32)[:, None]
        q0 = (c[..., :160].reshape(*lead, nb, 5, 32) * pow3).sum(-2)
        q1 = (c[..., 160:240].reshape(*lead, nb, 5, 16) * pow3).sum(-2)
        qh = (c[..., 240:].reshape(*lead, nb, 4, 4) * pow3[:4]).sum(-2)
        q = mx.concatenate([q0, q1, qh], axis=-1)
        out = (q * 256 + 242) // 243
    return out.astype(mx.uint8).reshape(*lead, nb * PACKINGS[packing])


def unpack(packed: mx.array, k: int, packing: str) -> mx.array:
    """uint8 [..., packed_width(K)] -> codes in {-1, 0, 1} as int8 [..., K]."""
    *lead, width = packed.shape
    nb = width // PACKINGS[packing]
    b = packed.astype(mx.uint32).reshape(*lead, nb, PACKINGS[packing])
    if packing == "tq2":
        shifts = (2 * mx.arange(4, dtype=mx.uint32))[:, None]
        c = (b.reshape(*lead, nb, 2, 1, 32) >> shifts) & 3
        c = c.reshape(*lead, nb, BLOCK)
    else:
        def digits(q, n):
            pow3 = mx.array(_POW3[::-1][:n], mx.uint32)[:, None]  # 1, 3, 9, ...: digit n first
            return (((q[..., None, :] * pow3) & 255) * 3) >> 8

        c0 = digits(b[..., :32], 5).reshape(*lead, nb, 160)
        c1 = digits(b[..., 32:48], 5).reshape(*lead, nb, 80)
        ch = digits(b[..., 48:52], 4).reshape(*lead, nb, 16)
        c = mx.concatenate([c0, c1, ch], axis=-1)
    return (c.reshape(*lead, nb * BLOCK)[..., :k].astype(mx.int8) - 1).astype(mx.int8)


# ------------------------------------------------------------------------------------------ activations
def quantize_activations(x: mx.array) -> tuple[mx.array, mx.array]:
    """BitNet's per-token absmax int8: x ~ xq * scale with xq = round(x * 127 / max|x|) in [-128, 127].
    Returns (xq int8 [..., K], scale float32 [..., 1])."""
    x = x.astype(mx.float32)
    amax = mx.maximum(mx.abs(x).max(axis=-1, keepdims=True), 1e-5)
    xq = mx.clip(mx.round(x * (127.0 / amax)), -128, 127).astype(mx.int8)
    return xq, amax / 127.0


# ------------------------------------------------------------------------------------------ the matmul
@dataclass(frozen=True)
class TernaryWeight:
    """A packed ternary weight: codes [N, packed_width(K)] uint8 and scales [N] or [1] (float)."""

    packed: mx.array
    scales: mx.array
    k: int
    packing: str

    @property
    def n(self) -> int:
        return self.packed.shape[0]


def ternary_matmul(
    x: mx.array, w: TernaryWeight, x_scale: mx.array | None = None, *, backend: str | None = None
) -> mx.array:
    """x [..., K] @ W^T -> [..., N] in float32 (or x's float type).

    x is float, or int8 with `x_scale` [..., 1] (then y = (xq . t) x_scale w_scale, the dot product exact).
    `backend`: None picks "metal" on Metal and "mlx" elsewhere; "reference" is the oracle the others are
    tested against.
    """
    backend = backend or ("metal" if _ON_METAL else "mlx")
    if backend == "reference":
        return reference_matmul(x, w, x_scale)
    if backend == "mlx":
        return mlx_matmul(x, w, x_scale)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k)
    s2 = x_scale.reshape(-1) if x_scale is not None else None
    (y,) = metal.run(launch(x2, w, s2))
    return y.reshape(*lead, w.n)


GEMV_MAX_TOKENS = 8  # up to this many tokens the GEMV kernel (one simdgroup per 4 rows) beats the tiled GEMM


def launch(x: mx.array, w: TernaryWeight, x_scale: mx.array | None = None, cuda: bool = False) -> metal.Launch:
    """The Metal launch for x [M, K] (float, or int8 with x_scale [M]) @ W^T -> y [M, N]; `cuda`: the CUDA
    twin of the GEMV instead (metal/ternary.cu, same arguments)."""
    m, k = x.shape
    if k != w.k:
        raise ConfigError(f"ternary matmul: x has {k} columns, the weight {w.k}")
    integer = x.dtype == mx.int8
    if integer and x_scale is None:
        raise ConfigError("ternary matmul: int8 activations need their scales")
    x_scale = x_scale.astype(mx.float32) if x_scale is not None else mx.ones((m,), mx.float32)
    nb = w.packed.shape[1] // PACKINGS[w.packing]
    dims = mx.array([m, w.n, k, nb], mx.int32)
    template = [("A", mx.int32 if integer else mx.float32), ("PACK", 2 if w.packing == "tq2" else 1),
                ("PER_TENSOR", int(w.scales.size == 1))]
    out_dtype = mx.float32 if integer else x.dtype
    kernels = metal.kernels("ternary.cu" if cuda else "ternary.metal")
    if m <= GEMV_MAX_TOKENS or cuda:
        grid, group, kernel = (64, -(-w.n // 8), m), (64, 1, 1), kernels["ternary_gemv"]
    else:
        grid, group, kernel = (256, -(-w.n // 32), -(-m // 32)), (256, 1, 1), kernels["ternary_gemm"]
    return metal.Launch(kernel, [w.packed, w.scales, x, x_scale, dims], [(m, w.n)], [out_dtype],
                        (grid[0], grid[1] * group[1], grid[2]), group, template)


def reference_matmul(x: mx.array, w: TernaryWeight, x_scale: mx.array | None = None) -> mx.array:
    """The oracle: unpack the codes to float and matmul. Integer activations sum exactly in float32
    (|partial sums| <= 127 K < 2^24 for K < 132k)."""
    t = unpack(w.packed, w.k, w.packing).astype(mx.float32)
    out_dtype = mx.float32 if x.dtype == mx.int8 else x.dtype
    y = x.astype(mx.float32) @ t.T
    y = y * w.scales.astype(mx.float32)
    if x_scale is not None:
        y = y * x_scale.astype(mx.float32)
    return y.astype(out_dtype)


# ------------------------------------------------------------------------------ the pure-MLX fast path
# Off Metal both packings become 2-bit slots in uint32 words, 16 a word (bits 2i..2i+1 slot i), which is MLX's
# 2-bit affine layout: with scale s and bias -s, code c reads s * c - s, and a padding slot (code 1) reads 0.
# tq2's bytes are such words as they are. tq1 is re-packed per call in one fused integer pass over its bytes
# (1/16 of the float decode's output): three qs bytes (15 codes) and a padding slot a word, the block's four qh
# bytes (16 codes) one word, 17 words a block, 6 % more slots than values. x is permuted into slot order (a zero
# under each padding slot) instead of reordering N x K codes; the sum over K does not care about the order.
AFFINE_GROUP = 128  # slots per scale: the fewest scale/bias bytes MLX accepts; rows pad to whole groups


def storage_order(packing: str) -> list[int]:
    """K position of each value of a 256-value block in storage order (byte by byte, digit by digit)."""
    if packing == "tq2":  # byte (half, m), bits j -> half * 128 + 32 j + m
        return [h * 128 + 32 * j + m for h in range(2) for m in range(32) for j in range(4)]
    return ([m + 32 * n for m in range(32) for n in range(5)] + [160 + m + 16 * n for m in range(16) for n in range(5)]
            + [240 + m + 4 * n for m in range(4) for n in range(4)])


def slot_order(packing: str) -> list[int]:
    """K position of each 2-bit slot of a block's words, -1 for a padding slot."""
    order = storage_order(packing)
    if packing == "tq2":
        return order
    qs = [order[15 * i + s] if s < 15 else -1 for i in range(16) for s in range(16)]  # bytes 3i..3i+2, byte-major
    return qs + order[240:]


@cache
def _x_order(packing: str, nb: int) -> mx.array:
    """Indices into x padded to nb * 256 + 1 values (the last a zero) that put x in slot order, whole groups."""
    block = mx.array(slot_order(packing), mx.int32)
    idx = mx.where(block < 0, nb * BLOCK, mx.arange(nb, dtype=mx.int32)[:, None] * BLOCK + block).reshape(-1)
    pad = -idx.size % AFFINE_GROUP
    return mx.concatenate([idx, mx.full((pad,), nb * BLOCK, mx.int32)]) if pad else idx


_TQ2_SHIFTS = 2 * mx.arange(16, dtype=mx.uint32)


@mx.compile
def _tq1_codes(packed: mx.array) -> mx.array:
    """Each tq1 byte's 5 digits as 2-bit slots of a uint32, first digit lowest (one fused pass over contiguous
    bytes; the words are assembled from it by strided slices, which is several times faster than fusing both)."""
    b = packed.astype(mx.uint32)
    return sum(((((b * 3**n) & 255) * 3) >> 8) << (2 * n) for n in range(5))  # digit n = (b 3^n mod 256) 3 >> 8


def words(packed: mx.array, packing: str) -> mx.array:
    """The codes as 2-bit slots in uint32 words [N, words], slot_order within each block, rows padded with code-1
    slots to whole AFFINE_GROUPs."""
    n = packed.shape[0]
    if packing == "tq2":
        return packed.view(mx.uint32)
    c = _tq1_codes(packed).reshape(n, -1, PACKINGS["tq1"])
    qs = c[..., 0:48:3] | (c[..., 1:48:3] << 10) | (c[..., 2:48:3] << 20) | (1 << 30)  # slot 15: code 1
    qh = c[..., 48:] & 255  # a qh byte holds 4 digits
    high = qh[..., 0] | (qh[..., 1] << 8) | (qh[..., 2] << 16) | (qh[..., 3] << 24)
    w = mx.concatenate([qs, high[..., None]], axis=-1).reshape(n, -1)
    pad = -w.shape[1] % (AFFINE_GROUP // 16)
    return mx.concatenate([w, mx.full((n, pad), 0x55555555, mx.uint32)], axis=1) if pad else w


@mx.compile
def _decode_words(words: mx.array) -> mx.array:
    """Slot i of a word is bits 2i..2i+1 (MLX's CPU backend runs this several times faster on words than bytes)."""
    return ((words[..., None] >> _TQ2_SHIFTS) & 3).astype(mx.float32) - 1.0


def mlx_matmul(x: mx.array, w: TernaryWeight, x_scale: mx.array | None = None) -> mx.array:
    """The pure-MLX path off Metal: the weight as 2-bit words (no copy for tq2), then for few tokens MLX's own
    2-bit affine matmul on them, otherwise one fused decode to float and a BLAS matmul."""
    out_dtype = mx.float32 if x.dtype == mx.int8 else x.dtype
    nb = w.packed.shape[1] // PACKINGS[w.packing]
    xf = mx.pad(x.astype(mx.float32), [(0, 0)] * (x.ndim - 1) + [(0, nb * BLOCK - w.k + 1)])
    xs = mx.take(xf, _x_order(w.packing, nb), axis=-1)
    q = words(w.packed, w.packing)
    scales = w.scales.astype(mx.float32)
    if x.size // x.shape[-1] <= AFFINE_MAX_TOKENS:
        s = mx.broadcast_to(scales.reshape(-1, 1), (w.n, xs.shape[-1] // AFFINE_GROUP))
        y = mx.quantized_matmul(xs, q, s, -s, transpose=True, group_size=AFFINE_GROUP, bits=2)
    else:
        y = (xs @ _decode_words(q).reshape(w.n, -1).T) * scales
    if x_scale is not None:
        y = y * x_scale.astype(mx.float32)
    return y.astype(out_dtype)


AFFINE_MAX_TOKENS = 8  # MLX's CPU quantized matmul beats decode + BLAS for decode; far behind it for prefill
_ON_METAL = mx.metal.is_available()
