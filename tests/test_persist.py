"""Sessions that survive a restart: `Session.save` / `Session.load` keep the conversation and its cache (attention
KV, DeltaNet states whole, checkpoints), so the resumed session's next turn is the uninterrupted one token for
token and runs only its new tokens; a file from another model, or a damaged one, is refused in one line."""

from __future__ import annotations

import mlx.core as mx
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


# ------------------------------------------------------------------------------------------------ prompt-cache spill
@pytest.mark.parametrize("name", ["qwen3_model", "hybrid_model"])
def test_the_prompt_cache_spills_to_disk_under_a_cap(name, request, tmp_path):
    """Entries leaving a prompt cache with room for one go to disk; a prompt that continues an older one resumes
    from its file, and answers as a fresh cache does; the files stay within their byte cap."""
    from mlxq.engine.scheduler import Engine

    model = request.getfixturevalue(name)
    story = [model.tokenizer.encode(f"Story {i}: " + "the keeper of the lighthouse waited " * 6) for i in range(5)]
    probe = model.make_cache()
    model.net(mx.array([story[0]]), probe)
    entry = sum(c.nbytes for c in probe)  # one story's cache (recurrent checkpoints add a little)
    spill = tmp_path / "spill"
    (spill).mkdir()
    (spill / "entry-7.safetensors").write_bytes(b"left by an earlier run")
    engine = Engine(model.net, model.tokenizer, prompt_cache_bytes=int(entry * 1.6),
                    prompt_cache_spill=(str(spill), int(entry * 3.5))).start()
    try:
        assert not (spill / "entry-7.safetensors").exists()
        first = [model_answer(engine, s, 4)[0] for s in story[:2]][0]
        stats = engine.stats()["prompt_cache"]
        assert stats["entries"] == 1 and stats["spilled_entries"] == 1 and stats["spill_writes"] == 1
        ran = story[0] + first[:-1]  # what the first request's cache holds (a hybrid resumes at its end only)
        follow = ran + model.tokenizer.encode(" and then the ship came")
        tokens, usage = model_answer(engine, follow, 6)
        assert engine.stats()["prompt_cache"]["spill_reads"] == 1
        assert usage.cached_tokens == len(ran)  # the first story came back from disk
        assert tokens == model.generate(follow, max_tokens=6).tokens
        for s in story[2:]:  # more than the disk holds
            model_answer(engine, s, 4)
        stats = engine.stats()["prompt_cache"]
        files = list(spill.iterdir())
        assert stats["spilled_bytes"] == sum(f.stat().st_size for f in files) <= entry * 3.5
        assert len(files) == stats["spilled_entries"] >= 2
    finally:
        engine.close()


def model_answer(engine, prompt: list[int], n: int):
    import threading

    from mlxq.engine.scheduler import Request

    outs, done = [], threading.Event()

    def on_output(out):
        outs.append(out)
        if out.finish_reason is not None:
            done.set()

    engine.submit(Request(prompt, n, on_output=on_output))
    assert done.wait(120)
    assert outs[-1].error is None
    return [t for o in outs for t in o.tokens], outs[-1].usage
