"""Many players at once on one engine: 16 Sessions from threads and from asyncio, with random cancellations and
streams left early. Each session's greedy answers equal the same session run alone, and the engine never wedges.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import pytest
from fixtures_qwen3 import *  # noqa: F403  (pytest fixtures: qwen3_model, ...)
from fixtures_qwen35 import *  # noqa: F403  (pytest fixture: hybrid_model)

from mlxq.api import Session
from mlxq.errors import GenerationError

PLAYERS = 16
WORDS = ["soup", "a ship", "the sea", "his friend", "a restaurant", "an island", "a storm", "the waiter"]


def script(i: int) -> tuple[str, list[str], int]:
    """Player i's system prompt, questions and answer length: prompts of different lengths, so rows are ragged."""
    system = f"You are the game master for player {i}. " + "Never reveal the hidden story. " * (i % 5)
    questions = [f"Is it about {WORDS[(i + t) % len(WORDS)]}?" + " Please answer." * (t % 2) for t in range(3)]
    return system, questions, 5 + i % 4


def session(model, i: int) -> Session:
    system, _, max_tokens = script(i)
    return Session(model, system=system, max_tokens=max_tokens, logprobs=0)  # greedy


def turn(s: Session, answer: str) -> tuple[str, list[float]]:
    """An answer with the logprobs of its tokens: equal answers from equal probabilities, not just equal argmaxes
    (a padding that leaked into a row's state would shift them)."""
    return answer, [lp.logprob for lp in s.last.logprobs]


def alone(model) -> list[list[tuple[str, list[float]]]]:
    """Every player's answers, one player at a time."""
    out = []
    for i in range(PLAYERS):
        s = session(model, i)
        out.append([turn(s, s.ask(q)) for q in script(i)[1]])
    return out


def same(got: list[list[tuple[str, list[float]]]], want: list[list[tuple[str, list[float]]]]) -> None:
    for player_got, player_want in zip(got, want, strict=True):
        assert [a for a, _ in player_got] == [a for a, _ in player_want]
        for (_, lp_got), (_, lp_want) in zip(player_got, player_want, strict=True):
            assert mx.allclose(mx.array(lp_got), mx.array(lp_want), rtol=0, atol=1e-5)


def cancel_at(s: Session, k: int):
    """A logits processor that cancels the session's turn once it has generated k tokens (it runs on the engine
    thread, mid-step: the engine must drop the request cleanly at its next step)."""

    def proc(generated: list[int], logits: mx.array) -> mx.array:
        if len(generated) >= k:
            s.cancel()
        return logits

    return proc


def settled(engine, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while engine.pending:
        assert time.monotonic() < deadline, f"the engine is wedged: {engine.stats()}"
        time.sleep(0.01)
    assert engine.alive


def test_sessions_from_threads_with_cancellations(qwen3_model):
    model = qwen3_model
    want = alone(model)
    engine = model.engine
    got: list = [None] * PLAYERS
    cancelled = [0] * PLAYERS
    errors: list[BaseException] = []
    streams_left = [0]

    def player(i: int) -> None:
        rng = random.Random(i)
        try:
            s = session(model, i)
            answers = []
            for q in script(i)[1]:
                if rng.random() < 0.4:  # this turn is cancelled first, at its first to fourth token
                    with contextlib.suppress(GenerationError):  # an answer that ended before that stands
                        answers.append(turn(s, s.ask(q, logits_processors=[cancel_at(s, rng.randrange(0, 4))])))
                        continue
                    cancelled[i] += 1
                answers.append(turn(s, s.ask(q)))
            got[i] = answers
            # A stream left early ends its request.
            for chunk in model.stream(f"Player {i} counts: one, two,", max_tokens=40, ignore_eos=True):
                if chunk.tokens:
                    streams_left[0] += 1
                    break
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=player, args=(i,)) for i in range(PLAYERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a player never finished"
    assert not errors, errors[0]
    same(got, want)
    assert sum(cancelled) > 0 and streams_left[0] == PLAYERS
    settled(engine)
    assert model.generate("Still there?", max_tokens=2).tokens


def test_sessions_from_asyncio_with_cancellations(hybrid_model):
    """The same on a hybrid model (recurrent state, rows of different lengths prefilled together), from asyncio:
    turns cancelled by cancelling their task at a random moment, streams left early."""
    model = hybrid_model
    want = alone(model)
    engine = model.engine

    async def player(i: int) -> list[str]:
        rng = random.Random(100 + i)
        s = session(model, i)
        answers = []
        for q in script(i)[1]:
            if rng.random() < 0.4:
                task = asyncio.create_task(s.ask_async(q))
                await asyncio.sleep(rng.choice([0, 0.001, 0.01, 0.05]))
                task.cancel()
                try:
                    answers.append(turn(s, await task))  # it finished before the cancel: the answer stands
                    continue
                except asyncio.CancelledError:
                    pass
            answers.append(turn(s, await s.ask_async(q)))
        chunks = model.astream(f"Player {i} counts: one, two,", max_tokens=40, ignore_eos=True)
        async for chunk in chunks:
            if chunk.tokens:
                break
        await chunks.aclose()  # leaving the loop ends the request
        return answers

    async def everyone() -> list[list[str]]:
        return await asyncio.wait_for(asyncio.gather(*(player(i) for i in range(PLAYERS))), 300)

    same(asyncio.run(everyone()), want)
    settled(engine)
    assert model.generate("Still there?", max_tokens=2).tokens


def test_a_model_first_used_from_a_worker_thread(qwen3_model_dir, qwen3_model):
    """A game service may load a model and make its first request from a worker thread: the engine starts there
    (MLX arrays made lazily on the loading thread cannot be evaluated on another thread, so loading finishes them)."""
    import mlxq

    model = mlxq.load(str(qwen3_model_dir))
    out: list = []
    worker = threading.Thread(target=lambda: out.append(model.generate("Once upon a time", max_tokens=6)))
    worker.start()
    worker.join(120)
    model.close()
    assert out and out[0].tokens == qwen3_model.generate("Once upon a time", max_tokens=6).tokens


def test_one_session_answers_one_question_at_a_time(qwen3_model):
    s = Session(qwen3_model, max_tokens=4)

    async def both():
        return await asyncio.gather(s.ask_async("One?"), s.ask_async("Two?"), return_exceptions=True)

    first, second = asyncio.run(both())
    assert isinstance(first, str) and "ask one at a time" in str(second)
    assert len(s.messages) == 2


@pytest.mark.parametrize("name", ["qwen3_model", "hybrid_model"])
def test_a_cancelled_turn_leaves_the_conversation_as_it_was(name, request):
    model = request.getfixturevalue(name)
    s, fresh = Session(model, system="Game master.", max_tokens=6), Session(model, system="Game master.", max_tokens=6)
    first = s.ask("Is it about soup?")
    assert fresh.ask("Is it about soup?") == first
    with pytest.raises(GenerationError, match="cancelled"):
        s.ask("Did he die?", logits_processors=[cancel_at(s, 2)])
    assert len(s.messages) == 3 and s.ask("Did he die?") == fresh.ask("Did he die?")
    assert s.stats[-1].cached_tokens > 0  # the cancelled turn's work was kept for the retry


def test_umigame_players_mode_runs_many_games_at_once(qwen3_model_dir):
    """`examples/umigame/play.py --players N`: N guarded JSON games on one engine, with throughput and turn latency
    reported (the tiny random model answers nonsense, but every answer is schema-valid JSON or counted as none)."""
    play = Path(__file__).parent.parent / "examples" / "umigame" / "play.py"
    done = subprocess.run([sys.executable, str(play), "--model", str(qwen3_model_dir), "--players", "3",
                           "--max-tokens", "24"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    head = re.search(r"^3 players, (\d+) turns \((\d+) without an answer\) in [\d.]+ s$", done.stdout, re.M)
    assert head, done.stdout
    assert int(head[1]) + int(head[2]) >= 3  # every player asked at least once
    assert re.search(r"throughput: [\d.]+ generated tokens/s aggregate \((\d+) tokens\)", done.stdout)
    assert re.search(r"turn latency: p50 \d+ ms, p95 \d+ ms", done.stdout)
    assert re.search(r"first token:  p50 \d+ ms, p95 \d+ ms", done.stdout)
