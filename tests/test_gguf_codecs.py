"""GGUF block encoders: every byte equal to ggml's own quantizer (without and with an importance matrix) and to
gguf-py's where it quantizes, on random rows with the edge cases that break naive encoders; the fitted grids are
what gguf-py's dequantizer reads back."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from ggml_ref import ggml_quantize

from mlxq.formats.gguf.codecs import CODECS, QK_K, _elements, _iq4_index, _refine, _row_sigma2, _seq, encode

F32_MAX = np.finfo(np.float32).max


pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # C's arithmetic on the edge rows: inf, NaN


def rows(seed: int, cols: int = 2 * QK_K) -> np.ndarray:
    """Random rows (per-row scales over four decades) with one edge case per row at the top."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((48, cols)).astype(np.float32) * np.exp(2 * rng.standard_normal((48, 1))).astype(np.float32)
    w[0] = 0  # all-zero blocks
    w[1, :QK_K] = 0  # one zero super-block next to a normal one
    w[2, 5] = 1e4  # one huge outlier
    w[3, 77] = -3e4
    w[4] *= 1e-40  # denormals
    w[5, :40], w[5, 40:80] = 65504, -65504  # float16's max
    w[6, 7], w[6, 300] = F32_MAX, -F32_MAX  # float32's max
    w[7] = np.abs(w[7])  # one-signed rows (the mins clamp at zero)
    w[8] = -np.abs(w[8])
    w[9, ::2] = 0
    w[10] = 1.0  # constant blocks
    w[11, :300] = 1e-8
    w[12, 3] = np.float32(1e-45)  # the smallest denormal alone
    w[13, :QK_K] = -0.0  # negative zeros: C's loops start from +0 and never take them
    return w


@pytest.mark.parametrize("kind", sorted(CODECS))
@pytest.mark.parametrize("seed", [0, 1])
def test_bit_exact_with_ggml(kind, seed):
    w = rows(seed)
    np.testing.assert_array_equal(encode(w, kind), ggml_quantize(w, kind))


@pytest.mark.parametrize("kind", sorted(CODECS))
def test_bit_exact_with_ggml_importance_weighted(kind):
    w = rows(2)
    imatrix = (np.random.default_rng(3).random(w.shape[1]) ** 3).astype(np.float32)
    imatrix[17] = 0  # a channel that never saw input
    np.testing.assert_array_equal(encode(w, kind, imatrix), ggml_quantize(w, kind, imatrix))


@pytest.mark.parametrize("kind", [k for k in sorted(CODECS) if k in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                                                                      "TQ1_0", "TQ2_0")] + ["BF16", "F16"])
def test_bit_exact_with_gguf_py(kind):
    w = rows(4)
    w[13] = 0  # gguf-py stores a negative-zero block's scale as -0 where ggml (the reference) stores +0
    qtype = gguf.GGMLQuantizationType[kind]
    want = gguf.quants.quantize(w, qtype)
    np.testing.assert_array_equal(np.asarray(encode(w, kind)).view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("kind", sorted(CODECS))
def test_grid_is_what_gguf_py_decodes(kind):
    """scale * q + bias of the fitted grid, for the codes packed, equals gguf-py's dequantization."""
    codec = CODECS[kind]
    w = rows(5)[13:]
    x = w.reshape(-1, codec.block)
    fit = codec.fit(x, None, None)
    got = gguf.quants.dequantize(codec.pack(fit, fit.codes), gguf.GGMLQuantizationType[kind]).reshape(x.shape)
    per = codec.block // codec.sub
    scale = np.repeat(fit.scale.reshape(-1, per), codec.sub, axis=1)
    bias = np.repeat(fit.bias.reshape(-1, per), codec.sub, axis=1)
    values = fit.codes if codec.levels is None else codec.levels[fit.codes]
    np.testing.assert_allclose(scale * values + bias, got, rtol=1e-6, atol=1e-30)
    assert fit.codes.min() >= 0 and fit.codes.max() <= codec.nmax


def best_index_int8(levels: np.ndarray, x: np.float32) -> int:
    """ggml's best_index_int8, line by line (float32 arithmetic)."""
    if x <= levels[0]:
        return 0
    if x >= levels[-1]:
        return len(levels) - 1
    ml, mu = 0, len(levels) - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < levels[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if np.float32(x - levels[mu - 1]) < np.float32(levels[mu] - x) else mu


def test_iq4_nearest_level_is_ggmls():
    """The half-unit table behind IQ4_NL's code choice picks what best_index_int8 picks, at and around every
    midpoint and level (ties go up), far out, and for NaN (the last code)."""
    levels = CODECS["IQ4_NL"].levels
    steps = np.arange(-40, 41)
    probes = [np.float32(p) + steps * np.spacing(np.float32(p)) for p in
              [*(levels[:-1] + levels[1:]) / 2, *levels, 0.0, 1e-40, -1e-40]]
    x = np.concatenate([*probes, [np.nan, np.inf, -np.inf, 3e38, -3e38, 130.0, -131.0]]).astype(np.float32)
    want = [best_index_int8(levels, v) for v in x]
    assert _iq4_index(2 * x).tolist() == want


def test_sums_run_in_order():
    """The encoders rely on numpy summing a leading axis in order, as a C loop does (pairwise summation would
    differ in the last bits and break exactness)."""
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((32, 4096)) * np.exp(3 * rng.standard_normal((32, 4096)))).astype(np.float32)
    acc = a[0].copy()
    for r in a[1:]:
        acc = acc + r
    np.testing.assert_array_equal(_seq(a), acc)
    assert _elements(np.arange(64.0).reshape(2, 32), 16).shape == (16, 4)


def test_rows_not_a_multiple_of_the_block_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        encode(np.zeros((2, 576), np.float32), "Q4_K")


def awkward_rows(seed: int) -> np.ndarray:
    """`rows` with what the fast paths hand to slower ones: NaN and infinities (C's comparisons never take a NaN;
    ggml's nearest_int of one is 0), +a and -a in one block (the first wins the abs-max), exact halves (roundf rounds
    them away from zero where numpy's rint goes to even), weights halfway between two IQ4_NL levels (the upper wins)."""
    w = rows(seed)
    w[14, 9], w[15, 200], w[16, 30] = np.nan, np.inf, -np.inf
    w[17, :32] = np.nan  # an all-NaN block
    w[18, 3], w[18, 20] = 0.75, -0.75  # ties of |x| in both orders, also as a K-quant sub-block's extremes
    w[19, 40], w[19, 50] = -0.75, 0.75
    w[20, :32] = np.arange(32) - np.float32(15.5)  # Q8_0: d = 1 exactly, every code a half
    w[20, 0] = 127
    w[21, 256:288] = np.arange(-16, 16) / np.float32(2)
    w[22] = np.abs(w[22])  # +0 and -0 as a block's least value, in both orders (C keeps the first it meets)
    w[22, 3], w[22, 9], w[22, 33], w[22, 40] = -0.0, 0.0, 0.0, -0.0
    w[22, 64:96] = -w[22, 64:96]  # and as its largest
    w[22, 70], w[22, 71] = -0.0, 0.0
    w[22, 96:128], w[22, 96] = 0.0, -0.0  # all zeros, the first one negative
    w[22, 128:160], w[22, 129] = 0.0, -0.0
    # IQ4_NL: 127 first makes a trial inverse scale exactly 1, so the others sit on midpoints between its levels
    levels = np.asarray(CODECS["IQ4_NL"].levels)
    w[23, :32] = np.resize(np.concatenate([[127], (levels[:-1] + levels[1:]) / 2]), 32)
    w[23, 32:64] = np.resize(levels, 32)  # exactly on the levels: the fitted scale is 1
    w[24, 64], w[24, 70] = F32_MAX, -F32_MAX  # one block spanning float32's range: max - min overflows
    w[24, 96:128] *= np.float32(1e-39)  # a denormal block with an exact zero: its inverse scale overflows, 0 * inf
    w[24, 100] = 0
    return w


@pytest.mark.parametrize("kind", sorted(CODECS))
def test_bit_exact_with_ggml_on_awkward_rows(kind):
    w = awkward_rows(6)
    np.testing.assert_array_equal(encode(w, kind), ggml_quantize(w, kind))
    imatrix = (np.random.default_rng(7).random(w.shape[1]) ** 3).astype(np.float32)
    np.testing.assert_array_equal(encode(w, kind, imatrix), ggml_quantize(w, kind, imatrix))
    codec = CODECS[kind]
    if codec.weighted:  # the codes a calibrated export starts from are C's too (for Q8_0 and TQ a NaN's is undefined)
        qw = np.broadcast_to(imatrix, w.shape).reshape(-1, codec.block)
        sigma2 = np.repeat(_row_sigma2(w, codec.row_stat), w.shape[1] // codec.block) if codec.row_stat else None
        codes = codec.fit(w.reshape(-1, codec.block), qw, sigma2).codes
        assert codes.min() >= 0 and codes.max() <= codec.nmax


@pytest.mark.parametrize("kind", ["Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q4_0", "Q8_0", "IQ4_NL"])
def test_bit_exact_with_ggml_on_many_rows(kind):
    """Enough blocks (several encoding steps) that the refinement passes drop the blocks that stopped
    moving at different passes, and ties turn up in the data itself."""
    rng = np.random.default_rng(8)
    w = (rng.standard_normal((640, 1024)) * np.float32(0.02)).astype(np.float32)
    w[::7] = np.round(w[::7] * 256) / np.float32(256)  # a coarse grid: many equal magnitudes and exact halves
    np.testing.assert_array_equal(encode(w, kind), ggml_quantize(w, kind))
    imatrix = (rng.random(w.shape[1]) ** 3).astype(np.float32)
    np.testing.assert_array_equal(encode(w, kind, imatrix), ggml_quantize(w, kind, imatrix))


def _nearest_int(v: np.float32) -> int:
    """ggml's nearest_int, bit for bit (garbage past 2**22, as in C)."""
    return int((np.array([v], np.float32) + np.float32(12582912.0)).view(np.int32)[0] & 0x7FFFFF) - 0x400000


def refine_reference(x, w, codes, sumlx, suml2, lo, hi, qp):
    """The refinement loop of ggml's make_q3_quants (qp False) / make_qp_quants (qp True) for one block, line by
    line in float32; returns (codes, sumlx, suml2, passes run, whether the fifth and last still moved a code)."""
    f = np.float32
    codes, passes = [int(c) for c in codes], 0
    while passes < 5:
        passes, changed = passes + 1, 0
        for i in range(len(x)):
            slx = f(sumlx - f(w[i] * x[i]) * f(codes[i]))
            sl2 = f(suml2 - f(w[i] * f(codes[i])) * f(codes[i]))
            if slx > 0 and (sl2 > 0 or not qp):
                new = min(hi, _nearest_int(f(f(x[i] * sl2) / slx)))
                new = new if lo is None else max(lo, new)
                if new != codes[i]:
                    slx = f(slx + f(w[i] * x[i]) * f(new))
                    sl2 = f(sl2 + f(w[i] * f(new)) * f(new))
                    if (qp or sl2 > 0) and f(slx * slx) * suml2 > f(sumlx * sumlx) * sl2:
                        codes[i], sumlx, suml2, changed = new % 256 if qp else new, slx, sl2, changed + 1
        if not changed:
            break
    return codes, sumlx, suml2, passes, changed > 0


@pytest.mark.parametrize("qp", [False, True])
def test_refinement_moves_codes_in_cs_order(qp):
    """The refinement behind Q3_K (make_q3) and the importance-weighted K-quant scales (make_qp): a first pass across
    all blocks, then rounds that make each block's next move in C's order, through pass boundaries and the fifth
    pass's end. Against C's loop line by line, on blocks that keep moving: heavy tails, the largest weight negative
    for make_q3 (only then are its trials ever taken), some negative values for make_qp (its uint8_t codes wrap, and
    many blocks still move when the fifth pass ends)."""
    rng = np.random.default_rng(9)
    n, blocks = 16, 3000
    x = (rng.standard_t(2, (blocks, n)) * np.exp(rng.standard_normal((blocks, 1)))).astype(np.float32)
    rows = np.arange(blocks)
    if qp:  # codes 0..hi from about hi / max
        x, w, lo, hi = np.abs(x), rng.random((blocks, n)).astype(np.float32) ** 2, None, 15
        x[rng.random(x.shape) < 0.1] *= -1
        start = np.minimum(hi, np.rint(x * (np.float32(hi) / x.max(axis=1, keepdims=True)) * np.float32(1.3)))
    else:  # codes -4..3 from -nmax / max, weights x*x
        big = np.abs(x).argmax(axis=1)
        x[rows, big] = -np.abs(x[rows, big])
        w, lo, hi = x * x, -4, 3
        start = np.clip(np.rint(x * (np.float32(-4) / x[rows, big])[:, None]), lo, hi)
    start = start.astype(np.float32)  # the sums take these, the codes as stored (uint8_t for make_qp)
    sumlx = _seq(np.ascontiguousarray((w * x * start).T))
    suml2 = _seq(np.ascontiguousarray((w * start * start).T))
    codes = np.mod(start, np.float32(256)) if qp else start
    want = [refine_reference(x[b], w[b], codes[b], sumlx[b], suml2[b], lo, hi, qp) for b in range(blocks)]
    passes, capped = np.array([p for *_, p, _ in want]), np.array([c for *_, c in want])
    assert (passes >= 3).sum() > 20 and (passes == 5).any()  # the data reaches late passes and the cap
    assert capped.sum() > (20 if qp else -1)
    codes = np.ascontiguousarray(codes.T)
    got_lx, got_l2 = _refine(np.ascontiguousarray(x.T), np.ascontiguousarray(w.T), codes, lo, hi, qp, (sumlx, suml2))
    np.testing.assert_array_equal(codes.T, np.array([c for c, *_ in want], np.float32))
    np.testing.assert_array_equal(got_lx, np.array([s for _, s, *_ in want], np.float32))
    np.testing.assert_array_equal(got_l2, np.array([s for _, _, s, *_ in want], np.float32))
