"""One set of options on every path: the secret guard, thinking control and its budget (one default), a JSON
schema, tools, logprobs and penalties give the same greedy answer through the Python API, a Session and the
server (its fields, and the `mlxq` extension for the guard), and each option visibly does its job."""

from __future__ import annotations

import json

import pytest
from fixtures_qwen3 import *  # noqa: F403  (pytest fixtures: qwen3_model, ...)
from fixtures_qwen3 import END_THINK, THINK
from test_guards import teacher
from test_server import MODEL, serving

from mlxq.api import Session
from mlxq.engine.guards import normalize
from server.output import TokenText

QUESTION = "Is the man in the story alive?"
MESSAGES = [{"role": "user", "content": QUESTION}]
MAX_TOKENS = 24
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no", "irrelevant"]}, "solved": {"type": "boolean"}},
    "required": ["answer", "solved"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "reveal_hint",
            "parameters": {"type": "object", "properties": {"level": {"enum": [1, 2, 3]}}, "required": ["level"]},
        },
    }
]


@pytest.fixture(scope="module")
def live(qwen3_model):
    with serving(qwen3_model) as server:
        yield server


@pytest.fixture(scope="module")
def ids(qwen3_model):
    tok = qwen3_model.tokenizer
    return {word: tok.encode(word, add_special_tokens=False)[0] for word in (" banana", " the", "{", " yes")}


def cases(ids) -> dict[str, dict]:
    return {
        "schema": dict(schema=SCHEMA, enable_thinking=False),
        "thinking budget": dict(enable_thinking=True, thinking_budget=3, logit_bias={END_THINK: -100.0}),
        "default budget": dict(enable_thinking=True, logit_bias={END_THINK: -100.0}),  # half of max_tokens
        "tools": dict(tools=TOOLS, tool_choice="required", enable_thinking=False),
        "secret guard": dict(secrets=["Banana bread"], min_span=6, enable_thinking=False,
                             logit_bias={ids[" banana"]: 40.0}),
        "penalties": dict(enable_thinking=False, logit_bias={ids[" the"]: 12.0}, presence_penalty=1.5,
                          frequency_penalty=2.0, repetition_penalty=1.3),
        "logprobs": dict(enable_thinking=False, logprobs=3),
    }


def server_body(case: dict) -> dict:
    """The same options as OpenAI fields, vLLM-style extensions and the `mlxq` extension."""
    body: dict = {"temperature": 0}
    extra: dict = {}
    for key, value in case.items():
        if key == "schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": value}}
        elif key == "enable_thinking":
            extra["chat_template_kwargs"] = {"enable_thinking": value}
        elif key in ("thinking_budget", "repetition_penalty"):
            extra[key] = value
        elif key in ("secrets", "public", "min_span"):
            extra.setdefault("mlxq", {})[key] = value
        elif key == "logit_bias":
            body[key] = {str(t): b for t, b in value.items()}
        elif key == "logprobs":
            body["logprobs"], body["top_logprobs"] = True, value
        else:  # tools, tool_choice, presence_penalty, frequency_penalty
            body[key] = value
    return {**body, "extra_body": extra}


def session_answer(model, case: dict):
    options = {k: v for k, v in case.items() if k != "schema"}
    s = Session(model, max_tokens=MAX_TOKENS, **options)
    return s, s.ask(QUESTION, schema=case.get("schema"))


@pytest.mark.parametrize("name", ["schema", "thinking budget", "default budget", "tools", "secret guard",
                                  "penalties", "logprobs"])
def test_same_answer_on_every_path(qwen3_model, live, ids, name):
    case = cases(ids)[name]
    api = qwen3_model.generate(MESSAGES, max_tokens=MAX_TOKENS, **case)
    served = live.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                 **server_body(case))
    session, answer = session_answer(qwen3_model, case)
    msg = served.choices[0].message

    # the same answer, three ways
    assert (msg.content or "") == api.text
    assert getattr(msg, "reasoning_content", None) == api.reasoning
    assert served.usage.completion_tokens == api.usage.completion_tokens == len(api.tokens)
    assert served.usage.completion_tokens_details.reasoning_tokens == api.usage.reasoning_tokens
    assert served.choices[0].finish_reason == api.finish_reason
    assert session.last.tokens == api.tokens and session.last.reasoning == api.reasoning
    assert answer == (json.loads(api.text) if "schema" in case else api.text.strip())

    # and the option did its job
    tok = qwen3_model.tokenizer
    if name == "schema":
        assert set(json.loads(api.text)) == {"answer", "solved"} and api.finish_reason == "stop"
    elif name in ("thinking budget", "default budget"):
        budget = case.get("thinking_budget", MAX_TOKENS // 2)  # the one default: half of max_tokens
        assert api.tokens[0] == THINK and api.tokens[budget + 1] == END_THINK  # forced, against the bias
        assert api.reasoning and api.usage.reasoning_tokens == budget + 2
    elif name == "tools":
        assert api.finish_reason == "tool_calls"
        (call,) = api.tool_calls
        assert msg.tool_calls[0].function.name == call["function"]["name"] == "reveal_hint"
        assert json.loads(msg.tool_calls[0].function.arguments) == json.loads(call["function"]["arguments"])
        assert json.loads(call["function"]["arguments"])["level"] in (1, 2, 3)
        assert session.last.tool_calls[0]["function"]["name"] == "reveal_hint"
        assert session.messages[-1]["tool_calls"][0]["function"]["arguments"] == json.loads(
            call["function"]["arguments"])
    elif name == "secret guard":
        unguarded = qwen3_model.generate(MESSAGES, max_tokens=MAX_TOKENS, logit_bias=case["logit_bias"],
                                         enable_thinking=False)
        assert "banana" in normalize(unguarded.text)  # the bias makes the model say it
        assert normalize(api.text) and "banana" not in normalize(api.text)
    elif name == "penalties":
        plain = qwen3_model.generate(MESSAGES, max_tokens=MAX_TOKENS, logit_bias=case["logit_bias"],
                                     enable_thinking=False)
        assert plain.tokens.count(ids[" the"]) > 2 * api.tokens.count(ids[" the"])
    elif name == "logprobs":
        served_lp = served.choices[0].logprobs.content
        assert [lp.token for lp in served_lp] == [TokenText(tok).text_of(t.token) for t in api.logprobs]
        assert len(api.logprobs) == len(api.tokens) == len(session.last.logprobs)
        for mine, theirs in zip(api.logprobs, served_lp, strict=True):
            assert len(mine.top) == len(theirs.top_logprobs) == 3
            assert mine.top[0][1] >= mine.logprob - 1e-5 and abs(mine.logprob - theirs.logprob) < 1e-5


def test_secret_guard_on_completions(qwen3_model, live):
    """The guard needs no chat: a raw prompt through the API and /v1/completions, a teacher pushing the secret."""
    secret = "The man ate his friend."
    forced = qwen3_model.tokenizer.encode(" " + secret)
    prompt = "The story:"
    leaked = qwen3_model.generate(prompt, raw=True, max_tokens=len(forced), logits_processors=[teacher(forced)])
    assert normalize(secret) in normalize(leaked.text)
    guarded = qwen3_model.generate(prompt, raw=True, max_tokens=len(forced), logits_processors=[teacher(forced)],
                                   secrets=[secret], min_span=6)
    said = normalize(guarded.text)
    assert not any(normalize(secret)[i : i + 6] in said for i in range(len(normalize(secret)) - 5))
    # The server cannot take a processor: a bias makes the model repeat a word of another secret instead.
    banana = qwen3_model.tokenizer.encode(" banana", add_special_tokens=False)[0]
    secret, bias = "Banana, banana, banana!", {str(banana): 30}
    body = {"mlxq": {"secrets": [secret], "min_span": 6}}
    text = live.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logit_bias=bias,
                                          extra_body=body).choices[0].text
    plain = live.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                           logit_bias=bias).choices[0].text
    assert "bananabanana" in normalize(plain) and "banana" not in normalize(text) and text
