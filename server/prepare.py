"""OpenAI request bodies -> engine requests: limits, sampling, and the controls (`mlxq.engine.controls`) each
choice gets: thinking control, JSON schema (`response_format`), tools, the secret guard (the `mlxq` extension
field). Prompts are rendered and controls planned by the engine's own `prepare`, as for the Python API; this
module maps OpenAI's fields onto it and adds what only a server needs (limits, request templates in a budget).

Everything here runs on the request's own thread and touches no MLX array: processors are built by a factory
the engine thread calls (MLX arrays belong to the thread that makes them). Grammars are checked here once to
reject a bad schema with a 400 before anything is queued.
"""

from __future__ import annotations

import inspect
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import llguidance

from mlxq.engine.constraints import response_format_grammar, token_tables
from mlxq.engine.controls import Controls, Prepared, prepare
from mlxq.engine.sampling import SamplingParams, check_logit_bias
from mlxq.engine.scheduler import Request
from mlxq.engine.stops import check_stops
from mlxq.engine.tools import template_call
from mlxq.errors import InvalidRequest
from mlxq.models import text_config
from server.schemas import ChatRequest, CompletionRequest, Message

DEFAULT_CONTEXT = 4096  # when the model's config does not say
TEMPLATE_FIELD = "chat_template_kwargs.chat_template"


@dataclass
class Limits:
    """What one request may ask for."""

    max_tokens: int = 4096  # completion tokens per choice
    max_choices: int = 8  # n (times the number of prompts, for completions)
    max_request_bytes: int = 4 << 20
    max_pending: int = 256  # requests queued or running in the engine before new ones get a 503
    # Chat templates sent in requests (chat_template_kwargs.chat_template) run arbitrary Jinja: refused unless
    # allowed, and then rendered within a time budget and an output size budget (characters).
    allow_request_templates: bool = False
    template_seconds: float = 2.0
    template_chars: int = 1 << 20


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


@dataclass
class Choice:
    """Where one choice comes from (its reasoning split and tool calls are read by the engine, see `Reading`)."""

    prompt_index: int
    echo: str = ""  # completions with echo: the prompt text, written before the choice's text


@dataclass
class Plan:
    """Engine requests for one API call (one per choice) and how to read their outputs."""

    requests: list[Request]
    choices: list[Choice]
    prompt_tokens: list[int] = field(default_factory=list)  # per prompt


class Planner:
    """Builds `Plan`s for one model. `default_thinking` (None: the template's default, which is on for Qwen3)
    and `thinking_budget` (None: the engine's default, half of max_tokens) apply where a request does not say.

    Plans are built on many request threads at once. Cheap checks come first (choices, fields), and templates are
    rendered with no lock held (the tokenizer serialises its own encoding), so one request's slow template never
    stalls another's."""

    def __init__(
        self,
        model: Any,
        limits: Limits | None = None,
        *,
        default_thinking: bool | None = None,
        thinking_budget: int | None = None,
        rewindable_cache: bool = True,
    ):
        self.tokenizer = model.tokenizer
        self.limits = limits or Limits()
        self.context = int(text_config(model.config).get("max_position_embeddings") or DEFAULT_CONTEXT)
        self.tables = token_tables(self.tokenizer)  # built now (about a second for a large vocabulary)
        self.vocab = self.tables.vocab_size
        self.default_thinking = default_thinking
        self.thinking_budget = thinking_budget
        self.rewindable_cache = rewindable_cache  # False: mark where the conversation so far ends (hybrid models)
        # apply_chat_template's own parameters: a request's chat_template_kwargs may only set template variables
        self.template_parameters = set(inspect.signature(type(self.tokenizer.hf).apply_chat_template).parameters)

    # -------------------------------------------------------------------------------------------- chat
    def chat(self, body: ChatRequest) -> Plan:
        if not self.tokenizer.has_chat_template:
            raise InvalidRequest("messages: this model has no chat template: use /v1/completions with a plain prompt")
        n = self._choices(body.n, 1)
        messages = [_message(m, i) for i, m in enumerate(body.messages)]
        kwargs = self._template_kwargs(body.chat_template_kwargs)
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidRequest("top_logprobs: needs logprobs: true")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        budget = body.thinking_budget if body.thinking_budget is not None else self.thinking_budget
        controls = self._controls(body, enable_thinking=self._thinking(kwargs, body.reasoning_effort),
                                  thinking_budget=budget, schema=self._schema(body.response_format),
                                  tools=body.tools, tool_choice=body.tool_choice)
        prepared = prepare(self.tokenizer, messages, controls, chat_template_kwargs=kwargs,
                           rewindable=self.rewindable_cache, render=self._render)
        max_tokens = self._max_tokens(len(prepared.prompt), body.max_completion_tokens or body.max_tokens, "messages")
        requests = [self._request(prepared, max_tokens, body, j, logprobs) for j in range(n)]
        return Plan(requests, [Choice(0)] * n, [len(prepared.prompt)])

    def _thinking(self, kwargs: dict, effort: str | None) -> bool | None:
        """enable_thinking from reasoning_effort ("none" turns it off), else the server's default where
        chat_template_kwargs does not say either (the engine checks the two agree)."""
        asked = kwargs.get("enable_thinking")
        if effort is None:
            return self.default_thinking if asked is None else None
        wanted = effort != "none"
        if isinstance(asked, bool) and asked != wanted:
            raise InvalidRequest(f"reasoning_effort: {effort!r} contradicts chat_template_kwargs.enable_thinking")
        return wanted

    def _schema(self, response_format: dict[str, Any] | None) -> dict | None:
        """The JSON schema a `response_format` asks for (json_object: any object), checked; None for text."""
        grammar = response_format_grammar(response_format)
        if grammar is None:
            return None
        self._check_grammar(grammar, "response_format")
        if response_format["type"] == "json_schema":
            return response_format["json_schema"]["schema"]
        return {"type": "object"}  # json_object

    @staticmethod
    def _controls(body: ChatRequest | CompletionRequest, **fields: Any) -> Controls:
        """The request's controls, with the secret guard of the `mlxq` extension field."""
        guard = body.mlxq
        if guard is not None:
            fields.update(secrets=guard.secrets, public=guard.public, min_span=guard.min_span)
        return Controls(**fields)

    def _template_kwargs(self, given: dict[str, Any] | None) -> dict[str, Any]:
        """A request's chat_template_kwargs: template variables only; its own chat template only when allowed."""
        kwargs = dict(given or {})
        for key in kwargs:
            if key == "chat_template" and not self.limits.allow_request_templates:
                raise InvalidRequest(f"{TEMPLATE_FIELD}: this server does not take chat templates from requests "
                                     "(start it with --allow-request-templates to allow them)")
            if key in self.template_parameters and key != "chat_template":
                raise InvalidRequest(f"chat_template_kwargs.{key}: not a template variable")
        if "chat_template" in kwargs and not isinstance(kwargs["chat_template"], str):
            raise InvalidRequest(f"{TEMPLATE_FIELD}: must be a string")
        return kwargs

    def _render(self, messages: list[dict], tools: list[dict] | None, kwargs: dict, generation_prompt: bool) -> str:
        """The prompt text. A request's own template renders within the time and size budgets of `limits`."""
        own = "chat_template" in kwargs
        field = TEMPLATE_FIELD if own else "messages"
        try:
            with _time_budget(self.limits.template_seconds if own else None):
                text = self.tokenizer.render_chat_template(
                    messages, tools=tools, add_generation_prompt=generation_prompt, **kwargs
                )
        except InvalidRequest:
            raise
        except _Overtime:
            raise InvalidRequest(f"{field}: rendering took longer than {self.limits.template_seconds:g} s") from None
        except Exception as e:  # the template's own checks (roles must alternate, ...) raise jinja errors
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InvalidRequest(f"{field}: the chat template cannot render the messages: {first[:300]}") from None
        if not isinstance(text, str):
            raise InvalidRequest(f"{field}: the chat template did not render text")
        if own and len(text) > self.limits.template_chars:
            raise InvalidRequest(f"{field}: renders {len(text)} characters; at most {self.limits.template_chars}")
        return text

    # -------------------------------------------------------------------------------------------- completions
    def completion(self, body: CompletionRequest) -> Plan:
        if body.suffix:
            raise InvalidRequest("suffix: is not supported")
        if body.best_of is not None and body.best_of != body.n:
            raise InvalidRequest("best_of: is not supported (only best_of == n)")
        if body.echo and body.logprobs is not None:
            raise InvalidRequest("echo: cannot be combined with logprobs")
        prompts = _prompt_list(body.prompt)
        n = self._choices(body.n, len(prompts))  # before any prompt is tokenized
        controls = self._controls(body)
        prepared = [prepare(self.tokenizer, self._prompt_ids(p, i, len(prompts)), controls)
                    for i, p in enumerate(prompts)]
        requests, choices = [], []
        requested = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's default for completions
        for p, prompt in enumerate(prepared):
            max_tokens = self._max_tokens(len(prompt.prompt), requested, "prompt")
            echo = self.tokenizer.decode(prompt.prompt) if body.echo else ""
            for j in range(n):
                requests.append(self._request(prompt, max_tokens, body, p * n + j, body.logprobs))
                choices.append(Choice(p, echo=echo))
        return Plan(requests, choices, [len(p.prompt) for p in prepared])

    def _prompt_ids(self, prompt: str | list[int], i: int, count: int) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequest(f"prompt: prompt[{i}] is empty" if count > 1 else "prompt: must not be empty")
        return ids

    # -------------------------------------------------------------------------------------------- shared
    def _choices(self, n: int, prompts: int) -> int:
        if n * prompts > self.limits.max_choices:
            raise InvalidRequest(f"n: at most {self.limits.max_choices} choices per request (asked for {n * prompts})")
        return n

    def _max_tokens(self, prompt_len: int, requested: int | None, prompt_field: str) -> int:
        limit = self.limits.max_tokens
        room = self.context - prompt_len
        if room < 1:
            raise ContextLengthExceeded(
                f"{prompt_field}: the prompt has {prompt_len} tokens; this model's context length is "
                f"{self.context} tokens"
            )
        if requested is None:
            return min(limit, room)
        if requested > limit:
            raise InvalidRequest(f"max_tokens: {requested} is more than this server allows ({limit})")
        if requested > room:
            raise ContextLengthExceeded(
                f"max_tokens: this model's maximum context length is {self.context} tokens; the prompt "
                f"has {prompt_len} and max_tokens asks for {requested} more"
            )
        return requested

    def _request(self, prepared: Prepared, max_tokens: int, body: ChatRequest | CompletionRequest, index: int,
                 logprobs: int | None) -> Request:
        return prepared.request(max_tokens, self._params(body, index), stop=check_stops(body.stop), logprobs=logprobs,
                                ignore_eos=body.ignore_eos, speculative=body.mlxq.speculative if body.mlxq else 0)

    def _params(self, body: ChatRequest | CompletionRequest, index: int) -> SamplingParams:
        bias = {}
        for key, value in (body.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise InvalidRequest(f"logit_bias: key {key!r} is not a token id") from None
            if not -100 <= value <= 100:
                raise InvalidRequest(f"logit_bias: value {value} for token {token} is not in [-100, 100]")
            bias[token] = float(value)
        check_logit_bias(bias, self.vocab)
        seed = None if body.seed is None else body.seed + index  # choices of one request differ, yet repeat
        return SamplingParams(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            logit_bias=bias,
            seed=seed,
        )

    def _check_grammar(self, grammar: str, what: str) -> None:
        try:
            error = llguidance.LLMatcher.validate_grammar(grammar, self.tables.ll)
        except (ValueError, TypeError, RuntimeError) as e:
            error = str(e) or type(e).__name__
        if error:
            raise InvalidRequest(f"{what}: {error.splitlines()[0][:300]}")


def _prompt_list(prompt: str | list) -> list[str | list[int]]:
    """The prompts of a completions request (text or token ids each), counted before any is tokenized."""
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        return [prompt]
    if not prompt:
        raise InvalidRequest("prompt: must not be empty")
    return list(prompt)


class _Overtime(BaseException):
    """Raised inside a template that ran past its time budget. A BaseException, so that no `except Exception`
    in Jinja or transformers swallows it on the way out."""


@contextmanager
def _time_budget(seconds: float | None):
    """Stops Python code run in this block (in this thread) once `seconds` have passed, by a trace function that
    looks at the clock on every call and line. Jinja templates are Python code once compiled, so a template that
    loops for minutes ends within the budget. None: no budget (and no tracing cost)."""
    if seconds is None:
        yield
        return
    deadline = time.monotonic() + seconds

    def trace(frame, event, arg):
        if time.monotonic() > deadline:
            raise _Overtime
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        yield
    finally:
        sys.settrace(previous)


def _message(m: Message, i: int) -> dict[str, Any]:
    """A message as the chat template takes it: text parts joined, `developer` as `system`."""
    content = m.content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(f"messages[{i}].content[{j}]: only text parts are supported")
            texts.append(part["text"])
        content = "".join(texts)
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
    for key in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
        value = getattr(m, key)
        if value is not None:
            out[key] = value
    if m.tool_calls:  # templates expect arguments as an object, while the API sends a JSON string
        out["tool_calls"] = [template_call(c.model_dump(exclude_none=True)) for c in m.tool_calls]
    return out
