"""Sessions that survive a restart: `Session.save` / `Session.load` keep the conversation and its cache (attention
KV, DeltaNet states whole, checkpoints), so the resumed session's next turn is the uninterrupted one token for
token and runs only its new tokens; a file from another model, or a damaged one, is refused in one line."""

from __future__ import annotations

import pytest
from fixtures_qwen3 import *  # noqa: F403  (pytest fixtures: qwen3_model, ...)
from fixtures_qwen35 import *  # noqa: F403  (pytest fixture: hybrid_model)

import mlxq
from mlxq.api import Session
from mlxq.errors import FormatError, InvalidRequest, MlxqError

QUESTIONS = ("Is it about soup?", "Did he die?", "Was he shipwrecked?")


@pytest.mark.parametrize("name", ["qwen3_model", "hybrid_model"])
def test_a_saved_session_resumes_after_a_restart(name, request, tmp_path):
    model = request.getfixturevalue(name)
    s = Session(model, system="You are a game master.", max_tokens=8, secrets=["the soup was made of his friend"],
                speculative=4, logprobs=0)
    for q in QUESTIONS[:2]:
        s.ask(q)
    path = tmp_path / "game.session"
    s.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["game.session"]  # no temporary file left behind
    uninterrupted = s.ask(QUESTIONS[2])

    restarted = mlxq.load(str(model.checkpoint.path))  # a new process would load the model again
    try:
        resumed = Session.load(restarted, path)
        assert resumed.messages == s.messages[:-2] and resumed.secrets == s.secrets and resumed.speculative == 4
        assert resumed.logprobs == 0
        assert resumed.ask(QUESTIONS[2]) == uninterrupted
        assert resumed.last.tokens == s.last.tokens
        got, want = ([lp.logprob for lp in r.logprobs] for r in (resumed.last, s.last))
        assert got == pytest.approx(want, abs=2e-5)  # the same state, not just the same argmax (a zeroed
        # DeltaNet state moves these by 1e-4 in this tiny random model)
        # it ran only the new question: the cache came from the file
        assert resumed.stats[0].cached_tokens == s.stats[2].cached_tokens > 0
    finally:
        restarted.close()


def one_line(e: pytest.ExceptionInfo, path) -> str:
    text = str(e.value)
    assert isinstance(e.value, MlxqError) and "\n" not in text and str(path) in text
    return text


def test_a_file_from_another_model_or_a_damaged_one_is_refused(qwen3_model, hybrid_model, tmp_path):
    s = Session(qwen3_model, max_tokens=6)
    s.ask(QUESTIONS[0])
    path = tmp_path / "a.session"
    s.save(path)
    with pytest.raises(InvalidRequest) as e:
        Session.load(hybrid_model, path)
    assert "another model" in one_line(e, path)

    data = path.read_bytes()
    flipped = tmp_path / "flipped.session"
    flipped.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])  # inside the last array
    with pytest.raises(FormatError) as e:
        Session.load(qwen3_model, flipped)
    assert "corrupt" in one_line(e, flipped)

    for name, content in (("cut.session", data[: len(data) // 2]), ("junk.session", b"not a session at all")):
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(FormatError) as e:
            Session.load(qwen3_model, bad)
        one_line(e, bad)
    with pytest.raises(InvalidRequest) as e:
        Session.load(qwen3_model, tmp_path / "missing.session")
    one_line(e, tmp_path / "missing.session")
    assert Session.load(qwen3_model, path).ask(QUESTIONS[1])  # the good file still loads
