"""What decoding enforces besides sampling, offered the same way on every path (Python API, Session, server),
and how a prompt with those controls becomes engine requests.

- Thinking control: `enable_thinking` (None: the chat template's default, which is on for Qwen3-style
  templates) and `thinking_budget` (None: half of `max_tokens`, so an answer always has room after the
  reasoning). Chat prompts always get thinking control, which also keeps the visible answer from being empty.
- `schema`: the answer is JSON validating against this JSON schema (`{"type": "object"}`: any object). When
  thinking is on, the JSON follows the think block.
- `tools` / `tool_choice`: OpenAI function tools, rendered by the chat template, parsed out of the output in
  the template's format, and forced by a grammar for "required" or a named function.
- `secrets` / `public` / `min_span`: the secret guard (`mlxq.engine.guards.SecretGuard`).

`prepare` renders the prompt and checks everything that can be checked before a request is queued (a bad
schema is an error now, not in the engine); the logits processors themselves are built on the engine thread,
per request, by the factory it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any

import llguidance

from mlxq.engine.constraints import GrammarProcessor, json_grammar, token_tables
from mlxq.engine.guards import THINK_CLOSE, THINK_OPEN, ThinkingProcessor, prompt_opens_think, secret_guard_processor
from mlxq.engine.output import Reading
from mlxq.engine.sampling import LogitsProcessor, SamplingParams
from mlxq.engine.scheduler import Request
from mlxq.engine.speculative import draft_plan
from mlxq.engine.tokenizer import Tokenizer
from mlxq.engine.tools import ToolPlan, plan_tools
from mlxq.errors import InvalidRequest, MlxqError, TokenizerError

Prompt = str | list[int] | list[dict[str, Any]]  # text, token ids, or chat messages
MAX_SECRETS, MAX_SECRET_CHARS = 64, 4096


@dataclass(frozen=True)
class Controls:
    enable_thinking: bool | None = None
    thinking_budget: int | None = None
    schema: dict | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    secrets: tuple[str, ...] = ()
    public: tuple[str, ...] = ()
    min_span: int = 8

    def __post_init__(self) -> None:
        if self.thinking_budget is not None and self.thinking_budget < 0:
            raise InvalidRequest("thinking_budget: must be >= 0")
        if self.min_span < 1:
            raise InvalidRequest("min_span: must be >= 1")
        for name in ("secrets", "public"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(s, str) for s in value):
                raise InvalidRequest(f"{name}: must be a list of strings")
            object.__setattr__(self, name, tuple(value))
        # The guard's tables grow with a secret's length times its span window: bounded, as any input is.
        if len(self.secrets) > MAX_SECRETS or any(len(s) > MAX_SECRET_CHARS for s in self.secrets):
            raise InvalidRequest(f"secrets: at most {MAX_SECRETS} secrets of at most {MAX_SECRET_CHARS} characters")


CONTROL_FIELDS = frozenset(f.name for f in fields(Controls))
SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams))


def split_options(options: dict[str, Any]) -> tuple[Controls, dict[str, Any]]:
    """Keyword options -> (Controls, sampling keywords); anything else is an error that names it."""
    unknown = sorted(set(options) - CONTROL_FIELDS - SAMPLING_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown option {unknown[0]!r}")
    controls = Controls(**{k: v for k, v in options.items() if k in CONTROL_FIELDS})
    return controls, {k: v for k, v in options.items() if k in SAMPLING_FIELDS}


def default_budget(budget: int | None, max_tokens: int) -> int:
    """The one default thinking budget: half of `max_tokens`, leaving room for the answer."""
    return budget if budget is not None else max_tokens // 2


def supports_thinking(tokenizer: Tokenizer) -> bool:
    """Whether the vocabulary has `<think>` and `</think>` as single tokens (Qwen3, Qwen3.5 and their likes)."""
    if tokenizer.token_id(THINK_OPEN) is None or tokenizer.token_id(THINK_CLOSE) is None:
        return False  # not in the vocabulary at all: no need to build the tables (1.1 s for SmolLM2's 49k tokens)
    try:
        tables = token_tables(tokenizer)
    except TokenizerError:  # no constrained decoding for this tokenizer, and no thinking control either
        return False
    return tables.id_of(THINK_OPEN) is not None and tables.id_of(THINK_CLOSE) is not None


@dataclass
class Prepared:
    """A rendered prompt with its controls: what every choice of one call shares."""

    prompt: list[int]
    reading: Reading
    marks: list[int] = field(default_factory=list)  # where a later prompt may part from this one
    _processors: Callable[[int], list[LogitsProcessor]] = lambda max_tokens: []

    def request(self, max_tokens: int, params: SamplingParams | None = None, *, stop: list[str] | None = None,
                logprobs: int | None = None, ignore_eos: bool = False,
                extra: list[LogitsProcessor] | None = None, speculative: int | str = 0) -> Request:
        """An engine request for one choice. `extra`: the caller's own processor instances (used by this request
        alone)."""
        draft_plan(speculative)  # a bad value fails here, in the caller's thread
        build, extra = self._processors, list(extra or [])
        return Request(
            self.prompt, max_tokens, params or SamplingParams(), lambda: [*extra, *build(max_tokens)],
            list(stop or []), logprobs, self.marks, ignore_eos, self.reading,
            speculative=speculative,
        )


Render = Callable[[list[dict], list[dict] | None, dict, bool], str]  # (messages, tools, kwargs, gen. prompt) -> text


def prepare(tokenizer: Tokenizer, prompt: Prompt, controls: Controls = Controls(), *,
            chat_template_kwargs: dict[str, Any] | None = None, rewindable: bool = True,
            render: Render | None = None) -> Prepared:
    """Renders `prompt` (chat messages through the template) and plans `controls` for it. `rewindable`: the
    model's caches can resume at any position; when not (recurrent layers), the request marks where the
    conversation so far ends, so the next turn can resume there. `render`: how chat messages become text (the
    server bounds templates that requests bring); by default the model's chat template."""
    render = render or partial(render_chat, tokenizer)
    kwargs = dict(chat_template_kwargs or {})
    chat = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)
    thinking = _thinking(controls.enable_thinking, kwargs.get("enable_thinking"))
    supported = supports_thinking(tokenizer)
    if chat and thinking is None and supported:
        thinking = True  # what Qwen3-style templates do when enable_thinking is not given
    if thinking is not None and chat:
        kwargs["enable_thinking"] = thinking
    on = bool(thinking) and supported
    if chat:
        tools = plan_tools(tokenizer, controls.tools, controls.tool_choice, after_think=on)
    elif controls.tools:
        raise InvalidRequest("tools: need a prompt of chat messages")
    else:
        tools = ToolPlan(None, None)
    grammar = tools.grammar
    if controls.schema is not None:
        if grammar is not None:
            raise InvalidRequest("tool_choice: a forced tool call cannot be combined with a JSON schema for the answer")
        grammar = json_grammar(controls.schema, leading_newlines=on)
        error = llguidance.LLMatcher.validate_grammar(grammar, token_tables(tokenizer).ll)
        if error:
            raise InvalidRequest(f"schema: {error.splitlines()[0][:300]}")

    marks: list[int] = []
    if chat:
        ids = tokenizer.encode(render(prompt, tools.tools, kwargs, True), add_special_tokens=False)
        if not rewindable:  # where the next turn's prompt will part from this one
            history = tokenizer.encode(render(prompt, tools.tools, kwargs, False), add_special_tokens=False)
            if 0 < len(history) < len(ids) and history == ids[: len(history)]:
                marks = [len(history)]
    elif isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
    else:
        raise InvalidRequest("prompt: must be text, token ids, or a non-empty list of chat messages")
    if not ids:
        raise InvalidRequest("prompt: must not be empty")
    bad = next((t for t in ids if not 0 <= t < tokenizer.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"prompt: token id {bad} is outside the vocabulary (0..{tokenizer.vocab_size - 1})")

    controlled = chat or thinking is not None  # raw prompts get thinking control only when asked for it
    think_open = on and prompt_opens_think(tokenizer, ids)
    reading = Reading(controlled and supported, think_open, tools if tools.functions else None)
    close = token_tables(tokenizer).id_of(THINK_CLOSE) if on else None
    forced_tool = tools.grammar is not None
    secrets = controls.secrets
    if secrets:  # the per-secret tables (slow to build) are built here, not on the engine thread
        secret_guard_processor(tokenizer, list(secrets), controls.min_span, controls.public)

    def processors(max_tokens: int) -> list[LogitsProcessor]:
        procs: list[LogitsProcessor] = []
        if controlled:
            # A forced tool call starts with a special token, which "require content" would mask.
            budget = default_budget(controls.thinking_budget, max_tokens) if on else None
            procs.append(ThinkingProcessor(tokenizer, on, budget, think_open=think_open,
                                           require_content=not forced_tool))
        if grammar is not None:
            procs.append(GrammarProcessor(tokenizer, grammar, start_after=close))
        if secrets:
            procs.append(secret_guard_processor(tokenizer, list(secrets), controls.min_span, controls.public))
        return procs

    return Prepared(ids, reading, marks, processors)


def _thinking(asked: bool | None, in_kwargs: Any) -> bool | None:
    if in_kwargs is not None and not isinstance(in_kwargs, bool):
        raise InvalidRequest("chat_template_kwargs.enable_thinking: must be a boolean")
    if asked is not None and in_kwargs is not None and asked != in_kwargs:
        raise InvalidRequest("enable_thinking: contradicts chat_template_kwargs.enable_thinking")
    return asked if asked is not None else in_kwargs


def render_chat(tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None, kwargs: dict,
                generation_prompt: bool) -> str:
    """Chat messages as text, through the model's chat template (the template writes BOS where it belongs)."""
    try:
        return tokenizer.render_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                              **kwargs)
    except MlxqError:
        raise
    except Exception as e:  # the template's own checks (roles must alternate, ...) raise jinja errors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InvalidRequest(f"messages: the chat template cannot render them: {first[:300]}") from None
