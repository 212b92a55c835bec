"""OpenAI request bodies (the fields mlxq reads; others are ignored, as OpenAI-compatible servers do).

Types are strict: a string where a number belongs is a 400, not silently converted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_TOP_LOGPROBS = 20


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class Extension(_Body):
    """mlxq's own fields, under `"mlxq"`: the secret guard (`mlxq.engine.guards.SecretGuard`), as the Python API
    and `Session` take it: no span of `min_span` normalised characters of a secret is written, except spans that
    occur in `public` text; `speculative`: prompt-lookup draft tokens checked per decode step, or "mtp" for drafts
    from the model's multi-token-prediction head (the same output)."""

    secrets: list[str] = Field(default_factory=list)
    public: list[str] = Field(default_factory=list)
    min_span: int = Field(8, ge=1)
    speculative: Annotated[int, Field(ge=0, le=64)] | Literal["mtp"] = 0


class SamplingFields(_Body):
    """What chat and completions requests share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # extensions (vLLM, mlx-lm): 0 turns them off
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension (as vLLM): generate max_tokens whatever the model says
    mlxq: Extension | None = None  # extension: the secret guard, speculative decoding


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"  # the API sends a JSON string; templates take an object


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_budget: int | None = Field(None, ge=0)  # extension: reasoning tokens before `</think>` is forced


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
