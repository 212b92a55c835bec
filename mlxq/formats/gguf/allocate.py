"""Sensitivity-driven types within a mix, at the mix's own size (`mlxq export --calibrate --method allocate`).

Why: on SmolLM2, quantizing one tensor class at a time with llama.cpp's own quantizer (the others Q8_0) and scoring
by llama-perplexity shows the KL is not spread like the weights' Hessian-weighted error, and adds up per class
(Q2_K's classes sum to 0.287 against 0.29 for the whole file). ffn_down in Q3_K adds 0.157 nats (54 % of Q2_K's
KL), in Q4_K 0.003; attn_v in Q4_0 0.053, in Q5_0 0.014; ffn_up in Q4_0 0.036; the tied embedding/head in Q5_0
0.025 (it sits in Q8_0 at 8.5 bits). Better codes within a type (GPTQ) cut the layer error, yet the KL stays,
because the error that matters is in a few tensors whose type is too coarse. So the bits are moved.

Status (measured by llama-perplexity on 8 x 512 held-back tokens; not the default yet): at Q3_K_M it moves the
embedding to Q5_0 and attn_q/k, ffn_gate/up to Q5_0, attn_v to Q8_0 (5.4535 bpw against llama.cpp's 5.4551) and
scores KL 0.0393 against llama.cpp+imatrix's 0.0927 (0.42); at Q4_K_M 0.0294 against 0.0346 (0.85, 6.1638 against
6.1655 bpw). At Q2_K it fails: the Fisher estimate does not see the
ffn_down cliff (Q3_K -> Q4_K is 50x in KL, a quadratic estimate gives about 4x) and is noisy tensor by tensor; it
put 14 of 30 ffn_down in Q2_K and scored 0.292 (4.81 bpw) against llama.cpp's 0.2916 (5.14 bpw).
The headroom is real: llama.cpp's own quantizer and imatrix with the types the per-class KL points to (embedding
Q5_0, ffn_down Q4_K, attn_v/ffn_up/ffn_gate Q5_0; 5.137 bpw) scores 0.083 against its Q2_K's 0.292 (5.139 bpw).
The allocation itself (`allocate`, the ladders) is what a measured-KL cost needs; the cost is what must change.

How: the diagonal of the empirical Fisher information F (squared gradients of the next-token loss on the
calibration text) weighs each candidate type's squared error, sum F (w - q(w))^2, which approximates twice the
KL the quantization adds (the Fisher is the KL's Hessian). Each tensor may move one step up or down its row
width's ladder from the mix's own type; the choice minimises the summed estimate with the file's quantized bits at
most the mix's (a Lagrangian greedy over the steps). Ladders hold the K-quants, or for rows that are not whole
256-blocks the symmetric legacy types llama.cpp falls back to (Q4_0, Q5_0, Q8_0): Q4_1/Q5_1 are left out because
they hold an affine-quantized source exactly and would win on a re-quantized checkpoint for the wrong reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxq.formats.gguf.codecs import bits_per_weight, encode
from mlxq.kernels import kquants

K_LADDER = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
LEGACY_LADDER = ("Q4_0", "Q5_0", "Q8_0")
FISHER_TOKENS = 2048  # of the calibration text, in sequences of FISHER_SEQ
FISHER_SEQ = 256
SAMPLED_ROWS = 512  # per tensor, to estimate each candidate's error


def ladder(kind: str, cols: int) -> tuple[str, ...] | None:
    """The types a tensor of `kind` with rows of `cols` may move along, or None when it stays (floats, ternary)."""
    rungs = K_LADDER if cols % 256 == 0 else LEGACY_LADDER if cols % 32 == 0 else ()
    return rungs if kind in rungs or kind in ("Q4_1", "Q5_1") else None


def steps(kind: str, cols: int) -> tuple[str, ...]:
    """`kind` and its neighbours on the ladder: the candidates, lowest first."""
    rungs = ladder(kind, cols)
    if rungs is None:
        return (kind,)
    at = rungs.index({"Q4_1": "Q4_0", "Q5_1": "Q5_0"}.get(kind, kind))
    near = rungs[max(at - 1, 0) : at + 2]
    return tuple(sorted({*near, kind}, key=bits_per_weight))


def fisher_diagonal(net: nn.Module, batches: list[list[int]], progress: Callable[[], None] = lambda: None
                    ) -> dict[str, mx.array]:
    """Sum over sequences of the squared gradient of each sequence's mean next-token loss, per parameter (names as
    the unfused model's, which are the checkpoint's)."""

    def loss(tokens: mx.array) -> mx.array:
        logits = net(tokens[None, :-1], net.make_cache())[0]
        return nn.losses.cross_entropy(logits, tokens[1:], reduction="mean")

    grad = nn.value_and_grad(net, loss)
    total: dict[str, mx.array] = {}
    for seq in batches:
        _, g = grad(mx.array(seq))
        for name, v in _flat(g):
            total[name] = total[name] + v * v if name in total else v * v
        mx.eval(total)
        progress()
    return total


def _flat(tree, prefix: str = ""):
    from mlx.utils import tree_flatten

    return tree_flatten(tree, prefix)


def dequantized(data: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """GGUF data of `kind` back to float32 weights of `shape`."""
    return np.asarray(kquants.dequantize(mx.array(np.ascontiguousarray(data)), kind)).reshape(shape)


def weighted_errors(w: np.ndarray, fisher: np.ndarray, kinds: tuple[str, ...], importance: np.ndarray | None,
                    rows: int = SAMPLED_ROWS) -> dict[str, float]:
    """sum F (w - q(w))^2 for each candidate type, the codes chosen by ggml's (importance-weighted) fits; estimated
    on at most `rows` evenly spaced rows (per expert), scaled to the whole tensor (an export encodes once, this
    once per candidate)."""
    n = w.shape[-2]
    if n > rows:
        pick = np.linspace(0, n - 1, rows).astype(np.int64)
        w, fisher = w[..., pick, :], fisher[..., pick, :]
        if importance is not None and importance.ndim == w.ndim and importance.shape[-2] == n:
            importance = importance[..., pick, :]
    scale = n / w.shape[-2]
    return {k: scale * float((fisher * (w - dequantized(encode(w, k, importance), k, w.shape)) ** 2).sum())
            for k in kinds}


@dataclass
class Choice:
    """One tensor's candidates: type -> (bits, estimated cost)."""

    name: str
    options: dict[str, tuple[float, float]]
    start: str  # the mix's own type


def allocate(choices: list[Choice]) -> dict[str, str]:
    """A type per tensor minimising the summed cost with total bits at most the mix's. Greedy on the lower convex
    hull of each tensor's (bits, cost) points: start every tensor at its cheapest type, then take upgrades in order
    of cost saved per bit while the budget allows."""
    budget = sum(c.options[c.start][0] for c in choices)
    pick, moves = {}, []
    for c in choices:
        pts = sorted(c.options.items(), key=lambda kv: kv[1][0])
        hull = [pts[0]]
        for p in pts[1:]:  # keep only upgrades that lower the cost, with falling savings per bit
            if p[1][1] >= hull[-1][1][1]:
                continue
            while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], p):
                hull.pop()
            hull.append(p)
        pick[c.name] = hull[0][0]
        moves += [(_slope(a, b), c.name, a[0], b[0], b[1][0] - a[1][0]) for a, b in zip(hull, hull[1:], strict=False)]
    used = sum(c.options[pick[c.name]][0] for c in choices)
    for _, name, frm, to, extra in sorted(moves, key=lambda m: -m[0]):
        if pick[name] == frm and used + extra <= budget:
            pick[name], used = to, used + extra
    start = {c.name: c.start for c in choices}  # feasible too: the greedy may only miss it on awkward sizes
    return pick if _total(choices, pick) <= _total(choices, start) else start


def _total(choices: list[Choice], pick: dict[str, str]) -> float:
    return sum(c.options[pick[c.name]][1] for c in choices)


def _slope(a, b) -> float:
    """Cost saved per extra bit going from point a to point b."""
    return (a[1][1] - b[1][1]) / max(b[1][0] - a[1][0], 1e-9)
