"""GGUF block encoders: float rows -> the bytes llama.cpp reads, for F32, F16, BF16, the legacy 32-weight types
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), the K-quants (Q2_K..Q6_K), the ternary types (TQ1_0, TQ2_0) and the non-linear
IQ4_NL.

Bit-exact with ggml's own quantizer (ggml-quants.c), both without an importance matrix (its `*_ref` functions, what
`llama-quantize` runs without `--imatrix`) and with one (its `*_impl` functions). That takes the C code's float32
arithmetic taken literally: every sum accumulates sequentially (numpy reduces over a leading axis in order, so the
per-block working arrays are element-major, [weights in a sub-block, sub-blocks]), products associate left to right,
`nearest_int` is ggml's magic-number rounding, comparisons keep the first maximum, and a scale whose float16 is zero
keeps the codes found before it. The tests compare every byte against ggml's shared library.

Each type is split into `fit` (choose the block's scales and the reference codes) and `pack` (lay codes and scales
out as bytes), with the grid `scale * q + bias` that the scales stand for: calibrated export keeps the fitted
scales and chooses the codes itself (GPTQ error feedback), the format stays llama.cpp's. IQ4_NL's grid is
`scale * LEVELS[q]` (a codec's `levels`), not affine in q.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf.quants import IQ4_NL

QK = 32  # weights per legacy block
QK_K = 256  # weights per K-quant / ternary super-block
GROUP_MAX_EPS = np.float32(1e-15)
F = np.float32
_MAGIC = F(12582912.0)  # 1.5 * 2**23: adding it rounds a float32 to an integer in its low mantissa bits


# ------------------------------------------------------------------------------------------ float32 helpers
def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even through the float32 mantissa (garbage, as in C, past 2**22)."""
    out = (np.asarray(v, F) + _MAGIC).view(np.int32)  # one new array, the rest in place
    out &= 0x7FFFFF
    out -= 0x400000
    return out


_EXACT = F(1 << 22)  # below this magnitude, nearest_int is numpy's rint (round half to even)


def _nearest(v: np.ndarray) -> np.ndarray:
    """nearest_int(v) as float32 whole numbers, in place: numpy's rint (one pass) where every |v| < 2**22 (it
    rounds as the magic number does there), else ggml's trick itself (garbage past 2**22 and for NaN, as in C)."""
    if v.size and -_EXACT < v.min() and v.max() < _EXACT:  # NaN fails both tests
        return np.rint(v, out=v)
    return _nearest_int(v).astype(F)


# numpy's clip ufunc itself: np.clip's wrapper costs several times the clipping of a block-sized array
_CLIP = getattr(getattr(np, "_core", None) and np._core.umath, "clip", None)


def _clip(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """MAX(lo, MIN(hi, v)) in place (one pass)."""
    if _CLIP is None:
        return np.clip(v, lo, hi, out=v)
    return _CLIP(v, v.dtype.type(lo), v.dtype.type(hi), out=v)


def _fp16(v: np.ndarray) -> np.ndarray:
    """float32 -> the float16 ggml stores (round to nearest even), returned as float32."""
    return np.asarray(v, F).astype(np.float16).astype(F)


def _half_bytes(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, F).astype(np.float16).view(np.uint8).reshape(*np.shape(v), 2)


def _u8(v: np.ndarray) -> np.ndarray:
    """C's conversion of an int to uint8_t (modulo 256)."""
    return (np.asarray(v) & 0xFF).astype(np.uint8)


def _i8(v: np.ndarray) -> np.ndarray:
    """C's conversion of an int to int8_t (two's complement wrap)."""
    return ((np.asarray(v).astype(np.int32) + 128) & 0xFF) - 128


def _seq(x: np.ndarray) -> np.ndarray:
    """Sum over the leading axis in order: ((x0 + x1) + x2) + ..., as a C loop accumulates."""
    return np.add.reduce(x, axis=0)


def _min_max(x: np.ndarray, start: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """C's `min = x[0]; if (x[i] < min) min = x[i]` (and max) over the leading axis; with `start`, the loop
    starts from min = start, max = -start instead. numpy's reductions where they agree with the loop; the loop itself
    in the blocks holding a NaN (C's comparisons skip it, or keep it when it comes first) or whose least or largest
    value is a zero (C keeps the first of +0 and -0)."""
    lo, hi = np.minimum.reduce(x, axis=0), np.maximum.reduce(x, axis=0)  # NaN wherever a block holds one
    if start is not None:
        lo, hi = np.minimum(lo, F(start)), np.maximum(hi, F(-start))
    slow = np.flatnonzero(np.isnan(lo) | (lo == 0) | (hi == 0))
    if slow.size:
        lo[slow], hi[slow] = _min_max_loop(x[:, slow], start)
    return lo, hi


def _min_max_loop(x: np.ndarray, start: float | None) -> tuple[np.ndarray, np.ndarray]:
    if start is None:
        lo, hi, rest = x[0].copy(), x[0].copy(), x[1:]
    else:
        lo, hi, rest = np.full(x.shape[1:], F(start)), np.full(x.shape[1:], F(-start)), x
    for row in rest:
        lo = np.where(row < lo, row, lo)
        hi = np.where(row > hi, row, hi)
    return lo, hi


def _lanes(x: np.ndarray) -> np.ndarray:
    """Blocks x [B, n] (n a multiple of 4) -> [n/4, 4B]: row r holds weights 4r..4r+3 of every block side by side,
    so a reduction over the leading axis (numpy's fastest direction) and then over each block's 4 lanes
    (`_block_reduce`) covers the block. Moved in 16-byte units, a third of the cost of a full transpose."""
    return np.ascontiguousarray(np.ascontiguousarray(x, F).view(np.complex128).T).view(F)


def _block_reduce(op: np.ufunc, lanes: np.ndarray) -> np.ndarray:
    """op over each block of `_lanes`'s layout -> [B] (for order-free ops: max, min, fmax, fmin)."""
    m = op.reduce(lanes, axis=0).reshape(-1, 4)
    return op(op(m[:, 0], m[:, 1]), op(m[:, 2], m[:, 3]))


def _by_lanes(x: np.ndarray, fast, general) -> tuple:
    """A fit without importance worked in `_lanes`'s layout (each block's scale broadcast along contiguous rows, one
    cast per code): `fast(x, lanes, hi, lo, bad)` -> (arrays per block..., bad) for all blocks, given each block's
    largest and least weight and `bad`, the blocks holding a NaN or an infinity (numpy's max and min carry them into
    the result). The blocks still flagged bad come out of `general(x[bad])`, C's arithmetic taken literally."""
    t = _lanes(x)
    hi, lo = _block_reduce(np.maximum, t), _block_reduce(np.minimum, t)
    with np.errstate(all="ignore"):  # the bad blocks' arithmetic is thrown away, the general path's is C's
        *out, bad = fast(x, t, hi, lo, ~(np.isfinite(hi) & np.isfinite(lo)))
        if bad.any():
            redo = np.flatnonzero(bad)
            for o, r in zip(out, general(x[redo]), strict=True):
                o[redo] = r
    return tuple(out)


def _spread(v: np.ndarray) -> np.ndarray:
    """One value per block [B] -> `_lanes`'s row layout [4B] (each block's value under its 4 lanes)."""
    return np.repeat(v, 4)


def _unlanes(codes: np.ndarray) -> np.ndarray:
    """Byte codes in `_lanes`'s layout [n/4, 4B] -> blocks [B, n] (moved 4 bytes at a time)."""
    n4 = codes.shape[0]
    return np.ascontiguousarray(codes.view(np.uint32).T).view(np.uint8).reshape(-1, 4 * n4)


def _min_max_rows(x: np.ndarray, start: float) -> tuple[np.ndarray, np.ndarray]:
    """`_min_max(x.T, start)` for blocks x [B, n]: fmin/fmax skip NaN as C's comparisons do, so the order matters only
    for which zero a block keeps (C keeps the first of +0 and -0): the blocks whose least or largest value is a zero
    take the C loop."""
    t = _lanes(x)
    lo, hi = np.fmin(_block_reduce(np.fmin, t), F(start)), np.fmax(_block_reduce(np.fmax, t), F(-start))
    zero = np.flatnonzero((lo == 0) | (hi == 0))
    if zero.size:
        lo[zero], hi[zero] = _min_max_loop(np.ascontiguousarray(x[zero].T), start)
    return lo, hi


def _largest(x: np.ndarray, start: float = 0.0) -> np.ndarray:
    """C's `if (x[i] > m) m = x[i]` from m = start over the leading axis (NaN never wins, as in C)."""
    m = np.full(x.shape[1:], F(start))
    for row in x:
        m = np.where(row > m, row, m)
    return m


def _running_abs_max(x: np.ndarray) -> np.ndarray:
    """C's `amax = MAX(amax, fabsf(x[i]))` from 0 along each block of x [B, n]: numpy's max (through `_lanes`), and
    the C loop's order only in the blocks that hold a NaN (MAX takes a NaN, and drops it again at the next weight)."""
    t = _lanes(x)
    amax = _block_reduce(np.maximum, np.abs(t, out=t))
    nan = np.flatnonzero(np.isnan(amax))
    if nan.size:
        m = np.zeros(nan.size, F)
        for row in np.abs(x[nan]).T:
            m = np.where(m > row, m, row)
        amax[nan] = m
    return amax


def _roundf(v: np.ndarray) -> np.ndarray:
    """C's roundf as float32 whole numbers: half away from zero. numpy's rint rounds halves to even: the exact halves
    (v - rint(v) is exact in float32) move away from zero (floor(|v| + 0.5) would round 0.49999997 up)."""
    r = np.rint(v)
    half = np.subtract(v, r)
    np.abs(half, out=half)
    tie = np.flatnonzero(half == F(0.5))
    if tie.size:
        flat = v.reshape(-1)
        r.reshape(-1)[tie] = np.trunc(flat[tie]) + np.sign(flat[tie])
    return r


def _abs_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(largest |x|, the signed value holding it) over the leading axis, the first one on ties, starting from 0 (C's
    strict `>`, so NaN never wins and an all-zero block's value is +0 as in C, not a -0 it holds). From the largest
    and least values (fmax/fmin skip NaN as C's comparisons do): only where +a and -a are both there does the order
    matter, and only those blocks are searched."""
    return _signed_max(np.fmax.reduce(x, axis=0), np.fmin.reduce(x, axis=0), lambda tie: x[:, tie])


def _abs_max_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`_abs_max(x.T)` for blocks x [B, n]."""
    t = _lanes(x)
    return _signed_max(_block_reduce(np.fmax, t), _block_reduce(np.fmin, t), lambda tie: x[tie].T)


def _signed_max(hi: np.ndarray, lo: np.ndarray, blocks) -> tuple[np.ndarray, np.ndarray]:
    """`_abs_max` from each block's largest and least value; `blocks(indices)` gives those blocks element-major."""
    neg = -lo
    amax = np.fmax(hi, neg)
    some = amax > 0  # False where the block is all zeros or all NaN: C keeps its 0
    amax = np.where(some, amax, F(0))
    value = np.where(some, np.where(hi > neg, hi, -neg), F(0))
    tie = np.flatnonzero(some & (hi == neg))
    if tie.size:
        part = blocks(tie)
        value[tie] = np.take_along_axis(part, (np.abs(part) == amax[tie]).argmax(axis=0)[None], 0)[0]
    return amax, value


def _elements(x: np.ndarray, n: int) -> np.ndarray:
    """[..., k*n] -> element-major [n, ... * k] (sub-blocks of n weights side by side)."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _blocks(x: np.ndarray, per_block: int) -> np.ndarray:
    """Element-major [n, blocks * per_block] -> [blocks, per_block * n] in weight order."""
    n = x.shape[0]
    return np.ascontiguousarray(x.T).reshape(-1, per_block * n)


# ------------------------------------------------------------------------------------- ggml's scale searches
def _make_qx(x: np.ndarray, nmax: int, w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(rmse_type=1): symmetric codes 0..2*nmax-1 around nmax and their least-squares scale, best
    of 19 trial scales. x, w element-major [n, B]; w None means x*x. Returns (scale [B], codes): `codes(cols)` is
    the winner's codes [n, len(cols)] of blocks `cols` (int32; `slice(None)` for all), computed when asked from the
    winner's iscale (the K-quants' final pass replaces them except where a stored scale is zero: they are asked for
    only there). The trials work in two reused buffers."""
    amax, big = _abs_max(x)
    w = x * x if w is None else w
    wx = w * x  # C's w*x[i]*l associates as (w*x[i])*l
    zero = amax < GROUP_MAX_EPS  # C returns zeros for these: whatever the trials do with them is replaced
    # elsewhere |iscale * x| <= |iscale| * amax ~ nmax + 1: nearest_int is numpy's rint (one pass), unless a NaN or
    # an infinity is there (C's nearest_int of a NaN is garbage, clamped into a code)
    finite = bool(np.isfinite(x).all())
    lf, wl = np.empty_like(x), np.empty_like(x)
    with np.errstate(all="ignore"):

        def codes_at(iscale):  # clip(nearest(iscale * x)) into lf, as float32 whole numbers
            np.multiply(x, iscale, out=lf)
            if finite:
                np.rint(lf, out=lf)
            else:
                np.copyto(lf, _nearest(lf))
            return _clip(lf, -nmax, nmax - 1)

        def trial(iscale):
            codes_at(iscale)
            np.multiply(wx, lf, out=wl)
            sumlx = _seq(wl)
            np.multiply(w, lf, out=wl)
            np.multiply(wl, lf, out=wl)
            return sumlx, _seq(wl)

        code_iscale = F(-nmax) / big
        sumlx, suml2 = trial(code_iscale)
        scale = np.where(suml2 != 0, sumlx / suml2, F(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(F(nmax) + F(0.1) * F(step)) / big
            slx, sl2 = trial(iscale)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            code_iscale = np.where(better, iscale, code_iscale)
            scale = np.where(better, slx / sl2, scale)
            best = np.where(better, scale * slx, best)

    def codes(cols) -> np.ndarray:  # the winner's codes (C's nearest_int: exact wherever they are asked for)
        with np.errstate(all="ignore"):
            q = _clip(_nearest_int(x[:, cols] * code_iscale[cols]), -nmax, nmax - 1) + nmax
        return np.where(zero[cols], 0, q)

    return np.where(zero, F(0), scale).astype(F), codes


@dataclass
class _Refining:
    """Blocks ggml's refinement still moves, element-major: their columns `at` in the chunk [m]; per weight the
    weight, w*x and its importance w [3, n, m], the codes (float32 whole numbers) [n, m] and the terms w*x*L and
    w*L*L [2, n, m] (associated left to right, as C computes them); per block the two sums [2, m] and its clock
    [m]: pass * n + the position its pass goes on from (the positions before it belong to its next pass)."""

    at: np.ndarray
    data: np.ndarray
    codes: np.ndarray
    terms: np.ndarray
    sums: np.ndarray
    clock: np.ndarray

    @classmethod
    def of(cls, at, x, wx, w, codes, sums, clock: int) -> _Refining:
        """Blocks `at` (columns of x, w*x, w, codes [n, B] and sums [2, B]) at `clock`."""
        data, own = np.stack([np.take(a, at, axis=1) for a in (x, wx, w)]), np.take(codes, at, axis=1)
        terms = np.empty_like(data[1:])
        np.multiply(data[1], own, out=terms[0])
        np.multiply(data[2], own, out=terms[1])
        terms[1] *= own
        return cls(at, data, own, terms, np.take(sums, at, axis=1), np.full(len(at), clock))

    def take(self, keep: np.ndarray) -> _Refining:
        return _Refining(self.at[keep], *(np.compress(keep, a, axis=-1) for a in
                                          (self.data, self.codes, self.terms, self.sums)), self.clock[keep])

    def put(self, codes: np.ndarray, sums: np.ndarray) -> None:
        """Into the chunk's codes [n, B] and sums [2, B]."""
        codes[:, self.at], sums[:, self.at] = self.codes, self.sums


def _refine(x, w, codes, lo, hi, qp: bool, sums=None) -> tuple[np.ndarray, np.ndarray]:
    """ggml's refinement of make_q3_quants / make_qp_quants: up to 5 passes over the weights, each code moved to
    nearest(x * sl2 / slx), clamped to lo..hi (lo None: only MIN(hi, .)), where that raises slx^2 / sl2. x, w,
    codes (float32 whole numbers, changed in place) element-major [n, B]; starts from `sums` (sumlx, suml2), or the
    codes' own; returns the final (sumlx, suml2) [B]. qp: make_qp's order of checks (sl2 > 0 before the trial) and
    its uint8_t codes.

    The first two passes run as C's loop, one weight position at a time across the blocks: the first over all of
    them, the second over those the first moved (~13 % of Q3_K's on real weights). A block the second pass moves goes
    on in rounds (`_refine_round`), whose cost does not grow with the passes: a pass costs ~30 numpy calls per
    position, whatever the number of blocks left."""
    wx = w * x  # C's w*x[i]*L[i] associates as (w*x[i])*L[i]
    if sums is None:
        sums = np.stack([_seq(wx * codes), _seq(w * codes * codes)])
    else:
        sums = np.stack(sums)  # updated in place below
    moved = _refine_pass(x, wx, w, codes, sums, lo, hi, qp)
    if not moved.any():
        return sums[0], sums[1]
    at = np.flatnonzero(moved)  # C's second pass, on the blocks the first moved
    part = [np.take(a, at, axis=1) for a in (x, wx, w, codes, sums)]
    moved = _refine_pass(*part, lo, hi, qp)
    codes[:, at], sums[:, at] = part[3], part[4]
    if moved.any():  # C's third pass on, in rounds
        r = _Refining.of(at[moved], x, wx, w, codes, sums, clock=2 * x.shape[0])
        _refine_in_rounds(r, codes, sums, lo, hi, qp)
    return sums[0], sums[1]


def _refine_pass(x, wx, w, codes, sums, lo, hi, qp: bool) -> np.ndarray:
    """One of `_refine`'s passes as C's loop, one weight position at a time across all blocks (codes and sums [2, B]
    changed in place). Returns which blocks moved."""
    sumlx, suml2 = sums
    # each weight's terms w*x*L and w*L*L for the codes the pass starts from: a position's code is still that one
    # when the pass reaches it (only its own step moves it)
    lx = wx * codes
    l2 = w * codes
    l2 *= codes
    slx, sl2, new = np.empty((3, x.shape[1]), F)  # each step's work, in reused buffers
    differs, moved = np.empty(x.shape[1], bool), np.zeros(x.shape[1], bool)
    for i, xi in enumerate(x):
        np.subtract(sumlx, lx[i], out=slx)
        np.subtract(suml2, l2[i], out=sl2)
        np.multiply(xi, sl2, out=new)
        np.divide(new, slx, out=new)
        rounded = _nearest(new)  # in place, unless a NaN or |v| >= 2**22 is there
        if lo is None:
            np.minimum(rounded, F(hi), out=rounded)
        else:
            _clip(rounded, lo, hi)
        # C's trial goes on only where the code would change: few blocks (~2 % of Q3_K's trials on real weights)
        tried = np.flatnonzero(np.not_equal(rounded, codes[i], out=differs))
        if not tried.size:
            continue
        nl, s1, s2 = rounded[tried], slx[tried], sl2[tried]
        t1 = wx[i, tried] * nl
        t1 += s1
        t2 = w[i, tried] * nl
        t2 *= nl
        t2 += s2
        take = (s1 > 0) & ((s2 if qp else t2) > 0)
        take &= (t1 * t1) * suml2[tried] > (sumlx[tried] * sumlx[tried]) * t2
        at = tried[take]
        codes[i, at] = np.mod(nl[take], F(256)) if qp else nl[take]
        sumlx[at], suml2[at] = t1[take], t2[take]
        moved[at] = True
    return moved


def _refine_round(r: _Refining, lo, hi, qp: bool) -> np.ndarray:
    """One round of `_refine` over the blocks of `r` (changed in place). Returns which blocks moved; the others are
    done (their clock is set past the end).

    C visits a block's weights one after another, but a trial's arithmetic depends only on its weight, its code and
    the block's two sums, and the sums change only where a code moves: few do (on real weights ~2 % of the trial
    codes differ from the code held). So a round evaluates every weight of every block at once, from the sums the
    block holds, and makes each block's first move in C's order: the rest of its pass, then the next pass from its
    start. Up to that move, C computes exactly these trials. A block with no move left is done: its pass ends with
    no change, or its fifth pass ends (a pass that follows one without moves would redo the same arithmetic)."""
    n, m = r.codes.shape
    d = r.sums[:, None, :] - r.terms  # each weight's sums without its own terms: slx, sl2
    trial = d[0] > 0
    if qp:
        trial &= d[1] > 0
    new = r.data[0] * d[1]
    new /= d[0]  # (where slx <= 0 the quotient is never used)
    new = _nearest(new)
    if lo is None:
        np.minimum(new, F(hi), out=new)
    else:
        _clip(new, lo, hi)
    trial &= new != r.codes
    f = np.flatnonzero(trial)  # the moves tried, position-major: within a block in C's order
    i, b = np.divmod(f, m)
    (slx, sl2), (wx, w), nl = d.reshape(2, -1)[:, f], r.data[1:].reshape(2, -1)[:, f], new.reshape(-1)[f]
    s1 = slx + wx * nl
    s2 = sl2 + w * nl * nl
    sumlx, suml2 = r.sums[:, b]
    take = (s1 * s1) * suml2 > (sumlx * sumlx) * s2
    if not qp:
        take &= s2 > 0
    clock = r.clock[b]
    clock += (i - clock) % n + 1  # the block's clock after this move: C's 5 passes end at 5n
    take &= clock <= 5 * n
    # each block's first move taken in C's order (the least clock), and its index among the moves tried
    none = np.iinfo(np.int64).max
    first = np.full(m, none)
    np.minimum.at(first, b[take], clock[take] * f.size + np.flatnonzero(take))
    moved = first < none
    clock, k = np.divmod(first[moved], f.size)
    f, nl = f[k], nl[k]
    if qp:
        np.mod(nl, F(256), out=nl)  # uint8_t
    r.codes.reshape(-1)[f] = nl
    r.terms.reshape(2, -1)[:, f] = wx[k] * nl, w[k] * nl * nl
    r.sums[:, b[k]] = s1[k], s2[k]
    r.clock[:] = 6 * n  # past the end: a block that did not move is done
    r.clock[b[k]] = clock
    return moved


def _refine_in_rounds(r: _Refining, codes, sums, lo, hi, qp: bool) -> None:
    """Refines the blocks of `r` until none moves; their codes and sums go into the chunk's `codes`, `sums`. The
    arrays keep blocks that are done until most are (gathering the others costs about what a round does)."""
    while r is not None:
        moved = np.count_nonzero(_refine_round(r, lo, hi, qp))
        if 2 * moved > r.at.size:
            continue
        r.put(codes, sums)
        r = r.take(r.clock <= 5 * len(codes)) if moved else None


def _make_q3(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(do_rmse=true): symmetric codes refined one weight at a time (x*x weighted). Returns
    (scale [B], codes) as `_make_qx` does."""
    amax, big = _abs_max(x)
    zero = amax < GROUP_MAX_EPS  # C returns zeros for these: whatever happens to them here is replaced
    with np.errstate(all="ignore"):
        lf = (F(-nmax) / big) * x  # elsewhere |lf| <= nmax: rint is nearest_int, unless a NaN or inf is there
        lf = np.rint(lf, out=lf) if np.isfinite(x).all() else _nearest(lf)
        _clip(lf, -nmax, nmax - 1)
        sumlx, suml2 = _refine(x, x * x, lf, -nmax, nmax - 1, qp=False)
        scale = np.where(suml2 > 0, sumlx / suml2, F(0))

    def codes(cols) -> np.ndarray:
        return np.where(zero[cols], 0, lf[:, cols].astype(np.int32) + nmax)

    return np.where(zero, F(0), scale).astype(F), codes


def _make_qkx(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, mad: bool):
    """make_qkx2_quants / make_qkx3_quants: asymmetric codes 0..nmax with a scale and a min (min <= 0), the best
    weighted least-squares fit over nstep+1 trial ranges (each trial starts from the best min so far, as in C).
    Returns (scale [B], -min [B], codes), `codes(cols)` as `_make_qx`'s, from the winner's (iscale, min). Each trial
    works in three buffers the size of x."""
    lo, hi = _min_max(x)
    sum_w, sum_x = _seq(w), _seq(w * x)
    lo = np.where(lo > 0, F(0), lo)
    flat = hi == lo  # C returns zeros for these at once: whatever the trials do with them is replaced at the end
    first_lo = lo
    finite = bool(np.isfinite(x).all())
    lf, tmp, tmp2 = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    with np.errstate(all="ignore"):

        def codes_at(iscale, low):  # clip(nearest((x - low) * iscale)) into lf, as float32 whole numbers
            np.subtract(x, low, out=lf)
            np.multiply(lf, iscale, out=lf)
            # |x - low| <= max(hi - low, low - first_lo): below 2**22 the codes are numpy's rint (one pass, no check)
            span = np.maximum(hi - low, low - first_lo)
            if finite and np.max(np.where(flat, F(0), np.abs(iscale) * span)) < _EXACT:
                np.rint(lf, out=lf)
            else:
                np.copyto(lf, _nearest(lf))
            return _clip(lf, 0, nmax)

        def error(scale, low):  # sum of w * (scale * l + min - x)^2 (or |.|) for the codes in lf
            np.multiply(lf, scale, out=tmp)
            np.add(tmp, low, out=tmp)
            np.subtract(tmp, x, out=tmp)
            if mad:
                np.abs(tmp, out=tmp)
            else:
                np.multiply(tmp, tmp, out=tmp)
            np.multiply(tmp, w, out=tmp)
            return _seq(tmp)

        iscale = F(nmax) / (hi - lo)
        scale = F(1) / iscale
        codes_at(iscale, lo)
        best = error(scale, lo)
        code_iscale, code_lo = iscale, lo  # the winner's codes: codes_at(code_iscale, code_lo)
        for step in range(nstep + 1):
            iscale = ((F(rmin) + F(rdelta) * F(step)) + F(nmax)) / (hi - lo)
            codes_at(iscale, lo)
            np.multiply(w, lf, out=tmp)
            sum_l = _seq(tmp)
            np.multiply(tmp, x, out=tmp2)
            sum_xl = _seq(tmp2)
            tmp *= lf
            sum_l2 = _seq(tmp)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_min = np.where(positive, F(0), this_min)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            err = error(this_scale, this_min)
            better = (det > 0) & (err < best)
            code_iscale, code_lo = np.where(better, iscale, code_iscale), np.where(better, lo, code_lo)
            best = np.where(better, err, best)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)
    lo = np.where(flat, first_lo, lo)

    def codes(cols) -> np.ndarray:  # the winner's codes, as `_make_qx`'s
        with np.errstate(all="ignore"):
            q = _clip(_nearest_int((x[:, cols] - code_lo[cols]) * code_iscale[cols]), 0, nmax)
        return np.where(flat[cols], 0, q)

    return np.where(flat, F(0), scale).astype(F), (-lo).astype(F), codes


def _make_qp(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants: non-negative codes 0..nmax for the sub-block scales of a super-block, importance weighted.
    The codes live in uint8_t there, so they wrap where C's would (the sums use the unwrapped value first)."""
    hi = np.zeros(x.shape[1:], F)
    for row in x:
        hi = np.where(hi > row, hi, row)  # MAX(max, x[i])
    with np.errstate(all="ignore"):
        iscale = F(nmax) / hi
        scale = F(1) / iscale
        diff = x - scale * _u8(_nearest_int(iscale * x)).astype(F)
        best = _seq(w * diff * diff)
        for step in range(-4, 5):
            if step == 0:
                continue
            iscale_step = (F(0.1) * F(step) + F(nmax)) / hi
            scale_step = F(1) / iscale_step
            diff = x - scale_step * np.minimum(nmax, _nearest_int(iscale_step * x)).astype(F)
            mse = _seq(w * diff * diff)
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, iscale_step, iscale)
        raw = np.minimum(nmax, _nearest_int(iscale * x))
        lf = raw.astype(F)
        codes = _u8(raw).astype(F)  # uint8_t, where the sums take the code as it was
        sumlx, suml2 = _refine(x, w, codes, None, nmax, qp=True, sums=(_seq(w * x * lf), _seq(w * lf * lf)))
        scale = np.where(suml2 > 0, sumlx / suml2, F(0))
    zero = hi < GROUP_MAX_EPS
    return np.where(zero, F(0), scale).astype(F), np.where(zero, 0, codes.astype(np.int32))


def _row_sigma2(x: np.ndarray, factor: float) -> np.ndarray:
    """factor * sum(x*x) / n per row of x [rows, n], summed in order."""
    return F(factor) * _seq(np.ascontiguousarray((x * x).T)) / F(x.shape[1])


def _impl_weights(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """ggml's importance weights qw * sqrt(sigma2 + x*x); x, qw [blocks, n], sigma2 [blocks]."""
    return qw * np.sqrt(sigma2[:, None] + x * x)


# ------------------------------------------------------------------------------------------------ the codecs
@dataclass
class Fit:
    """A fitted block layout: what `pack` needs besides the codes, the grid value = scale * q + bias of every
    code q in 0..nmax (per sub-block, [blocks, sub-blocks]; scale * levels[q] + bias for a non-linear codec) and the
    reference codes [blocks, block]."""

    header: dict[str, np.ndarray]
    scale: np.ndarray
    bias: np.ndarray
    codes: np.ndarray


class Codec:
    """One GGUF block type. `fit` takes rows cut into blocks [blocks, block] (float32), the importance of each
    weight or None, and `row_sigma2` (what ggml's importance weighting derives from the whole row, per block)."""

    name: str
    block: int  # weights per block
    size: int  # bytes per block
    sub: int  # weights per scale
    nmax: int  # largest code
    row_stat: float = 0.0  # legacy *_impl: the row's mean square enters the weights (0: not used)
    weighted: bool = True  # whether ggml has an importance-weighted fit for it
    levels: np.ndarray | None = None  # a non-linear type's value of each code (the grid is scale * levels[q])
    # weights per encoding step: few enough that a fit's dozens of working arrays stay in cache, enough that its
    # per-block numpy calls (on arrays of one value per sub-block) are not all overhead. Fastest in whole exports of
    # SmolLM2 here (1 MB of L2 a core, 32 MB of L3): Q4_K / Q5_K / Q6_K at 2**18, and Q3_K, whose refinement costs
    # numpy calls per weight position whatever the step's size, at 2**19
    chunk: int = 1 << 17

    def fit(self, x: np.ndarray, qw: np.ndarray | None, row_sigma2: np.ndarray | None) -> Fit:
        raise NotImplementedError

    def pack(self, fit: Fit, codes: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def encode_blocks(self, x: np.ndarray, qw: np.ndarray | None = None, row_sigma2=None) -> np.ndarray:
        fit = self.fit(x, qw, row_sigma2)
        return self.pack(fit, fit.codes)


_LOW_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """32 codes -> 16 bytes: weight j in the low nibble and weight j+16 in the high nibble of byte j (8 bytes at a
    time: each byte masked to its low nibble, so the 64-bit shift moves no bit across a byte)."""
    c = np.ascontiguousarray(codes, np.uint8).reshape(-1, 32).view(np.uint64)  # [blocks, 4]
    q = c[:, 2:] & _LOW_NIBBLES
    q <<= np.uint64(4)
    q |= c[:, :2] & _LOW_NIBBLES
    return q.view(np.uint8)


def _concat_bytes(parts: list[np.ndarray]) -> np.ndarray:
    """`np.concatenate(parts, axis=1)` for byte blocks [B, k]: each part moves as one k-byte item per block (numpy
    would copy a block's few bytes as a row of its own, several times slower)."""
    n, width = len(parts[0]), sum(p.shape[1] for p in parts)
    out = np.empty((n, width), np.uint8)
    at = 0
    for p in parts:
        k = p.shape[1]
        item = np.dtype(f"V{k}")
        np.ndarray((n,), item, out, at, (width,))[...] = np.ascontiguousarray(p, np.uint8).view(item).reshape(n)
        at += k
    return out


def _high_bits(codes: np.ndarray) -> np.ndarray:
    """Bit 4 of each of 32 codes, as the little-endian uint32 qh of Q5_0/Q5_1."""
    return np.packbits((codes.astype(np.uint8, copy=False) >> 4) & 1, axis=-1, bitorder="little")


class _Q4_0(Codec):
    name, block, size, sub, nmax, row_stat = "Q4_0", QK, 18, QK, 15, 1.0
    half = 8  # codes are centred on this

    def fit(self, x, qw, row_sigma2):
        if qw is None:  # no sums: the blocks stay in weight order
            d, codes = _by_lanes(x, self._fit_lanes, self._fit_plain)
        else:
            w = _elements(_impl_weights(x, qw, row_sigma2), QK)
            d, codes = _make_qx(_elements(x, QK), self.half, w)
            codes = _blocks(codes(slice(None)), 1)
        stored = _fp16(d)
        return Fit({"d": d}, stored[:, None], (F(-self.half) * stored)[:, None], codes)

    def _fit_lanes(self, x, t, hi, lo, bad):
        """Where the weights and the inverse scale are finite, the codes x * id + half + 0.5 lie in
        [0, 2 * half + 1): one cast to uint8 is C's (int8_t) cast."""
        _, big = _signed_max(hi, lo, lambda tie: x[tie].T)
        d = big / F(-self.half)
        inv = np.where(d != 0, F(1) / d, F(0))
        bad |= ~np.isfinite(inv)  # a denormal scale's inverse overflows
        inv[bad] = 0
        t *= _spread(inv)
        t += F(self.half + 0.5)
        np.minimum(t, F(self.nmax), out=t)  # MIN(nmax, .) before the cast: the same on codes that are not negative
        return d, _unlanes(t.astype(np.uint8)), bad

    def _fit_plain(self, x):
        _, big = _abs_max_rows(x)
        d = big / F(-self.half)
        inv = np.where(d != 0, F(1) / d, F(0))
        v = x * inv[:, None]
        v += F(self.half + 0.5)
        codes = v.astype(np.int32).astype(np.int8)  # C's (int8_t)(int), NaN's INT_MIN included
        np.minimum(codes, self.nmax, out=codes)
        return d, codes.view(np.uint8)  # C's uint8_t of MIN(nmax, .)

    def pack(self, fit, codes):
        return _concat_bytes([_half_bytes(fit.header["d"]), _nibbles(codes)])


class _Q5_0(_Q4_0):
    name, size, nmax, half = "Q5_0", 22, 31, 16

    def pack(self, fit, codes):
        return _concat_bytes([_half_bytes(fit.header["d"]), _high_bits(codes), _nibbles(codes)])


class _Q4_1(Codec):
    name, block, size, sub, nmax, row_stat = "Q4_1", QK, 20, QK, 15, 1.0

    def fit(self, x, qw, row_sigma2):
        if qw is None:  # no sums: the blocks stay in weight order
            d, lo, codes = _by_lanes(x, self._fit_lanes, self._fit_plain)
        else:
            w = _elements(_impl_weights(x, qw, row_sigma2), QK)
            d, neg_min, codes = _make_qkx(_elements(x, QK), w, self.nmax, -0.9, 0.05, 36, False)
            lo, codes = -neg_min, _blocks(codes(slice(None)), 1)
        return Fit({"d": d, "m": lo}, _fp16(d)[:, None], _fp16(lo)[:, None], codes)

    def _fit_lanes(self, x, t, hi, lo, bad):
        """Where the weights, the range and the inverse scale are finite, (x - min) * id + 0.5 lies in
        [0, nmax + 1]: one cast to uint8 is C's. A block whose least or largest value is a zero is left to C's loop
        (which keeps the first of +0 and -0)."""
        d = (hi - lo) / F(self.nmax)
        inv = np.where(d != 0, F(1) / d, F(0))
        bad |= ~(np.isfinite(d) & np.isfinite(inv)) | (lo == 0) | (hi == 0)
        inv[bad], lo[bad] = 0, 0
        t -= _spread(lo)
        t *= _spread(inv)
        t += F(0.5)
        if self.nmax == 15:
            np.minimum(t, F(15), out=t)
        return d, lo, _unlanes(t.astype(np.uint8)), bad

    def _fit_plain(self, x):
        lo, hi = _min_max_rows(x, np.finfo(F).max)
        d = (hi - lo) / F(self.nmax)
        inv = np.where(d != 0, F(1) / d, F(0))
        v = x - lo[:, None]
        v *= inv[:, None]
        v += F(0.5)
        codes = v.astype(np.int32).astype(np.uint8)  # C's (uint8_t)(int), NaN's INT_MIN included
        if self.nmax == 15:
            np.minimum(codes, 15, out=codes)
        return d, lo, codes

    def pack(self, fit, codes):
        return _concat_bytes([_half_bytes(fit.header["d"]), _half_bytes(fit.header["m"]), _nibbles(codes)])


class _Q5_1(_Q4_1):
    name, size, nmax = "Q5_1", 24, 31

    def pack(self, fit, codes):
        h = fit.header
        return _concat_bytes([_half_bytes(h["d"]), _half_bytes(h["m"]), _high_bits(codes), _nibbles(codes)])


class _Q8_0(Codec):
    name, block, size, sub, nmax, weighted = "Q8_0", QK, 34, QK, 255, False

    def fit(self, x, qw, row_sigma2):  # ggml's Q8_0 has no importance-weighted variant
        d, codes = _by_lanes(x, self._fit_lanes, self._fit_plain)
        stored = _fp16(d)
        return Fit({"d": d}, stored[:, None], (F(-128) * stored)[:, None], codes)

    def _fit_lanes(self, x, t, hi, lo, bad):
        """Where the weights and the inverse scale are finite: amax from the block's extremes (+0 for an all-zero
        block, as C's loop from 0), and |x * id| <= 127 rounded by C's roundf (numpy's rint, with exact halves moved
        away from zero: v + copysign(0.5, v) is exact there)."""
        d = np.abs(np.maximum(hi, -lo)) / F(127)
        inv = np.where(d != 0, F(1) / d, F(0))
        bad |= ~np.isfinite(inv)
        inv[bad] = 0
        t *= _spread(inv)
        r = np.rint(t)
        half = np.subtract(t, r)
        np.abs(half, out=half)
        tie = half == F(0.5)
        if tie.any():
            r[tie] = t[tie] + np.copysign(F(0.5), t[tie])
        codes = r.astype(np.int8).view(np.uint8)
        codes ^= np.uint8(0x80)  # + 128, as uint8
        return d, _unlanes(codes), bad

    def _fit_plain(self, x):
        d = _running_abs_max(x) / F(127)
        inv = np.where(d != 0, F(1) / d, F(0))
        v = x * inv[:, None]
        if np.isfinite(d).all() and not np.isnan(v).any():  # |v| <= 127: int8 holds every code
            codes = _roundf(v).astype(np.int8).view(np.uint8) ^ np.uint8(0x80)  # + 128, as uint8
        else:  # lroundf of a NaN: C's (int8_t) of LONG_MIN
            codes = (_roundf(v).astype(np.int32) + 128) & 0xFF
        return d, codes

    def pack(self, fit, codes):
        q = codes.astype(np.uint8, copy=False) ^ np.uint8(0x80)  # codes - 128 as int8, when 0 <= codes <= 255
        return _concat_bytes([_half_bytes(fit.header["d"]), q])


def _pack_2bit(codes: np.ndarray) -> np.ndarray:
    """256 codes < 4 -> 64 bytes: byte 32*h + l holds weights 128h + l + 32k in bits 2k (k = 0..3)."""
    c = codes.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)).reshape(-1, 64)


def _k_weights(x: np.ndarray, qw: np.ndarray, factor: float) -> np.ndarray:
    """ggml's importance weights for a K-quant super-block x [blocks, 256]: qw * sqrt(sigma2 + x^2) with
    sigma2 = factor * mean(x^2) over the super-block."""
    return _impl_weights(x, qw, _row_sigma2(x, factor))


def _requantize(xe, d, dm, codes, nmax, offset=0) -> np.ndarray:
    """ggml's final pass: codes = nearest((x + dm) / d) + offset, clamped to 0..nmax, with the stored
    (float16-derived) scales; a sub-block whose scale is zero keeps the codes its search found (`codes(cols)`, asked
    for those sub-blocks only). xe [n, B]; d, dm [B] (dm None: no term, as C's x / d). Returns uint8 codes [n, B]."""
    keep = np.flatnonzero(d == 0)
    with np.errstate(all="ignore"):
        v = np.divide(xe if dm is None else xe + dm, d)
        v[:, keep] = 0  # (thrown away: kept out of `_nearest`'s range check)
        v = _nearest(v)
    v += F(offset)
    out = _clip(v, 0, nmax).astype(np.uint8)
    if keep.size:
        out[:, keep] = codes(keep)
    return out


class _Q2_K(Codec):
    name, block, size, sub, nmax = "Q2_K", QK_K, 84, 16, 3

    def fit(self, x, qw, row_sigma2):
        n = x.shape[0]
        xe = _elements(x, 16)
        if qw is None:
            w = np.abs(xe)
            scales, mins, codes = _make_qkx(xe, w, 3, -0.5, 0.1, 15, True)
            scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
            max_scale, max_min = _largest(np.ascontiguousarray(scales.T)), _largest(np.ascontiguousarray(mins.T))
            with np.errstate(all="ignore"):
                ls = np.where(max_scale[:, None] > 0, _nearest_int((F(15) / max_scale)[:, None] * scales), 0)
                lm = np.where(max_min[:, None] > 0, _nearest_int((F(15) / max_min)[:, None] * mins), 0)
            d = np.where(max_scale > 0, max_scale / F(15), F(0))
            dmin = np.where(max_min > 0, max_min / F(15), F(0))
        else:
            w = _elements(_k_weights(x, qw, 1.0), 16)
            scales, mins, codes = _make_qkx(xe, w, 3, -0.9, 0.05, 36, False)
            sw = _seq(w).reshape(n, 16).T
            d, ls = _make_qp(np.ascontiguousarray(scales.reshape(n, 16).T), 15, sw)
            dmin, lm = _make_qp(np.ascontiguousarray(mins.reshape(n, 16).T), 15, sw)
            ls, lm = ls.T, lm.T
        packed = _u8(_u8(ls) | (lm << 4)).astype(np.int32)
        df, mf = _fp16(d), _fp16(dmin)
        step = (df[:, None] * (packed & 0xF).astype(F)).reshape(-1)
        low = (mf[:, None] * (packed >> 4).astype(F)).reshape(-1)
        codes = _requantize(xe, step, low, codes, 3)
        return Fit({"scales": packed.astype(np.uint8), "d": d, "dmin": dmin}, step.reshape(n, 16),
                   -low.reshape(n, 16), _blocks(codes, 16))

    def pack(self, fit, codes):
        h = fit.header
        return _concat_bytes([h["scales"], _pack_2bit(codes), _half_bytes(h["d"]), _half_bytes(h["dmin"])])


def _q3_scale_bytes(l: np.ndarray) -> np.ndarray:
    """16 six-bit scales (0..63) -> Q3_K's 12 bytes: low nibbles in 0..7, high 2-bit pairs in 8..11."""
    l = l.astype(np.int32)
    out = np.zeros((l.shape[0], 12), np.int32)
    out[:, :8] = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
    hi = l >> 4
    for j in range(16):
        out[:, 8 + j % 4] |= hi[:, j] << (2 * (j // 4))
    return _u8(out)


def _q3_scale_values(b: np.ndarray) -> np.ndarray:
    """Q3_K's 12 scale bytes -> 16 signed scales (as the C code reads them back)."""
    b = b.astype(np.int32)
    low = np.concatenate([b[:, :8] & 0xF, b[:, :8] >> 4], axis=1)
    hi = np.stack([(b[:, 8 + j % 4] >> (2 * (j // 4))) & 3 for j in range(16)], axis=1)
    return _i8(low | (hi << 4)) - 32


class _Q3_K(Codec):
    name, block, size, sub, nmax, chunk = "Q3_K", QK_K, 110, 16, 7, 1 << 19

    def fit(self, x, qw, row_sigma2):
        n = x.shape[0]
        xe = _elements(x, 16)
        if qw is None:
            scales, codes = _make_q3(xe, 4)
            scales = scales.reshape(n, 16)
            amax, big = _abs_max(np.ascontiguousarray(scales.T))
            with np.errstate(all="ignore"):
                iscale = F(-32) / big
                l = np.clip(_i8(_nearest_int(iscale[:, None] * scales)), -32, 31) + 32
                d = np.where(big != 0, F(1) / iscale, F(0))
            l = np.where((big != 0)[:, None], l, 0)
        else:
            w = _elements(_k_weights(x, qw, 2.0), 16)
            scales, codes = _make_qx(xe, 4, w)
            sw = _seq(w).reshape(n, 16).T
            d, l = _make_qx(np.ascontiguousarray(scales.reshape(n, 16).T), 32, np.ascontiguousarray(sw))
            l = l(slice(None)).T
        sb = _q3_scale_bytes(l)
        step = (_fp16(d)[:, None] * _q3_scale_values(sb).astype(F)).reshape(-1)
        codes = _requantize(xe, step, None, codes, 7, offset=4)
        return Fit({"scales": sb, "d": d}, step.reshape(n, 16), -4 * step.reshape(n, 16), _blocks(codes, 16))

    def pack(self, fit, codes):
        c = codes.astype(np.uint8, copy=False)
        high = (c > 3).reshape(-1, 8, 32)  # weight 32k + m -> bit k of hmask byte m
        hmask = np.zeros((c.shape[0], 32), np.uint8)
        for k in range(8):
            hmask |= high[:, k].astype(np.uint8) << k
        return _concat_bytes([hmask, _pack_2bit(c & 3), fit.header["scales"], _half_bytes(fit.header["d"])])


def _k4_scale_bytes(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit mins -> the 12 bytes Q4_K / Q5_K keep them in (get_scale_min_k4's inverse)."""
    ls, lm = ls.astype(np.int32), lm.astype(np.int32)
    out = np.zeros((ls.shape[0], 12), np.int32)
    out[:, 0:4] = ls[:, :4]
    out[:, 4:8] = lm[:, :4]
    out[:, 8:12] = _u8((ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4))
    out[:, 0:4] = _u8(out[:, 0:4] | ((ls[:, 4:] >> 4) << 6))
    out[:, 4:8] = _u8(out[:, 4:8] | ((lm[:, 4:] >> 4) << 6))
    return _u8(out)


def _k4_scale_values(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b = b.astype(np.int32)
    sc = np.concatenate([b[:, 0:4] & 63, (b[:, 8:12] & 0xF) | ((b[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


class _Q4_K(Codec):
    name, block, size, sub, nmax, chunk = "Q4_K", QK_K, 144, 32, 15, 1 << 18
    search = (-1.0, 0.1, 20)  # make_qkx2's (rmin, rdelta, nstep) without importance

    def fit(self, x, qw, row_sigma2):
        n = x.shape[0]
        xe = _elements(x, 32)
        if qw is None:
            av_x = np.sqrt(_seq(xe * xe) / F(32))
            scales, mins, codes = _make_qkx(xe, av_x + np.abs(xe), self.nmax, *self.search, False)
            scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
            max_scale, max_min = _largest(np.ascontiguousarray(scales.T)), _largest(np.ascontiguousarray(mins.T))
            with np.errstate(all="ignore"):
                inv_scale = np.where(max_scale > 0, F(63) / max_scale, F(0))
                inv_min = np.where(max_min > 0, F(63) / max_min, F(0))
            ls = np.minimum(63, _u8(_nearest_int(inv_scale[:, None] * scales)))
            lm = np.minimum(63, _u8(_nearest_int(inv_min[:, None] * mins)))
            d, dmin = max_scale / F(63), max_min / F(63)
        else:
            w = _elements(_k_weights(x, qw, 2.0), 32)
            scales, mins, codes = _make_qkx(xe, w, self.nmax, -0.9, 0.05, 36, False)
            sw = np.ascontiguousarray(_seq(w).reshape(n, 8).T)
            d, ls = _make_qp(np.ascontiguousarray(scales.reshape(n, 8).T), 63, sw)
            dmin, lm = _make_qp(np.ascontiguousarray(mins.reshape(n, 8).T), 63, sw)
            ls, lm = _u8(ls.T), _u8(lm.T)
            if self.nmax == 31:  # q5_K_impl clamps, q4_K_impl does not
                ls, lm = np.minimum(63, ls), np.minimum(63, lm)
        sb = _k4_scale_bytes(ls, lm)
        sc, m = _k4_scale_values(sb)
        step = (_fp16(d)[:, None] * sc.astype(F)).reshape(-1)
        low = (_fp16(dmin)[:, None] * m.astype(F)).reshape(-1)
        codes = _requantize(xe, step, low, codes, self.nmax)
        return Fit({"scales": sb, "d": d, "dmin": dmin}, step.reshape(n, 8), -low.reshape(n, 8), _blocks(codes, 8))

    def pack(self, fit, codes):
        h = fit.header
        c = codes.reshape(-1, 4, 2, 32).astype(np.uint8, copy=False)
        qs = ((c[:, :, 0] & 0xF) | ((c[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
        parts = [_half_bytes(h["d"]), _half_bytes(h["dmin"]), h["scales"]]
        if self.nmax == 31:  # bit 4 of weight 64i + j (+32) -> bit 2i (2i+1) of qh[j]
            qh = np.zeros((c.shape[0], 32), np.uint8)
            for i in range(4):
                qh |= ((c[:, i, 0] >> 4) << (2 * i)) | ((c[:, i, 1] >> 4) << (2 * i + 1))
            parts.append(qh)
        return _concat_bytes([*parts, qs])


class _Q5_K(_Q4_K):
    name, size, nmax = "Q5_K", 176, 31
    search = (-0.5, 0.1, 15)


class _Q6_K(Codec):
    name, block, size, sub, nmax, chunk = "Q6_K", QK_K, 210, 16, 63, 1 << 18

    def fit(self, x, qw, row_sigma2):
        n = x.shape[0]
        xe = _elements(x, 16)
        scales, codes = _make_qx(xe, 32, None if qw is None else _elements(qw, 16))
        scales = scales.reshape(n, 16)
        amax, big = _abs_max(np.ascontiguousarray(scales.T))
        zero = amax < GROUP_MAX_EPS
        with np.errstate(all="ignore"):
            iscale = F(-128) / big
            d = np.where(zero, F(0), F(1) / iscale)
            ls = np.where(zero[:, None], 0, _i8(np.minimum(127, _nearest_int(iscale[:, None] * scales))))
        step = (_fp16(d)[:, None] * ls.astype(F)).reshape(-1)
        codes = _requantize(xe, step, None, codes, 63, offset=32)
        if zero.any():  # an all-zero block is stored as zeros
            codes[:, np.repeat(zero, 16)] = 32
        return Fit({"scales": ls, "d": d, "zero": zero}, step.reshape(n, 16), -32 * step.reshape(n, 16),
                   _blocks(codes, 16))

    def pack(self, fit, codes):
        c = codes.reshape(-1, 2, 4, 32).astype(np.uint8, copy=False)  # [blocks, half, quarter, 32]
        ql = np.concatenate([(c[:, :, 0] & 0xF) | ((c[:, :, 2] & 0xF) << 4),
                             (c[:, :, 1] & 0xF) | ((c[:, :, 3] & 0xF) << 4)], axis=2).reshape(-1, 128)
        qh = ((c[:, :, 0] >> 4) | ((c[:, :, 1] >> 4) << 2) | ((c[:, :, 2] >> 4) << 4) | ((c[:, :, 3] >> 4) << 6))
        out = _concat_bytes([ql, qh.reshape(-1, 64), fit.header["scales"].astype(np.int8).view(np.uint8),
                             _half_bytes(fit.header["d"])])
        out[fit.header["zero"]] = 0
        return out


_IQ4_LEVELS = np.array(IQ4_NL.kvalues, F)  # ggml's kvalues_iq4nl, ascending integers


def _iq4_table(levels: np.ndarray, lo: int = -130, hi: int = 116) -> tuple[np.ndarray, int, int]:
    """ggml's best_index_int8 (the nearest level; the upper one unless `x - lower < upper - x`; beyond the ends the
    end) as a table over half units. Between integer levels a and b, float32's `x - a < b - x` flips exactly at the
    midpoint, a multiple of 1/2 (the tests check every float near each one against the C rule), so the index is
    constant on each [k/2, (k+1)/2), and 2x is exact. Returns (index per half-unit bin from 2*lo, 2*lo, 2*hi)."""
    starts = np.arange(2 * lo, 2 * hi + 1) / 2
    return np.searchsorted((levels[:-1] + levels[1:]) / 2, starts, side="right").astype(np.int32), 2 * lo, 2 * hi


_IQ4_INDEX, _IQ4_LO2, _IQ4_HI2 = _iq4_table(_IQ4_LEVELS)


def _iq4_index(twice: np.ndarray) -> np.ndarray:
    """best_index_int8(x) for twice = 2x (float32, changed in place): clamped (NaN to the top, the last code as in C:
    fmin skips it), floored, looked up."""
    np.fmin(twice, F(_IQ4_HI2), out=twice)
    np.fmax(twice, F(_IQ4_LO2), out=twice)
    np.floor(twice, out=twice)
    twice -= F(_IQ4_LO2)
    return _IQ4_INDEX[twice.astype(np.int32)]  # int32: numpy converts float32 to it far faster than to int64


class _IQ4_NL(Codec):
    """IQ4_NL: 32 weights, one float16 scale d, value d * LEVELS[q]. ggml (quantize_row_iq4_nl_impl with ntry = 7,
    with and without importance alike) takes d = max / 127 from the signed largest weight, then the best least-squares
    scale of 15 trial inverse scales (-127 + t) / max, t = -7..7, and finally each code nearest to x / d."""

    name, block, size, sub, nmax, levels = "IQ4_NL", QK, 18, QK, 15, _IQ4_LEVELS

    def fit(self, x, qw, row_sigma2):
        xe = _elements(x, QK)
        if qw is None:
            w = xe * xe
        else:  # sigma2 of the block itself (ggml's "super-block" is the block here)
            w = _elements(_impl_weights(x, qw, _seq(xe * xe) * F(2 / QK)), QK)
        amax, big = _abs_max(xe)
        lv = self.levels
        with np.errstate(all="ignore"):

            def trial(iscale):  # (sum w q x, sum w q^2) of the codes nearest iscale * x
                q = lv[_iq4_index((F(2) * iscale) * xe)]  # 2 (iscale x) exactly, bar overflow to the top end
                wq = w * q
                sumqx = _seq(wq * xe)
                wq *= q
                return sumqx, _seq(wq)

            sumqx, sumq2 = trial(F(1) / (-big / lv[0]))
            d = np.where(sumq2 > 0, sumqx / sumq2, F(0))
            best = d * sumqx
            for t in range(-7, 8):
                sumqx, sumq2 = trial(F(t + int(lv[0])) / big)
                better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
                d = np.where(better, sumqx / sumq2, d)
                best = np.where(better, d * sumqx, best)
            d = np.where(amax < GROUP_MAX_EPS, F(0), d).astype(F)
            inv = np.where(d != 0, F(1) / d, F(0))  # NaN is true in C: its inverse is NaN, every code the last
            codes = _iq4_index((F(2) * inv)[:, None] * x)
        return Fit({"d": d}, _fp16(d)[:, None], np.zeros((len(d), 1), F), codes)

    def pack(self, fit, codes):
        return _concat_bytes([_half_bytes(fit.header["d"]), _nibbles(codes)])


def _ternary_fit(x: np.ndarray) -> Fit:
    """TQ1_0 / TQ2_0: one scale (the block's largest |x|) and codes round(x / d) + 1 in {0, 1, 2}."""
    amax = _running_abs_max(x)
    with np.errstate(all="ignore"):
        inv = np.where(amax != 0, F(1) / amax, F(0))
    codes = _roundf(x * inv[:, None]).astype(np.int32) + 1
    stored = _fp16(amax)
    return Fit({"d": amax}, stored[:, None], -stored[:, None], codes)


class _TQ2_0(Codec):
    name, block, size, sub, nmax, weighted = "TQ2_0", QK_K, 66, QK_K, 2, False

    def fit(self, x, qw, row_sigma2):
        return _ternary_fit(x)

    def pack(self, fit, codes):
        return _concat_bytes([_pack_2bit(codes & 3), _half_bytes(fit.header["d"])])


_POW3 = np.array([81, 27, 9, 3, 1], np.int32)


class _TQ1_0(Codec):
    name, block, size, sub, nmax, weighted = "TQ1_0", QK_K, 54, QK_K, 2, False

    def fit(self, x, qw, row_sigma2):
        return _ternary_fit(x)

    def pack(self, fit, codes):
        c = codes.astype(np.int32)
        n = c.shape[0]

        def trits(part, width, digits):  # `digits` codes, `width` apart, packed base 3 then scaled to a byte
            q = (part.reshape(n, digits, width) * _POW3[5 - digits:, None]).sum(axis=1)
            if digits == 4:
                q = q * 3
            return ((q.astype(np.uint16) * 256 + 242) // 243).astype(np.uint8)

        qs = np.concatenate([trits(c[:, :160], 32, 5), trits(c[:, 160:240], 16, 5)], axis=1)
        return _concat_bytes([qs, trits(c[:, 240:], 4, 4), _half_bytes(fit.header["d"])])


CODECS: dict[str, Codec] = {c.name: c for c in (
    _Q4_0(), _Q4_1(), _Q5_0(), _Q5_1(), _Q8_0(), _Q2_K(), _Q3_K(), _Q4_K(), _Q5_K(), _Q6_K(), _TQ1_0(), _TQ2_0(),
    _IQ4_NL())}
FLOAT_TYPES = ("F32", "F16", "BF16")
# llama.cpp's fallback when a row is not a whole number of blocks (llama-quant.cpp, tensor_type_fallback); a
# 32-weight type that does not fit either becomes F16
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1",
            "Q6_K": "Q8_0"}
TYPES = (*FLOAT_TYPES, "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K", "TQ2_0", "TQ1_0",
         "IQ4_NL")


def block_size(kind: str) -> int:
    return 1 if kind in FLOAT_TYPES else CODECS[kind].block


def bits_per_weight(kind: str) -> float:
    if kind in FLOAT_TYPES:
        return 32.0 if kind == "F32" else 16.0
    c = CODECS[kind]
    return 8 * c.size / c.block


def row_bytes(kind: str, cols: int) -> int:
    if kind in FLOAT_TYPES:
        return cols * (4 if kind == "F32" else 2)
    return cols // CODECS[kind].block * CODECS[kind].size


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, ggml's way: NaN kept quiet, else round to nearest even."""
    n = x.view(np.uint32)
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & 0xFFFF0000) | (64 << 16), n + (0x7FFF + ((n >> 16) & 1)))
    return (n >> 16).astype(np.uint16)


def encode(w: np.ndarray, kind: str, importance: np.ndarray | None = None) -> np.ndarray:
    """Rows w [..., cols] -> GGUF data: float arrays for F32/F16, uint16 bits for BF16, else bytes
    [..., cols / block * size]. `importance` [cols] (or broadcastable to w) switches to ggml's importance-weighted
    fits, as `llama-quantize --imatrix` does."""
    w = np.asarray(w, F)
    if kind == "F32":
        return np.ascontiguousarray(w)
    if kind == "F16":
        return w.astype(np.float16)
    if kind == "BF16":
        return _bf16(np.ascontiguousarray(w))
    codec = CODECS[kind]
    rows, qw = block_rows(w, kind, importance)
    cols = rows.shape[1]
    out = np.empty((rows.shape[0], cols // codec.block * codec.size), np.uint8)
    step = max(1, codec.chunk // cols)
    # one chunk after another, in this thread: a fit makes many small numpy calls, and side by side in two threads
    # they contend for the GIL (measured on SmolLM2's exports: the same wall time for a third more CPU); an export
    # spreads its tensors' rows over processes instead (parallel.py)
    with np.errstate(all="ignore"):  # C's arithmetic, NaN and inf included, is the reference
        for r in range(0, rows.shape[0], step):
            _encode_rows(codec, rows[r : r + step], None if qw is None else qw[r : r + step], out[r : r + step])
    return out.reshape(*w.shape[:-1], -1)


def block_rows(w: np.ndarray, kind: str, importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """`encode`'s input as rows [n, cols] (float32) and each weight's importance [n, cols] (None: unweighted; a
    block-quantized `kind` only). Rows are encoded independently: any split of them gives the same bytes."""
    codec = CODECS[kind]
    w = np.asarray(w, F)
    cols = w.shape[-1]
    if cols % codec.block:
        raise ValueError(f"{kind} needs rows that are a multiple of {codec.block} (got {cols})")
    qw = None
    if importance is not None and codec.weighted:
        qw = np.broadcast_to(np.asarray(importance, F), w.shape).reshape(-1, cols)
    return w.reshape(-1, cols), qw


def _encode_rows(codec: Codec, x: np.ndarray, qw: np.ndarray | None, out: np.ndarray) -> None:
    per = x.shape[1] // codec.block
    sigma2 = np.repeat(_row_sigma2(x, codec.row_stat), per) if qw is not None and codec.row_stat else None
    q = None if qw is None else np.ascontiguousarray(qw).reshape(-1, codec.block)
    out[:] = codec.encode_blocks(x.reshape(-1, codec.block), q, sigma2).reshape(x.shape[0], -1)

