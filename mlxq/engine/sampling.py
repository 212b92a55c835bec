"""Sampling parameters, logits processors and the token sampler, all in MLX (no per-token host sync)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

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


def penalty_processors(p: SamplingParams, context: int = 64) -> list[LogitsProcessor]:
    """Repetition (multiplicative, over the last `context` tokens), presence/frequency (additive, over
    everything generated) and logit bias."""
    procs: list[LogitsProcessor] = []
    if p.logit_bias:
        ids = mx.array(list(p.logit_bias.keys()))
        vals = mx.array(list(p.logit_bias.values()), dtype=mx.float32)
        procs.append(lambda _, logits: logits.at[:, ids].add(vals))
    if p.repetition_penalty != 1.0:
        def repetition(tokens: list[int], logits: mx.array) -> mx.array:
            if not tokens:
                return logits
            ids = mx.array(sorted(set(tokens[-context:])))
            sel = logits[:, ids]
            sel = mx.where(sel < 0, sel * p.repetition_penalty, sel / p.repetition_penalty)
            logits[:, ids] = sel
            return logits
        procs.append(repetition)
    if p.presence_penalty or p.frequency_penalty:
        def presence_frequency(tokens: list[int], logits: mx.array) -> mx.array:
            if not tokens:
                return logits
            counts: dict[int, int] = {}
            for t in tokens:
                counts[t] = counts.get(t, 0) + 1
            ids = mx.array(list(counts))
            n = mx.array(list(counts.values()), dtype=mx.float32)
            return logits.at[:, ids].add(-(p.presence_penalty + p.frequency_penalty * n))
        procs.append(presence_frequency)
    return procs


class Sampler:
    """logprobs [1, V] -> token [1]: greedy, or sampled at `temperature` after the filters, composed in the usual
    order: top-k, top-p, min-p. `verify` is the same draw given a speculative draft token (rejection sampling)."""

    def __init__(self, p: SamplingParams):
        self.p = p
        # any int seeds (OpenAI's may be < 0)
        self._key = mx.random.key(p.seed % (1 << 64)) if p.seed is not None else None

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self.p.greedy:
            return mx.argmax(logprobs, axis=-1)
        return mx.random.categorical(self._scores(logprobs), key=self._next_key())

    def verify(self, logprobs: mx.array, draft: int, q: mx.array | None = None) -> mx.array:
        """A token distributed exactly as `self(logprobs)` would be, that is `draft` as often as possible, given that
        the draft was drawn from q [1, V] (None: a draft read from the text, as certain as if q were all on it).
        Rejection sampling: keep the draft with probability min(1, p(draft) / q(draft)), else draw from
        max(0, p - q) renormalised. Together each token t comes with probability min(p(t), q(t)) + max(0, p(t) -
        q(t)) = p(t). Greedy: the argmax, which the caller compares with the draft."""
        if self.p.greedy:
            return mx.argmax(logprobs, axis=-1)
        p = mx.softmax(self._scores(logprobs), axis=-1)
        if q is None:
            q = (mx.arange(p.shape[-1]) == draft)[None].astype(p.dtype)
        u = mx.random.uniform(shape=(1,), key=self._next_key())
        keep = u * q[:, draft] < p[:, draft]
        other = mx.random.categorical(mx.log(mx.maximum(p - q, 0.0)), key=self._next_key())
        return mx.where(keep, mx.array([draft], dtype=other.dtype), other)

    def propose(self, logprobs: mx.array) -> tuple[mx.array, mx.array | None]:
        """A draft token from a draft model's logprobs [1, V], and the distribution q it was drawn from: the same
        temperature and filters as the model's tokens get (greedy: the argmax, and no q)."""
        if self.p.greedy:
            return mx.argmax(logprobs, axis=-1), None
        scores = self._scores(logprobs)
        return mx.random.categorical(scores, key=self._next_key()), mx.softmax(scores, axis=-1)

    def _scores(self, logprobs: mx.array) -> mx.array:
        p = self.p
        scores = logprobs / p.temperature
        if p.top_k and p.top_k < scores.shape[-1]:
            kth = mx.sort(scores, axis=-1)[:, -p.top_k][:, None]
            scores = mx.where(scores < kth, -mx.inf, scores)
        if p.top_p < 1.0:
            order = mx.argsort(-scores, axis=-1)
            sorted_scores = mx.take_along_axis(scores, order, axis=-1)
            probs = mx.softmax(sorted_scores, axis=-1)
            before = mx.cumsum(probs, axis=-1) - probs  # mass strictly above each token
            sorted_scores = mx.where(before >= p.top_p, -mx.inf, sorted_scores)
            scores = mx.put_along_axis(scores, order, sorted_scores, axis=-1)
        if p.min_p > 0:
            top = mx.max(scores, axis=-1, keepdims=True)
            scores = mx.where(scores < top + math.log(p.min_p), -mx.inf, scores)
        return scores

    def _next_key(self) -> mx.array | None:
        if self._key is None:
            return None
        self._key, sub = mx.random.split(self._key)
        return sub


def make_sampler(p: SamplingParams) -> Sampler:
    return Sampler(p)
