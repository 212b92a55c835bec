"""The engine thread: continuous batching gives the tokens each request gets alone, the prompt cache resumes
attention and hybrid (Gated DeltaNet) models, a failing request fails alone, cancelling ends a request."""

from __future__ import annotations

import asyncio
import ctypes
import sys
import threading
import time
from functools import partial

import mlx.core as mx
import pytest
from fixtures_qwen3 import *  # noqa: F403  (pytest fixtures: qwen3_model, ...)
from fixtures_qwen35 import *  # noqa: F403  (pytest fixture: hybrid_model)

from mlxq.engine.blas import BlasThreads, Faster
from mlxq.engine.cache import KVCache
from mlxq.engine.prompt_cache import PromptCache
from mlxq.engine.sampling import SamplingParams
from mlxq.engine.scheduler import Engine, Output, Request
from mlxq.errors import GenerationError


def run(engine: Engine, requests: list[Request], timeout: float = 60) -> list[list[Output]]:
    """Submits `requests` together; returns each one's outputs once all have finished."""
    outs: list[list[Output]] = [[] for _ in requests]
    done = [threading.Event() for _ in requests]
    for i, req in enumerate(requests):

        def on_output(out: Output, i: int = i) -> None:
            outs[i].append(out)
            if out.finish_reason is not None:
                done[i].set()

        req.on_output = on_output
        engine.submit(req)
    for event in done:
        assert event.wait(timeout), "a request did not finish"
    return outs


def tokens(outs: list[Output]) -> list[int]:
    return [t for o in outs for t in o.tokens]


def logprobs(outs: list[Output]) -> list[float]:
    return [lp.logprob for o in outs for lp in o.logprobs]


@pytest.fixture(scope="module")
def engine(qwen3_model):
    e = Engine(qwen3_model.net, qwen3_model.tokenizer, max_batch=4).start()
    yield e
    e.close()


def prompts(model, n: int) -> list[list[int]]:
    return [model.tokenizer.encode("The story so far: " + "once upon a time " * (2 * i + 1)) for i in range(n)]


def test_batched_decode_gives_each_request_its_own_tokens(qwen3_model, engine):
    ps = prompts(qwen3_model, 6)  # more than max_batch: two wait, then join as others finish
    alone = [qwen3_model.generate(p, max_tokens=12 + i).tokens for i, p in enumerate(ps)]
    outs = run(engine, [Request(p, 12 + i, logprobs=3) for i, p in enumerate(ps)])
    for i, o in enumerate(outs):
        assert tokens(o) == alone[i]
        assert o[-1].finish_reason == "length" and o[-1].usage.completion_tokens == 12 + i
        for lp in (x for out in o for x in out.logprobs):
            assert len(lp.top) == 3 and lp.top[0][1] >= lp.logprob - 1e-4 and lp.logprob <= 0


def test_sampling_with_a_seed_repeats_in_any_batch(qwen3_model, engine):
    p = prompts(qwen3_model, 1)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    first = tokens(run(engine, [Request(p, 10, params)])[0])
    together = run(
        engine,
        [
            Request(p, 10, SamplingParams(temperature=1.0, top_p=0.9, seed=7)),
            Request(p[:-2], 10, SamplingParams(temperature=1.0, seed=8)),
        ],
    )
    assert tokens(together[0]) == first


def test_prompt_cache_resumes_an_attention_model(qwen3_model, engine):
    p = qwen3_model.tokenizer.encode("A long shared system prompt about puzzles. " * 4)
    first = run(engine, [Request(p, 6)])[0]
    follow = p + tokens(first)[:-1] + qwen3_model.tokenizer.encode(" And then?")
    second = run(engine, [Request(follow, 6)])[0]
    usage = second[-1].usage
    assert usage.cached_tokens == len(p) + len(tokens(first)) - 1  # everything the first request ran
    assert tokens(second) == qwen3_model.generate(follow, max_tokens=6).tokens


def test_a_failing_request_fails_alone(qwen3_model, engine):
    ps = prompts(qwen3_model, 3)

    def broken() -> list:
        def boom(generated: list[int], logits: mx.array) -> mx.array:
            if len(generated) == 3:
                raise RuntimeError("processor exploded")
            return logits

        return [boom]

    failures = engine.failures
    outs = run(engine, [Request(ps[0], 8), Request(ps[1], 8, make_processors=broken), Request(ps[2], 8)])
    assert isinstance(outs[1][-1].error, GenerationError) and outs[1][-1].finish_reason == "error"
    assert "processor exploded" in str(outs[1][-1].error)
    for i in (0, 2):
        assert tokens(outs[i]) == qwen3_model.generate(ps[i], max_tokens=8).tokens
    assert engine.failures == failures + 1 and engine.alive
    assert tokens(run(engine, [Request(ps[1], 4)])[0]) == qwen3_model.generate(ps[1], max_tokens=4).tokens


def test_cancel_ends_a_request_and_keeps_its_work(qwen3_model, engine):
    p = qwen3_model.tokenizer.encode("Count slowly: " * 3)
    got, done = [], threading.Event()
    req = Request(p, 10_000, ignore_eos=True)

    def on_output(out: Output) -> None:
        got.append(out)
        if len(got) == 3:
            req.cancel()
        if out.finish_reason is not None:
            done.set()

    req.on_output = on_output
    engine.submit(req)
    assert done.wait(30)
    assert got[-1].finish_reason == "cancelled" and got[-1].usage.completion_tokens < 50
    assert engine.pending == 0
    # What it ran is in the prompt cache: the same prompt resumes at once.
    again = run(engine, [Request(p, 2)])[0]
    assert again[-1].usage.cached_tokens == len(p) - 1


def test_prompt_cache_is_bounded_by_bytes(qwen3_model):
    probe = qwen3_model.make_cache()
    qwen3_model.net(mx.array([[1, 2, 3, 4]]), probe)
    per_token = sum(c.nbytes for c in probe) // 4
    cache = PromptCache(qwen3_model.make_cache, max_bytes=per_token * 10)
    for start in range(0, 40, 4):  # ten unrelated 4-token prompts; room for two
        caches = qwen3_model.make_cache()
        ids = list(range(100 + start, 104 + start))
        qwen3_model.net(mx.array([ids]), caches)
        cache.store(ids, caches)
        assert cache.nbytes <= cache.max_bytes
    assert len(cache) == 2
    resumed, n, _ = cache.fetch(list(range(136, 140)) + [5])  # the newest is kept
    assert n == 4 and resumed[0].offset == 4


# ------------------------------------------------------------------------------------------------ hybrid
def test_hybrid_model_batches_and_resumes_from_checkpoints(hybrid_model):
    model = hybrid_model
    assert not all(isinstance(c, KVCache) for c in model.make_cache())  # recurrent layers: no free rewind
    engine = Engine(model.net, model.tokenizer, max_batch=4).start()
    try:
        ps = prompts(model, 3)
        outs = run(engine, [Request(p, 10) for p in ps])
        for p, o in zip(ps, outs, strict=True):
            assert tokens(o) == model.generate(p, max_tokens=10).tokens
        # A chat-like follow-up: resumes at the end of what the first request ran (its stored checkpoint) ...
        follow = ps[2] + tokens(outs[2])[:-1] + [13, 14, 15]
        again = run(engine, [Request(follow, 5, marks=[len(follow) - 2])])[0]
        assert again[-1].usage.cached_tokens == len(ps[2]) + 9
        assert tokens(again) == model.generate(follow, max_tokens=5).tokens
        # ... and a prompt parting from it at the mark it asked for resumes there.
        branch = follow[:-2] + [77, 78]
        third = run(engine, [Request(branch, 5)])[0]
        assert third[-1].usage.cached_tokens == len(follow) - 2
        assert tokens(third) == model.generate(branch, max_tokens=5).tokens
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------------ batched prefill
def hold_at(token: int, inside: threading.Event, gate: threading.Event):
    """Processors that stop the engine thread (mid-step) at the request's `token`-th token until `gate` opens."""

    def make() -> list:
        def hold(generated: list[int], logits: mx.array) -> mx.array:
            if len(generated) == token:
                inside.set()
                gate.wait(60)
            return logits

        return [hold]

    return make


@pytest.mark.parametrize("name", ["qwen3_model", "hybrid_model"])
def test_prompts_that_arrive_together_are_prefilled_in_one_pass(name, request):
    """Four prompts of different lengths, queued while the engine is busy, run their whole prompts in one forward
    pass (ragged rows; recurrent state untouched by the padding) and each gets the tokens it gets alone."""
    model = request.getfixturevalue(name)
    engine = Engine(model.net, model.tokenizer, max_batch=8).start()
    try:
        inside, gate = threading.Event(), threading.Event()
        blocker = Request(prompts(model, 1)[0], 6, make_processors=hold_at(2, inside, gate), ignore_eos=True)
        outs: list[list[Output]] = []
        thread = threading.Thread(target=lambda: outs.append(run(engine, [blocker])[0]))
        thread.start()
        assert inside.wait(60)
        before = engine.prefill_steps
        ps = prompts(model, 5)[1:]
        together = [Request(p, 7, logprobs=0) for p in ps]
        gate.set()
        got = run(engine, together)  # submitted while the engine is held, so they arrive together
        thread.join(60)
        assert engine.prefill_steps - before == 1
        for p, o in zip(ps, got, strict=True):
            want = model.generate(p, max_tokens=7, logprobs=0)
            assert tokens(o) == want.tokens
            # the same probabilities, not just the same argmax: padding left no trace in any row's state
            assert mx.allclose(mx.array(logprobs(o)), mx.array([lp.logprob for lp in want.logprobs]), rtol=0, atol=1e-5)
        assert len(tokens(outs[0])) == 6
    finally:
        engine.close()


def test_a_long_prompt_does_not_stall_a_running_stream(qwen3_model):
    """While a long prompt is prefilled chunk by chunk, a running stream gets a token after every chunk."""
    engine = Engine(qwen3_model.net, qwen3_model.tokenizer, max_batch=4, prefill_chunk=32).start()
    try:
        seen: list[int] = []  # prefill steps done when each of the stream's tokens came out
        started = threading.Event()
        stream = Request(prompts(qwen3_model, 1)[0], 10_000, ignore_eos=True, logprobs=0)  # an output per token

        def on_stream(out: Output) -> None:
            seen.append(engine.prefill_steps)
            if len(seen) == 3:
                started.set()

        stream.on_output = on_stream
        engine.submit(stream)
        assert started.wait(60)
        long = qwen3_model.tokenizer.encode("A very long story about a lighthouse keeper. " * 40)
        before = engine.prefill_steps
        first = run(engine, [Request(long, 1)])[0]
        steps = engine.prefill_steps - before
        stream.cancel()
        assert steps >= len(long) // 32 and tokens(first)
        during = [s for s in seen if before <= s <= before + steps]
        assert all(b - a <= 1 for a, b in zip(during, during[1:], strict=False))  # never two chunks in a row
        assert len(during) >= steps - 1
    finally:
        engine.close()


def test_long_prompts_are_prefilled_a_few_at_a_time_oldest_first(qwen3_model):
    """Six long prompts queued together: the four oldest share the prefill steps (each its 128-token share) and
    answer first; the other two start when there is room, instead of every prompt answering at the very end."""
    engine = Engine(qwen3_model.net, qwen3_model.tokenizer, max_batch=8, prefill_chunk=512).start()
    try:
        inside, gate = threading.Event(), threading.Event()
        blocker = Request(prompts(qwen3_model, 1)[0], 4, make_processors=hold_at(1, inside, gate), ignore_eos=True)
        thread = threading.Thread(target=run, args=(engine, [blocker]))
        thread.start()
        assert inside.wait(60)
        story = "A keeper lit the lamp every night, and ships passed safely. "
        long = [qwen3_model.tokenizer.encode(f"Story {i}. " + story * 25) for i in range(6)]
        first_at = [0] * 6  # prefill steps done when each request's first token came out
        requests = [Request(p, 2) for p in long]
        for i, req in enumerate(requests):
            req.on_output = lambda out, i=i: first_at.__setitem__(i, first_at[i] or engine.prefill_steps)
        before = engine.prefill_steps
        for req in requests:
            engine.submit(req)
        gate.set()
        thread.join(60)
        deadline = time.monotonic() + 120
        while engine.pending:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        steps = [at - before for at in first_at]
        assert len(set(steps[:4])) == 1 and min(steps[4:]) > steps[0]  # the first four together, then the rest
        assert steps[0] == -(-len(long[0]) // 128)  # each of the four fed 128 tokens a step
    finally:
        engine.close()


def test_requests_arriving_during_the_first_prefill_start_before_its_first_decode(qwen3_model):
    """A burst reaches the engine a moment apart: the first request wakes it alone and the rest arrive during its
    prefill step. Those are prefilled next, before the first decode step (their first tokens do not wait for it),
    and every request still gets the tokens it gets alone."""
    model = qwen3_model
    engine = Engine(model.net, model.tokenizer, max_batch=8).start()
    ps = prompts(model, 4)
    first, rest = Request(ps[0], 5), [Request(p, 5) for p in ps[1:]]
    outs: list[list[Output]] = [[] for _ in ps]
    done = [threading.Event() for _ in ps]
    for i, req in enumerate([first, *rest]):
        req.on_output = lambda out, i=i: (outs[i].append(out), out.finish_reason and done[i].set())
    steps: list[tuple[str, int]] = []
    runner = engine.runner
    prefill, decode = runner.prefill, runner.decode

    def prefill_while_the_rest_arrive(tokens, at, marks):
        if not steps:
            for req in rest:
                engine.submit(req)
        steps.append(("prefill", len(tokens)))
        return prefill(tokens, at, marks)

    def decode_counted(tokens):
        steps.append(("decode", len(tokens)))
        return decode(tokens)

    runner.prefill, runner.decode = prefill_while_the_rest_arrive, decode_counted
    try:
        engine.submit(first)
        assert all(event.wait(60) for event in done)
    finally:
        engine.close()
    assert steps[:3] == [("prefill", 1), ("prefill", 3), ("decode", 4)], steps
    for p, o in zip(ps, outs, strict=True):
        assert tokens(o) == model.generate(p, max_tokens=5).tokens


def test_prefill_hands_back_the_buffers_mlx_kept_off_metal(qwen3_model):
    """Off Metal, the buffers a prompt's products freed are not kept for reuse after its prefill step (decode reuses
    few of them; SmolLM2's ~20 MB stayed through every token). Other tests here check the tokens are unchanged."""
    model = qwen3_model
    engine = Engine(model.net, model.tokenizer, max_batch=8).start()
    kept: list[int] = []
    prefill = engine.runner.prefill

    def prefill_then_look(*args, **kwargs):
        out = prefill(*args, **kwargs)
        kept.append(mx.get_cache_memory())
        return out

    engine.runner.prefill = prefill_then_look
    try:
        got = tokens(run(engine, [Request(prompts(model, 1)[0], 4)])[0])
    finally:
        engine.close()
    assert len(got) == 4 and kept
    if not mx.metal.is_available():
        assert kept == [0] * len(kept)


@pytest.mark.parametrize("max_tokens", [30, 300])
def test_a_short_requests_kv_buffers_are_made_once_for_all_its_tokens(qwen3_model, monkeypatch, max_tokens):
    """A request whose prompt and answer fit in a block gets decode KV buffers of exactly the positions it can reach
    (its prompt and max_tokens - 1: the last token is never fed), made once; a longer one grows them in steps
    (`buffer_positions`). Off Metal, MLX's cache is handed back before a finished row's cache is copied out of the
    batch (the copy reuses what MLX kept from the steps)."""
    from mlxq.engine.batch import Batch

    model = qwen3_model
    engine = Engine(model.net, model.tokenizer, max_batch=8).start()
    prompt = prompts(model, 1)[0]
    seen: list[int] = []  # per decode step: the positions the buffers are sized for
    decode = engine.runner.decode

    def decode_then_look(tokens):
        out = decode(tokens)
        seen.append(engine.runner._batches["decode"].positions)
        return out

    kept_at_copy: list[int] = []
    remove = Batch.remove

    def look_then_remove(self, i, *, keep_cache=True):
        if keep_cache:
            kept_at_copy.append(mx.get_cache_memory())
        return remove(self, i, keep_cache=keep_cache)

    engine.runner.decode = decode_then_look
    monkeypatch.setattr(Batch, "remove", look_then_remove)
    # MLX's cache limit is process-wide: an expert pool an earlier test left for the collector holds it near 0
    limit = mx.set_cache_limit(1 << 30)
    try:
        got = tokens(run(engine, [Request(prompt, max_tokens, ignore_eos=True)])[0])
        first, seen[:] = list(seen), []
        shorter = tokens(run(engine, [Request(prompt, 20, ignore_eos=True)])[0])  # the next row reserves its own
    finally:
        engine.close()
        mx.set_cache_limit(limit)
    assert len(got) == max_tokens and len(first) == max_tokens - 1 and len(prompt) < 16
    assert len(shorter) == 20 and set(seen) == {len(prompt) + 19}
    if max_tokens < 256:
        assert set(first) == {len(prompt) + max_tokens - 1}
    else:
        assert sorted(set(first)) == [16, 32, 64, 96, 128, 160, 192, 224, 256, 512]
    if not mx.metal.is_available():
        assert kept_at_copy and all(c < 4096 for c in kept_at_copy)


def test_rows_asking_for_different_logprobs_share_a_step(qwen3_model, engine):
    """Rows with no logprobs, the chosen token's only, and the top 2 or 5, sampled together in one pass, each get
    what they get alone: the same tokens, logprobs and top tokens (best first)."""
    ps = prompts(qwen3_model, 4)
    asked = [None, 0, 2, 5]
    alone = [run(engine, [Request(p, 6, logprobs=k)])[0] for p, k in zip(ps, asked, strict=True)]
    together = run(engine, [Request(p, 6, logprobs=k) for p, k in zip(ps, asked, strict=True)])
    for k, a, t in zip(asked, alone, together, strict=True):
        assert tokens(t) == tokens(a)
        got, want = [x for o in t for x in o.logprobs], [x for o in a for x in o.logprobs]
        assert len(got) == (0 if k is None else 6)
        for g, w in zip(got, want, strict=True):
            assert g.token == w.token and abs(g.logprob - w.logprob) < 1e-4
            assert [i for i, _ in g.top] == [i for i, _ in w.top] and len(g.top) == k
            assert all(a >= b for (_, a), (_, b) in zip(g.top, g.top[1:], strict=False))
            assert not k or g.top[0][0] == g.token  # greedy: the chosen token is the likeliest


def test_rows_with_their_own_penalties_batched_get_the_tokens_they_get_alone(qwen3_model, engine):
    """Penalties and logit bias are applied to all rows of a step at once (`sampling.penalize`): each request in a
    batch of different settings (greedy and sampled, one drafting by prompt lookup, whose draft positions are
    picked with the tokens accepted so far) gets the tokens it gets alone, and the penalties change them."""
    ps = prompts(qwen3_model, 4)
    params = [SamplingParams(repetition_penalty=1.8),
              SamplingParams(frequency_penalty=1.5, presence_penalty=0.5, logit_bias={5: 4.0}),
              SamplingParams(temperature=0.9, seed=3, repetition_penalty=1.3, frequency_penalty=0.6),
              SamplingParams(presence_penalty=2.0)]

    def requests() -> list[Request]:
        return [Request(p, 16, params=q, speculative=4 if i == 3 else 0)
                for i, (p, q) in enumerate(zip(ps, params, strict=True))]

    alone = [tokens(run(engine, [req])[0]) for req in requests()]
    together = [tokens(o) for o in run(engine, requests())]
    assert together == alone
    plain = [tokens(run(engine, [Request(p, 16, speculative=4 if i == 3 else 0)])[0]) for i, p in enumerate(ps)]
    assert all(a != b for a, b in zip(alone, plain, strict=True))


def test_mx_random_seed_makes_unseeded_sampling_repeat(qwen3_model, engine):
    """An unseeded request takes its seed from MLX's generator when submitted, so `mx.random.seed` repeats it (as
    with mlx-lm), and a greedy request leaves the generator alone."""
    p = prompts(qwen3_model, 1)[0]

    def sampled() -> list[int]:
        return tokens(run(engine, [Request(p, 12, SamplingParams(temperature=1.5))])[0])

    mx.random.seed(11)
    first, second = sampled(), sampled()
    mx.random.seed(11)
    run(engine, [Request(p, 4)])  # greedy: draws nothing
    assert sampled() == first and sampled() == second
    assert first != second
    mx.random.seed(11)
    text = qwen3_model.generate(p, max_tokens=12, temperature=1.5).tokens
    assert text == first


def openblas_threads() -> int | None:
    """OpenBLAS's thread count now, or None when the process has not loaded OpenBLAS (a Mac: Accelerate)."""
    get = getattr(ctypes.CDLL(None), "openblas_get_num_threads", None)
    return None if get is None else get()


def test_decode_steps_of_several_rows_run_on_one_blas_thread(qwen3_model):
    """A step's matmuls run on OpenBLAS's threads: a decode step of one row and a prefill step on as many as the
    process started with, a decode step of several rows on one (`engine/blas.py`), read from inside each step; an
    idle engine leaves the process its own count."""
    started = openblas_threads()
    if sys.platform.startswith("linux"):  # the tests run with OpenBLAS preloaded (Makefile), as mlxq's CLI does
        assert started is not None, "OpenBLAS is not loaded: preload it (LD_PRELOAD, see the Makefile)"
    else:
        assert started is None or started >= 1
    engine = Engine(qwen3_model.net, qwen3_model.tokenizer, max_batch=4).start()
    started = engine._blas.default if started is not None else None  # the process's own (an engine may have set 1)
    seen: list[tuple[int, int | None]] = []  # (decode rows, 0 in a prefill step; threads) at every step's processors

    def watch(req, tokens, logits):
        prefilling = any(seq.req is req for seq in engine._prefilling)
        seen.append((0 if prefilling else len(engine._running), openblas_threads()))
        return logits

    def watched(p: list[int], n: int) -> Request:
        req = Request(p, n)
        req.make_processors = lambda: [partial(watch, req)]
        return req

    try:
        ps = prompts(qwen3_model, 3)
        run(engine, [watched(ps[0], 3)])
        run(engine, [watched(p, 4) for p in ps])
        deadline = time.monotonic() + 10  # its last step fed three rows, on one thread; once idle, the process's own
        while openblas_threads() != started and time.monotonic() < deadline:
            time.sleep(0.01)
        idle = openblas_threads()
    finally:
        engine.close()
    assert idle == started
    assert {rows for rows, _ in seen} >= {0, 1, 3}  # prefill, one row, three rows
    for rows, threads in seen:
        if rows == 1:  # whichever count has been faster (`Faster`, its own test below)
            assert threads in {started, 1}, threads
        else:
            assert threads == (started if rows == 0 else 1 if started is not None else None), (rows, threads)


def test_an_engine_closed_mid_decode_leaves_the_process_its_own_blas_threads(qwen3_model):
    """Closed while decoding three rows (steps on one OpenBLAS thread), the loop gives the process its own count back
    as it ends."""
    engine = Engine(qwen3_model.net, qwen3_model.tokenizer, max_batch=4).start()
    started = engine._blas.default if openblas_threads() is not None else None
    several = threading.Event()

    def watch(tokens, logits):
        if len(engine._running) == 3 and not engine._prefilling:
            several.set()
        return logits

    reqs = [Request(p, 200, ignore_eos=True) for p in prompts(qwen3_model, 3)]
    for req in reqs:
        req.make_processors = lambda: [watch]
        engine.submit(req)
    try:
        assert several.wait(60)
    finally:
        engine.close()
    assert openblas_threads() == started


def test_faster_takes_the_setting_whose_recent_steps_took_less_time():
    """Both settings are measured in turns first; then the faster one runs, the other every EXPLORE-th step, one
    slow step (a shared machine) does not flip the choice, and a lasting change does."""
    faster = Faster((2, 1))
    cost = {2: 1.0, 1: 2.0}
    picks = []
    for step in range(1, 81):
        option = faster.pick()
        picks.append(option)
        outlier = step == 20 and option == 2  # one step ten times as long
        faster.took(option, cost[option] * (10 if outlier else 1))
        if step == 40:
            cost = {2: 3.0, 1: 2.0}  # the machine got busy: one thread is now faster
    window = 2 * Faster.WINDOW
    assert sorted(picks[:window]) == [1] * Faster.WINDOW + [2] * Faster.WINDOW
    for step in range(window + 1, 41):
        assert picks[step - 1] == (1 if step % Faster.EXPLORE == 0 else 2), step
    # after the change, 2's median turns once 3 of its last 5 steps took 3.0; then 1 runs and 2 only explores
    for step in range(41, 81):
        assert picks[step - 1] == (2 if step <= 43 or step % Faster.EXPLORE == 0 else 1), step


@pytest.mark.parametrize("fast", ["one thread", "all threads"])
def test_one_row_decode_runs_on_the_blas_thread_count_measured_faster(qwen3_model, fast):
    """One-row decode steps run on 1 thread or the process's count, whichever its steps took less time on: a clock
    that makes steps on `fast` take 1 s and on the other 3 s (reading OpenBLAS's real count as each step ends),
    with the real count read from inside every step."""
    total = [0.0]

    def clock() -> float:
        total[0] += 1.0 if openblas_threads() == quick else 3.0
        return total[0]

    engine = Engine(qwen3_model.net, qwen3_model.tokenizer, max_batch=2)
    engine._blas = BlasThreads(clock=clock)
    started = engine._blas.default if openblas_threads() is not None else None  # the process's own count
    quick = 1 if fast == "one thread" else started
    engine.start()
    seen: list[int | None] = []

    def watch(req, tokens, logits):
        if not any(seq.req is req for seq in engine._prefilling):
            seen.append(openblas_threads())
        return logits

    req = Request(prompts(qwen3_model, 1)[0], 60)
    req.make_processors = lambda: [partial(watch, req)]
    try:
        run(engine, [req])
    finally:
        engine.close()
    assert len(seen) == 59  # the first token comes from the prefill step
    if started in (None, 1):  # nothing to choose from
        assert engine._blas.one_row is None and set(seen) == {started}
        return
    slow = started if quick == 1 else 1
    window = 2 * Faster.WINDOW
    assert sorted(seen[:window]) == sorted([quick, slow] * Faster.WINDOW)
    assert seen[window:] == [slow if k % Faster.EXPLORE == 0 else quick for k in range(window + 1, 60)]


def test_outputs_of_a_step_wake_an_event_loop_once(qwen3_model):
    """Eight streams on one event loop: each engine step's outputs reach the loop with one wake-up for all of them,
    not one per stream (`stream._Mailbox`), and every stream still gets its tokens."""
    from mlxq.engine.stream import astream

    engine = Engine(qwen3_model.net, qwen3_model.tokenizer, max_batch=8).start()

    async def main() -> tuple[list[list[int]], int]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        plain = loop.call_soon_threadsafe

        def counted(*args, **kwargs):
            nonlocal wakeups
            wakeups += 1
            return plain(*args, **kwargs)

        loop.call_soon_threadsafe = counted

        async def one(p: list[int]) -> list[int]:
            return [t async for chunk in astream(engine, Request(p, 8, ignore_eos=True)) for t in chunk.tokens]

        got = await asyncio.gather(*(one(p) for p in prompts(qwen3_model, 8)))
        return got, wakeups

    try:
        got, wakeups = asyncio.run(main())
        steps = engine.steps + engine.prefill_steps
    finally:
        engine.close()
    assert [len(t) for t in got] == [8] * 8
    # the engine hands outputs over at most twice a step (before a prefill pass, and before a step's sampling)
    assert wakeups <= 2 * steps + 2 < 8 * 8, (wakeups, steps)
