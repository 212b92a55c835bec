"""The generate loop: chunked prefill, then decode with the next step queued before the current token
is handed out (MLX's async eval), so Python overhead hides behind compute."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from mlxq.engine.sampling import LogitsProcessor, SamplingParams, make_sampler, penalty_processors

PREFILL_CHUNK = 512


@dataclass
class StepOutput:
    token: int
    logprobs: mx.array | None = None  # [V] log-probabilities the token was drawn from, when asked for


@dataclass
class Timings:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    first_token_s: float = 0.0
    experts: dict | None = None  # streamed experts' counters for this run (mlxq.experts.ExpertStats.as_dict())

    @property
    def prefill_tps(self) -> float:
        return (self.prompt_tokens - self.cached_tokens) / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        return (self.generated_tokens - 1) / self.decode_s if self.decode_s and self.generated_tokens > 1 else 0.0


def prefill(model: nn.Module, tokens: list[int], cache: list, chunk: int = PREFILL_CHUNK) -> mx.array:
    """Runs all but nothing-left of `tokens` through the model in chunks; returns the last logits [1, V]."""
    if not tokens:
        raise ValueError("prefill needs at least one token")
    for start in range(0, len(tokens) - 1, chunk):
        end = min(start + chunk, len(tokens) - 1)
        model(mx.array(tokens[start:end])[None], cache)
        mx.eval([c.state for c in cache])
    return model(mx.array(tokens[-1:])[None], cache)[:, -1, :]


@dataclass
class Generation:
    """One sequence being generated: its cache, sampler and processors."""

    model: nn.Module
    cache: list
    params: SamplingParams = field(default_factory=SamplingParams)
    processors: list[LogitsProcessor] = field(default_factory=list)
    want_logprobs: bool = False
    timings: Timings = field(default_factory=Timings)
    fed: list = field(default_factory=list)  # tokens now in the cache, in order (see fed_tokens)
    generated: list[int] = field(default_factory=list)

    def steps(self, prompt: list[int], max_tokens: int, cached: int = 0) -> Iterator[StepOutput]:
        """Yields generated tokens; `prompt[:cached]` is already in the cache."""
        sampler = make_sampler(self.params)
        procs = penalty_processors(self.params) + self.processors
        generated = self.generated = []
        t0 = time.perf_counter()
        self.timings.prompt_tokens, self.timings.cached_tokens = len(prompt), cached
        if max_tokens <= 0:
            return
        logits = prefill(self.model, prompt[cached:], self.cache)
        self.fed = list(prompt)

        def pick(logits: mx.array) -> tuple[mx.array, mx.array]:
            logits = logits.astype(mx.float32)
            for proc in procs:
                logits = proc(generated, logits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            return sampler(logprobs), logprobs

        token, logprobs = pick(logits)
        mx.async_eval(token, logprobs)
        t_decode = None
        # Processors read the tokens so far on the host, so they force one sync per step.
        pipelined = not procs
        for n in range(max_tokens):
            if pipelined and n + 1 < max_tokens:
                next_token, next_logprobs = self._advance(token, pick)
            tok = token.item()
            if t_decode is None:
                t_decode = time.perf_counter()
                self.timings.prefill_s = self.timings.first_token_s = t_decode - t0
            generated.append(tok)
            self.timings.generated_tokens = n + 1
            self.timings.decode_s = time.perf_counter() - t_decode
            yield StepOutput(tok, logprobs[0] if self.want_logprobs else None)
            if n + 1 >= max_tokens:
                break
            if not pipelined:
                next_token, next_logprobs = self._advance(token, pick)
            token, logprobs = next_token, next_logprobs

    def _advance(self, token: mx.array, pick) -> tuple[mx.array, mx.array]:
        """Queues the model step on `token`; the result is computed in the background."""
        next_token, next_logprobs = pick(self.model(token[:, None], self.cache)[:, -1, :])
        mx.async_eval(next_token, next_logprobs)
        self.fed.append(token)  # an mx scalar until read; `fed_tokens()` resolves
        return next_token, next_logprobs

    def fed_tokens(self) -> list[int]:
        return [t if isinstance(t, int) else t.item() for t in self.fed]
