"""A multi-turn chat that keeps its cache between turns, with thinking control, JSON answers and a secret guard.

Each turn renders the whole conversation with the chat template, keeps the longest prefix of it that is
already in the cache, and runs only the rest through the model, so a turn costs its new tokens. KV caches can
rewind to any position; recurrent layers (hybrid models) cannot, so for them a checkpoint is stored at the end
of each turn's conversation (before the assistant header), the point the next turn's rendering shares.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from mlxq.engine.cache import KVCache, checkpoint, restore
from mlxq.engine.constraints import json_schema_processor, token_tables
from mlxq.engine.generate import Generation, prefill
from mlxq.engine.guards import prompt_opens_think, secret_guard_processor, split_reasoning, thinking_processor
from mlxq.engine.sampling import LogitsProcessor, SamplingParams
from mlxq.errors import GenerationError, InvalidRequest

RETRY_NOTE = "(Please answer now, in a few words; do not leave the answer empty.)"


@dataclass
class TurnStats:
    prompt_tokens: int  # the whole rendered conversation
    cached_tokens: int  # reused from the previous turns' cache
    processed_tokens: int  # prompt tokens run through the model this turn
    generated_tokens: int
    first_token_s: float  # from the call to the first generated token
    total_s: float
    retried: bool = False


@dataclass
class _Output:
    content: str
    reasoning: str | None
    complete: bool  # the JSON grammar (if any) was completed


class Session:
    """A conversation with `model`. `secrets` (hidden from the player) are guarded against verbatim leaks of
    `min_span` normalised characters, except spans that occur in `public` text; `enable_thinking` is passed to
    the chat template and enforced while decoding; other keywords are sampling options (temperature, ...)."""

    def __init__(self, model: Any, system: str | None = None, secrets: list[str] | None = None, *,
                 public: list[str] | None = None, min_span: int = 8, enable_thinking: bool = False,
                 thinking_budget: int | None = None, max_tokens: int = 256, **sampling: Any):
        if not model.tokenizer.has_chat_template:
            raise InvalidRequest(f"{model.name}: a Session needs a model with a chat template")
        self.model = model
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.secrets = list(secrets or [])
        self.public = list(public or [])
        self.min_span = min_span
        self.enable_thinking = enable_thinking
        self.thinking_budget = thinking_budget
        self.max_tokens = max_tokens
        self.params = SamplingParams(**sampling)
        self.stats: list[TurnStats] = []
        self.last_reasoning: str | None = None
        self.cache = model.make_cache()
        self.fed: list[int] = []  # the tokens in the cache, in order
        self._marks: list[tuple[int, list]] = []  # (position, checkpoint), for caches that cannot rewind freely
        self._rewindable = all(isinstance(c, KVCache) for c in self.cache)  # a KV position is a full checkpoint
        token_tables(model.tokenizer)  # build the shared tables now, not inside the first turn's timing
        if self.secrets:
            secret_guard_processor(model.tokenizer, self.secrets, min_span, self.public)  # caches their tables

    # ---------------------------------------------------------------------------------------- public
    def ask(self, text: str, schema: dict | None = None, max_tokens: int | None = None, *,
            logits_processors: list[LogitsProcessor] | None = None) -> str | dict:
        """The model's answer to `text`: a non-empty string, or with `schema` the parsed JSON object (decoding is
        constrained to the schema). An empty or incomplete answer is retried once with a note, then raises
        GenerationError."""
        t0 = time.perf_counter()
        user = {"role": "user", "content": text}
        out, stats = self._turn([*self.messages, user], schema, max_tokens, logits_processors, t0)
        if not _usable(out, schema):
            retry = {"role": "user", "content": f"{text}\n\n{RETRY_NOTE}"}
            out, stats = self._turn([*self.messages, retry], schema, max_tokens, logits_processors, t0)
            stats.retried = True
            if not _usable(out, schema):
                self.stats.append(stats)
                what = "an incomplete JSON answer" if out.content else "an empty answer"
                limit = max_tokens or self.max_tokens
                raise GenerationError(f"{self.model.name} gave {what} twice (max_tokens={limit})")
        self.stats.append(stats)
        self.last_reasoning = out.reasoning
        self.messages += [user, {"role": "assistant", "content": out.content}]
        return json.loads(out.content) if schema is not None else out.content

    def reset(self, system: str | None = None) -> None:
        """Forget the conversation (keeping the system prompt unless a new one is given); the cache is reused
        for whatever prefix the next turn still shares."""
        system = system if system is not None else next((m["content"] for m in self.messages[:1]
                                                         if m["role"] == "system"), None)
        self.messages = [{"role": "system", "content": system}] if system else []

    # ---------------------------------------------------------------------------------------- one turn
    def _render(self, messages: list[dict], generation_prompt: bool = True) -> list[int]:
        return self.model.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                        enable_thinking=self.enable_thinking)

    def _turn(self, messages: list[dict], schema: dict | None, max_tokens: int | None,
              extra: list[LogitsProcessor] | None, t0: float) -> tuple[_Output, TurnStats]:
        tok, net = self.model.tokenizer, self.model.net
        max_tokens = max_tokens or self.max_tokens
        ids = self._render(messages)
        reused = self._rewind(ids)
        kept = reused
        if not self._rewindable:  # run up to the end of the conversation so far, and checkpoint there
            history = self._render(messages, generation_prompt=False)
            if reused < len(history) < len(ids) and history == ids[: len(history)]:
                prefill(net, ids[reused : len(history)], self.cache)
                self._marks.append((len(history), checkpoint(self.cache)))
                kept = len(history)

        think_open = prompt_opens_think(tok, ids)
        budget = self.thinking_budget
        if self.enable_thinking and budget is None:
            budget = max_tokens // 2  # leave room for the answer
        thinking = thinking_processor(tok, self.enable_thinking, budget, prompt=ids)
        procs = [*(extra or []), thinking]
        grammar = None
        if schema is not None:
            close = thinking.tags.close
            start_after = close[-1] if self.enable_thinking and len(close) == 1 else None
            grammar = json_schema_processor(tok, schema, start_after=start_after)
            procs.append(grammar)
        if self.secrets:
            procs.append(secret_guard_processor(tok, self.secrets, self.min_span, self.public))

        gen = Generation(net, self.cache)
        pieces, first = [], None
        for chunk in self.model.stream(ids, max_tokens=max_tokens, params=self.params, logits_processors=procs,
                                       cache=self.cache, cached_tokens=kept, generation=gen):
            if first is None and chunk.token is not None:
                first = time.perf_counter() - t0
            pieces.append(chunk.text)
        self.fed = gen.fed_tokens()
        reasoning, content = split_reasoning("".join(pieces), think_open)
        total = time.perf_counter() - t0
        stats = TurnStats(len(ids), reused, len(ids) - reused, len(gen.generated), first or total, total)
        return _Output(content, reasoning, grammar is None or grammar.finished), stats

    def _rewind(self, ids: list[int]) -> int:
        """Restores the cache to the longest prefix of `ids` it can; returns how many tokens it keeps. At least
        one token of `ids` is always left to run, for the logits of the first answer token."""
        limit = min(len(ids) - 1, len(self.fed))
        n = 0
        while n < limit and ids[n] == self.fed[n]:
            n += 1
        if self._rewindable:
            restore(self.cache, [n] * len(self.cache))
        else:
            n, state = max(((p, s) for p, s in self._marks if p <= n), default=(0, None), key=lambda m: m[0])
            if state is None:
                self.cache = self.model.make_cache()
            else:
                restore(self.cache, state)
            self._marks = [(p, s) for p, s in self._marks if p <= n]
        self.fed = self.fed[:n]
        return n


def _usable(out: _Output, schema: dict | None) -> bool:
    if not out.content:
        return False
    if schema is None:
        return True
    try:
        json.loads(out.content)
    except ValueError:
        return False
    return out.complete
