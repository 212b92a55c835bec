"""Session: cache reuse across turns, JSON answers, the secret guard and thinking control on the whole path."""

from __future__ import annotations

import re

import pytest
from fixtures_qwen3 import *  # noqa: F403  (pytest fixtures: qwen3_model, ...)
from fixtures_qwen3 import THINK
from fixtures_qwen35 import *  # noqa: F403  (pytest fixture: hybrid_model)
from test_guards import SECRET_JA, teacher

from mlxq.api import Session
from mlxq.engine.guards import normalize
from mlxq.errors import GenerationError, InvalidRequest

QUESTIONS = ["Is it about soup?", "Did he die?", "Was he alone on the island?"]
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "irrelevant"]},
                                           "solved": {"type": "boolean"}},
          "required": ["answer", "solved"], "additionalProperties": False}


def play(model):
    s = Session(model, system="You are a game master.", max_tokens=8, temperature=1.0, seed=0)
    answers = [s.ask(q) for q in QUESTIONS]
    return s, answers


@pytest.mark.parametrize("name", ["qwen3_model", "hybrid_model"])  # KV rewinds freely; recurrent to checkpoints
def test_turn_three_reuses_the_cache(name, request):
    model = request.getfixturevalue(name)
    tok = model.tokenizer
    s, answers = play(model)
    assert all(answers)
    first, third = s.stats[0], s.stats[2]
    assert first.cached_tokens == 0 and first.processed_tokens == first.prompt_tokens
    # Turn 3 runs only what is new: the re-rendered previous answer, the new question and the chat markup.
    new = len(tok.encode(answers[1])) + len(tok.encode(QUESTIONS[2])) + 20
    assert third.processed_tokens <= new < third.prompt_tokens // 2
    assert third.cached_tokens + third.processed_tokens == third.prompt_tokens
    assert s.slot.caches[0].offset == len(s.slot.tokens)
    # The reused cache gives the same answer as a fresh one on the same conversation.
    fresh = Session(model, max_tokens=8, temperature=1.0, seed=0)
    fresh.messages = s.messages[:-2]
    assert fresh.ask(QUESTIONS[2]) == answers[2] and fresh.stats[0].cached_tokens == 0


def test_json_answers_and_thinking_off(qwen3_model):
    s = Session(qwen3_model, max_tokens=24, temperature=1.0, seed=1, logit_bias={THINK: 30.0})
    for q in QUESTIONS:
        answer = s.ask(q, schema=SCHEMA)
        assert answer["answer"] in ("yes", "no", "irrelevant") and isinstance(answer["solved"], bool)
        assert s.last_reasoning is None
    assert s.ask("Any hint?")  # free text: never empty, never a think block
    assert "<think>" not in s.messages[-1]["content"]


def test_thinking_on_with_schema_answers_after_the_block(qwen3_model):
    s = Session(qwen3_model, enable_thinking=True, thinking_budget=4, max_tokens=40, temperature=1.0, seed=2,
                logit_bias={THINK: 30.0})
    answer = s.ask("Is it about soup?", schema=SCHEMA)
    assert answer["answer"] in ("yes", "no", "irrelevant")
    assert s.last_reasoning  # the block was split off, not left in the content
    assert "think>" not in s.messages[-1]["content"]


def test_secret_guard_stops_a_leak_in_a_session(qwen3_model):
    forced = qwen3_model.tokenizer.encode(SECRET_JA)
    plain = Session(qwen3_model, max_tokens=len(forced))
    leaked = plain.ask("What happened?", logits_processors=[teacher(forced)])
    assert normalize(SECRET_JA) in normalize(leaked)  # the model WOULD leak
    guarded = Session(qwen3_model, secrets=[SECRET_JA], min_span=6, max_tokens=len(forced))
    said = normalize(guarded.ask("What happened?", logits_processors=[teacher(forced)]))
    secret = normalize(SECRET_JA)
    assert said and not any(secret[i : i + 6] in said for i in range(len(secret) - 5)), said


def test_incomplete_answer_is_retried_then_raises(qwen3_model):
    s = Session(qwen3_model, temperature=1.0, seed=0)
    with pytest.raises(GenerationError, match="incomplete JSON answer twice"):
        s.ask("Answer in JSON.", schema=SCHEMA, max_tokens=3)  # too short for the schema, twice
    assert s.stats[-1].retried and s.messages == []  # nothing half-done is kept in the conversation


def test_a_cache_slot_is_not_an_option_of_model_calls(qwen3_model):
    """Only a Session hands the engine its conversation's cache; Model's calls name the option as unknown."""
    from mlxq.engine.prompt_cache import CacheSlot

    with pytest.raises(InvalidRequest, match="unknown option 'slot'"):
        qwen3_model.generate("Hello", max_tokens=2, slot=CacheSlot())


def test_a_bias_on_an_id_outside_the_vocabulary_is_named_on_every_path(qwen3_model):
    """The API and Session refuse it as the server does (one check), instead of dropping it unseen."""
    vocab = qwen3_model.tokenizer.vocab_size
    for bad in (vocab, -1):
        want = f"logit_bias: token id {bad} is outside the vocabulary (0..{vocab - 1})"
        with pytest.raises(InvalidRequest, match=re.escape(want)):
            qwen3_model.generate("Hi", max_tokens=2, logit_bias={THINK: 1.0, bad: 5.0})
        with pytest.raises(InvalidRequest, match="outside the vocabulary"):
            Session(qwen3_model, max_tokens=2, logit_bias={bad: 5.0}).ask("Hi")
    assert qwen3_model.generate("Hi", max_tokens=2, logit_bias={vocab - 1: 5.0}).tokens  # the last id is fine
