"""`mlxq serve` through the official `openai` client: a live server (uvicorn on a free port) on a tiny random
Qwen3 with the real Qwen3 tokenizer and chat template."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import openai
import pytest
import uvicorn
from fixtures_qwen3 import *  # noqa: F403  (pytest fixtures: qwen3_model, ...)
from fixtures_qwen3 import END_THINK, THINK
from fixtures_qwen35 import *  # noqa: F403  (pytest fixture: hybrid_model)

from mlxq.engine.guards import thinking_processor
from mlxq.engine.scheduler import Engine
from server.app import build_app
from server.prepare import Limits

MODEL, KEY = "tiny-qwen3", "test-key"
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
USER = [{"role": "user", "content": "Is the man in the story alive?"}]
SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no", "irrelevant"]},
        "solved": {"type": "boolean"},
        "comment": {"type": "string", "maxLength": 20},
    },
    "required": ["answer", "solved", "comment"],
    "additionalProperties": False,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Live:
    url: str
    engine: Engine
    client: openai.OpenAI
    app: Any = None

    def raw(self, path: str, body: bytes | None = None, *, key: str | None = KEY, method: str | None = None):
        """(status, parsed JSON) of a raw HTTP request."""
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


@contextlib.contextmanager
def serving(model, **options):
    """A live server on `model` (uvicorn in a thread, on a free port)."""
    app, engine = build_app(model, [MODEL], api_key=KEY, **options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}"
        yield Live(url, engine, openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60), app)
    finally:
        server.should_exit = True
        thread.join(10)
        engine.close()


@pytest.fixture(scope="module")
def live(qwen3_model):
    with serving(qwen3_model, limits=Limits(max_tokens=512, max_choices=4, max_request_bytes=64 << 10)) as server:
        yield server


def chat(live: Live, **kw):
    kw = {"model": MODEL, "messages": USER, "max_tokens": 16, **kw}
    return live.client.chat.completions.create(**kw)


def wait_idle(engine: Engine, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while engine.pending:
        assert time.monotonic() < deadline, f"engine still busy: {engine.stats()}"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------------ basics
def test_chat_completion_and_usage(qwen3_model):
    with serving(qwen3_model) as live:  # a fresh server: its prompt cache starts empty
        r = chat(live, temperature=0, extra_body=NO_THINK)
        assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
        choice = r.choices[0]
        assert choice.message.role == "assistant" and choice.message.content
        assert choice.finish_reason in ("stop", "length")
        prompt = qwen3_model.tokenizer.apply_chat_template(USER, enable_thinking=False)
        u = r.usage
        assert u.prompt_tokens == len(prompt) and u.total_tokens == u.prompt_tokens + u.completion_tokens
        assert 1 <= u.completion_tokens <= 16 and u.prompt_tokens_details.cached_tokens == 0
        # The same prompt again resumes all of it but the last token (whose logits start the answer); another
        # question resumes exactly the tokens both prompts share.
        again = chat(live, temperature=0, extra_body=NO_THINK)
        assert again.usage.prompt_tokens_details.cached_tokens == len(prompt) - 1
        other = [{"role": "user", "content": "Did he die of thirst?"}]
        other_prompt = qwen3_model.tokenizer.apply_chat_template(other, enable_thinking=False)
        shared = next(i for i, (a, b) in enumerate(zip(prompt, other_prompt, strict=False)) if a != b)
        r = chat(live, messages=other, temperature=0, extra_body=NO_THINK)
        assert 0 < shared < len(prompt) - 1 and r.usage.prompt_tokens_details.cached_tokens == shared
        models = live.client.models.list()
        assert [m.id for m in models.data] == [MODEL]


def test_completions_with_echo_and_logprobs(live, qwen3_model):
    r = live.client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2
    )
    c = r.choices[0]
    assert r.object == "text_completion" and c.text and c.finish_reason == "length"
    assert r.usage.completion_tokens == 6 == len(c.logprobs.tokens) == len(c.logprobs.token_logprobs)
    assert all(len(top) == 2 for top in c.logprobs.top_logprobs)
    assert "".join(c.logprobs.tokens) == c.text
    echoed = live.client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, echo=True
    )
    assert echoed.choices[0].text == "The capital of France is" + c.text
    ids = qwen3_model.tokenizer.encode("The capital of France is")
    by_ids = live.client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == c.text


def test_streaming_matches_the_whole_answer_and_reports_usage(live):
    args = dict(temperature=1.0, seed=11, max_tokens=20, logprobs=True, top_logprobs=2)
    whole = chat(live, **args)
    stream = chat(live, stream=True, stream_options={"include_usage": True}, **args)
    chunks = list(stream)
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    deltas = [c.choices[0].delta for c in chunks[:-1]]
    assert deltas[0].role == "assistant"
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    msg = whole.choices[0].message
    assert content == msg.content and reasoning == (getattr(msg, "reasoning_content", None) or "")
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    streamed = [t for c in chunks[:-1] if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in whole.choices[0].logprobs.content]
    assert len(streamed) == whole.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in streamed)


def test_stop_strings_streamed_or_not(live):
    full = live.client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    expected = text[: text.find(stop)]
    cut = live.client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0, stop=[stop, "never-appears"]
    )
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    stream = live.client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0, stop=stop, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_reproducibility_and_sampling_fields(live):
    extensions = {"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1}
    args = dict(
        temperature=1.0,
        top_p=0.95,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        max_tokens=16,
        extra_body={**NO_THINK, **extensions},
    )
    a, b = chat(live, seed=42, **args), chat(live, seed=42, **args)
    c = chat(live, seed=43, **args)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert c.choices[0].message.content != a.choices[0].message.content
    two = chat(live, seed=42, n=2, **args)
    assert [ch.index for ch in two.choices] == [0, 1]
    assert two.choices[0].message.content == a.choices[0].message.content  # choice i uses seed + i


def test_logit_bias(live, qwen3_model):
    token = qwen3_model.tokenizer.encode(" banana", add_special_tokens=False)[0]
    r = live.client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=3, temperature=0, logit_bias={str(token): 100}
    )
    assert r.choices[0].text == " banana" * 3


# ------------------------------------------------------------------------------------------------ structure
def _valid(answer: dict) -> bool:
    return (
        set(answer) == {"answer", "solved", "comment"}
        and answer["answer"] in ("yes", "no", "irrelevant")
        and isinstance(answer["solved"], bool)
        and isinstance(answer["comment"], str)
        and len(answer["comment"]) <= 20
    )


def test_json_schema_answers_always_validate(live, qwen3_model):
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}

    def ask(seed: int) -> str:
        think = {} if seed % 3 else {"thinking_budget": 4}  # some think first, then answer in JSON
        r = chat(
            live,
            temperature=1.0,
            seed=seed,
            max_tokens=64,
            response_format=fmt,
            extra_body={**(NO_THINK if seed % 3 else {}), **think},
        )
        assert r.choices[0].finish_reason == "stop"
        return r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(24)))
    assert all(_valid(json.loads(a)) for a in answers)
    assert len(set(answers)) > 1  # sampled, not one fixed answer
    # json_object: keys are free, so a random model may run out of tokens inside one; cut off or not, the output
    # is JSON so far, and once the object closes the answer ends.
    for seed in range(4):
        obj = chat(
            live,
            temperature=1.0,
            seed=seed,
            max_tokens=24,
            response_format={"type": "json_object"},
            extra_body=NO_THINK,
        ).choices[0]
        assert obj.message.content.startswith("{")
        if obj.finish_reason == "stop":
            assert isinstance(json.loads(obj.message.content), dict)
    closing = {str(t): 40 for t in qwen3_model.tokenizer.encode("{}", add_special_tokens=False)}
    obj = chat(
        live,
        temperature=1.0,
        seed=0,
        max_tokens=24,
        response_format={"type": "json_object"},
        logit_bias=closing,
        extra_body=NO_THINK,
    ).choices[0]
    assert obj.finish_reason == "stop" and json.loads(obj.message.content) == {}


def test_thinking_off_never_thinks(live):
    # The bias pushes the model to open a think block; with thinking off the tag is masked, so it cannot.
    bias = {str(THINK): 30, str(END_THINK): 30}
    for seed in range(6):
        off = chat(live, temperature=1.0, seed=seed, logit_bias=bias, reasoning_effort="none")
        msg = off.choices[0].message
        assert msg.content.strip() and "think>" not in msg.content
        assert getattr(msg, "reasoning_content", None) is None
    also_off = chat(live, temperature=1.0, seed=9, logit_bias=bias, extra_body=NO_THINK).choices[0].message
    assert also_off.content.strip() and "think>" not in also_off.content
    # Thinking on: the reasoning comes back on its own, never inside the content; the budget ends it.
    on = chat(live, temperature=1.0, seed=3, max_tokens=40, extra_body={"thinking_budget": 5})
    msg = on.choices[0].message
    assert msg.reasoning_content and "think>" not in msg.content and "think>" not in msg.reasoning_content
    assert msg.content.strip()
    assert 0 < on.usage.completion_tokens_details.reasoning_tokens < on.usage.completion_tokens


WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"enum": ["Paris", "Tokyo"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
]


def test_tool_calls(live):
    tools = WEATHER_TOOLS
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = chat(live, tools=tools, tool_choice=choice, temperature=1.0, seed=2, max_tokens=48, reasoning_effort="none")
        assert r.choices[0].finish_reason == "tool_calls"
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Tokyo")
    # Thinking first: the forced call follows the think block (the budget closes it, then a blank line).
    thought = chat(
        live,
        tools=tools,
        tool_choice="required",
        temperature=1.0,
        seed=4,
        max_tokens=64,
        extra_body={"thinking_budget": 3},
    )
    assert thought.choices[0].finish_reason == "tool_calls" and thought.choices[0].message.reasoning_content
    stream = chat(
        live, tools=tools, tool_choice="required", temperature=0, max_tokens=48, reasoning_effort="none", stream=True
    )
    chunks = list(stream)
    calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# ------------------------------------------------------------------------------------------------ cache
def test_prompt_cache_reports_cached_tokens(live):
    system = {"role": "system", "content": "You are the game master of a lateral thinking puzzle. " * 8}
    first = chat(live, messages=[system, *USER], temperature=0, extra_body=NO_THINK)
    answer = first.choices[0].message.content
    turn2 = [system, *USER, {"role": "assistant", "content": answer}, {"role": "user", "content": "Was it night?"}]
    second = chat(live, messages=turn2, temperature=0, extra_body=NO_THINK)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # Everything up to the previous assistant header is reused (its empty think block is not re-rendered).
    assert first.usage.prompt_tokens - 8 <= cached < second.usage.prompt_tokens
    again = chat(live, messages=turn2, temperature=0, extra_body=NO_THINK)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == second.choices[0].message.content


def test_prompt_cache_on_a_hybrid_model(hybrid_model):
    """Recurrent layers cannot rewind: the server checkpoints where the conversation so far ends, and the next
    turn resumes there."""
    with serving(hybrid_model) as live:
        system = {"role": "system", "content": "You are the game master of a lateral thinking puzzle. " * 8}
        first = chat(live, messages=[system, *USER], temperature=0, extra_body=NO_THINK)
        turn2 = [
            system,
            *USER,
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "Was it night?"},
        ]
        second = chat(live, messages=turn2, temperature=0, extra_body=NO_THINK)
        history = hybrid_model.tokenizer.apply_chat_template([system, *USER], add_generation_prompt=False)
        assert second.usage.prompt_tokens_details.cached_tokens == len(history)
        # Same answer as the whole prompt run afresh, under the same thinking control.
        ids = hybrid_model.tokenizer.apply_chat_template(turn2, enable_thinking=False)
        fresh = hybrid_model.generate(
            ids, max_tokens=16, logits_processors=[thinking_processor(hybrid_model.tokenizer, False, prompt=ids)]
        )
        assert second.choices[0].message.content == fresh.text.strip()


# ------------------------------------------------------------------------------------------------ concurrency
def test_concurrent_streams_with_disconnects(live):
    engine = live.engine
    wait_idle(engine)
    cancelled_before = engine.cancelled
    rng = random.Random(0)
    leave_after = [rng.choice([None, 1, 3, 6]) for _ in range(8)]
    leave_after[0], leave_after[1] = None, 2  # at least one of each

    def client(i: int) -> str:
        stream = chat(
            live,
            messages=[{"role": "user", "content": f"Tell story number {i}."}],
            max_tokens=40,
            temperature=1.0,
            seed=i,
            stream=True,
            extra_body={**NO_THINK, "ignore_eos": True},
        )
        seen = 0
        for chunk in stream:
            seen += 1
            if leave_after[i] is not None and seen >= leave_after[i]:
                stream.close()  # the client goes away mid-answer
                return "left"
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return finish

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(client, range(8)))
    assert results == ["left" if n is not None else "length" for n in leave_after]
    wait_idle(engine)  # every generation ended: finished, or cancelled by its client leaving
    assert engine.cancelled - cancelled_before == sum(n is not None for n in leave_after)
    status, health = live.raw("/health", key=None)
    assert status == 200 and health["status"] == "ok" and health["running"] == 0
    assert chat(live, extra_body=NO_THINK).choices[0].message.content


def test_a_client_that_leaves_a_whole_answer_cancels_it(live):
    engine = live.engine
    wait_idle(engine)
    cancelled = engine.cancelled
    impatient = live.client.with_options(timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=500, extra_body={**NO_THINK, "ignore_eos": True}
        )
    wait_idle(engine)  # the server notices within a second or so, not after 500 tokens
    assert engine.cancelled == cancelled + 1


def test_a_failing_request_fails_alone(live, monkeypatch):
    engine = live.engine
    submit = engine.submit

    def sabotaged(req):  # the next requests get a logits processor that raises at their third token
        make = req.make_processors

        def boom(generated, logits: mx.array) -> mx.array:
            if len(generated) >= 2:
                raise RuntimeError("sabotaged processor")
            return logits

        req.make_processors = lambda: [*make(), boom]
        submit(req)

    monkeypatch.setattr(engine, "submit", sabotaged)
    with pytest.raises(openai.InternalServerError) as err:
        chat(live, extra_body=NO_THINK)
    assert "sabotaged processor" in err.value.body["message"] and err.value.body["type"] == "server_error"
    with pytest.raises(openai.APIError, match="sabotaged processor"):
        list(chat(live, stream=True, extra_body=NO_THINK))  # the error arrives inside the stream
    monkeypatch.setattr(engine, "submit", submit)
    assert chat(live, extra_body=NO_THINK).choices[0].message.content
    assert live.raw("/health", key=None)[0] == 200


# ------------------------------------------------------------------------------------------------ bad requests
def test_malformed_requests_get_openai_errors(live):
    good = {"model": MODEL, "messages": USER}
    cases = [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (json.dumps({"model": MODEL}).encode(), 400, "messages"),
        (json.dumps({**good, "messages": "hello"}).encode(), 400, "messages"),
        (json.dumps({**good, "max_tokens": "10"}).encode(), 400, "max_tokens"),
        (json.dumps({**good, "temperature": 5}).encode(), 400, "temperature"),
        (json.dumps({**good, "max_tokens": 10**9}).encode(), 400, "max_tokens"),
        (json.dumps({**good, "n": 99}).encode(), 400, "n"),
        (json.dumps({**good, "top_logprobs": 2}).encode(), 400, "top_logprobs"),
        (json.dumps({**good, "logit_bias": {"x": 1}}).encode(), 400, "logit_bias"),
        (json.dumps({**good, "logit_bias": {"99999999": 1}}).encode(), 400, "logit_bias"),
        (json.dumps({**good, "messages": [{"role": "wizard", "content": "hi"}]}).encode(), 400, "messages.0.role"),
        (
            json.dumps(
                {**good, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}}
            ).encode(),
            400,
            "response_format",
        ),
        (json.dumps({**good, "tool_choice": "required"}).encode(), 400, "tool_choice"),
        (
            json.dumps(
                {**good, "reasoning_effort": "none", "chat_template_kwargs": {"enable_thinking": True}}
            ).encode(),
            400,
            None,
        ),
        (json.dumps({**good, "model": "gpt-4"}).encode(), 404, "model"),
        (json.dumps({**good, "messages": [{"role": "user", "content": "word " * 2100}]}).encode(), 400, None),
        (json.dumps({**good, "messages": [{"role": "user", "content": "x" * (70 << 10)}]}).encode(), 413, None),
    ]
    for body, status, param in cases:
        got, data = live.raw("/v1/chat/completions", body)
        assert got == status, (body[:80], data)
        err = data["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"] == "invalid_request_error"
        if param is not None:
            assert err["param"] == param, (body[:80], err)
    long = live.raw("/v1/chat/completions", cases[-2][0])[1]["error"]
    assert long["code"] == "context_length_exceeded"
    assert live.raw("/v1/completions", json.dumps({"model": MODEL, "prompt": ""}).encode())[0] == 400
    assert live.raw("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "suffix": "y"}).encode())[0] == 400
    assert live.raw("/v1/nowhere")[0] == 404
    assert live.raw("/v1/chat/completions", method="GET")[0] == 405
    # Auth: /v1 needs the key, /health does not.
    assert live.raw("/v1/models", key=None)[0] == 401
    status, data = live.raw("/v1/chat/completions", json.dumps(good).encode(), key="wrong")
    assert status == 401 and data["error"]["code"] == "invalid_api_key"
    assert live.raw("/health", key=None)[0] == 200
    with pytest.raises(openai.NotFoundError):
        chat(live, model="nope")
    with pytest.raises(openai.BadRequestError):
        chat(live, max_tokens=10**6)
    assert chat(live, extra_body=NO_THINK).choices[0].message.content  # still serving


# ------------------------------------------------------------------------------------------------ the command
def test_mlxq_serve_command(qwen3_model_dir):
    port = free_port()
    env = {**os.environ, "MLXQ_NO_REEXEC": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlxq.cli",
            "serve",
            str(qwen3_model_dir),
            "--port",
            str(port),
            "--served-model-name",
            "tiny",
            "--api-key",
            KEY,
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=Path(__file__).parent.parent,
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=30)
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "mlxq serve did not come up"
                time.sleep(0.2)
        assert [m.id for m in models.data] == ["tiny"]
        r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, reasoning_effort="none")
        assert r.choices[0].message.content
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode in (0, 130), out
    assert "loaded" in out and "ready" in out and f"127.0.0.1:{port}/v1" in out and "auth on" in out
