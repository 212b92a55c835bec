"""Constrained decoding: sampled answers of a garbage (tiny random) model always match the grammar."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import pytest
from fixtures_qwen3 import *  # noqa: F403  (pytest fixtures: qwen3_model, ...)

from mlxq.engine.constraints import (
    json_schema_processor,
    lark_processor,
    regex_processor,
    response_format_processor,
)
from mlxq.errors import InvalidRequest

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no", "irrelevant"]},
        "solved": {"type": "boolean"},
        "comment": {"type": "string", "maxLength": 12},
        "score": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["answer", "solved", "comment", "score"],
    "additionalProperties": False,
}
PROMPT = [{"role": "user", "content": "Answer in JSON."}]
NO_THINK = {"enable_thinking": False}


def valid(obj) -> bool:
    """SCHEMA, checked by hand (no jsonschema dependency)."""
    return (isinstance(obj, dict) and set(obj) == {"answer", "solved", "comment", "score"}
            and obj["answer"] in ("yes", "no", "irrelevant") and isinstance(obj["solved"], bool)
            and isinstance(obj["comment"], str) and len(obj["comment"]) <= 12
            and type(obj["score"]) is int and 0 <= obj["score"] <= 99)


def follows(proc, tok, text: str) -> bool:
    """Whether `text`, fed token by token, stays inside the processor's grammar and completes it."""
    ids = tok.encode(text, add_special_tokens=False)
    for i, token in enumerate(ids):
        if proc(ids[:i], mx.zeros((1, tok.vocab_size)))[0, token].item() == -float("inf"):
            return False
    proc(ids, mx.zeros((1, tok.vocab_size)))  # feeds the last token
    return proc.finished


def test_json_schema_answers_are_always_valid(qwen3_model):
    model = qwen3_model
    unconstrained = model.generate(PROMPT, max_tokens=40, temperature=1.0, seed=0, chat_template_kwargs=NO_THINK)
    with pytest.raises(ValueError):  # the model alone writes garbage
        json.loads(unconstrained.text)
    for seed in range(16):
        proc = json_schema_processor(model.tokenizer, SCHEMA)
        out = model.generate(PROMPT, max_tokens=80, temperature=1.0, seed=seed, logits_processors=[proc],
                             chat_template_kwargs=NO_THINK)
        assert out.finish_reason == "stop" and proc.finished and proc.stopped, out.text
        assert valid(json.loads(out.text)), out.text


def test_json_object_mask_and_forced_eos(qwen3_model):
    tok = qwen3_model.tokenizer
    proc = json_schema_processor(tok, None)  # any JSON object
    V = tok.vocab_size
    brace, word = tok.encode("{", add_special_tokens=False), tok.encode("hello", add_special_tokens=False)
    allowed = proc([], mx.zeros((1, V))) > -mx.inf
    assert allowed[0, brace[0]].item() and not allowed[0, word[0]].item()
    done = tok.encode('{"a": [1, "x"]}', add_special_tokens=False)
    assert not proc.finished
    allowed = proc(done, mx.zeros((1, V + 64))) > -mx.inf  # logits wider than the vocabulary (padded head)
    assert {i for i, ok in enumerate(allowed[0].tolist()) if ok} == tok.eos_token_ids  # complete: only EOS
    assert proc.finished and proc.stopped


def test_regex_and_lark(qwen3_model):
    model = qwen3_model
    for seed in range(3):
        proc = regex_processor(model.tokenizer, r"[0-9]{3}-[a-z]{2}")
        out = model.generate("Code:", raw=True, max_tokens=20, temperature=1.0, seed=seed, logits_processors=[proc])
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", out.text), out.text
        proc = lark_processor(model.tokenizer, 'start: "answer: " ("yes" | "no")')
        out = model.generate("Q:", raw=True, max_tokens=20, temperature=1.0, seed=seed, logits_processors=[proc])
        assert out.text in ("answer: yes", "answer: no") and proc.finished


def test_start_after_leaves_the_think_block_free(qwen3_model):
    tok = qwen3_model.tokenizer
    end_think = tok.encode("</think>", add_special_tokens=False)[0]
    proc = json_schema_processor(tok, None, start_after=end_think)
    word = tok.encode("hello", add_special_tokens=False)[0]
    assert proc([word], mx.zeros((1, tok.vocab_size)))[0, word].item() == 0.0  # still thinking: free
    after = proc([word, end_think], mx.zeros((1, tok.vocab_size)))
    assert after[0, word].item() == -float("inf")
    assert proc.finished is False


def test_bad_grammars_and_response_format(qwen3_model):
    tok = qwen3_model.tokenizer
    with pytest.raises(InvalidRequest, match="invalid grammar"):
        regex_processor(tok, "([a-z")
    with pytest.raises(InvalidRequest, match="invalid grammar"):
        lark_processor(tok, "start: undefined_rule")
    with pytest.raises(InvalidRequest, match="JSON object"):
        json_schema_processor(tok, ["not", "a", "schema"])
    assert response_format_processor(tok, {"type": "text"}) is None
    answer = '{"answer": "yes", "solved": false, "comment": "warm", "score": 7}'
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    for text, accepted in ((answer, {"json_object": True, "json_schema": True}),
                           ('{"answer": "maybe"}', {"json_object": True, "json_schema": False}),
                           ('{"answer": "yes", "score": 100}', {"json_object": True, "json_schema": False}),
                           ('["yes"]', {"json_object": False, "json_schema": False})):
        for kind, response_format in (("json_object", {"type": "json_object"}), ("json_schema", fmt)):
            assert follows(response_format_processor(tok, response_format), tok, text) == accepted[kind], (kind, text)
    with pytest.raises(InvalidRequest, match="response_format"):
        response_format_processor(tok, {"type": "xml"})
