"""Hessian-aware GGUF codes (`--method gptq`): on a random layer with a random, correlated Hessian, the codes and
scales chosen against the Hessian give a lower H-weighted output error than ggml's importance-weighted search (what
`--method imatrix` and `llama-quantize --imatrix` write), row by row, in bytes gguf-py decodes."""

from __future__ import annotations

import gguf
import mlx.core as mx
import numpy as np
import pytest

from mlxq.formats.gguf import calibrated
from mlxq.formats.gguf.codecs import encode

KINDS = ["Q4_0", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def layer(seed: int, rows: int = 48, cols: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Weights with per-row scales, and H = E[x x^T] of inputs with correlated channels of very different sizes
    (as real activations have), from fewer tokens than a well-conditioned estimate would want."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * np.exp(0.5 * rng.standard_normal((rows, 1)))).astype(np.float32)
    mix = rng.standard_normal((cols, cols)) / np.sqrt(cols) + np.eye(cols)
    x = (rng.standard_normal((4 * cols, cols)) @ mix) * np.exp(rng.standard_normal(cols))
    return w, (x.T @ x / len(x)).astype(np.float32)


LIGHT = 0.1  # damping for the comparison: the default's heavier damping (chosen end to end) blurs H toward I


def errors(w: np.ndarray, data: np.ndarray, kind: str, h: np.ndarray, damp: float = LIGHT) -> np.ndarray:
    wq = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind]).reshape(w.shape)
    return calibrated.row_errors(w, wq, calibrated.damped(mx.array(h), damp))


@pytest.mark.parametrize("kind", KINDS)
def test_lower_hessian_weighted_error_than_the_importance_search(kind):
    w, h = layer(0)
    importance = np.diagonal(h).copy()
    ours = calibrated.choose_codes(w, mx.array(h), kind, importance, damp=LIGHT)
    theirs = encode(w, kind, importance)
    assert ours.shape == theirs.shape and ours.dtype == np.uint8
    mine, ggml = errors(w, ours, kind, h), errors(w, theirs, kind, h)
    assert np.all(mine <= ggml * (1 + 1e-6)), (mine / ggml).max()  # each row keeps its best candidate
    assert mine.sum() < 0.9 * ggml.sum(), mine.sum() / ggml.sum()  # measured: 0.82-0.84 K-quants, lower legacy


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_K", "Q3_K"])
def test_refit_lowers_the_error_of_fixed_codes(kind):
    """The least-squares block scales, codes held fixed, never do worse than the fitted ones (float16 aside)."""
    w, h = layer(1, rows=16)
    codec = calibrated.CODECS[kind]
    u = calibrated.inverse_hessian_factor(mx.array(h), LIGHT)
    fits, codes = calibrated._gptq(w, u, codec, np.diagonal(h).copy())
    hd = calibrated.damped(mx.array(h), LIGHT)
    before = errors(w, calibrated._pack(codec, fits, codes), kind, h)
    after = errors(w, calibrated._pack(codec, calibrated._refit(codec, fits, codes, w, hd), codes), kind, h)
    assert np.all(after <= before * 1.001) and after.sum() < before.sum(), (after / before)
