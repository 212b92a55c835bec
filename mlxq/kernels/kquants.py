"""GGML block-quantized weights (GGUF's K-quants, legacy and ternary types) used as they are stored: dequantization,
`x @ W^T` on raw blocks, and its gathered form for MoE experts.

A quantized weight W [out, in] is `blocks`, uint8 [out, in / block_elems * block_bytes]: each row is its blocks back
to back, byte for byte as in the GGUF file (stacked experts: [experts, out, ...]). This is the pure-MLX reference
path: it dequantizes the weight it multiplies, one layer at a time at call time, so the model stays at its file
size and only one layer's float weight exists at once. Kernels (Metal) register themselves with
`register_backend` under the same signatures and are tested against these functions.

Dequantization is bit-exact with gguf-py's `gguf.quants.dequantize` (the same float32 operations in the same
order; every product of a scale and a code is exact, so fused multiply-adds cannot change a result).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import mlx.core as mx
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from mlxq.errors import FormatError
from mlxq.kernels import ternary

QK_K = 256



# ------------------------------------------------------------------------------------------------ helpers
def _f16(b: mx.array, at: int) -> mx.array:
    """The float16 at byte `at` of every block, as float32 [n, 1]."""
    return mx.view(b[:, at : at + 2], mx.float16).astype(mx.float32)


def _f16_as_stored(b: mx.array, at: int) -> mx.array:
    """The float16 at (even) byte `at` of every block [n, 1], in an array of its own (not a view into the blocks)."""
    return mx.contiguous(mx.view(_halfwords(b)[:, at // 2 : at // 2 + 1], mx.float16))


def _halfwords(b: mx.array) -> mx.array:
    """Blocks of an even number of bytes [n, size] as 16-bit words [n, size / 2], a view: MLX copies or combines
    slices of an array an element at a time, so slices of these cost half what slices of the bytes do."""
    return mx.view(b, mx.uint16)


def _words(b: mx.array, start: int, stop: int) -> mx.array:
    """Bytes [start, stop) (even offsets, 8k bytes) of every block as 64-bit words [n, k]: the slice taken in 16-bit
    words, or as it is when the blocks are whole 64-bit words."""
    if b.shape[1] % 8 == 0 and start % 8 == 0:
        return mx.view(b, mx.uint64)[:, start // 8 : stop // 8]
    return mx.view(_halfwords(b)[:, start // 2 : stop // 2], mx.uint64)


def _bits(b: mx.array, shifts: list[int], mask: int) -> mx.array:
    """[n, k] bytes -> [n, len(shifts), k]: (byte >> shift) & mask for each shift."""
    return (b[:, None, :] >> mx.array(shifts, b.dtype)[None, :, None]) & mask


def _nibbles(qs: mx.array, run: int) -> mx.array:
    """Low nibbles then high nibbles of each `run` bytes: [n, k] -> [n, 2k] (llama.cpp's 4-bit layout)."""
    n = qs.shape[0]
    return _bits(qs.reshape(n * (qs.shape[1] // run), run), [0, 4], 0xF).reshape(n, -1)


def _int8(q: mx.array) -> mx.array:
    return q.astype(mx.int8)


# ------------------------------------------------------------------------------------------------ legacy (32)
def _q4_0(b):
    d = _f16(b, 0)
    q = _int8(_nibbles(b[:, 2:18], 16)) - 8
    return d * q.astype(mx.float32)


def _q4_1(b):
    d, m = _f16(b, 0), _f16(b, 2)
    return d * _nibbles(b[:, 4:20], 16).astype(mx.float32) + m


def _q5(b: mx.array, at: int) -> mx.array:
    """Q5_0 / Q5_1 codes 0..31: four bytes of high bits (bit j for weight j), then the nibbles."""
    n = b.shape[0]
    high = (b[:, at : at + 4, None] >> mx.arange(8, dtype=mx.uint8)) & 1  # [n, byte, bit]: weight 8 * byte + bit
    return _nibbles(b[:, at + 4 : at + 20], 16) | (high.reshape(n, 32) << 4)


def _q5_0(b):
    d = _f16(b, 0)
    return d * (_int8(_q5(b, 2)) - 16).astype(mx.float32)


def _q5_1(b):
    d, m = _f16(b, 0), _f16(b, 2)
    return d * _q5(b, 4).astype(mx.float32) + m


def _q8_0(b):
    d = _f16(b, 0)
    return mx.view(b[:, 2:34], mx.int8).astype(mx.float32) * d


# ------------------------------------------------------------------------------------------------ K-quants (256)
def _q2_k(b):
    n = b.shape[0]
    scales, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0xF).astype(mx.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).astype(mx.float32)).reshape(n, 16, 1)
    q = _bits(qs.reshape(n * 2, 32), [0, 2, 4, 6], 3).reshape(n, 16, 16).astype(mx.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, scales = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    low = _bits(scales[:, 0:8], [0, 4], 0xF).reshape(n, 16)
    high = _bits(scales[:, 8:12], [0, 2, 4, 6], 3).reshape(n, 16)
    sc = (_int8(low | (high << 4)) - 32).astype(mx.float32)
    dl = (d * sc).reshape(n, 16, 1)
    ql = _bits(qs.reshape(n * 2, 32), [0, 2, 4, 6], 3).reshape(n, 16, 16)
    qh = _bits(hmask, list(range(8)), 1).reshape(n, 16, 16) ^ 1  # a set bit means no offset
    q = (_int8(ql) - _int8(qh << 2)).astype(mx.float32)
    return (dl * q).reshape(n, QK_K)


def _scale_min_k4(s: mx.array) -> tuple[mx.array, mx.array]:
    """Q4_K / Q5_K: eight 6-bit scales and eight 6-bit mins packed in 12 bytes."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = mx.concatenate([d & 0x3F, (md & 0xF) | ((d >> 2) & 0x30)], axis=1)
    mn = mx.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def _q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl = (d * sc.astype(mx.float32)).reshape(n, 8, 1)
    dm = (dmin * mn.astype(mx.float32)).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:144], 32).reshape(n, 8, 32).astype(mx.float32)
    return (dl * q - dm).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl = (d * sc.astype(mx.float32)).reshape(n, 8, 1)
    dm = (dmin * mn.astype(mx.float32)).reshape(n, 8, 1)
    ql = _nibbles(b[:, 48:176], 32).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48], list(range(8)), 1).reshape(n, 8, 32)
    q = (ql | (qh << 4)).astype(mx.float32)
    return (dl * q - dm).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh, scales = b[:, 0:128], b[:, 128:192], b[:, 192:208]
    d = _f16(b, 208)
    dl = (d * mx.view(scales, mx.int8).astype(mx.float32)).reshape(n, 16, 1)
    low = _nibbles(ql, 64).reshape(n, 8, 32)
    high = _bits(qh.reshape(n * 2, 32), [0, 2, 4, 6], 3).reshape(n, 8, 32)
    q = (_int8(low | (high << 4)) - 32).reshape(n, 16, 16).astype(mx.float32)
    return (dl * q).reshape(n, QK_K)


# ------------------------------------------------------------------------------------------------ ternary, IQ4
def _tq1_0(b):  # the payload is mlxq's own ternary packing (mlxq.kernels.ternary), then d
    return _f16(b, 52) * ternary.unpack(b[:, 0:52], QK_K, "tq1").astype(mx.float32)


def _tq2_0(b):
    return _f16(b, 64) * ternary.unpack(b[:, 0:64], QK_K, "tq2").astype(mx.float32)


_IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml's kvalues_iq4nl
# ggml's table is smooth: this quartic, rounded, is exactly it at the 16 codes (at most 0.48 off before rounding;
# tests check all 16). Plain float ops run about 3x faster on MLX's CPU backend than a lookup, gathered or selected.
_IQ4_QUARTIC = (0.001324720171469444, 0.04121682411156027, -1.5001835754544741, 24.743245746341753, -127.04360165118695)


@mx.compile
def _iq4(codes: mx.array) -> mx.array:
    """4-bit codes -> ggml's non-linear values (_IQ4_VALUES), float32."""
    x = codes.astype(mx.float32)
    y = _IQ4_QUARTIC[0] * x
    for p in _IQ4_QUARTIC[1:-1]:  # Horner
        y = (y + p) * x
    return mx.round(y + _IQ4_QUARTIC[-1])


def _iq4_nl(b):
    return _f16(b, 0) * _iq4(_nibbles(b[:, 2:18], 16))


def _iq4_xs(b):
    n = b.shape[0]
    d = _f16(b, 0)
    high = (mx.view(b[:, 2:4], mx.uint16) >> mx.arange(0, 16, 2, dtype=mx.uint16)[None]).astype(mx.uint8) & 3
    low = _bits(b[:, 4:8], [0, 4], 0xF).swapaxes(1, 2).reshape(n, 8)
    sc = (_int8(low | (high << 4)) - 32).astype(mx.float32)
    dl = (d * sc).reshape(n, 8, 1)
    return (dl * _iq4(_nibbles(b[:, 8:136], 16)).reshape(n, 8, 32)).reshape(n, QK_K)


# ------------------------------------------------------------------------------------------------ IQ grids
_GRIDS: dict[str, mx.array] = {}


def _grid(kind: str) -> mx.array:
    """The IQ type's codebook [entries, values] (gguf-py holds llama.cpp's tables as data)."""
    if kind not in _GRIDS:
        from gguf import quants

        cls = getattr(quants, kind)
        cls.init_grid()
        _GRIDS[kind] = mx.array(cls.grid.reshape(cls.grid_shape))
    return _GRIDS[kind]


def _ksigns() -> mx.array:
    if "ksigns" not in _GRIDS:
        from gguf import quants

        _GRIDS["ksigns"] = mx.array(list(quants.IQ2_XXS.ksigns), mx.uint8)
    return _GRIDS["ksigns"]


def _sign_bits(bytes_: mx.array) -> mx.array:
    """[...] sign bytes -> [..., 8] of +1 / -1 (bit i set: weight i negative)."""
    bits = (bytes_[..., None] >> mx.arange(8, dtype=mx.uint8)) & 1
    return mx.where(bits == 0, mx.array(1.0), mx.array(-1.0))


def _iq2_xxs(b):
    n = b.shape[0]
    d = _f16(b, 0)
    q = mx.view(b[:, 2:66], mx.uint32).reshape(n, 8, 2)
    db = (d * (0.5 + (q[..., 1] >> 28).astype(mx.float32)) * 0.25).reshape(n, 8, 1, 1)
    sign_index = (q[..., 1:2] >> mx.array([0, 7, 14, 21], mx.uint32)) & 0x7F
    signs = _sign_bits(_ksigns()[sign_index])  # [n, 8, 4, 8]
    grid = _grid("IQ2_XXS")[mx.view(q[..., 0], mx.uint8).reshape(n, 8, 4).astype(mx.uint32)]
    return (db * grid * signs).reshape(n, QK_K)


def _iq2_xs(b):
    n = b.shape[0]
    d = _f16(b, 0)
    qs = mx.view(b[:, 2:66], mx.uint16)  # [n, 32]
    sc = _bits(b[:, 66:74], [0, 4], 0xF).swapaxes(1, 2).reshape(n, 16)
    db = (d * (0.5 + sc.astype(mx.float32)) * 0.25).reshape(n, 16, 1, 1)
    signs = _sign_bits(_ksigns()[(qs >> 9).astype(mx.uint32)]).reshape(n, 16, 2, 8)
    grid = _grid("IQ2_XS")[(qs & 511).astype(mx.uint32)].reshape(n, 16, 2, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _iq2_s(b):
    n = b.shape[0]
    d = _f16(b, 0)
    qs, sign_bytes, qh, scales = b[:, 2:34], b[:, 34:66], b[:, 66:74], b[:, 74:82]
    sc = _bits(scales, [0, 4], 0xF).swapaxes(1, 2).reshape(n, 16)
    db = (d * (0.5 + sc.astype(mx.float32)) * 0.25).reshape(n, 16, 1, 1)
    signs = _sign_bits(sign_bytes).reshape(n, 16, 2, 8)
    high = _bits(qh, [0, 2, 4, 6], 3).swapaxes(1, 2).reshape(n, 32).astype(mx.uint32)
    grid = _grid("IQ2_S")[qs.astype(mx.uint32) | (high << 8)].reshape(n, 16, 2, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _iq3_xxs(b):
    n = b.shape[0]
    d = _f16(b, 0)
    qs, scales = b[:, 2:66], mx.view(b[:, 66:98], mx.uint32)  # [n, 64], [n, 8]
    db = (d * (0.5 + (scales >> 28).astype(mx.float32)) * 0.5).reshape(n, 8, 1, 1)
    sign_index = (scales[..., None] >> mx.array([0, 7, 14, 21], mx.uint32)) & 0x7F
    signs = _sign_bits(_ksigns()[sign_index])  # [n, 8, 4, 8]
    grid = _grid("IQ3_XXS")[qs.astype(mx.uint32)].reshape(n, 8, 4, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _iq3_s(b):
    n = b.shape[0]
    d = _f16(b, 0)
    qs, qh, sign_bytes, scales = b[:, 2:66], b[:, 66:74], b[:, 74:106], b[:, 106:110]
    sc = _bits(scales, [0, 4], 0xF).swapaxes(1, 2).reshape(n, 8)
    db = (d * (1 + 2 * sc).astype(mx.float32)).reshape(n, 8, 1, 1)
    signs = _sign_bits(sign_bytes).reshape(n, 8, 4, 8)
    high = _bits(qh, list(range(8)), 1).swapaxes(1, 2).reshape(n, 64).astype(mx.uint32)
    grid = _grid("IQ3_S")[qs.astype(mx.uint32) | (high << 8)].reshape(n, 8, 4, 8)
    return (db * grid * signs).reshape(n, QK_K)


IQ1_DELTA = 0.125


def _iq1_s(b):
    n = b.shape[0]
    d = _f16(b, 0)
    qs, qh = b[:, 2:34], mx.view(b[:, 34:50], mx.uint16)  # [n, 32], [n, 8]
    dl = (d * (2 * ((qh >> 12) & 7) + 1).astype(mx.float32)).reshape(n, 8, 1, 1)
    delta = mx.where((qh & 0x8000) == 0, IQ1_DELTA, -IQ1_DELTA).reshape(n, 8, 1, 1)
    high = ((qh[..., None] >> mx.array([0, 3, 6, 9], mx.uint16)) & 7).reshape(n, 32).astype(mx.uint32)
    grid = _grid("IQ1_S")[qs.astype(mx.uint32) | (high << 8)].reshape(n, 8, 4, 8)
    return (dl * (grid + delta)).reshape(n, QK_K)


def _iq1_m(b):
    n = b.shape[0]
    qs, qh, scales = b[:, 0:32], b[:, 32:48], mx.view(b[:, 48:56], mx.uint16)  # [n, 32], [n, 16], [n, 4]
    # the float16 scale is spread over the top nibbles of the four scale words
    parts = (scales & 0xF000) >> mx.array([12, 8, 4, 0], mx.uint16)
    d = mx.view(parts[:, 0:1] | parts[:, 1:2] | parts[:, 2:3] | parts[:, 3:4], mx.float16).astype(mx.float32)
    sc = ((scales[..., None] >> mx.array([0, 3, 6, 9], mx.uint16)) & 7).reshape(n, 16)
    dl = (d * (2 * sc + 1).astype(mx.float32)).reshape(n, 8, 2, 1, 1)
    halves = (qh[..., None] >> mx.array([0, 4], mx.uint8)).reshape(n, 32)  # [n, 32]
    idx = qs.astype(mx.uint32) | ((halves & 7).astype(mx.uint32) << 8)
    delta = mx.where((halves & 8) == 0, IQ1_DELTA, -IQ1_DELTA).reshape(n, 8, 2, 2, 1)
    grid = _grid("IQ1_M")[idx].reshape(n, 8, 2, 2, 8)
    return (dl * (grid + delta)).reshape(n, QK_K)


_DEQUANTIZE: dict[str, Callable[[mx.array], mx.array]] = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
    "TQ1_0": _tq1_0, "TQ2_0": _tq2_0, "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs,
    "IQ2_XXS": _iq2_xxs, "IQ2_XS": _iq2_xs, "IQ2_S": _iq2_s, "IQ3_XXS": _iq3_xxs, "IQ3_S": _iq3_s,
    "IQ1_S": _iq1_s, "IQ1_M": _iq1_m,
}
# GGML type name -> (weights per block, bytes per block), from gguf-py's table
BLOCK_SIZES: dict[str, tuple[int, int]] = {kind: GGML_QUANT_SIZES[GGMLQuantizationType[kind]] for kind in _DEQUANTIZE}


# ------------------------------------------------------------------------------------------------ as MLX affine
# Types whose every value is exactly `scale * code + bias` with one scale and bias per 32 weights: MLX's affine
# quantization holds them without loss. Scales and biases are float16 where that is exact (the legacy types store
# float16 scales, and their biases are those times a power of two or stored float16), else float32 (K-quant scales
# are products of a float16 and a 6-bit integer: exact in float32, seldom in float16); MLX's quantized matmul
# promotes them to the input's float32 exactly. GGML type -> bits per code.
AFFINE_BITS: dict[str, int] = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5}
# the types whose biases are, by construction, their (float16) scale times -2^(bits - 1): codes offset by half their
# range
BIAS_PER_SCALE: dict[str, int] = {"Q4_0": -8, "Q5_0": -16, "Q8_0": -128}
AFFINE_GROUP = 32


def _affine_blocks(b: mx.array, kind: str) -> tuple[mx.array, mx.array, mx.array]:
    """Per block: its codes packed as MLX packs them [n, elems * bits / 8] (uint8), scales and biases
    [n, elems / 32]: float32, but the legacy types' scales float16 as stored (and Q4_1 / Q5_1's biases)."""
    n = b.shape[0]
    if kind in ("Q4_0", "Q5_0"):
        d = _f16_as_stored(b, 0)
        packed = _from_lanes(b, 2, 8, _nibble_lane_bytes) if kind == "Q4_0" else _from_lanes(b, 2, 10, _five_bits)
        return packed, d, BIAS_PER_SCALE[kind] * d.astype(mx.float32)
    if kind in ("Q4_1", "Q5_1"):
        packed = _from_lanes(b, 4, 8, _nibble_lane_bytes) if kind == "Q4_1" else _from_lanes(b, 4, 10, _five_bits)
        return packed, _f16_as_stored(b, 0), _f16_as_stored(b, 2)
    if kind == "Q8_0":
        d = _f16_as_stored(b, 0)
        # int8 + 128 as a byte: the sign bit flipped, two bytes at a time
        return (mx.view(_halfwords(b)[:, 1:17] ^ mx.array(0x8080, mx.uint16), mx.uint8), d,
                BIAS_PER_SCALE[kind] * d.astype(mx.float32))
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    if kind == "Q4_K":
        packed = _repack_nibbles(_words(b, 16, 144), 32)
    else:
        qh = _bits(b[:, 16:48], list(range(8)), 1).reshape(n, QK_K)
        packed = _pack_bytes(_nibbles(b[:, 48:176], 32) | (qh << 4), 5)
    return packed, d * sc.astype(mx.float32), -(dmin * mn.astype(mx.float32))


def _repack_nibbles(words: mx.array, run: int) -> mx.array:
    """llama.cpp's 4-bit layout as 64-bit words [n, k] (each `run` bytes: weights 0..run-1 in the low nibbles,
    run..2run-1 in the high ones) -> MLX's bytes [n, 8k] (weight 2i in the low nibble of byte i, 2i + 1 in the high
    one), without unpacking the codes: each 16-bit lane of a word is a pair of bytes, whose low nibbles make a byte of
    the run's first half and whose high nibbles make one of its second half."""
    n, k = words.shape
    return mx.view(_nibble_pairs(words.reshape(n * k * 8 // run, 1, run // 8)), mx.uint8).reshape(n, 8 * k)


@mx.compile
def _nibble_pairs(w: mx.array) -> mx.array:
    """[m, 1, j] words -> [m, 2, j] 32-bit words: the four lanes' low-nibble bytes, then their high-nibble bytes.
    Compiled: one pass over the bytes instead of one per operation (integer operations: exact)."""
    return _nibble_bytes(w, mx.array([[[0], [4]]], mx.uint64))  # the low nibbles' bytes, then the high ones'


def _nibble_bytes(w: mx.array, half: mx.array) -> mx.array:
    """The bytes made of the nibbles at `half` (0: low, 4: high) of each 16-bit lane's two bytes: 64-bit words -> 32-bit
    words."""
    v = ((w >> half) & _u64(0x000F000F000F000F)) | ((w >> (half + _u64(4))) & _u64(0x00F000F000F000F0))
    v = (v | (v >> _u64(8))) & _u64(0x0000FFFF0000FFFF)  # each lane's byte, squeezed together
    return (v | (v >> _u64(16))).astype(mx.uint32)


def _from_lanes(b: mx.array, at: int, lanes: int, kernel: Callable[..., tuple[mx.array, ...]]) -> mx.array:
    """`kernel` on `lanes` 16-bit lanes of every block from (even) byte `at`, each [n, 1] where it lies in the blocks
    (a slice of several would be copied first: blocks of 18, 20 or 22 bytes are not whole 64-bit words), its 32-bit
    words [n, 1] joined as bytes [n, 4 * words]."""
    hw = _halfwords(b)
    return mx.view(mx.concatenate(kernel(*(hw[:, i : i + 1] for i in range(at // 2, at // 2 + lanes))), axis=1),
                   mx.uint8)


@mx.compile
def _nibble_lane_bytes(*lanes: mx.array) -> tuple[mx.array, ...]:
    """Q4_0 / Q4_1: a block's eight 16-bit lanes of nibble bytes [n, 1] each -> four 32-bit words [n, 1], MLX's
    bytes as `_repack_nibbles` makes them: the low nibbles' bytes of the first and second 8, then the high ones'."""
    words = _lanes_word(lanes[0:4]), _lanes_word(lanes[4:8])
    return tuple(_nibble_bytes(w, _u64(half)) for half in (0, 4) for w in words)


def _u64(v: int) -> mx.array:
    return mx.array(v, mx.uint64)


@mx.compile
def _five_bits(*lanes: mx.array) -> tuple[mx.array, ...]:
    """Q5_0 / Q5_1, without unpacking the codes: a block's ten 16-bit lanes [n, 1] each (two of fifth bits, eight of
    nibble bytes) -> MLX's 5-bit stream as five 32-bit words [n, 1] each: four groups of 8 weights
    (`_five_bit_group`), 40 bits each, laid end to end. Compiled: one pass instead of one per operation (integer
    operations: exact)."""
    high = _lanes_word(lanes[0:2])
    low_bytes, high_bytes = _lanes_word(lanes[2:6]), _lanes_word(lanes[6:10])  # nibble bytes 0..7, 8..15
    # weights 0..7, 8..15 are the low nibbles of bytes 0..7, 8..15; weights 16..23, 24..31 their high nibbles
    g0, g1 = _five_bit_group(low_bytes, 0, high), _five_bit_group(high_bytes, 0, high >> _u64(8))
    g2, g3 = _five_bit_group(low_bytes, 4, high >> _u64(16)), _five_bit_group(high_bytes, 4, high >> _u64(24))
    words = (g0, (g0 >> _u64(32)) | (g1 << _u64(8)), (g1 >> _u64(24)) | (g2 << _u64(16)),
             (g2 >> _u64(16)) | (g3 << _u64(24)), g3 >> _u64(8))
    return tuple(w.astype(mx.uint32) for w in words)  # the low 32 bits of each


def _lanes_word(lanes: list[mx.array]) -> mx.array:
    """Little-endian 16-bit lanes -> one 64-bit word (up to four lanes)."""
    word = lanes[0].astype(mx.uint64)
    for i, lane in enumerate(lanes[1:], 1):
        word = word | (lane.astype(mx.uint64) << _u64(16 * i))
    return word


def _five_bit_group(nibbles: mx.array, shift: int, high: mx.array) -> mx.array:
    """8 weights as 40 bits: the nibbles at `shift` (0 or 4) of a word's 8 bytes, each given its fifth bit (the low
    byte of `high`, bit k for byte k: spread a bit to a byte by one multiplication; 7 copies 7 bits apart never
    overlap; bit 7 by a shift), squeezed from 8 bits apart to 5 in three halving steps."""
    x = (nibbles >> _u64(shift)) & _u64(0x0F0F0F0F0F0F0F0F)
    h = high & _u64(0xFF)
    spread = ((h & _u64(0x7F)) * _u64(0x2040810204081)) | ((h & _u64(0x80)) << _u64(49))
    x = x | ((spread & _u64(0x0101010101010101)) << _u64(4))
    x = (x & _u64(0x001F001F001F001F)) | ((x & _u64(0x1F001F001F001F00)) >> _u64(3))  # pairs: 10 bits in each 16
    x = (x & _u64(0x000003FF000003FF)) | ((x & _u64(0x03FF000003FF0000)) >> _u64(6))  # fours: 20 bits in each 32
    return (x & _u64(0xFFFFF)) | ((x >> _u64(12)) & _u64(0xFFFFF << 20))  # eights: 40 bits


def _pack_bytes(codes: mx.array, bits: int) -> mx.array:
    """Codes [rows, n] (each < 2**bits, n a multiple of 8) -> MLX's packed little-endian bit stream as bytes
    [rows, n * bits / 8] (code i in bits [i * bits, (i + 1) * bits)). Built a byte at a time: every 8 codes make
    `bits` bytes, byte j gathering the codes whose bits overlap bits [8j, 8j + 8) (never wider than a byte: 64-bit
    words cost more memory traffic than they save ops)."""
    rows, n = codes.shape
    c = codes.astype(mx.uint8)
    if bits == 8:
        return c
    c = c.reshape(rows, n // 8, 8)
    out = []
    for j in range(bits):
        byte = None
        for k in range(8):
            shift = bits * k - 8 * j  # where code k's bit 0 lands in byte j
            if -bits < shift < 8:
                part = c[..., k] << shift if shift >= 0 else c[..., k] >> -shift
                byte = part if byte is None else byte | part
        out.append(byte)
    return mx.stack(out, axis=-1).reshape(rows, n * bits // 8)


def pack_codes(codes: mx.array, bits: int) -> mx.array:
    """Codes [rows, n] (each < 2**bits) -> MLX's packed uint32 [rows, n * bits / 32]: one little-endian bit
    stream per row (code i in bits [i * bits, (i + 1) * bits))."""
    return mx.view(_pack_bytes(codes, bits), mx.uint32)


def unpack_codes(packed: mx.array, bits: int) -> mx.array:
    """The inverse of `pack_codes`: MLX's packed uint32 [..., n * bits / 32] -> codes [..., n] (uint8); code k of
    each 8 is gathered from the one or two bytes its bits fall in."""
    *lead, words = packed.shape
    stream = mx.view(packed, mx.uint8)
    if bits == 8:
        return stream
    b = stream.reshape(*lead, words * 4 // bits, bits)
    mask = (1 << bits) - 1
    codes = []
    for k in range(8):
        j, shift = divmod(bits * k, 8)
        code = b[..., j] >> shift
        if shift + bits > 8:
            code = code | (b[..., j + 1] << (8 - shift))
        codes.append(code & mask)
    return mx.stack(codes, axis=-1).reshape(*lead, words * 32 // bits)


# The shifts and masks fused (integer ops: exact): a prompt dequantizes every layer's weight, and unfused each code's
# intermediates went through MLX's buffer cache (SmolLM2 Q4_K_M: the first token's peak RSS 6 MB lower)
_unpack_codes_fused = mx.compile(unpack_codes)


def affine_dequantize(weight: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int,
                      dtype: mx.Dtype = mx.float32) -> mx.array:
    """`mx.dequantize` for the affine mode in plain MLX ops (scale * code + bias, as MLX computes it); MLX's own CPU
    dequantization and quantized matmul are an order of magnitude slower than this plus a BLAS matmul."""
    codes = _unpack_codes_fused(weight, bits)
    *lead, n = codes.shape
    q = codes.reshape(*lead, n // group_size, group_size).astype(mx.float32)
    w = scales.astype(mx.float32)[..., None] * q + biases.astype(mx.float32)[..., None]
    return w.reshape(*lead, n).astype(dtype)


def to_affine(blocks: mx.array, kind: str, rows_per_step: int | None = None, *,
              defer: bool = False) -> tuple[mx.array, mx.array | Narrowing, mx.array | Narrowing]:
    """blocks [..., row_bytes] of an `AFFINE_BITS` type -> (weight, scales, biases) as `mx.quantize` would store
    them (group size 32, `AFFINE_BITS[kind]` bits; scales and biases float16 where exact, else float32), with
    `mx.dequantize` of the result (scales and biases as float32) bit-exact with `dequantize`.
    Works `rows_per_step` rows at a time, by default all of them (steps are joined by a copy). Evaluated; with
    `defer`, nothing is evaluated and scales and biases come as `Narrowing`s, for the caller to evaluate with other
    work and resolve."""
    if kind not in AFFINE_BITS:
        raise FormatError(f"GGML type {kind} is not exactly representable as MLX affine")
    elems, size = BLOCK_SIZES[kind]
    *lead, nbytes = blocks.shape
    flat = blocks.reshape(-1, nbytes)
    rows_per_step = rows_per_step or max(1, flat.shape[0])
    parts = []
    for start in range(0, flat.shape[0], rows_per_step):
        chunk = flat[start : start + rows_per_step]
        rows = chunk.shape[0]
        packed, scales, biases = _affine_blocks(chunk.reshape(-1, size), kind)
        part = (mx.view(packed.reshape(rows, -1), mx.uint32), scales.reshape(rows, -1), biases.reshape(rows, -1))
        if rows < flat.shape[0]:
            mx.eval(part)  # each step done before the next is built: what working in steps is for
        parts.append(part)
    weight, scales, biases = (mx.concatenate(p) if len(parts) > 1 else p[0] for p in zip(*parts, strict=True))
    weight, scales, biases = weight.reshape(*lead, -1), Narrowing(scales.reshape(*lead, -1)), Narrowing(
        biases.reshape(*lead, -1), from_scales=_biases_from_scales(scales, kind) if kind in BIAS_PER_SCALE else None)
    if defer:
        return weight, scales, biases
    mx.eval(weight, *scales.arrays, *biases.arrays)  # one wait for MLX instead of one per check
    return weight, scales.resolve(), biases.resolve()


def _biases_from_scales(scales: mx.array, kind: str) -> mx.array:
    """Whether biases made from float16 `scales` (`BIAS_PER_SCALE`) are each, in float16, their scale times the factor
    exactly (unevaluated), from the scales alone: every scale below 2^16 / |factor| in magnitude (the product then
    is at most float16's largest, and a power of two times a float16 is exact) or infinite (so is its product), none
    NaN. Exactly when the float32 biases would survive the float16 round trip and equal the scales times the factor
    (`layers.derived_biases_check`)."""
    magnitude = mx.view(scales, mx.uint16) & mx.array(0x7FFF, mx.uint16)
    limit = (32 - (-BIAS_PER_SCALE[kind]).bit_length()) << 10  # float16 2^16 / |factor|: exponent field 31 - log2
    return mx.all((magnitude < limit) | (magnitude == 0x7C00))


class Narrowing:
    """A float array kept as float16 when every value survives the round trip (a float16 overflow or rounding keeps
    it float32). The array and the check are built unevaluated (`arrays`: evaluated with whatever else is queued);
    the choice is made after (`resolve`, its float16 form made then, unevaluated), so that deciding never makes
    MLX's caller wait on its own, and no form is made that is not kept.
    `from_scales` (biases of a `BIAS_PER_SCALE` type: `_biases_from_scales`) is a check from the scales alone that
    every value survives and is its scale times the factor: when given, only it is queued, and the array and the
    round trip are evaluated only if it fails (a loader that drops such biases never makes them)."""

    def __init__(self, wide: mx.array, *, of: Narrowing | None = None,
                 then: Callable[[mx.array], mx.array] | None = None, from_scales: mx.array | None = None):
        self.wide = wide
        if of is None:
            self.fits = wide.dtype == mx.float16 or mx.array_equal(wide.astype(mx.float16).astype(mx.float32), wide)
            self.from_scales = from_scales
        else:  # a part or a reshaping of `of` (`map`, `split`): chooses as it does, and is made from its choice
            self.fits, self.from_scales = of.fits, of.from_scales
        self._of, self._then, self._chosen = of, then, None

    @property
    def arrays(self) -> list[mx.array]:
        if self.from_scales is not None:
            return [self.from_scales]
        return [self.wide] + ([self.fits] if isinstance(self.fits, mx.array) else [])

    def map(self, f: Callable[[mx.array], mx.array]) -> Narrowing:
        """`f` (a reordering or reshaping: values and dtype kept) on the array and on its choice."""
        return Narrowing(f(self.wide), of=self, then=f)

    def split(self, f: Callable[[mx.array], list[mx.array]]) -> list[Narrowing]:
        """`f` (cutting an array into parts) on the array, and once on its choice: each part chooses as the whole."""
        cut = functools.cache(lambda: f(self.resolve()))
        return [Narrowing(part, of=self, then=lambda _, i=i: cut()[i]) for i, part in enumerate(f(self.wide))]

    def resolve(self) -> mx.array:
        """The chosen form (waits for the check if it has not been evaluated); the same array on every call."""
        if self._chosen is None:
            if self._of is not None:
                self._chosen = self._then(self._of.resolve())
            else:
                narrow = self.wide.dtype != mx.float16 and (
                    (self.from_scales is not None and bool(self.from_scales)) or bool(self.fits))
                self._chosen = self.wide.astype(mx.float16) if narrow else self.wide
        return self._chosen


# ------------------------------------------------------------------------------------------------ interface
def supports(kind: str) -> bool:
    """Whether `kind` (a GGML type name) has a reference path here."""
    return kind in _DEQUANTIZE


def row_bytes(kind: str, n: int) -> int:
    """Bytes of one row of `n` weights."""
    elems, size = BLOCK_SIZES[kind]
    if n % elems:
        raise FormatError(f"{kind}: a row of {n} weights is not a whole number of {elems}-weight blocks")
    return n // elems * size


def dequantize(blocks: mx.array, kind: str, dtype: mx.Dtype = mx.float32, *, backend: str | None = None) -> mx.array:
    """uint8 blocks [..., n_blocks * block_bytes] -> weights [..., n_blocks * block_elems] in `dtype`.

    The reference path is bit-exact with `gguf.quants.dequantize` in float32."""
    if (kernel := _kernel("dequantize", backend)) and (out := kernel(blocks, kind, dtype)) is not NotImplemented:
        return out
    if kind not in _DEQUANTIZE:
        raise FormatError(f"GGML type {kind} has no MLX dequantization (have: {', '.join(_DEQUANTIZE)})")
    elems, size = BLOCK_SIZES[kind]
    *lead, nbytes = blocks.shape
    if nbytes % size:
        raise FormatError(f"{kind}: {nbytes} bytes per row is not a whole number of {size}-byte blocks")
    out = _DEQUANTIZE[kind](blocks.reshape(-1, size)).reshape(*lead, nbytes // size * elems)
    return out if dtype == mx.float32 else out.astype(dtype)


# From this many rows on (a prompt), off Metal, products on quantized weights dequantize the weight and run BLAS
# matmuls: MLX's CPU quantized matmul costs about a row's worth of that per row, so it wins only for a few rows
# (decode). The float weight is made this many bytes at a time (`sliced_matmul`): 2^15 * 27, which rows of widths
# made of 64, 3 and powers of two divide (SmolLM2's 576 and 1536 float32 weights: slices of 384 and 144 rows; its
# layers' 192, 576 and 1536 rows are whole slices and at most one half slice), so the slices, the last ones too,
# come in two sizes: MLX's CPU cache reuses a freed buffer only for a size within two pages of its own, and it
# keeps a set of buffers per size (SmolLM2 at Q2_K: the first prompt's peak RSS ~4 MB lower, decode's ~1.8 MB)
DEQUANTIZE_FROM_ROWS = 8
SLICE_BYTES = 864 << 10


def sliced_matmul(x: mx.array, rows: int, weight_rows: Callable[[int, int], mx.array]) -> mx.array:
    """x [..., in] @ W^T for W [rows, in] made by `weight_rows(start, stop)` (its float rows), a slice of rows at a
    time, each slice's product evaluated before the next slice is made: a prompt holds one slice of float weight
    (`SLICE_BYTES`), not a layer's. Without the evaluation the slices would pile up: MLX allocates the outputs of
    the operations it schedules ahead of the one computing, so a lazy prompt through SmolLM2 held several layers'
    float weights at once. Each output is the same dot product of the same float weights; BLAS may still round it
    differently in a slice of another width, as it does with another thread count. Not for traced functions
    (`mx.compile`, gradients), which cannot evaluate."""
    one_row = x.size == x.shape[-1]

    def product(start: int, stop: int) -> mx.array:
        w = weight_rows(start, stop)
        # one row: W @ x streams the weight once (see layers.Linear)
        return (w @ x.reshape(-1, 1)).reshape(*x.shape[:-1], -1) if one_row else x @ w.T

    return by_row_slices(rows, slice_rows(4 * x.shape[-1]), product)


def slice_rows(row_bytes: int) -> int:
    """Rows in one slice of `SLICE_BYTES` made per row slice (64 at least: a panel of BLAS's kernels)."""
    return max(64, SLICE_BYTES // row_bytes)


def by_row_slices(rows: int, step: int, product: Callable[[int, int], mx.array]) -> mx.array:
    """The outputs [..., rows] of `product(start, stop)` (those of weight rows start:stop) a slice of `step` rows at a
    time, each evaluated before the next is made (`sliced_matmul`), joined along the last axis."""
    parts = []
    for start in range(0, rows, step):
        parts.append(product(start, min(start + step, rows)))
        mx.eval(parts[-1])
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


def matmul(x: mx.array, blocks: mx.array, kind: str, *, backend: str | None = None) -> mx.array:
    """x [..., in] @ W^T -> [..., out] in x's dtype, W [out, in] stored as `blocks` [out, row_bytes(kind, in)]: a
    GEMV for one row (decode), a GEMM for many (prefill). The reference dequantizes W, then multiplies: for a
    prompt off Metal a slice of rows at a time (`sliced_matmul`)."""
    if (kernel := _kernel("matmul", backend)) and (out := kernel(x, blocks, kind)) is not NotImplemented:
        return out
    if _ON_METAL or 1 < x.size // x.shape[-1] < DEQUANTIZE_FROM_ROWS:
        return x @ dequantize(blocks, kind, x.dtype, backend="reference").T
    return sliced_matmul(x, blocks.shape[0],
                         lambda start, stop: dequantize(blocks[start:stop], kind, x.dtype, backend="reference"))


def gather_matmul(x: mx.array, blocks: mx.array, kind: str, indices: mx.array, sorted_indices: bool = False, *,
                  backend: str | None = None) -> mx.array:
    """MoE experts, as `mx.gather_mm(x, W^T, rhs_indices=indices)`: x [..., rows, in] through the weight of expert
    `indices[...]`, the experts stacked as `blocks` [experts, out, row_bytes(kind, in)] -> [..., rows, out].
    The reference dequantizes only the experts used: the selected ones for a few tokens, all of them once for
    many (prefill)."""
    if (kernel := _kernel("gather_matmul", backend)) and (
            out := kernel(x, blocks, kind, indices, sorted_indices)) is not NotImplemented:
        return out
    if indices.size < blocks.shape[0]:  # decode: a few (token, expert) pairs
        w = dequantize(blocks[indices.reshape(-1)], kind, x.dtype, backend="reference")  # [pairs, out, in]
        return x @ w.reshape(*indices.shape, *w.shape[1:]).swapaxes(-1, -2)
    w = dequantize(blocks, kind, x.dtype, backend="reference")
    return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)


def take_rows(blocks: mx.array, kind: str, ids: mx.array, dtype: mx.Dtype = mx.float32) -> mx.array:
    """Rows `ids` of the weight (an embedding lookup): only those rows are dequantized."""
    return dequantize(blocks[ids], kind, dtype)


# ------------------------------------------------------------------------------------------------ kernels
_BACKENDS: dict[str, dict[str, Callable]] = {}


def register_backend(name: str, **ops: Callable) -> None:
    """Kernels for some of `dequantize`, `matmul`, `gather_matmul` (same signatures, minus `backend`); an op may
    return NotImplemented for a type it does not handle, and the reference runs instead. "auto" (the default)
    picks "metal" on Metal when it is registered."""
    unknown = set(ops) - {"dequantize", "matmul", "gather_matmul"}
    if unknown:
        raise ValueError(f"kquants backend {name}: unknown ops {sorted(unknown)}")
    _BACKENDS[name] = ops


def _kernel(op: str, backend: str | None) -> Callable | None:
    backend = backend or "auto"
    if backend == "auto":
        backend = "metal" if _ON_METAL and "metal" in _BACKENDS else "reference"
    if backend == "reference":
        return None
    if backend not in _BACKENDS:
        raise ValueError(f"kquants: backend '{backend}' is not registered (have: {', '.join(sorted(_BACKENDS))})")
    return _BACKENDS[backend].get(op)


_ON_METAL = mx.metal.is_available()
if _ON_METAL:
    from mlxq.kernels import kquants_metal

    kquants_metal.register()
