"""Property-based fuzzing of the HTTP API (issue 10) against a live server on 127.0.0.1 (a tiny Qwen3 with the real
Qwen3 tokenizer and chat template): request bodies drawn from the request models themselves (`server.schemas`:
every field, of its own type or of any other JSON type, present or not), damaged JSON, wrong paths, methods and
keys. Every answer must come within the deadline (no hang) and be a 2xx or a 4xx in OpenAI's error JSON, never a
5xx; a stream must end with [DONE] or a client-error event; nothing is logged with a traceback; and /health is
200 after each batch.

`make test` runs a small fixed-seed budget; the long run is `pytest -m slow tests/test_fuzz_requests.py`
(MLXQ_FUZZ_EXAMPLES sets its size; counts print as JSON and go to MLXQ_FUZZ_REPORT when set).
"""

from __future__ import annotations

import http.client
import json
import logging
import types
import typing
from collections import Counter
from typing import Any, Literal

import pydantic
import pytest
from fixtures_qwen3 import *  # noqa: F403  (pytest fixtures: qwen3_model, ...)
from hostile import RUNS, budget, reporting
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from test_server import KEY, MODEL, serving

from mlxq.errors import MlxqError
from server.prepare import Limits, Planner
from server.schemas import ChatRequest, CompletionRequest

FAST_EXAMPLES = 80
FAST_PLANS = 400  # in-process: bodies straight to the planner, no HTTP, no generation
BATCH = 20  # requests between /health checks
DEADLINE_S = 60  # a tiny model answers in well under a second: this only tells a hang from an answer

INTERESTING_INTS = [0, 1, 2, 3, 4, 5, 8, 9, 16, 100, 151667, 151668, 151935, 151936, 10**6, 2**31, 2**32, 2**53,
                    2**63, 2**64, 2**70, -1, -2**31, -2**63, -2**70]
ints = st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(-10, 300), st.integers())
floats = st.one_of(st.sampled_from([0.0, -0.0, 1e-9, 0.5, 1.0, 2.0, 100.0, 1e308]), st.floats(allow_nan=False,
                                                                                               allow_infinity=False))
texts = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "<think>", "</think>", "<tool_call>",
                                                         "<|im_end|>", "<|im_start|>user", "{{ x }}", "{% for %}",
                                                         "\u0000", "\ud7ff\ue000", "a" * 300]))
json_scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)), max_leaves=10)



def mostly(strategy: st.SearchStrategy, other: st.SearchStrategy) -> st.SearchStrategy:
    """`strategy` four times in five, else `other` (`a | b` would weigh each of b's own branches like a)."""
    return st.integers(0, 4).flatmap(lambda i: strategy if i else other)


# fields whose values are free-form JSON in the models: drawn from shapes that reach deep into the code
SCHEMAS = st.one_of(json_values, st.fixed_dictionaries({"type": st.sampled_from(["object", "string", "array",
                                                                                  "integer", "nonsense"])},
                                                       optional={"properties": st.dictionaries(
                                                           st.text(max_size=5), json_values, max_size=3),
                                                           "x-guidance": json_values,
                                                           "required": json_values, "enum": json_values}))
FREE_FORM = {
    "response_format": st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "json_object", "json_schema", "bogus"]) | json_scalars},
        optional={"json_schema": st.fixed_dictionaries({}, optional={"name": texts, "schema": SCHEMAS})
                  | json_values}),
    "tools": mostly(st.lists(st.fixed_dictionaries({"type": mostly(st.just("function"), json_scalars)}, optional={
        "function": mostly(st.fixed_dictionaries({"name": mostly(texts, json_scalars)}, optional={
            "parameters": SCHEMAS, "description": texts}), json_values)}), max_size=3), json_values),
    "tool_choice": st.one_of(st.sampled_from(["none", "auto", "required", "bogus"]), mostly(st.fixed_dictionaries(
        {"type": mostly(st.just("function"), json_scalars), "function": st.one_of(json_values, st.fixed_dictionaries(
            {"name": mostly(st.sampled_from(["answer", "other"]), json_scalars)}))}), json_values)),
    "chat_template_kwargs": st.dictionaries(st.sampled_from(["enable_thinking", "chat_template", "tokenize",
                                                             "tools", "add_generation_prompt", "x"]) | texts,
                                            json_values, max_size=3),
    "logit_bias": st.dictionaries(st.sampled_from(["0", "1", "151667", "-1", "999999999", "x"]) | texts,
                                  json_scalars, max_size=3),
    "content": texts | st.lists(st.fixed_dictionaries({"type": st.just("text") | texts},
                                                      optional={"text": texts | json_scalars}), max_size=3),
}


def strategy_for(annotation: Any, name: str = "") -> st.SearchStrategy:
    """Values of a request-model field's own type (recursing into nested models and containers)."""
    if name in FREE_FORM:
        return FREE_FORM[name]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return json_values
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return model_bodies(annotation)
    if origin is typing.Annotated:  # a constrained field (Field(ge=..)): values of its type, in range or not
        return strategy_for(args[0], name)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(strategy_for(a, name) for a in args))
    if origin is Literal:
        return st.sampled_from(args)
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=4)
    if origin is dict:
        return st.dictionaries(texts, strategy_for(args[1]), max_size=4)
    return {str: texts, int: ints, float: floats, bool: st.booleans(), type(None): st.none()}[annotation]


def model_bodies(model: type[pydantic.BaseModel], overrides: dict | None = None) -> st.SearchStrategy:
    """Objects for `model`: each field absent, of its own type, or (one time in five) any JSON value at all."""
    overrides = overrides or {}
    fields = {}
    for name, info in model.model_fields.items():
        own = overrides[name] if name in overrides else strategy_for(info.annotation, name)
        fields[name] = mostly(own, json_values)
    required = {n for n, info in model.model_fields.items() if info.is_required()}
    return st.fixed_dictionaries({n: s for n, s in fields.items() if n in required},
                                 optional={n: s for n, s in fields.items() if n not in required})


DEEP_FIELDS = ("messages", "tools", "tool_choice", "response_format", "chat_template_kwargs", "stop", "logit_bias",
               "prompt", "n", "logprobs", "top_logprobs", "echo", "stream_options")


def request_bodies(model: type[pydantic.BaseModel], overrides: dict, bases: list[dict]) -> st.SearchStrategy:
    """Half the time every field at random (most such bodies are rejected); half the time one of the valid `bases`
    with one to three fields drawn (streamed or not), so that many requests pass validation and reach templates,
    grammars and the engine."""
    overrides = {"model": st.just(MODEL), **overrides}
    own = {n: overrides[n] if n in overrides else strategy_for(info.annotation, n)
           for n, info in model.model_fields.items() if n != "model"}
    weighted = sorted(own) + [n for n in DEEP_FIELDS if n in own] * 4  # the fields that reach deepest, more often
    near = st.lists(st.sampled_from(weighted), min_size=1, max_size=3, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({n: own[n] for n in names}))
    near = st.tuples(st.sampled_from(bases), near, st.booleans()).map(
        lambda drawn: {**drawn[0], "stream": drawn[2], **drawn[1]})
    return st.one_of(model_bodies(model, overrides), near)


# Sampling fields mostly in their valid ranges, so that many bodies pass validation and reach the engine.
SMALL = {"max_tokens": st.integers(1, 6) | ints, "max_completion_tokens": st.integers(1, 6) | ints,
         "n": st.integers(1, 3) | ints, "temperature": st.floats(0, 2) | floats, "top_p": st.floats(0.01, 1) | floats,
         "min_p": st.floats(0, 1) | floats, "top_k": st.integers(0, 50) | ints,
         "presence_penalty": st.floats(-2, 2) | floats, "frequency_penalty": st.floats(-2, 2) | floats,
         "repetition_penalty": st.floats(0.5, 2) | floats, "top_logprobs": st.integers(0, 5) | ints,
         "thinking_budget": st.integers(0, 4) | ints}
CHAT_BASE = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Is the man alive?"}],
             "chat_template_kwargs": {"enable_thinking": False}}
TOOLS = [{"type": "function", "function": {"name": "answer", "parameters": {
    "type": "object", "properties": {"verdict": {"enum": ["yes", "no"]}}, "required": ["verdict"]}}}]
HISTORY = [{"role": "user", "content": "Alive?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "c1", "type": "function", "function": {"name": "answer", "arguments": '{"verdict": "no"}'}}]},
           {"role": "tool", "tool_call_id": "c1", "content": "noted"}, {"role": "user", "content": "Why?"}]
CHAT = request_bodies(ChatRequest, SMALL, [
    CHAT_BASE, {**CHAT_BASE, "tools": TOOLS}, {**CHAT_BASE, "tools": TOOLS, "messages": HISTORY},
    {**CHAT_BASE, "response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": TOOLS[0][
        "function"]["parameters"]}}}, {**CHAT_BASE, "chat_template_kwargs": {}, "max_tokens": 8}])
COMPLETION = request_bodies(CompletionRequest, {**SMALL, "logprobs": st.none() | st.integers(0, 5) | ints,
                                                "prompt": st.one_of(
    texts, st.lists(texts, max_size=5), st.lists(st.integers(0, 151935) | ints, max_size=8),
    st.lists(st.lists(st.integers(0, 151935) | ints, max_size=5), max_size=4))},
                            [{"model": MODEL, "max_tokens": 4, "prompt": "Once upon a time"}])


@st.composite
def requests(draw) -> tuple[str, str, bytes, dict[str, str]]:
    """(method, path, body, headers)."""
    kind = draw(st.sampled_from(["chat"] * 5 + ["completion"] * 4 + ["raw", "path", "auth"]))
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    if kind in ("chat", "completion"):
        body = draw(CHAT if kind == "chat" else COMPLETION)
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        return "POST", path, json.dumps(body, allow_nan=True).encode(), headers
    if kind == "raw":
        body = draw(st.one_of(st.binary(max_size=200), st.sampled_from(
            [b"", b"{", b"[]", b"null", b"1e999", b'{"model": "' + MODEL.encode() + b'"', b"[" * 5000 + b"]" * 5000,
             b'{"model": "tiny-qwen3", "messages": [' + b'{"role": "user", "content": "x"},' * 50 + b"]}"])))
        return "POST", draw(st.sampled_from(["/v1/chat/completions", "/v1/completions"])), body, headers
    if kind == "path":
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS"]))
        path = draw(st.sampled_from(["/", "/v1", "/v1/models", f"/v1/models/{MODEL}", "/v1/models/x", "/health",
                                     "/docs", "/openapi.json", "/v1/chat/completions", "/v1/embeddings"]))
        return method, path, b"{}" if method in ("POST", "PUT") else b"", headers
    key = draw(st.sampled_from(["", "Bearer", "Bearer ", f"bearer {KEY}", f"Bearer {KEY}x", "Basic abc", "\u00e9"]))
    return "POST", "/v1/chat/completions", b"{}", {**headers, "Authorization": key.encode().decode("latin-1")}


def _is_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):
        return False


class Tracebacks(logging.Handler):
    """Counts log records that carry a traceback or say a request failed."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.records.append(record)


class Client:
    """Sends one request and classifies the answer."""

    def __init__(self, url: str):
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)

    def send(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[str, str]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=DEADLINE_S)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            response = conn.getresponse()
            data = response.read()  # a stream ends when the server ends it: within the deadline or it is a hang
        except TimeoutError:
            return "hang", path
        finally:
            conn.close()
        status = response.status
        if status >= 500:
            return f"{status}", data[:300].decode("utf-8", "replace")
        if response.getheader("content-type", "").startswith("text/event-stream"):
            return self._stream(status, data)
        try:
            parsed = json.loads(data)
        except ValueError:
            return "not-json", data[:300].decode("utf-8", "replace")
        error = parsed.get("error") if isinstance(parsed, dict) else None
        if status >= 400 and not (isinstance(error, dict) and error.get("message")):
            return "bad-error-body", data[:300].decode()
        if status == 400 and _is_object(body) and not error.get("param"):  # the client is told which field
            return "400 without param", error["message"]
        return f"{status}", ""

    @staticmethod
    def _stream(status: int, data: bytes) -> tuple[str, str]:
        events = [line[6:] for line in data.decode().split("\n") if line.startswith("data: ")]
        if events and events[-1] == "[DONE]":
            return f"{status} stream", ""
        last = json.loads(events[-1]) if events else {}
        error = last.get("error") if isinstance(last, dict) else None
        if isinstance(error, dict) and error.get("type") == "invalid_request_error":
            return f"{status} stream-client-error", ""
        return "stream-broken", (events[-1] if events else "")[:300]


def fuzz_http(server, examples: int, seed_value: int, counts: Counter) -> None:
    client, handler = Client(server.url), Tracebacks()
    for name in ("", "mlxq", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addHandler(handler)
    sent = 0

    @seed(seed_value)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(request=requests())
    def check(request):
        nonlocal sent
        outcome, detail = client.send(*request)
        counts[outcome] += 1
        sent += 1
        assert outcome[0] in "24" and outcome != "400 without param", (outcome, detail, request[1], request[2][:500])
        assert not handler.records, [r.getMessage() for r in handler.records]
        if sent % BATCH == 0:
            assert client.send("GET", "/health", b"", {})[0] == "200"

    try:
        check()
        assert client.send("GET", "/health", b"", {})[0] == "200"
        counts["tracebacks logged"] += len(handler.records)
    finally:
        for name in ("", "mlxq", "uvicorn", "uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).removeHandler(handler)


def fuzz_planner(planner: Planner, examples: int, seed_value: int, counts: Counter) -> None:
    """Bodies that pass the request models go straight to the planner: a Plan or an MlxqError, nothing else.
    Thousands a minute, so combinations deep in templates, tools and grammars are reached that HTTP-speed
    fuzzing meets rarely."""

    @seed(seed_value)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(kind=st.sampled_from(["chat", "completion"]), data=st.data())
    def check(kind, data):
        schema, plan = (ChatRequest, planner.chat) if kind == "chat" else (CompletionRequest, planner.completion)
        body = data.draw(CHAT if kind == "chat" else COMPLETION)
        try:
            request = schema.model_validate_json(json.dumps(body))
        except pydantic.ValidationError:
            counts["rejected by the request model"] += 1
            return
        try:
            plan(request)
            counts["planned"] += 1
        except MlxqError as e:
            assert e.status < 500 and str(e), e
            counts[f"refused: {type(e).__name__}"] += 1

    check()


@pytest.fixture(scope="module")
def live(qwen3_model):
    limits = Limits(max_tokens=8, max_choices=4, max_request_bytes=64 << 10)
    with serving(qwen3_model, limits=limits, max_batch=4) as server:
        yield server


@pytest.mark.parametrize("run", RUNS)
def test_fuzz_planner(qwen3_model, run):
    examples, seed_value = budget(run, FAST_PLANS, scale=5)
    with reporting(f"fuzz_planner_{run}", Counter()) as counts:
        fuzz_planner(Planner(qwen3_model, Limits(max_tokens=8, max_choices=4)), examples, seed_value, counts)


@pytest.mark.parametrize("run", RUNS)
def test_fuzz_http(live, run):
    examples, seed_value = budget(run, FAST_EXAMPLES)
    with reporting(f"fuzz_http_{run}", Counter()) as counts:
        fuzz_http(live, examples, seed_value, counts)
