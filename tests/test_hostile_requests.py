"""Client mistakes and hostile requests against a live server (issue 10, defects 1-4 and 9): each gets a 4xx
with `param`, nothing hangs, one request never stalls another, and a real internal error is a 500 logged once
that keeps the connection open."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from fixtures_qwen3 import *  # noqa: F403  (pytest fixtures: qwen3_model, ...)
from test_server import KEY, MODEL, USER, serving

from mlxq.engine.stops import MAX_STOP_CHARS
from mlxq.errors import InvalidRequest
from server.app import create_app
from server.prepare import Limits

NO_THINK = {"enable_thinking": False}
# Nested loops: minutes of rendering (the defect report's template)
SLOW_TEMPLATE = "{% for i in range(12000) %}{% for j in range(12000) %}{% endfor %}{% endfor %}hi"


@pytest.fixture(scope="module")
def live(qwen3_model):
    with serving(qwen3_model, limits=Limits(max_tokens=64, max_choices=4, max_request_bytes=64 << 10)) as server:
        yield server


def chat_body(**kw) -> bytes:
    return json.dumps({"model": MODEL, "messages": USER, "max_tokens": 4, "chat_template_kwargs": NO_THINK,
                       **kw}).encode()


def error_of(live, path: str, body: bytes, status: int = 400) -> dict:
    got, data = live.raw(path, body)  # urllib with a 30 s timeout: a hang fails the test
    assert got == status, data
    return data["error"]


# ------------------------------------------------------------------------------------------------ defect 1
@pytest.mark.parametrize("stream", [False, True])
def test_completions_with_no_prompts_is_a_400(live, stream):
    body = json.dumps({"model": MODEL, "prompt": [], "stream": stream}).encode()
    assert error_of(live, "/v1/completions", body)["param"] == "prompt"
    body = json.dumps({"model": MODEL, "prompt": [[]], "stream": stream}).encode()
    assert error_of(live, "/v1/completions", body)["param"] == "prompt"


# ------------------------------------------------------------------------------------------------ defect 2
@pytest.mark.parametrize("calls", [[{"function": "abc"}], [{"function": 5}], [{"function": [1, 2]}], [5],
                                   [{"function": {"arguments": "{}"}}]])
def test_malformed_tool_calls_in_history(live, calls):
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": calls}, {"role": "user", "content": "?"}]
    err = error_of(live, "/v1/chat/completions", chat_body(messages=messages))
    assert err["param"].startswith("messages.1.tool_calls.0"), err


@pytest.mark.parametrize("schema", [{"x-guidance": "zz"}, [], "object", {"type": "nonsense"}])
def test_malformed_response_format_schema(live, schema):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert error_of(live, "/v1/chat/completions", chat_body(response_format=fmt))["param"] == "response_format"


@pytest.mark.parametrize("choice", [{"type": "function", "function": "f"}, {"type": "function", "function": {}},
                                    {"type": "function"}, {"type": "function", "function": {"name": 5}}, "bogus"])
def test_malformed_tool_choice(live, choice):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    err = error_of(live, "/v1/chat/completions", chat_body(tools=tools, tool_choice=choice))
    assert err["param"] == "tool_choice"


class Conversation:
    """HTTP/1.1 over one socket, so a test sees whether the server kept the connection open."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.buffer = b""

    def post(self, path: str, body: bytes) -> tuple[int, dict, dict]:
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        self.sock.sendall(head.encode() + body)
        while b"\r\n\r\n" not in self.buffer:
            self._more()
        raw, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = raw.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        size = int(headers["content-length"])
        while len(self.buffer) < size:
            self._more()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return int(lines[0].split()[1]), headers, json.loads(data)

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, "the server closed the connection"
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def test_internal_error_is_one_500_logged_once_on_a_kept_connection(live, monkeypatch, caplog):
    def broken(body):
        raise RuntimeError("planted bug")

    conn = Conversation(live.url)
    try:
        status, _, data = conn.post("/v1/chat/completions", chat_body())
        assert status == 200 and data["choices"][0]["message"]["content"] is not None
        monkeypatch.setattr(_planner_of(live), "chat", broken)
        with caplog.at_level(logging.INFO):
            status, headers, data = conn.post("/v1/chat/completions", chat_body())
        assert status == 500 and data["error"]["type"] == "server_error" and "RuntimeError" in data["error"]["message"]
        assert headers.get("connection", "").lower() != "close"
        tracebacks = [r for r in caplog.records if r.exc_info]
        assert len(tracebacks) == 1 and "planted bug" in str(tracebacks[0].exc_info[1]), caplog.records
        monkeypatch.undo()
        status, _, data = conn.post("/v1/chat/completions", chat_body(n=9))  # same socket: still open
        assert status == 400 and data["error"]["param"] == "n"
    finally:
        conn.close()


def _planner_of(live):
    """The Planner behind the live app (its routes are bound methods of one OpenAIServer)."""
    app = live.app
    route = next(r for r in app.routes if getattr(r, "path", "") == "/v1/chat/completions")
    return getattr(route.endpoint, "__wrapped__", route.endpoint).__self__.planner


# ------------------------------------------------------------------------------------------------ defect 3
def test_request_templates_are_refused_by_default(live):
    kwargs = {**NO_THINK, "chat_template": "{{ messages[0].content }}"}
    err = error_of(live, "/v1/chat/completions", chat_body(chat_template_kwargs=kwargs))
    assert err["param"] == "chat_template_kwargs.chat_template" and "--allow-request-templates" in err["message"]
    err = error_of(live, "/v1/chat/completions", chat_body(chat_template_kwargs={"tokenize": True}))
    assert err["param"] == "chat_template_kwargs.tokenize"


def test_n_is_checked_before_any_prompt_is_tokenized(live, monkeypatch):
    tokenizer = _planner_of(live).tokenizer
    calls = []
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: calls.append(a) or [1])
    body = json.dumps({"model": MODEL, "prompt": ["hi"] * 8000, "max_tokens": 1}).encode()  # under 64 KiB
    assert error_of(live, "/v1/completions", body)["param"] == "n"
    assert calls == []


def test_an_allowed_slow_template_ends_in_its_budget_and_stalls_nobody(qwen3_model):
    limits = Limits(max_tokens=16, allow_request_templates=True, template_seconds=8)
    with serving(qwen3_model, limits=limits) as server:
        ok = chat_body(chat_template_kwargs={**NO_THINK, "chat_template": "{{ messages[0].content }}"})
        status, data = server.raw("/v1/chat/completions", ok)
        assert status == 200, data  # a harmless request template renders
        slow = chat_body(chat_template_kwargs={**NO_THINK, "chat_template": SLOW_TEMPLATE})
        results: dict[str, tuple] = {}
        order: list[str] = []

        def send(name: str, body: bytes) -> None:
            results[name] = server.raw("/v1/chat/completions", body)
            order.append(name)

        slow_thread = threading.Thread(target=send, args=("slow", slow))
        slow_thread.start()
        deadline = time.monotonic() + 30
        while not _rendering():  # wait until the slow template is being rendered
            assert slow_thread.is_alive() and time.monotonic() < deadline, results
            time.sleep(0.01)
        send("plain", chat_body())
        slow_thread.join(60)
        assert order == ["plain", "slow"], order  # the plain request did not wait for the template
        assert results["plain"][0] == 200
        status, data = results["slow"]
        assert status == 400 and data["error"]["param"] == "chat_template_kwargs.chat_template"
        assert "longer than 8 s" in data["error"]["message"]


def _rendering() -> bool:
    """Whether a request thread is inside Jinja right now."""
    frames = sys._current_frames().values()
    return any("jinja2" in (f.f_code.co_filename or "") or f.f_code.co_filename.startswith("<template>")
               for frame in frames for f in _stack(frame))


def _stack(frame):
    while frame is not None:
        yield frame
        frame = frame.f_back


# ------------------------------------------------------------------------------------------------ defect 4
def test_stop_limits(live):
    long = error_of(live, "/v1/chat/completions", chat_body(stop=["x" * (MAX_STOP_CHARS + 1)]))
    many = error_of(live, "/v1/chat/completions", chat_body(stop=[str(i) for i in range(17)]))
    assert long["param"] == many["param"] == "stop"


# ------------------------------------------------------------------------------------------------ defect 9
def test_empty_api_key_is_an_error(qwen3_model, live):
    with pytest.raises(InvalidRequest, match="API key is empty"):
        create_app(live.engine, _planner_of(live), [MODEL], api_key=" ")
    env = {**os.environ, "MLXQ_NO_REEXEC": "1"}
    for args, extra in ((["--api-key", ""], {}), ([], {"MLXQ_API_KEY": ""})):
        done = subprocess.run([sys.executable, "-m", "mlxq.cli", "serve", "nowhere", *args], capture_output=True,
                              text=True, env={**env, **extra}, timeout=120)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "empty" in done.stderr, done.stderr
    status, data = live.raw("/v1/models", key="")  # "Bearer " with nothing after it
    assert status == 401
