"""Hessian-aware code choice for GGUF block types (`mlxq export --calibrate --method gptq`).

The format is llama.cpp's; which codes and scales fill it is ours. The objective is the layer's output error on the
calibration text, tr((W - W^) H (W - W^)^T) with H = E[x x^T] (plus GPTQ's damping), row by row: a row's output
depends on that row's weights only, so rows are chosen independently. Per row chunk:

1. GPTQ (Frantar et al., 2022): columns in order, each block's scales fitted by ggml's importance-weighted search on
   the weights as updated by the errors of the columns before (as GPTQ fits its groups), codes chosen column by
   column with error feedback.
2. Refit: with the codes fixed, the block scales that the header stores (d, and dmin or m) enter W^ linearly, so
   their least-squares optimum against H is one small solve per row (every block of the row at once); the
   6-bit sub-block scales stay. Optionally (`ROUNDS`) GPTQ again on the refitted grid, and a refit again.
3. Every candidate (ggml's importance-weighted fit, i.e. what `--method imatrix` writes, and each refit above) is
   scored by its H-weighted error, and each row keeps its best: never worse than the imatrix fit on the
   calibration text. (On SmolLM2's layers the refits win nearly every row; GPTQ's codes before a refit never.)

Tried and dropped: fitting every block again on the weights as GPTQ saw them when quantizing each column (so a
K-quant super-block's scales follow the drift of its later sub-blocks), then GPTQ on that grid: on SmolLM2's
down_proj (Q3_K) it scored worse than the refit path (0.685 vs 0.661 of the imatrix fit's error).

Grids are read back through the codec's own `pack` and the block dequantizer, so this works for every block type
without knowing its layout, save a non-linear one (IQ4_NL), which keeps ggml's importance-weighted fit.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np

from mlxq.formats.gguf.codecs import CODECS, Codec, Fit, encode
from mlxq.kernels.kquants import dequantize
from mlxq.quant.affine import CHUNK_ELEMENTS
from mlxq.quant.gptq import error_feedback, inverse_hessian_factor

SCALE_KEYS = ("d", "dmin", "m")  # header fields that multiply codes or stand as offsets: W^ is linear in them
# of mean(diag H). Layer by layer on held-back text 0.1 beat 0.01 and 1.0, but end to end (llama-perplexity KL on
# SmolLM2) 1.0 did best: Q3_K_M 0.0866 (0.1: 0.0884, 10: 0.0873), Q4_K_M 0.0381 (0.1: 0.0396)
DAMP = 1.0
ROUNDS = 0  # more rounds of GPTQ on the refitted grid + refit: on SmolLM2 within 1 % either way, at 1.6x the time
RIDGE = 1e-4  # relative pull of the refit toward the fitted scales (a block the codes leave undetermined stays)


def damped(hessian: mx.array, damp: float = DAMP) -> np.ndarray:
    """H + damp * mean(diag H) * I as float64 (the objective GPTQ minimises), dead channels kept at zero."""
    h = np.asarray(hessian.astype(mx.float32), np.float64)
    return h + np.eye(h.shape[0]) * damp * np.mean(np.diagonal(h))


def row_errors(w: np.ndarray, wq: np.ndarray, h: np.ndarray) -> np.ndarray:
    """tr per row: (w - wq)_r H (w - wq)_r^T, [rows]."""
    e = (np.asarray(w, np.float64) - wq).astype(np.float64)
    return np.einsum("rc,rc->r", e @ h, e)


def choose_codes(w: np.ndarray, hessian: mx.array, kind: str, importance: np.ndarray | None = None,
                 damp: float = DAMP, rounds: int = ROUNDS) -> np.ndarray:
    """w [rows, cols] float32 -> the GGUF bytes of `kind` [rows, cols / block * size] with codes and block scales
    chosen against the Hessian (see the module doc)."""
    codec = CODECS[kind]
    if codec.levels is not None:  # GPTQ's error feedback rounds onto an evenly spaced grid: ggml's fit instead
        return encode(w, kind, importance)
    w = np.asarray(w, np.float32)
    rows, cols = w.shape
    u = inverse_hessian_factor(hessian, damp)
    mx.eval(u)
    h = damped(hessian, damp)
    qw = None if importance is None else np.asarray(importance, np.float32)
    out = np.empty((rows, cols // codec.block * codec.size), np.uint8)
    step = max(1, CHUNK_ELEMENTS // cols)
    for r in range(0, rows, step):
        out[r : r + step] = _choose_chunk(w[r : r + step], u, h, codec, qw, rounds)
    return out


def _choose_chunk(w: np.ndarray, u: mx.array, h: np.ndarray, codec: Codec, qw: np.ndarray | None,
                  rounds: int) -> np.ndarray:
    candidates = [encode(w, codec.name, qw)]
    fits, codes = _gptq(w, u, codec, qw)
    for i in range(rounds + 1):
        fits = _refit(codec, fits, codes, w, h)
        candidates.append(_pack(codec, fits, codes))
        if i < rounds:
            codes = _gptq_fixed(w, u, codec, *_grid(codec, fits))
    errors = np.stack([row_errors(w, _decode(c, codec), h) for c in candidates])
    best = np.argmin(errors, axis=0)  # the first (ggml's fit) on ties
    return np.stack(candidates)[best, np.arange(w.shape[0])]


# ------------------------------------------------------------------------------------------------ pieces
def _decode(data: np.ndarray, codec: Codec) -> np.ndarray:
    return np.asarray(dequantize(mx.array(data), codec.name))


def _pack(codec: Codec, fits: list[Fit], codes: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([codec.pack(f, c) for f, c in zip(fits, codes, strict=True)], axis=1)


def _sigma2(codec: Codec, w: np.ndarray, qw: np.ndarray | None) -> np.ndarray | None:
    """ggml's legacy types weight by the row's mean square (of the original row here)."""
    return codec.row_stat * (w * w).mean(axis=1) if qw is not None and codec.row_stat else None


def _fit_block(codec: Codec, x: np.ndarray, qw: np.ndarray | None, col: int, sigma2: np.ndarray | None) -> Fit:
    """ggml's (importance-weighted) fit of one block column x [rows, block] starting at column `col`."""
    q = None if qw is None or not codec.weighted else np.broadcast_to(qw[col : col + codec.block], x.shape)
    with np.errstate(all="ignore"):
        return codec.fit(np.ascontiguousarray(x, np.float32), q, None if q is None else sigma2)


def _gptq(w: np.ndarray, u: mx.array, codec: Codec, qw: np.ndarray | None) -> tuple[list[Fit], list[np.ndarray]]:
    """GPTQ with each block's scales fitted (importance-weighted, ggml's search) when the block is reached."""
    n, sigma2 = w.shape[0], _sigma2(codec, w, qw)

    def fit(group: mx.array, col: int):
        found = _fit_block(codec, np.array(group), qw, col, sigma2)
        spread = lambda a: mx.array(np.repeat(a.reshape(n, -1), codec.sub, axis=1))  # noqa: E731
        return spread(found.scale), spread(found.bias), found

    done = error_feedback(mx.array(w), u, codec.block, codec.nmax, fit)
    return [f for f, _ in done], [np.array(c).astype(np.int32) for _, c in done]


def _gptq_fixed(w: np.ndarray, u: mx.array, codec: Codec, scale: np.ndarray, bias: np.ndarray) -> list[np.ndarray]:
    """GPTQ on a fixed grid: scale, bias [rows, cols] per weight."""
    s, b = mx.array(scale), mx.array(bias)

    def fit(group: mx.array, col: int):
        return s[:, col : col + codec.block], b[:, col : col + codec.block], None

    done = error_feedback(mx.array(w), u, codec.block, codec.nmax, fit)
    return [np.array(c).astype(np.int32) for _, c in done]


def _with(fit: Fit, values: dict[str, np.ndarray]) -> Fit:
    return replace(fit, header={**fit.header, **values})


def _grid(codec: Codec, fits: list[Fit]) -> tuple[np.ndarray, np.ndarray]:
    """(scale, bias) per weight [rows, cols] of the stored grid (float16 scales as llama.cpp reads them): the
    decoded value of code q is scale * q + bias."""
    zeros = [np.zeros((len(f.header["d"]), codec.block), np.int32) for f in fits]
    bias = _decode(_pack(codec, fits, zeros), codec)
    scale = _decode(_pack(codec, fits, [z + 1 for z in zeros]), codec) - bias
    return scale, bias


REFIT_ROWS = 256  # rows per least-squares batch (bounds the [rows, params, cols] working array)


def _refit(codec: Codec, fits: list[Fit], codes: list[np.ndarray], w: np.ndarray, h: np.ndarray) -> list[Fit]:
    """Least-squares block scales for fixed codes: W^ = sum_(k, j) theta_kj M_kj over the header's scale fields k
    of every block j of a row, minimising (w - W^) H (w - W^)^T per row (with a slight ridge toward the fitted
    scales, so a block whose codes leave a field undetermined keeps it)."""
    keys = [k for k in SCALE_KEYS if k in fits[0].header]
    n, nb, block, nk = w.shape[0], len(fits), codec.block, len(keys)
    basis = np.empty((n, nk, nb, block))  # M_kj on block j's columns
    for i, key in enumerate(keys):
        unit = [_with(f, {k: np.full(n, float(k == key), np.float32) for k in keys}) for f in fits]
        basis[:, i] = _decode(_pack(codec, unit, codes), codec).reshape(n, nb, block)
    theta0 = np.stack([np.stack([f.header[k] for f in fits], axis=1) for k in keys], axis=1).astype(np.float64)
    hb = mx.array(h.reshape(nb, block, nb * block).astype(np.float32))
    theta = np.empty_like(theta0)
    for r in range(0, n, REFIT_ROWS):
        m = basis[r : r + REFIT_ROWS]
        rn = m.shape[0]
        # q[j, (row, k), cols] = M_kj @ H[block j's rows, :] (float32 in MLX: the one big product)
        q = mx.matmul(mx.array(m.transpose(2, 0, 1, 3).reshape(nb, rn * nk, block).astype(np.float32)), hb)
        q = np.asarray(q, np.float64).reshape(nb, rn, nk, nb, block)
        gram = np.einsum("jnkJb,nKJb->nkjKJ", q, m).reshape(rn, nk * nb, nk * nb)
        rhs = np.einsum("jnkc,nc->nkj", q.reshape(nb, rn, nk, nb * block), w[r : r + REFIT_ROWS].astype(np.float64))
        t0 = theta0[r : r + REFIT_ROWS].reshape(rn, -1)
        diag = np.einsum("npp->np", gram)
        lam = RIDGE * diag + 1e-12 * diag.mean(axis=1, keepdims=True) + 1e-300
        a = gram + lam[:, :, None] * np.eye(nk * nb)
        with np.errstate(all="ignore"):
            t = np.linalg.solve(a, (rhs.reshape(rn, -1) + lam * t0)[..., None])[..., 0]
        theta[r : r + REFIT_ROWS] = np.where(np.isfinite(t), t, t0).reshape(rn, nk, nb)
    theta = theta.astype(np.float32)
    return [_with(f, {k: theta[:, i, j] for i, k in enumerate(keys)}) for j, f in enumerate(fits)]
