"""A multi-turn chat that keeps its cache between turns, with thinking control, JSON answers, tools and a secret
guard, on the model's one engine: many Sessions, from many threads or from asyncio, are batched together.

Each turn renders the whole conversation with the chat template and submits it with the session's own cache
slot (`mlxq.engine.prompt_cache.CacheSlot`): the engine resumes from the longest prefix the slot holds and runs
only the rest, so a turn costs its new tokens, whatever other sessions do meanwhile. KV caches can rewind to any
position; recurrent layers (hybrid models) cannot, so the request marks where the conversation so far ends
(before the assistant header), the point the next turn's rendering shares, and the engine checkpoints there.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlxq.engine import stream as streams
from mlxq.engine.constraints import token_tables
from mlxq.engine.guards import secret_guard_processor
from mlxq.engine.prompt_cache import CacheSlot
from mlxq.engine.sampling import LogitsProcessor, SamplingParams
from mlxq.engine.scheduler import Request
from mlxq.engine.stream import Result
from mlxq.engine.tools import template_call
from mlxq.errors import FormatError, GenerationError, InvalidRequest

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


class Session:
    """A conversation with `model`. `secrets` (hidden from the player) are guarded against verbatim leaks of
    `min_span` normalised characters, except spans that occur in `public` text; `enable_thinking` is passed to
    the chat template and enforced while decoding, `thinking_budget` (default: half of max_tokens) bounds the
    reasoning; `tools` are offered to the model as `tool_choice` says (its calls are in `last.tool_calls`; answer
    them with `add_tool_result` and `ask(None)`); `logprobs` (k) records
    each answer token's logprob in `last.logprobs`; `speculative` (k): prompt-lookup drafts of k tokens checked per
    decode step (same answers, faster when they quote the conversation), or 'mtp': drafts from the model's
    multi-token-prediction head; other keywords are sampling options
    (temperature, ...).

    One question at a time per Session; any number of Sessions at once."""

    def __init__(self, model: Any, system: str | None = None, secrets: list[str] | None = None, *,
                 public: list[str] | None = None, min_span: int = 8, enable_thinking: bool = False,
                 thinking_budget: int | None = None, max_tokens: int = 256, tools: list[dict] | None = None,
                 tool_choice: str | dict | None = None, logprobs: int | None = None, speculative: int | str = 0,
                 **sampling: Any):
        if not model.tokenizer.has_chat_template:
            raise InvalidRequest(f"{model.name}: a Session needs a model with a chat template")
        self.model = model
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        self.secrets = list(secrets or [])
        self.public = list(public or [])
        self.min_span = min_span
        self.enable_thinking = enable_thinking
        self.thinking_budget = thinking_budget
        self.max_tokens = max_tokens
        self.tools, self.tool_choice = tools, tool_choice
        self.logprobs = logprobs
        self.speculative = speculative
        self.params = SamplingParams(**sampling)
        self.stats: list[TurnStats] = []
        self.last: Result | None = None  # the last answer in full: text, reasoning, tokens, tool calls, logprobs
        self.last_reasoning: str | None = None
        self.slot = CacheSlot()  # this conversation's cache, kept by the engine between turns
        self._busy = threading.Lock()
        self._running: Request | None = None  # the request of the turn in progress
        token_tables(model.tokenizer)  # build the shared tables now, not inside the first turn's timing
        if self.secrets:
            secret_guard_processor(model.tokenizer, self.secrets, min_span, self.public)  # caches their tables

    # ---------------------------------------------------------------------------------------- public
    def ask(self, text: str | None, schema: dict | None = None, max_tokens: int | None = None, *,
            logits_processors: list[LogitsProcessor] | None = None) -> str | dict:
        """The model's answer to `text`: a non-empty string, or with `schema` the parsed JSON object (decoding is
        constrained to the schema). An empty or incomplete answer is retried once with a note, then raises
        GenerationError. `text=None` answers without a new user message (after `add_tool_result`)."""
        with self._turn():
            steps = self._ask(text, schema, max_tokens, logits_processors)
            request = next(steps)
            while True:
                result = streams.run(self.model.engine, request)
                try:
                    request = steps.send(result)
                except StopIteration as done:
                    return done.value

    async def ask_async(self, text: str | None, schema: dict | None = None, max_tokens: int | None = None, *,
                        logits_processors: list[LogitsProcessor] | None = None) -> str | dict:
        """`ask` for asyncio: `await session.ask_async(...)`. Cancelling the task ends the turn (the conversation
        is left as it was)."""
        with self._turn():
            steps = self._ask(text, schema, max_tokens, logits_processors)
            request = next(steps)
            while True:
                result = await streams.arun(self.model.engine, request)
                try:
                    request = steps.send(result)
                except StopIteration as done:
                    return done.value

    def save(self, path: str | Path) -> None:
        """Writes the conversation, its settings and its cache (attention keys and values, recurrent states whole,
        and the checkpoints a turn resumes from) to `path`, atomically, with the model's fingerprint; `load` takes
        it up again, in this process or another, and its next turn is the one this session would have given. The
        file holds the secrets too: keep it where the players cannot read it."""
        with self._turn():
            settings = dict(
                secrets=self.secrets, public=self.public, min_span=self.min_span, enable_thinking=self.enable_thinking,
                thinking_budget=self.thinking_budget, max_tokens=self.max_tokens, tools=self.tools,
                tool_choice=self.tool_choice, logprobs=self.logprobs, speculative=self.speculative,
                **{**asdict(self.params), "logit_bias": [[t, b] for t, b in self.params.logit_bias.items()]},
            )
            self.model.save_slot(self.slot, path, {"messages": self.messages, "settings": settings})

    @classmethod
    def load(cls, model: Any, path: str | Path) -> Session:
        """The session `save` wrote to `path`, on `model` (the same weights, checked by fingerprint)."""
        slot = CacheSlot()
        extra = model.load_slot(slot, path)
        try:
            settings = dict(extra["settings"])
            settings["logit_bias"] = {int(t): float(b) for t, b in settings["logit_bias"]}
            session = cls(model, **settings)
            session.messages = list(extra["messages"])
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{path}: is not a saved session ({type(e).__name__}: {e})") from None
        session.slot = slot
        return session

    def cancel(self) -> None:
        """Ends the turn in progress (from any thread): its `ask` raises GenerationError and the conversation is
        left as it was before the question."""
        request = self._running
        if request is not None:
            request.cancel()

    def add_tool_result(self, tool_call_id: str, content: str) -> None:
        """The result of one of the last answer's tool calls, for the model to read at the next `ask`."""
        self.messages.append({"role": "tool", "tool_call_id": tool_call_id, "content": content})

    def reset(self, system: str | None = None) -> None:
        """Forget the conversation (keeping the system prompt unless a new one is given); the cache is reused
        for whatever prefix the next turn still shares."""
        system = system if system is not None else next((m["content"] for m in self.messages[:1]
                                                         if m["role"] == "system"), None)
        self.messages = [{"role": "system", "content": system}] if system else []

    # ---------------------------------------------------------------------------------------- one turn
    @contextmanager
    def _turn(self):
        if not self._busy.acquire(blocking=False):
            raise InvalidRequest("this Session is already answering a question; ask one at a time")
        try:
            yield
        finally:
            self._running = None
            self._busy.release()

    def _ask(self, text: str | None, schema: dict | None, max_tokens: int | None,
             extra: list[LogitsProcessor] | None) -> Generator[Request, Result, str | dict]:
        """The turn's logic, for `ask` and `ask_async` alike: yields the requests to run, receives their results."""
        t0 = time.perf_counter()
        user = [] if text is None else [{"role": "user", "content": text}]
        started = time.perf_counter()
        result = yield self._request([*self.messages, *user], schema, max_tokens, extra)
        stats = _stats(result, started - t0, t0)
        _check_not_cancelled(result, self.model.name)
        if not _usable(result, schema):
            retry = {"role": "user", "content": f"{text}\n\n{RETRY_NOTE}" if text is not None else RETRY_NOTE}
            started = time.perf_counter()
            result = yield self._request([*self.messages, retry], schema, max_tokens, extra)
            stats = _stats(result, started - t0, t0)
            stats.retried = True
            _check_not_cancelled(result, self.model.name)
            if not _usable(result, schema):
                self.stats.append(stats)
                what = "an incomplete JSON answer" if result.text.strip() else "an empty answer"
                limit = max_tokens or self.max_tokens
                raise GenerationError(f"{self.model.name} gave {what} twice (max_tokens={limit})")
        self.stats.append(stats)
        self.last, self.last_reasoning = result, result.reasoning
        content = result.text.strip()
        answer: dict[str, Any] = {"role": "assistant", "content": content}
        if result.tool_calls:
            answer["tool_calls"] = [template_call(c) for c in result.tool_calls]
        self.messages += [*user, answer]
        return json.loads(content) if schema is not None else content

    def _request(self, messages: list[dict], schema: dict | None, max_tokens: int | None,
                 extra: list[LogitsProcessor] | None) -> Request:
        request = self.model.request(
            messages, max_tokens=max_tokens or self.max_tokens, params=self.params, logits_processors=extra,
            logprobs=self.logprobs, enable_thinking=self.enable_thinking, thinking_budget=self.thinking_budget,
            schema=schema, tools=self.tools, tool_choice=self.tool_choice, secrets=self.secrets, public=self.public,
            min_span=self.min_span, speculative=self.speculative,
        )
        request.slot = self.slot  # the engine resumes this conversation's cache (not an option of Model's calls)
        self._running = request
        return request


def _stats(result: Result, started: float, t0: float) -> TurnStats:
    usage, timings = result.usage, result.timings
    total = time.perf_counter() - t0
    first = started + timings.first_token_s if result.tokens else total
    return TurnStats(usage.prompt_tokens, usage.cached_tokens, usage.prompt_tokens - usage.cached_tokens,
                     usage.completion_tokens, first, total)


def _check_not_cancelled(result: Result, name: str) -> None:
    if result.finish_reason == "cancelled":
        raise GenerationError(f"{name}: the turn was cancelled")


def _usable(result: Result, schema: dict | None) -> bool:
    if result.tool_calls:
        return True
    if not result.text.strip():
        return False
    if schema is None:
        return True
    try:
        json.loads(result.text)
    except ValueError:
        return False
    return result.finish_reason == "stop"  # the grammar ends the output only once the JSON is complete
