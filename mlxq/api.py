"""The Python API: `mlxq.load(name) -> Model`, then generate, stream or score."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxq.engine.generate import Generation, Timings
from mlxq.engine.sampling import LogitsProcessor, SamplingParams
from mlxq.engine.stops import StopMatcher
from mlxq.engine.tokenizer import Tokenizer, load_tokenizer
from mlxq.errors import InvalidRequest
from mlxq.formats import Checkpoint
from mlxq.loading import load_model, open_for_run
from mlxq.session import Session  # noqa: F401  (re-exported: games use mlxq.api.Session)

Prompt = str | list[int] | list[dict[str, Any]]  # text, token ids, or chat messages


@dataclass
class Chunk:
    """A piece of streamed output."""

    text: str
    token: int | None = None
    finish_reason: str | None = None  # "stop" | "length" on the last chunk
    logprobs: mx.array | None = None


@dataclass
class Result:
    text: str
    tokens: list[int]
    finish_reason: str
    timings: Timings = field(default_factory=Timings)


class Model:
    """A loaded model with its tokenizer."""

    def __init__(self, net: nn.Module, tokenizer: Tokenizer, checkpoint: Checkpoint, name: str):
        self.net = net
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint
        self.name = name
        self.config = checkpoint.config

    # ---------------------------------------------------------------------------------------- scoring
    def logits(self, token_ids: list[int] | mx.array) -> mx.array:
        """Full-sequence logits, float32 [len, vocab], with a fresh cache."""
        tokens = mx.array(token_ids).reshape(1, -1)
        out = self.net(tokens, self.net.make_cache())
        return out[0].astype(mx.float32)

    def make_cache(self) -> list:
        return self.net.make_cache()

    def expert_stats(self):
        """Streaming counters so far (`mlxq.experts.ExpertStats`: hits, misses, bytes, read / stall / compute
        time; subtract two snapshots for one run), or None when the experts are not streamed."""
        pool = getattr(self.net, "expert_pool", None)
        return None if pool is None else pool.snapshot()

    # ---------------------------------------------------------------------------------------- prompts
    def encode_prompt(self, prompt: Prompt, *, tools: list[dict] | None = None,
                      chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if prompt and isinstance(prompt[0], int):
            return list(prompt)
        if prompt and isinstance(prompt[0], dict):
            return self.tokenizer.apply_chat_template(prompt, tools=tools, **(chat_template_kwargs or {}))
        raise InvalidRequest("prompt must be text, token ids, or a non-empty list of chat messages")

    # ---------------------------------------------------------------------------------------- generation
    def stream(
        self,
        prompt: Prompt,
        *,
        max_tokens: int = 256,
        stop: list[str] | str | None = None,
        params: SamplingParams | None = None,
        logits_processors: list[LogitsProcessor] | None = None,
        cache: list | None = None,
        cached_tokens: int = 0,
        logprobs: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict] | None = None,
        timings: Timings | None = None,
        generation: Generation | None = None,
        **sampling: Any,
    ) -> Iterator[Chunk]:
        """Yields text as it becomes final. Sampling options (temperature, top_p, top_k, min_p,
        repetition_penalty, seed, ...) go by keyword or as `params`."""
        ids = self.encode_prompt(prompt, tools=tools, chat_template_kwargs=chat_template_kwargs)
        stops = StopMatcher(stop)
        gen = generation or Generation(self.net, cache if cache is not None else self.make_cache())
        gen.params = params or SamplingParams(**sampling)
        gen.processors = list(logits_processors or [])
        gen.want_logprobs = logprobs
        if timings is not None:
            gen.timings = timings
        if not ids:
            raise InvalidRequest("empty prompt")
        detok = self.tokenizer.detokenizer()
        eos = self.tokenizer.eos_token_ids
        experts_before = self.expert_stats()
        text, emitted, finish, cut = "", 0, "length", -1
        for step in gen.steps(ids, max_tokens, cached=cached_tokens):
            if step.token in eos:
                gen.generated.pop()
                finish = "stop"
                break
            before = len(text)
            text += detok.add(step.token)
            cut = stops.find(text, before)
            if cut >= 0:
                text, finish = text[:cut], "stop"
                break
            safe = len(text) - stops.held_back(text)
            if safe > emitted or logprobs:
                yield Chunk(text[emitted:safe], step.token, None, step.logprobs)
                emitted = max(emitted, safe)
        if cut < 0:
            text += detok.flush()
        if experts_before is not None:
            gen.timings.experts = (self.expert_stats() - experts_before).as_dict()
        yield Chunk(text[emitted:], None, finish)

    def generate(self, prompt: Prompt, **kwargs: Any) -> Result:
        cache = kwargs.pop("cache", None)
        gen = Generation(self.net, cache if cache is not None else self.make_cache())
        pieces, finish = [], "length"
        for chunk in self.stream(prompt, generation=gen, **kwargs):
            pieces.append(chunk.text)
            finish = chunk.finish_reason or finish
        return Result("".join(pieces), list(gen.generated), finish, gen.timings)


def load(name: str | None = None, *, dtype: mx.Dtype | None = None, keep_quantized: bool | None = None,
         experts_per_tok: int | None = None, expert_memory: str | int | None = None,
         expert_options: dict | None = None) -> Model:
    """Load a model by name: a local HF/mlx-lm dir, a GGUF file, an alias (`smollm2`), `ollama:NAME`, or a
    hub id. With no name, the default small model. A GGUF file's quantized weights stay in their blocks on Metal;
    off Metal they are dequantized to float32 (MLX's quantized CPU kernels are slow on x86) while the float model
    fits comfortably in memory, else kept too (`loading.open_for_run`). `keep_quantized` forces either way.
    `experts_per_tok` overrides a MoE model's `num_experts_per_tok` (fewer experts: faster, less exact).
    `expert_memory` ("8GB", "25%"): a model with expert packs streams its experts from disk within that much
    memory (`expert_options`: see `mlxq.experts.StreamOptions`); `Model.expert_stats()` reports the I/O."""
    from concurrent.futures import ThreadPoolExecutor

    ckpt = open_for_run(name, keep_quantized)
    eos = ckpt.config.get("eos_token_id")
    eos = eos if isinstance(eos, list) else ([eos] if eos is not None else None)
    # the tokenizer loads beside the weights: MLX computes with the GIL released
    with ThreadPoolExecutor(1) as pool:
        tok = pool.submit(load_tokenizer, ckpt.tokenizer_dir, ckpt.gguf_file, ckpt.chat_template, eos)
        net = load_model(ckpt, dtype, experts_per_tok=experts_per_tok, expert_memory=expert_memory,
                         expert_options=expert_options)
        return Model(net, tok.result(), ckpt, name or "smollm2")
