"""The Python API: `mlxq.load(name) -> Model`, then generate, stream or score.

Every call is a request to the model's one engine (`mlxq.engine.scheduler`), started on first use: calls from
many threads, and from asyncio (`astream`, `agenerate`, `Session.ask_async`), are batched together.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxq.engine import persist
from mlxq.engine import stream as streams
from mlxq.engine.controls import Prompt, prepare, split_options
from mlxq.engine.prompt_cache import CacheSlot
from mlxq.engine.runner import evaluate_all
from mlxq.engine.sampling import LogitsProcessor, SamplingParams, check_logit_bias
from mlxq.engine.scheduler import DEFAULT_MAX_BATCH, DEFAULT_PROMPT_CACHE_BYTES, PREFILL_CHUNK, Engine, Request
from mlxq.engine.stops import check_stops
from mlxq.engine.stream import Chunk, Result, Timings  # noqa: F401  (the API's result types)
from mlxq.engine.tokenizer import Tokenizer, load_tokenizer
from mlxq.errors import InvalidRequest
from mlxq.experts import ExpertStats, expert_stats
from mlxq.formats import Checkpoint
from mlxq.loading import load_model, open_for_run, trim_heap
from mlxq.models.base import CausalLM


class Model:
    """A loaded model with its tokenizer and its engine.

    A prompt is text, token ids, or chat messages. Text is the user's turn: it goes through the chat template as
    one user message when the model has a template (as `mlxq generate`, Ollama's generate and mlx-lm's command line
    read it: an instruct model given bare text often ends at once), and as raw text when it has none or with
    `raw=True` (a completion of the text itself). Token ids are taken as they are.

    Generation options, the same on every path (here, `Session`, the server):
    - `max_tokens`, `stop` (a string or a list), `logprobs` (k: each token's logprob and the k most likely),
      `ignore_eos`, `speculative` (k: prompt-lookup draft tokens checked per decode step, or "mtp": drafts from the
      model's MTP head; same output);
    - sampling: `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`, `presence_penalty`,
      `frequency_penalty`, `logit_bias`, `seed` (or `params=SamplingParams(...)`);
    - controls (`mlxq.engine.controls`): `enable_thinking`, `thinking_budget`, `schema`, `tools`, `tool_choice`,
      `secrets`, `public`, `min_span`;
    - `logits_processors`: your own, run before the controls; `chat_template_kwargs`: passed to the template.
    """

    def __init__(self, net: CausalLM, tokenizer: Tokenizer, checkpoint: Checkpoint, name: str):
        evaluate_all(net)  # here, on the loading thread: lazy arrays belong to it, and the engine may start elsewhere
        self.net = net
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint
        self.name = name
        self.config = checkpoint.config
        self._engine: Engine | None = None
        self._engine_options = dict(max_batch=DEFAULT_MAX_BATCH, prompt_cache_bytes=DEFAULT_PROMPT_CACHE_BYTES,
                                    prefill_chunk=PREFILL_CHUNK, prompt_cache_spill=None)
        self._engine_lock = threading.Lock()

    # ---------------------------------------------------------------------------------------- the engine
    @property
    def engine(self) -> Engine:
        """The engine every request of this model runs on (started on first use)."""
        with self._engine_lock:
            if self._engine is None or not self._engine.alive:
                self._engine = self._new_engine().start()
            return self._engine

    def _new_engine(self) -> Engine:
        return Engine(self.net, self.tokenizer, **self._engine_options)

    def configure(self, *, max_batch: int | None = None, prompt_cache_bytes: int | None = None,
                  prefill_chunk: int | None = None, prompt_cache_spill: tuple[str, int] | None = None) -> None:
        """Engine settings: requests run together, bytes of the shared prompt cache, prompt tokens per prefill
        step, (directory, bytes) on disk where prompt-cache entries go when they leave memory. A running engine is
        closed (its unfinished requests end as cancelled) and the next request starts
        one with these settings."""
        given = dict(max_batch=max_batch, prompt_cache_bytes=prompt_cache_bytes, prefill_chunk=prefill_chunk,
                     prompt_cache_spill=prompt_cache_spill)
        self._engine_options.update({k: v for k, v in given.items() if v is not None})
        self.close()

    def close(self) -> None:
        """Stops the engine (it starts again on the next request)."""
        with self._engine_lock:
            if self._engine is not None:
                self._engine.close()
                self._engine = None

    # ---------------------------------------------------------------------------------------- scoring
    def logits(self, token_ids: list[int] | mx.array) -> mx.array:
        """Full-sequence logits, float32 [len, vocab], with a fresh cache."""
        tokens = mx.array(token_ids).reshape(1, -1)
        out = self.net(tokens, self.net.make_cache())[0].astype(mx.float32)
        # evaluated here, on the caller's thread: a streamed model's pool keeps the graph built over its slots,
        # and MLX cannot evaluate it later from the engine's thread (streams are per thread)
        mx.eval(out)
        return out

    def make_cache(self) -> list:
        return self.net.make_cache()

    def cache_fingerprint(self) -> str:
        """What a cache written to disk (`Session.save`) must match to be read back into this model."""
        return persist.fingerprint(self.net)

    def save_slot(self, slot: CacheSlot, path: str | Path, extra: dict) -> None:
        """Writes a conversation's cache (`slot`) with the caller's JSON-able `extra` to `path`, atomically."""
        persist.save(path, self.cache_fingerprint(), slot.tokens, slot.caches, slot.marks, extra)

    def load_slot(self, slot: CacheSlot, path: str | Path) -> dict:
        """Fills `slot` from a file `save_slot` wrote for this model; returns its `extra`."""
        slot.tokens, slot.caches, slot.marks, extra = persist.load(path, self.cache_fingerprint(), self.net.make_cache)
        return extra

    def expert_stats(self) -> ExpertStats | None:
        """Streaming counters so far (`mlxq.experts.ExpertStats`: hits, misses, bytes, read / stall / compute
        time; subtract two snapshots for one run), or None when the experts are not streamed."""
        return expert_stats(self.net)

    def encode_prompt(self, prompt: Prompt, *, raw: bool = False, **chat_template_kwargs: Any) -> list[int]:
        """Token ids of a prompt as `generate` reads it (text as a user turn unless `raw`; see the class)."""
        return prepare(self.tokenizer, self.read_prompt(prompt, raw), chat_template_kwargs=chat_template_kwargs).prompt

    def read_prompt(self, prompt: Prompt, raw: bool = False) -> Prompt:
        """Text as one user message when the model has a chat template and `raw` is not set; anything else as
        given. (The server's completions endpoint keeps text raw, as the OpenAI contract has it.)"""
        if raw and isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            raise InvalidRequest("raw: applies to a text prompt; chat messages always go through the chat template")
        if isinstance(prompt, str) and prompt and not raw and self.tokenizer.has_chat_template:
            return [{"role": "user", "content": prompt}]
        return prompt  # empty text stays empty, and fails as such

    # ---------------------------------------------------------------------------------------- generation
    def request(
        self,
        prompt: Prompt,
        *,
        raw: bool = False,
        max_tokens: int = 256,
        stop: list[str] | str | None = None,
        logprobs: int | None = None,
        ignore_eos: bool = False,
        params: SamplingParams | None = None,
        logits_processors: list[LogitsProcessor] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        speculative: int | str = 0,
        **options: Any,
    ) -> Request:
        """The engine request for a prompt and the options above (what `stream` and `generate` submit). `raw`: text
        is sent as it is, not as a user message through the chat template.
        `speculative`: k draft tokens checked per decode step, looked up in the prompt and the answer so far (prompt
        lookup), or 'mtp': drafts from the model's own multi-token-prediction head (Qwen3.5 checkpoints that keep
        their `mtp.*` weights); the output is the same as without."""
        controls, sampling = split_options(options)
        if params is not None and sampling:
            raise InvalidRequest(f"give sampling options either as params or by keyword, not both ({min(sampling)})")
        prepared = prepare(self.tokenizer, self.read_prompt(prompt, raw), controls,
                           chat_template_kwargs=chat_template_kwargs, rewindable=self.engine.rewindable)
        params = params or SamplingParams(**sampling)
        check_logit_bias(params.logit_bias, self.tokenizer.vocab_size)
        stops = check_stops(stop)
        k = int(logprobs) if logprobs is not None and logprobs is not False else None
        return prepared.request(max_tokens, params, stop=stops, logprobs=k,
                                ignore_eos=ignore_eos, extra=logits_processors, speculative=speculative)

    def stream(self, prompt: Prompt, **options: Any) -> Iterator[Chunk]:
        """Yields the output as it becomes final. Leaving the loop early ends the request."""
        return streams.stream(self.engine, self.request(prompt, **options))

    def astream(self, prompt: Prompt, **options: Any) -> AsyncIterator[Chunk]:
        """`stream` for asyncio: `async for chunk in model.astream(...)`."""
        return streams.astream(self.engine, self.request(prompt, **options))

    def generate(self, prompt: Prompt, **options: Any) -> Result:
        """The whole output, with timings."""
        before = self.expert_stats()
        return self._count_experts(streams.run(self.engine, self.request(prompt, **options)), before)

    async def agenerate(self, prompt: Prompt, **options: Any) -> Result:
        """`generate` for asyncio."""
        before = self.expert_stats()
        return self._count_experts(await streams.arun(self.engine, self.request(prompt, **options)), before)

    def _count_experts(self, result: Result, before: ExpertStats | None) -> Result:
        if before is not None:
            result.timings.experts = (self.expert_stats() - before).as_dict()
        return result


def load(name: str | None = None, *, dtype: mx.Dtype | None = None, keep_quantized: bool | None = None,
         experts_per_tok: int | None = None, expert_memory: str | int | None = None,
         expert_options: dict | None = None, group: Any = None, parallel: str | None = None) -> Model:
    """Load a model by name: a local HF/mlx-lm dir, a GGUF file, an alias (`smollm2`), `ollama:NAME`, or a
    hub id. With no name, the default small model. A GGUF file's quantized weights stay in their blocks on Metal;
    off Metal they are dequantized to float32 (MLX's quantized CPU kernels are slow on x86) while the float model
    fits comfortably in memory, else kept too (`loading.open_for_run`). `keep_quantized` forces either way.
    `experts_per_tok` overrides a MoE model's `num_experts_per_tok` (fewer experts: faster, less exact).
    `expert_memory` ("8GB", "25%"): a model with expert packs streams its experts from disk within that much
    memory (`expert_options`: see `mlxq.experts.StreamOptions`); `Model.expert_stats()` reports the I/O.

    `group` (`mx.distributed.init()`, more than one rank): every rank calls `load` alike and loads only its share,
    split `parallel` ("pipeline", "tensor" or "experts"; default experts for a MoE model, else pipeline). Rank 0
    gets a model that runs the whole group; the others call `model.follow()` (`mlxq.distributed`). With expert packs,
    each rank streams the experts it holds from its own copy of the packs, within its own `expert_memory` (a
    percentage is of its own experts; by default all of them, read once). Prefetch (`expert_options`) looks ahead
    within a rank's own layers under the pipeline split; an experts split does not prefetch."""
    if group is not None and group.size() > 1:
        from mlxq.distributed.group import load_group

        return load_group(name, group, parallel=parallel, dtype=dtype, keep_quantized=keep_quantized,
                          experts_per_tok=experts_per_tok, expert_memory=expert_memory, expert_options=expert_options)
    from concurrent.futures import Future, ThreadPoolExecutor

    ckpt = open_for_run(name, keep_quantized)
    # the tokenizer loads beside the weights: MLX computes with the GIL released
    with ThreadPoolExecutor(1) as pool:
        tok: list[Future] = []  # started once the first weights are queued: its parse holds the GIL, MLX converts

        def start_tokenizer() -> None:
            tok.append(pool.submit(load_tokenizer_for, ckpt))

        net = load_model(ckpt, dtype, experts_per_tok=experts_per_tok, expert_memory=expert_memory,
                         expert_options=expert_options, beside=start_tokenizer)
        if not tok:
            start_tokenizer()
        tokenizer = tok[0].result()
    trim_heap()
    return Model(net, tokenizer, ckpt, name or "smollm2")


def load_tokenizer_for(ckpt: Checkpoint) -> Tokenizer:
    eos = ckpt.config.get("eos_token_id")
    return load_tokenizer(ckpt.tokenizer_dir, ckpt.gguf_file, ckpt.chat_template,
                          eos if isinstance(eos, list) else ([eos] if eos is not None else None))


from mlxq.session import Session  # noqa: E402, F401  (re-exported: games use mlxq.api.Session)
