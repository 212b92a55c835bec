"""The gated delta rule (Gated DeltaNet's recurrence), behind one function with a backend switch.

Per value head, with a state S [Dv, Dk], a log-decay g <= 0 and a write strength beta in (0, 1):

    S_t = exp(g_t) S_{t-1} + beta_t (v_t - exp(g_t) S_{t-1} k_t) k_t^T        y_t = S_t q_t

Two pure-MLX paths compute it and run on every MLX backend:

- "step": the recurrence token by token; what decode uses (one token per call).
- "chunked": the WY / UT-transform chunk form of flash-linear-attention. Within a chunk of C tokens the
  work is matmuls; only the state is carried from chunk to chunk, so a prompt of T tokens takes T / C
  sequential steps instead of T.

Kernels (Metal, CUDA) register themselves with `register_backend` and are picked by name or by "auto",
so model code never changes when they arrive.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import mlx.core as mx

from mlxq.errors import ConfigError
from mlxq.kernels import metal
from mlxq.kernels.activations import exp

DEFAULT_CHUNK = 64
STEP_MAX_TOKENS = 4  # "auto" runs the step path up to this many tokens, the chunked path beyond

Backend = Callable[..., tuple[mx.array, mx.array]]
_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, fn: Backend) -> None:
    """Adds a backend with `gated_delta_rule`'s signature (minus `mode`); "auto" prefers "metal" on Metal."""
    _BACKENDS[name] = fn


def backends() -> list[str]:
    return sorted(_BACKENDS)


def gated_delta_rule(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
    *,
    mode: str | None = None,
    chunk_size: int | None = None,
) -> tuple[mx.array, mx.array]:
    """y [B, T, Hv, Dv] (dtype of v) and the new state [B, Hv, Dv, Dk] (float32).

    q, k: [B, T, Hk, Dk], already L2-normalised (q also scaled); v: [B, T, Hv, Dv]; g, beta: [B, T, Hv];
    value head h reads key head h // (Hv / Hk). `mode`: "auto" (default, or $MLXQ_DELTANET), "step",
    "chunked", or a registered kernel such as "metal".
    """
    mode = mode or os.environ.get("MLXQ_DELTANET", "auto")
    if mode == "auto":
        if _ON_METAL and "metal" in _BACKENDS:
            mode = "metal"
        else:
            mode = "step" if q.shape[1] <= STEP_MAX_TOKENS else "chunked"
    if mode not in _BACKENDS:
        raise ConfigError(f"gated_delta_rule: backend '{mode}' is not available (have: {', '.join(backends())})")
    B, _, Hk, Dk = k.shape
    Hv, Dv = v.shape[2:]
    if Hv % Hk:
        raise ConfigError(f"gated_delta_rule: {Hv} value heads are not a multiple of {Hk} key heads")
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), mx.float32)
    if mode == "chunked":
        return _BACKENDS[mode](q, k, v, g, beta, state, chunk_size=chunk_size or DEFAULT_CHUNK)
    return _BACKENDS[mode](q, k, v, g, beta, state)


_ON_METAL = mx.metal.is_available()


# ----------------------------------------------------------------------------------------- step path
# Heads are kept as [B, Hk, r, ...] (r = Hv / Hk) so the r value heads sharing a key head broadcast
# against it instead of copying q and k r times.
@mx.compile
def _step(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, S: mx.array):
    """One token. q, k [B, Hk, 1, Dk]; v [B, Hk, r, Dv]; g, beta [B, Hk, r]; S [B, Hk, r, Dv, Dk].

    S is read once for both S k and S q (the output is rebuilt from them), then written once:
    y = S_t q = decay (S q) + delta (k . q), with delta = beta (v - decay (S k)).
    """
    decay = exp(g)[..., None]
    sk_sq = S @ mx.stack([k, q], axis=-1)  # [B, Hk, r, Dv, 2]
    delta = (v - decay * sk_sq[..., 0]) * beta[..., None]
    y = decay * sk_sq[..., 1] + delta * (k * q).sum(-1, keepdims=True)
    S = decay[..., None] * S + delta[..., None] * k[..., None, :]
    return y, S


def recurrent_gated_delta_rule(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
) -> tuple[mx.array, mx.array]:
    """The sequential recurrence (decode, and the oracle the chunked path is tested against)."""
    B, T, Hk, Dk = k.shape
    Hv, Dv = v.shape[2:]
    r = Hv // Hk
    dtype = v.dtype
    q, k = (x.astype(mx.float32).reshape(B, T, Hk, 1, Dk) for x in (q, k))
    v = v.astype(mx.float32).reshape(B, T, Hk, r, Dv)
    g, beta = (x.astype(mx.float32).reshape(B, T, Hk, r) for x in (g, beta))
    S = state.reshape(B, Hk, r, Dv, Dk)
    if T == 1:  # decode: no per-token slicing and stacking
        y, S = _step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], S)
        return y.reshape(B, 1, Hv, Dv).astype(dtype), S.reshape(B, Hv, Dv, Dk)
    ys = []
    for t in range(T):
        y, S = _step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S)
        ys.append(y)
    y = mx.stack(ys, axis=1).reshape(B, T, Hv, Dv)
    return y.astype(dtype), S.reshape(B, Hv, Dv, Dk)


# -------------------------------------------------------------------------------------- chunked path
def chunked_gated_delta_rule(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[mx.array, mx.array]:
    """The chunk form. Within a chunk, with cumulative log-decays c_i and D_ij = exp(c_i - c_j) (i >= j):

    T = (I + strict_lower(diag(beta) K K^T * D))^-1        (the UT transform)
    U = T (beta V),   W = T (beta exp(c) K)                 (pseudo-values and their state part)
    V'= U - W S^T                                           (what the chunk writes, given the state S)
    Y = (Q exp(c)) S^T + (Q K^T * D) V'
    S <- exp(c_C) S + V'^T (K exp(c_C - c))
    """
    C = chunk_size
    if C < 1 or C & (C - 1):
        raise ConfigError(f"gated_delta_rule: chunk size {C} is not a power of two")
    B, T, Hk, Dk = k.shape
    Hv, Dv = v.shape[2:]
    r = Hv // Hk
    dtype = v.dtype
    if T < C:  # a short prompt: one chunk of the next power of two
        C = 1 << max(T - 1, 0).bit_length()
    N = -(-T // C)
    pad = N * C - T

    # [B, T, H, ...] -> [B, Hk, r|1, N, C, ...]; padding (k = v = beta = g = 0) leaves the state unchanged
    def chunks(x, heads, feat):
        x = x.astype(mx.float32)
        if pad:
            x = mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        shape = (B, N, C, Hk, heads) + ((feat,) if feat else ())
        x = x.reshape(shape)
        return x.transpose(0, 3, 4, 1, 2, 5) if feat else x.transpose(0, 3, 4, 1, 2)

    q, k = chunks(q, 1, Dk), chunks(k, 1, Dk)
    v = chunks(v, r, Dv)
    g, beta = chunks(g, r, 0), chunks(beta, r, 0)

    c = mx.cumsum(g, axis=-1)  # [B, Hk, r, N, C]
    decay, strict = _decay_matrix(c, C)
    kk = k @ k.swapaxes(-1, -2)  # [B, Hk, 1, N, C, C]: shared by the r value heads of a key head
    qk = q @ k.swapaxes(-1, -2)
    T_inv = _unit_lower_inverse(mx.where(strict, beta[..., None] * kk * decay, 0.0))
    U = T_inv @ (beta[..., None] * v)  # [B, Hk, r, N, C, Dv]
    W = T_inv @ ((beta * exp(c))[..., None] * k)  # [B, Hk, r, N, C, Dk]
    last = c[..., -1:]
    k_out = exp(last - c)[..., None] * k  # keys as they sit in the state at the chunk's end
    chunk_decay = exp(last)[..., None]  # [B, Hk, r, N, 1, 1]

    q_in = exp(c)[..., None] * q  # queries as they read the state at the chunk's start
    attn = qk * decay
    S = state.astype(mx.float32).reshape(B, Hk, r, Dv, Dk)
    ys = []
    for n in range(N):
        at = (slice(None),) * 3 + (n,)
        y, S = _chunk_step(S, U[at], W[at], k_out[at], chunk_decay[at], q_in[at], attn[at])
        ys.append(y)
    y = mx.stack(ys, axis=3).transpose(0, 3, 4, 1, 2, 5).reshape(B, N * C, Hv, Dv)[:, :T]
    return y.astype(dtype), S.reshape(B, Hv, Dv, Dk)


@mx.compile
def _chunk_step(S, U, W, k_out, chunk_decay, q_in, attn):
    """One chunk given the state S at its start: its outputs and the state after it."""
    v_new = U - W @ S.swapaxes(-1, -2)  # [.., C, Dv]: what the chunk writes
    y = q_in @ S.swapaxes(-1, -2) + attn @ v_new
    return y, chunk_decay * S + v_new.swapaxes(-1, -2) @ k_out


def _decay_matrix(c: mx.array, C: int) -> tuple[mx.array, mx.array]:
    """D_ij = exp(c_i - c_j) on and below the diagonal, 0 above (masked before exp: c_i - c_j > 0 there),
    and the strictly-lower mask."""
    i = mx.arange(C)
    lower = i[:, None] >= i[None, :]
    diff = c[..., :, None] - c[..., None, :]
    return exp(mx.where(lower, diff, -mx.inf)), i[:, None] > i[None, :]


def _unit_lower_inverse(L: mx.array) -> mx.array:
    """(I + L)^-1 for strictly lower-triangular L [..., C, C], C a power of two.

    Block doubling, with no triangular solve (MLX has none on the GPU):
    inv([[A, 0], [X, B]]) = [[A^-1, 0], [-B^-1 X A^-1, B^-1]], from 1x1 blocks up in log2(C) rounds.
    """
    *batch, C, _ = L.shape
    inv = mx.ones((*batch, C, 1, 1), L.dtype)  # the inverses of the 1x1 diagonal blocks
    s = 1
    while s < C:
        n = C // (2 * s)
        blocks = mx.diagonal(L.reshape(*batch, n, 2 * s, n, 2 * s), axis1=-4, axis2=-2)  # [.., 2s, 2s, n]
        X = mx.moveaxis(blocks, -1, -3)[..., s:, :s]  # [.., n, s, s]
        A, Bi = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        top = mx.concatenate([A, mx.zeros_like(A)], axis=-1)
        bottom = mx.concatenate([-(Bi @ X @ A), Bi], axis=-1)
        inv = mx.concatenate([top, bottom], axis=-2)
        s *= 2
    return inv[..., 0, :, :]


# ---------------------------------------------------------------------------------------- Metal kernel
def step_launch(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array) -> metal.Launch:
    """The fused step kernel (`metal/deltanet.metal`) for the whole call: one simdgroup per state row, the
    row kept in registers across the T tokens."""
    B, T, Hk, Dk = k.shape
    Hv, Dv = v.shape[2:]
    rows_per_group = 4
    dims = mx.array([B, T, Hk, Hv, Dk, Dv], mx.int32)
    return metal.Launch(
        metal.kernels("deltanet.metal")["gated_delta_step"],
        [q, k, v, g, beta, state.astype(mx.float32), dims],
        [(B, T, Hv, Dv), (B, Hv, Dv, Dk)],
        [v.dtype, mx.float32],
        (32 * rows_per_group, -(-Dv // rows_per_group), B * Hv),
        (32 * rows_per_group, 1, 1),
        [("KP", -(-Dk // 32))],
    )


def metal_gated_delta_rule(q, k, v, g, beta, state):
    y, state = metal.run(step_launch(q, k, v, g, beta, state))
    return y, state


register_backend("step", recurrent_gated_delta_rule)
register_backend("chunked", chunked_gated_delta_rule)
if _ON_METAL:
    register_backend("metal", metal_gated_delta_rule)
