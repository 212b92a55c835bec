"""The gated delta rule: chunked == sequential, both == transformers' torch reference; the backend switch."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlxq.errors import ConfigError
from mlxq.kernels import deltanet
from mlxq.kernels.deltanet import gated_delta_rule, register_backend


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def inputs(T: int, B: int = 2, Hk: int = 2, Hv: int = 4, Dk: int = 16, Dv: int = 8, seed: int = 0):
    """What the model feeds the rule: unit keys, queries scaled by Dk^-0.5, log-decays <= 0, beta in (0, 1)."""
    mx.random.seed(seed)
    q, k = mx.random.normal((2, B, T, Hk, Dk))
    q = q / mx.linalg.norm(q, axis=-1, keepdims=True) * Dk**-0.5
    k = k / mx.linalg.norm(k, axis=-1, keepdims=True)
    v = mx.random.normal((B, T, Hv, Dv))
    g = -mx.exp(mx.random.normal((B, T, Hv)) - 1.0)
    beta = mx.sigmoid(mx.random.normal((B, T, Hv)))
    state = 0.3 * mx.random.normal((B, Hv, Dv, Dk))
    return q, k, v, g, beta, state


@pytest.mark.parametrize("T,chunk", [(64, 16), (70, 16), (100, 32), (37, 64), (5, 8), (1, 4)])
def test_chunked_equals_sequential(T, chunk):
    q, k, v, g, beta, state = inputs(T)
    y_seq, s_seq = gated_delta_rule(q, k, v, g, beta, state, mode="step")
    y_chk, s_chk = gated_delta_rule(q, k, v, g, beta, state, mode="chunked", chunk_size=chunk)
    assert rel(y_chk, y_seq) < 1e-5 and rel(s_chk, s_seq) < 1e-5


def test_strong_decay_and_saturated_writes_stay_finite():
    """Decays near 0 (exp(g) underflows within a chunk) and beta near 1 on repeated keys: the chunk form
    must not produce inf/nan where the recurrence does not. Saturated writes cost the fp32 chunk form some
    precision (transformers' own chunk path is off by 3e-5 at chunk 32 here, 1.6e-4 at 64), hence 1e-4."""
    q, k, v, g, beta, state = inputs(96, seed=1)
    g = mx.concatenate([g[:, :40] * 200.0, g[:, 40:]], axis=1)
    k = mx.concatenate([mx.broadcast_to(k[:, :1], (2, 48, 2, 16)), k[:, 48:]], axis=1)
    beta = mx.maximum(beta, 0.99)
    y_seq, s_seq = gated_delta_rule(q, k, v, g, beta, state, mode="step")
    y_chk, s_chk = gated_delta_rule(q, k, v, g, beta, state, mode="chunked", chunk_size=32)
    assert bool(mx.isfinite(y_chk).all())
    assert rel(y_chk, y_seq) < 1e-4 and rel(s_chk, s_seq) < 1e-5


def test_split_calls_equal_one_call():
    q, k, v, g, beta, state = inputs(90)
    y_all, s_all = gated_delta_rule(q, k, v, g, beta, state, mode="chunked", chunk_size=16)
    ys, s = [], state
    for a, b in [(0, 23), (23, 24), (24, 90)]:
        y, s = gated_delta_rule(
            q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], s, mode="chunked", chunk_size=16
        )
        ys.append(y)
    assert rel(mx.concatenate(ys, axis=1), y_all) < 1e-5 and rel(s, s_all) < 1e-5


@pytest.mark.parametrize("mode", ["step", "chunked"])
def test_matches_transformers_torch_reference(mode):
    """transformers' own recurrence (state [B, H, Dk, Dv], i.e. ours transposed) on the same inputs."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

    q, k, v, g, beta, state = inputs(50)
    t = [torch.from_numpy(np.array(x)) for x in (q, k, v, g, beta)]
    # transformers scales q by Dk^-0.5 itself
    y_ref, s_ref = torch_recurrent_gated_delta_rule(
        t[0] * 16**0.5,
        *t[1:],
        initial_state=torch.from_numpy(np.array(state).swapaxes(-1, -2)),
        output_final_state=True,
    )
    y, s = gated_delta_rule(q, k, v, g, beta, state, mode=mode, chunk_size=16)
    assert rel(y, y_ref.numpy()) < 1e-5 and rel(s, s_ref.numpy().swapaxes(-1, -2)) < 1e-5


def test_zero_state_is_the_default():
    q, k, v, g, beta, _ = inputs(9, B=1)
    y0, s0 = gated_delta_rule(q, k, v, g, beta, mx.zeros((1, 4, 8, 16)), mode="step")
    y1, s1 = gated_delta_rule(q, k, v, g, beta)
    assert rel(y1, y0) < 1e-5 and s1.dtype == mx.float32 and s1.shape == (1, 4, 8, 16)


def test_backend_switch(monkeypatch):
    calls = []

    def fake(q, k, v, g, beta, state):
        calls.append(q.shape[1])
        return deltanet.recurrent_gated_delta_rule(q, k, v, g, beta, state)

    monkeypatch.setattr(deltanet, "_BACKENDS", dict(deltanet._BACKENDS))
    register_backend("fake", fake)
    q, k, v, g, beta, state = inputs(6)
    y, _ = gated_delta_rule(q, k, v, g, beta, state, mode="fake")
    assert calls == [6] and rel(y, gated_delta_rule(q, k, v, g, beta, state, mode="step")[0]) < 1e-6
    monkeypatch.setenv("MLXQ_DELTANET", "fake")
    gated_delta_rule(q, k, v, g, beta, state)
    assert calls == [6, 6]
    with pytest.raises(ConfigError, match="backend 'metal' is not available"):
        gated_delta_rule(q, k, v, g, beta, state, mode="metal")


def test_auto_picks_step_for_decode_and_chunked_for_prefill(monkeypatch):
    seen = []
    monkeypatch.setattr(
        deltanet,
        "_BACKENDS",
        {
            "step": lambda *a: seen.append("step") or deltanet.recurrent_gated_delta_rule(*a),
            "chunked": lambda *a, **kw: seen.append("chunked") or deltanet.chunked_gated_delta_rule(*a, **kw),
        },
    )
    for T in (1, 200):
        gated_delta_rule(*inputs(T, B=1), mode="auto")
    assert seen == ["step", "chunked"]


def test_value_heads_must_be_a_multiple_of_key_heads():
    q, k, v, g, beta, _ = inputs(4, Hk=3, Hv=4)
    with pytest.raises(ConfigError, match="not a multiple"):
        gated_delta_rule(q, k, v, g, beta)
