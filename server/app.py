"""The OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models, /health.

Three layers: routes here (HTTP, JSON, SSE, errors, auth, limits), `prepare.Planner` (bodies -> engine requests)
and the engine thread (`mlxq.engine.scheduler.Engine`), reached through `bridge.ServerSubmission`. Every bad request
gets OpenAI's error JSON with a 4xx status; a request that fails in the engine fails alone.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from mlxq.engine.scheduler import DEFAULT_MAX_BATCH, DEFAULT_PROMPT_CACHE_BYTES, Engine, Output
from mlxq.errors import InvalidRequest, MlxqError
from mlxq.experts import expert_stats
from server.bridge import EngineUnavailable, ServerSubmission
from server.output import CompletionLogprobs, TokenText, chat_logprobs, usage_json
from server.prepare import Limits, Plan, Planner
from server.schemas import ChatRequest, CompletionRequest

log = logging.getLogger("mlxq.server")

_FIELD = re.compile(r"^([a-z_][a-z0-9_.\[\]]*): ")  # messages name the field they are about first
POLL_S = 0.5  # how often a request checks whether its client is still there


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None, kind: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    @classmethod
    def of(cls, error: Exception) -> ApiError:
        if isinstance(error, ApiError):
            return error
        if isinstance(error, MlxqError):
            message = str(error)
            param = m.group(1) if (m := _FIELD.match(message)) and error.status < 500 else None
            return cls(error.status, message, param=param, code=getattr(error, "code", None))
        return cls(500, f"internal error: {type(error).__name__}")

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class _EventStream(StreamingResponse):
    """Server-sent events that cancel their engine requests however the response ends (finished, client gone,
    server shutting down)."""

    def __init__(self, events: AsyncIterator[str], submission: ServerSubmission):
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.submission = submission

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.submission.cancel()


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class _ChoiceRun:
    """One choice's progress: its content, reasoning, tool calls, logprobs, finish reason and usage."""

    def __init__(self, plan: Plan, index: int):
        self.choice = plan.choices[index]
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[dict] = []
        self.logprobs: list = []
        self.finish: str | None = None
        self.usage = None

    def take(self, out: Output) -> list[tuple[str, str]]:
        """The pieces this output makes final, as (field, text): reasoning first, then content."""
        pieces = [(name, text) for name, text in (("reasoning_content", out.reasoning), ("content", out.text)) if text]
        self.reasoning.append(out.reasoning)
        self.content.append(out.text)
        self.logprobs += out.logprobs
        if out.finish_reason is not None:
            self.calls, self.finish, self.usage = out.tool_calls, out.finish_reason, out.usage
        return pieces


class OpenAIServer:
    """Routes for one model served by `engine`. `names`: model ids requests may use (the first is listed)."""

    def __init__(self, engine: Engine, planner: Planner, names: list[str], *, api_key: str | None = None):
        if api_key is not None and not api_key.strip():
            raise InvalidRequest("the API key is empty: give a key, or none to serve without auth")
        self.engine, self.planner, self.names = engine, planner, names
        self.api_key = api_key
        self.text = TokenText(planner.tokenizer)
        self.created = int(time.time())
        self._experts_logged = expert_stats(engine.net)  # streamed experts: I/O logged after each request

    # -------------------------------------------------------------------------------------------- app
    def app(self) -> FastAPI:
        app = FastAPI(title="mlxq", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_exception_handler(ApiError, lambda _, e: e.response())
        app.add_exception_handler(MlxqError, lambda _, e: ApiError.of(e).response())
        app.add_exception_handler(HTTPException, self._http_error)
        app.add_api_route("/health", _guarded(self.health), methods=["GET"])
        app.add_api_route("/v1/models", _guarded(self.models), methods=["GET"])
        app.add_api_route("/v1/models/{model:path}", _guarded(self.model), methods=["GET"])
        app.add_api_route("/v1/chat/completions", _guarded(self.chat), methods=["POST"])
        app.add_api_route("/v1/completions", _guarded(self.completions), methods=["POST"])
        return app

    @staticmethod
    async def _http_error(_: Request, e: HTTPException) -> JSONResponse:
        message = {404: "no such endpoint", 405: "method not allowed"}.get(e.status_code, str(e.detail))
        return ApiError(e.status_code, message).response()

    # -------------------------------------------------------------------------------------------- routes
    async def health(self) -> JSONResponse:
        ok = self.engine.alive
        stats = self.engine.stats()
        degraded = stats.get("group", {}).get("state") == "degraded"  # a rank of a split model was lost
        status = "ok" if ok else "degraded" if degraded else "engine stopped"
        body = {"status": status, "model": self.names[0], **stats}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def models(self, request: Request) -> JSONResponse:
        self._auth(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request, model: str) -> JSONResponse:
        self._auth(request)
        self._check_model(model)
        return JSONResponse(self._model_card())

    async def chat(self, request: Request) -> Response:
        self._auth(request)
        body = await self._body(request, ChatRequest)
        self._check_model(body.model)
        plan = await run_in_threadpool(self.planner.chat, body)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await self._respond(request, plan, "chat", body.model, body.stream, include_usage)

    async def completions(self, request: Request) -> Response:
        self._auth(request)
        body = await self._body(request, CompletionRequest)
        self._check_model(body.model)
        plan = await run_in_threadpool(self.planner.completion, body)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await self._respond(request, plan, "completion", body.model, body.stream, include_usage)

    # -------------------------------------------------------------------------------------------- checks
    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    def _check_model(self, name: str) -> None:
        if name not in self.names:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server serves {self.names[0]!r}",
                param="model",
                code="model_not_found",
            )

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.names[0], "object": "model", "created": self.created, "owned_by": "mlxq"}

    async def _body(self, request: Request, schema: type[pydantic.BaseModel]) -> Any:
        limit = self.planner.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}", code="request_too_large")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise ApiError(413, f"request body is over the {limit}-byte limit", code="request_too_large")
        try:
            return schema.model_validate_json(bytes(data))
        except pydantic.ValidationError as e:
            raise _validation_error(e) from None

    # -------------------------------------------------------------------------------------------- responses
    async def _respond(
        self, request: Request, plan: Plan, kind: str, model: str, stream: bool, include_usage: bool
    ) -> Response:
        sub = ServerSubmission(self.engine, plan.requests, self.planner.limits.max_pending)
        try:
            first = await self._next(request, sub)  # an error before any output still gets its own status
            if first is None:
                return Response(status_code=499)  # the client left; nobody reads this
            if first[1].error is not None:
                raise ApiError.of(first[1].error)
        except BaseException:
            sub.cancel()
            raise
        runs = [_ChoiceRun(plan, i) for i in range(len(plan.requests))]
        ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        if stream:
            events = self._events(request, sub, plan, runs, first, kind, ident, model, include_usage)
            return _EventStream(events, sub)
        try:
            item = first
            while item is not None:
                self._take(runs, item)
                if sub.done:
                    break
                item = await self._next(request, sub)
            if item is None:
                return Response(status_code=499)
        finally:
            sub.cancel()
            self._log_experts()
        return JSONResponse(self._whole(plan, runs, kind, ident, model))

    def _log_experts(self) -> None:
        """Streamed experts' I/O since the last log line (concurrent requests share one line)."""
        if self._experts_logged is None:
            return
        now = expert_stats(self.engine.net)
        run, self._experts_logged = now - self._experts_logged, now
        if run.tokens:
            log.info("%s", run.summary())

    async def _next(self, request: Request, sub: ServerSubmission) -> tuple[int, Output] | None:
        """The next output; None when the client has gone away (checked every POLL_S, busy or not)."""
        while True:
            if time.monotonic() - sub.checked >= POLL_S:
                sub.checked = time.monotonic()
                if await request.is_disconnected():
                    sub.cancel()
                    return None
            item = await sub.aget(POLL_S)
            if item is not None:
                return item

    @staticmethod
    def _take(runs: list[_ChoiceRun], item: tuple[int, Output]) -> list[tuple[str, str]]:
        index, out = item
        if out.error is not None:
            raise ApiError.of(out.error)
        if out.finish_reason == "cancelled":
            raise EngineUnavailable("the request was cancelled (the server is shutting down)")
        return runs[index].take(out)

    def _whole(self, plan: Plan, runs: list[_ChoiceRun], kind: str, ident: str, model: str) -> dict[str, Any]:
        choices = []
        for i, run in enumerate(runs):
            if kind == "chat":
                message: dict[str, Any] = {"role": "assistant", "content": "".join(run.content)}
                if "".join(run.reasoning):
                    message["reasoning_content"] = "".join(run.reasoning)
                if run.calls:
                    message["tool_calls"] = run.calls
                    message["content"] = message["content"] or None
                logprobs = chat_logprobs(run.logprobs, self.text) if plan.requests[i].logprobs is not None else None
                choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": run.finish})
            else:
                logprobs = None
                if plan.requests[i].logprobs is not None:
                    logprobs = CompletionLogprobs(self.text, len(run.choice.echo)).block(run.logprobs)
                text = run.choice.echo + "".join(run.content)
                choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": run.finish})
        return {
            "id": ident,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "mlxq",
            "choices": choices,
            "usage": self._usage(plan, runs),
        }

    @staticmethod
    def _usage(plan: Plan, runs: list[_ChoiceRun]) -> dict[str, Any]:
        prompts = range(len(plan.prompt_tokens))
        first = [next(i for i, c in enumerate(plan.choices) if c.prompt_index == p) for p in prompts]
        return usage_json([r.usage for r in runs], plan.prompt_tokens, first)

    async def _events(
        self,
        request: Request,
        sub: ServerSubmission,
        plan: Plan,
        runs: list[_ChoiceRun],
        first: tuple[int, Output],
        kind: str,
        ident: str,
        model: str,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        head = {
            "id": ident,
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": "mlxq",
        }
        extra = {"usage": None} if include_usage else {}
        offsets = [CompletionLogprobs(self.text, len(run.choice.echo)) for run in runs]

        def chunk(choice: dict[str, Any]) -> str:
            return _sse({**head, "choices": [choice], **extra})

        if kind == "chat":
            for i in range(len(runs)):
                yield chunk(
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                )
        else:
            for i, run in enumerate(runs):
                if run.choice.echo:
                    yield chunk({"index": i, "text": run.choice.echo, "logprobs": None, "finish_reason": None})
        item: tuple[int, Output] | None = first
        try:
            while True:
                index, out = item
                run = runs[index]
                pieces = self._take(runs, item)
                want = plan.requests[index].logprobs is not None and out.logprobs
                if kind == "chat":
                    logprobs = chat_logprobs(out.logprobs, self.text) if want else None
                    for name, text in pieces or ([("content", "")] if logprobs else []):
                        yield chunk(
                            {"index": index, "delta": {name: text}, "logprobs": logprobs, "finish_reason": None}
                        )
                        logprobs = None  # once per output, on its first piece
                    if run.finish is not None:
                        if run.calls:
                            calls = [{"index": k, **c} for k, c in enumerate(run.calls)]
                            yield chunk(
                                {
                                    "index": index,
                                    "delta": {"tool_calls": calls},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            )
                        yield chunk({"index": index, "delta": {}, "logprobs": None, "finish_reason": run.finish})
                else:
                    text = "".join(t for _, t in pieces)
                    logprobs = offsets[index].block(out.logprobs) if want else None
                    if text or logprobs or run.finish is not None:
                        yield chunk({"index": index, "text": text, "logprobs": logprobs, "finish_reason": run.finish})
                if sub.done:
                    break
                item = await self._next(request, sub)
                if item is None:
                    return  # the client went away
        except Exception as e:  # the status line is long gone: the error goes in the stream (the client raises)
            error = ApiError.of(e)
            if error.status >= 500 and not isinstance(e, (ApiError, MlxqError)):
                log.error("streamed request failed", exc_info=e)
            yield _sse({"error": {"message": error.message, "type": error.kind, "param": error.param,
                                  "code": error.code}})
            return
        if include_usage:
            yield _sse({**head, "choices": [], "usage": self._usage(plan, runs)})
        self._log_experts()
        yield _sse("[DONE]")


def _guarded(route: Callable) -> Callable:
    """A route whose unexpected exceptions (bugs) are logged once and answered as a 500 in OpenAI's error JSON.
    Left to Starlette, such an exception is logged twice (its handler, then the server) and closes the
    connection; the errors a client causes are ApiErrors and MlxqErrors, answered by their handlers."""

    @functools.wraps(route)
    async def guarded(*args, **kwargs):
        try:
            return await route(*args, **kwargs)
        except (ApiError, MlxqError, HTTPException):
            raise
        except Exception as e:
            log.error("request failed", exc_info=e)
            return ApiError.of(e).response()

    return guarded


def _validation_error(e: pydantic.ValidationError) -> ApiError:
    err = e.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {err['msg']}")
    loc = ".".join(str(p) for p in err["loc"])
    if not loc:
        return ApiError(400, f"the request body must be a JSON object ({err['msg']})")
    more = len(e.errors()) - 1
    return ApiError(400, f"{loc}: {err['msg']}" + (f" (and {more} more errors)" if more else ""), param=loc)


def create_app(engine: Engine, planner: Planner, names: list[str], *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app for `engine` (already started). `names`: model ids requests may use, the first listed."""
    return OpenAIServer(engine, planner, names, api_key=api_key).app()


def build_app(
    model: Any,
    names: list[str],
    *,
    api_key: str | None = None,
    limits: Limits | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
    default_thinking: bool | None = None,
    thinking_budget: int | None = None,
    prompt_cache_spill: tuple[str, int] | None = None,
) -> tuple[FastAPI, Engine]:
    """An app serving `model` (an `mlxq.Model`) on the model's own engine (so the Python API in the same process
    shares it), started with these settings; close the engine when done."""
    model.configure(max_batch=max_batch, prompt_cache_bytes=prompt_cache_bytes, prompt_cache_spill=prompt_cache_spill)
    engine = model.engine
    try:
        planner = Planner(
            model,
            limits,
            default_thinking=default_thinking,
            thinking_budget=thinking_budget,
            rewindable_cache=engine.rewindable,
        )
        return create_app(engine, planner, names, api_key=api_key), engine
    except BaseException:
        engine.close()
        raise
