"""Sampling parameters, logits processors and the token sampler: every row of a step drawn in one pass, in MLX."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import mlx.core as mx

from mlxq.errors import InvalidRequest

# (generated-so-far token ids, logits [1, V]) -> logits [1, V]
LogitsProcessor = Callable[[list[int], mx.array], mx.array]


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, "temperature: must be >= 0"),
            (0 < self.top_p <= 1, "top_p: must be in (0, 1]"),
            (self.top_k >= 0, "top_k: must be >= 0"),
            (0 <= self.min_p <= 1, "min_p: must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty: must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InvalidRequest(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_logit_bias(bias: dict[int, float], vocab: int) -> None:
    """A bias on an id outside the vocabulary is the caller's mistake (a wrong tokenizer's id): named, not ignored."""
    bad = next((t for t in bias if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidRequest(f"logit_bias: token id {bad} is outside the vocabulary (0..{vocab - 1})")


def penalize(logits: mx.array, params: Sequence[SamplingParams], generated: Sequence[list[int]],
             context: int = 64) -> mx.array:
    """Logits [B, V] (float32) after every row's logit bias, repetition penalty (multiplicative, over the row's last
    `context` generated tokens) and presence/frequency penalties (additive, over everything it generated), in that
    order, each one scatter over all the rows that ask for it: row b with params[b], having generated
    generated[b]. Each logit gets the same float32 operations as it would alone. A biased id outside the
    vocabulary (nothing could sample it) is left out: scattered, it would land in another row."""
    vocab = logits.shape[-1]
    bias = [(b, t, v) for b, p in enumerate(params) for t, v in p.logit_bias.items() if 0 <= t < vocab]
    if bias:
        rows, ids, vals = zip(*bias, strict=True)
        logits = logits.at[mx.array(rows), mx.array(ids)].add(mx.array(vals, dtype=mx.float32))
    repeated = [(b, t, p.repetition_penalty) for b, (p, toks) in enumerate(zip(params, generated, strict=True))
                if p.repetition_penalty != 1.0 for t in sorted(set(toks[-context:]))]
    if repeated:
        rows, ids, factor = (mx.array(x) for x in zip(*repeated, strict=True))
        factor = factor.astype(mx.float32)
        sel = logits[rows, ids]
        logits[rows, ids] = mx.where(sel < 0, sel * factor, sel / factor)
    counted = [(b, t, n, p.presence_penalty, p.frequency_penalty)
               for b, (p, toks) in enumerate(zip(params, generated, strict=True))
               if p.presence_penalty or p.frequency_penalty for t, n in Counter(toks).items()]
    if counted:
        rows, ids, n, presence, frequency = (mx.array(x) for x in zip(*counted, strict=True))
        f32 = mx.float32
        logits = logits.at[rows, ids].add(-(presence.astype(f32) + frequency.astype(f32) * n.astype(f32)))
    return logits


class Sampler:
    """One request's sampling settings and its random stream. Tokens are drawn for many rows at once (`draw`,
    `propose`); calling a sampler draws for its row alone, by the same code.

    The stream is counter-based: the n-th draw of a request reads uniforms made from (seed, n) alone, so a seeded
    request gets the same tokens whichever other requests share its batch. Without a seed, the seed comes from MLX's
    global generator (`seeded`)."""

    def __init__(self, p: SamplingParams):
        self.p = p
        p = seeded(p)
        self.seed = p.seed % (1 << 64) if p.seed is not None else 0  # any int seeds (OpenAI's may be < 0)
        self.draws = 0

    def __call__(self, logprobs: mx.array) -> mx.array:
        return draw([self], logprobs)

    def verify(self, logprobs: mx.array, draft: int, q: mx.array | None = None) -> mx.array:
        return draw([self], logprobs, [draft], [q])

    def propose(self, logprobs: mx.array) -> tuple[mx.array, mx.array | None]:
        tokens, qs = propose([self], logprobs)
        return tokens, qs[0]

    def uniforms(self) -> tuple[float, float]:
        """The next draw's two uniforms in [0, 1), each exact in float32."""
        n, self.draws = self.draws, self.draws + 1
        a = _splitmix64(self.seed ^ _splitmix64(2 * n))
        b = _splitmix64(self.seed ^ _splitmix64(2 * n + 1))
        return (a >> 40) * 2.0**-24, (b >> 40) * 2.0**-24


def draw(samplers: Sequence[Sampler], logits: mx.array, drafts: Sequence[int | None] | None = None,
         qs: Sequence[mx.array | None] | None = None) -> mx.array:
    """Tokens [B] (lazy) for the rows of `logits` [B, V] (logprobs, or anything that differs from them by a constant
    per row: nothing here needs them normalised), row b with `samplers[b]`: greedy rows the argmax, the
    others drawn at their temperature after their filters, composed in the usual order: top-k, top-p, min-p.

    Row b with a speculative draft token `drafts[b]` gets a token distributed exactly as without one, that is the
    draft as often as possible, given that the draft was drawn from qs[b] [1, V] (None: read from the text, as
    certain as if q were all on it). Rejection sampling: keep the draft with probability min(1, p(draft) /
    q(draft)), else draw from max(0, p - q) renormalised; together each token t comes with probability min(p(t),
    q(t)) + max(0, p(t) - q(t)) = p(t). A greedy row gets the argmax, which the caller compares with the draft."""
    return _draw(samplers, logits, drafts, qs)[0]


def propose(samplers: Sequence[Sampler], logits: mx.array) -> tuple[mx.array, list[mx.array | None]]:
    """Draft tokens [B] from a draft model's logits [B, V], each with the distribution q [1, V] it was drawn from:
    the same temperature and filters as the model's own tokens get (greedy: the argmax, and no q)."""
    tokens, probs, sampled = _draw(samplers, logits)
    row = {b: i for i, b in enumerate(sampled)}
    return tokens, [probs[row[b] : row[b] + 1] if b in row else None for b in range(len(samplers))]


def _draw(samplers: Sequence[Sampler], logits: mx.array, drafts: Sequence[int | None] | None = None,
          qs: Sequence[mx.array | None] | None = None) -> tuple[mx.array, mx.array | None, list[int]]:
    """`draw`, also returning the sampled rows' filtered distributions p [S, V] and which rows those are. A row's
    token is read off the cumulative distribution at its uniform (inverse transform): one uniform a row, not one a
    vocabulary entry."""
    greedy = mx.argmax(logits, axis=-1).astype(mx.int32)
    sampled = [b for b, s in enumerate(samplers) if not s.p.greedy]
    if not sampled:
        return greedy, None, sampled
    rows = sampled if len(sampled) < len(samplers) else None
    p = mx.softmax(_scores([samplers[b].p for b in sampled], logits if rows is None else logits[mx.array(rows)]),
                   axis=-1)
    u = mx.array([samplers[b].uniforms() for b in sampled], dtype=mx.float32)  # [S, 2]: keep the draft? / draw
    d = [drafts[b] if drafts is not None and drafts[b] is not None else -1 for b in sampled]
    weights, keep = p, None
    if max(d) >= 0:
        vocab = p.shape[-1]
        col = mx.array(d, dtype=mx.int32)[:, None]
        q = (mx.arange(vocab)[None] == col).astype(p.dtype)  # a draft read from the text; none: q = 0, w = p
        given = [i for i, b in enumerate(sampled) if qs is not None and qs[b] is not None]
        if given:
            q[mx.array(given)] = mx.concatenate([qs[sampled[i]] for i in given]).astype(p.dtype)
        at = mx.maximum(col, 0)
        keep = (col >= 0) & (u[:, :1] * mx.take_along_axis(q, at, axis=-1) < mx.take_along_axis(p, at, axis=-1))
        weights = mx.maximum(p - q, 0.0)
    cdf = mx.cumsum(weights, axis=-1)
    below = mx.minimum(mx.sum(cdf <= u[:, 1:] * cdf[:, -1:], axis=-1), weights.shape[-1] - 1).astype(mx.int32)
    # rounding may put the target past the last token with weight (about once in 2^24 draws): never pick one that
    # the filters removed
    live = mx.take_along_axis(weights, below[:, None], axis=-1)[:, 0] > 0
    tokens = mx.where(live, below, mx.argmax(weights, axis=-1).astype(mx.int32))
    if keep is not None:
        tokens = mx.where(keep[:, 0], col[:, 0], tokens)
    if rows is None:
        return tokens, p, sampled
    greedy[mx.array(rows)] = tokens
    return greedy, p, sampled


def _scores(params: list[SamplingParams], logits: mx.array) -> mx.array:
    """Logits [S, V] at each row's temperature, with what its filters remove at -inf; a filter a row does not use
    leaves it as it is."""
    vocab = logits.shape[-1]
    # shifted so each row's best score is 0, at a temperature no smaller than float32's least normal number: a
    # temperature that is tiny (or 0 once in float32) then gives the argmax's distribution, not NaN (inf/inf, 0/0)
    temperature = mx.array([[max(p.temperature, _LEAST_NORMAL)] for p in params], dtype=logits.dtype)
    scores = (logits - mx.max(logits, axis=-1, keepdims=True)) / temperature
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(top_k):  # index 0 of the sorted row: the smallest score, which removes nothing
        kth = mx.take_along_axis(mx.sort(scores, axis=-1), mx.array([[vocab - k if k else 0] for k in top_k]), axis=-1)
        scores = mx.where(scores < kth, -mx.inf, scores)
    if any(p.top_p < 1.0 for p in params):
        order = mx.argsort(-scores, axis=-1)
        sorted_scores = mx.take_along_axis(scores, order, axis=-1)
        probs = mx.softmax(sorted_scores, axis=-1)
        before = mx.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        top_p = mx.array([[p.top_p if p.top_p < 1.0 else mx.inf] for p in params], dtype=probs.dtype)
        sorted_scores = mx.where(before >= top_p, -mx.inf, sorted_scores)
        scores = mx.put_along_axis(scores, order, sorted_scores, axis=-1)
    if any(p.min_p > 0 for p in params):
        floor = mx.array([[math.log(p.min_p) if p.min_p > 0 else -mx.inf] for p in params], dtype=scores.dtype)
        scores = mx.where(scores < mx.max(scores, axis=-1, keepdims=True) + floor, -mx.inf, scores)
    return scores


_LEAST_NORMAL = 2.0**-126  # float32
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """A 64-bit mix with every input bit reaching every output bit (SplitMix64's finaliser)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seeded(p: SamplingParams) -> SamplingParams:
    """`p` with a seed: its own, or a 62-bit one from MLX's global generator, so `mx.random.seed(s)` makes unseeded
    sampling repeat, as users of mlx-lm expect. Greedy settings never read their stream: they are left as they are,
    and leave MLX's generator alone."""
    if p.seed is not None or p.greedy:
        return p
    hi, lo = mx.random.randint(0, (1 << 31) - 1, (2,)).tolist()
    return replace(p, seed=hi << 31 | lo)


def make_sampler(p: SamplingParams) -> Sampler:
    return Sampler(p)
