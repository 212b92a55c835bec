"""Engine pieces: samplers, penalties, stop strings, caches (checkpoint/restore, sliding window), batched steps."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tiny import make_tiny

from mlxq.engine.batch import make_batch
from mlxq.engine.cache import KVCache, RotatingKVCache, buffer_positions, checkpoint, restore
from mlxq.engine.sampling import SamplingParams, draw, make_sampler, penalize
from mlxq.errors import InvalidRequest
from mlxq.formats import open_checkpoint
from mlxq.loading import load_model


def logprobs_of(probs):
    p = mx.array([probs])
    return mx.log(p)


def sample_many(params, probs, n=400):
    sampler = make_sampler(params)
    lp = logprobs_of(probs)
    return {sampler(lp).item() for _ in range(n)}


def test_greedy_is_argmax():
    assert make_sampler(SamplingParams())(logprobs_of([0.1, 0.6, 0.3])).item() == 1


def test_top_k_top_p_min_p_keep_only_the_head():
    probs = [0.5, 0.3, 0.15, 0.05]
    assert sample_many(SamplingParams(temperature=1.0, top_k=2, seed=0), probs) == {0, 1}
    assert sample_many(SamplingParams(temperature=1.0, top_p=0.7, seed=0), probs) == {0, 1}
    assert sample_many(SamplingParams(temperature=1.0, min_p=0.4, seed=0), probs) == {0, 1}  # keeps p >= 0.4 * 0.5
    assert sample_many(SamplingParams(temperature=1.0, seed=0), probs) == {0, 1, 2, 3}


def test_seed_reproducible():
    lp = logprobs_of([0.25] * 4)
    a = [make_sampler(SamplingParams(temperature=1.0, seed=7))(lp).item() for _ in range(1)]
    s1, s2 = (make_sampler(SamplingParams(temperature=1.0, seed=7)) for _ in range(2))
    seq1 = [s1(lp).item() for _ in range(20)]
    assert seq1 == [s2(lp).item() for _ in range(20)] and a[0] == seq1[0]
    assert len(set(seq1)) > 1  # the key advances between draws


def test_penalties_and_bias():
    logits = mx.zeros((1, 5))
    assert mx.argmax(penalize(logits, [SamplingParams(logit_bias={3: 5.0})], [[]])).item() == 3
    out = penalize(mx.array([[1.0, 2.0, -1.0]]), [SamplingParams(repetition_penalty=2.0)], [[1, 1]])
    assert out.tolist() == [[1.0, 1.0, -1.0]]
    out = penalize(mx.zeros((1, 3)), [SamplingParams(frequency_penalty=1.0, presence_penalty=0.5)], [[2, 2]])
    assert out.tolist() == [[0.0, 0.0, -2.5]]


def one_row_penalized(logits: mx.array, p: SamplingParams, tokens: list[int], context: int = 64) -> mx.array:
    """What one row [1, V] got before `penalize` took all rows at once: its own bias, repetition and
    presence/frequency steps, each with a Python float scalar."""
    if p.logit_bias:
        ids = mx.array(list(p.logit_bias.keys()))
        logits = logits.at[:, ids].add(mx.array(list(p.logit_bias.values()), dtype=mx.float32))
    if p.repetition_penalty != 1.0 and tokens:
        ids = mx.array(sorted(set(tokens[-context:])))
        sel = logits[:, ids]
        logits[:, ids] = mx.where(sel < 0, sel * p.repetition_penalty, sel / p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and tokens:
        counts: dict[int, int] = {}
        for t in tokens:
            counts[t] = counts.get(t, 0) + 1
        n = mx.array(list(counts.values()), dtype=mx.float32)
        logits = logits.at[:, mx.array(list(counts))].add(-(p.presence_penalty + p.frequency_penalty * n))
    return logits


def test_penalize_gives_every_row_what_it_would_get_alone():
    """Rows with every mix of bias and penalties (and none) in one pass: bit for bit what each row's own steps give,
    an id outside the vocabulary is left out, and the rows without any are untouched."""
    rng = np.random.default_rng(5)
    vocab = 97
    params = [
        SamplingParams(),
        SamplingParams(logit_bias={3: 5.0, 40: -100.0, 96: 0.3}),
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.7, presence_penalty=0.4),
        SamplingParams(frequency_penalty=0.11, presence_penalty=-0.25, logit_bias={7: 1.7}),
        SamplingParams(logit_bias={2: 2.0}, repetition_penalty=1.1, presence_penalty=0.2, frequency_penalty=0.9),
        SamplingParams(repetition_penalty=1.2, frequency_penalty=0.5),
    ]
    generated = [rng.integers(0, vocab, size=rng.integers(0, 150)).tolist() for _ in params]
    generated[2] = []  # nothing generated yet
    logits = mx.array(rng.normal(0, 4, size=(len(params), vocab)).astype(np.float32))
    got = penalize(logits, params, generated)
    for b, (p, tokens) in enumerate(zip(params, generated, strict=True)):
        want = one_row_penalized(logits[b : b + 1], p, tokens)
        assert np.array_equal(np.array(got[b : b + 1]), np.array(want)), b
    assert np.array_equal(np.array(got[0]), np.array(logits[0]))
    outside = penalize(logits, [SamplingParams(logit_bias={vocab: 9.0, -1: 9.0})] * len(params), generated)
    assert np.array_equal(np.array(outside), np.array(logits))


def test_a_vanishing_temperature_draws_the_argmax_of_what_is_allowed():
    """A temperature above 0 that float32 cannot tell from 0 (the fuzzer sent 3.4e-201 under a JSON schema): the
    draw is the argmax among the tokens the grammar allows, never a masked one from a NaN distribution."""
    logits = mx.array([[2.0, -mx.inf, 5.0, 1.0, -mx.inf, 0.0]])
    for t in (3.4e-201, 1e-40, 1e-30):
        for seed in range(8):
            assert draw([make_sampler(SamplingParams(temperature=t, seed=seed))], logits).item() == 2


def test_bad_sampling_params():
    with pytest.raises(InvalidRequest, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(InvalidRequest, match="temperature"):
        SamplingParams(temperature=-1)


def test_kv_checkpoint_restore():
    c = KVCache()
    k = mx.random.normal((1, 2, 5, 4))
    c.update_and_fetch(k, k)
    state = c.checkpoint()
    c.update_and_fetch(k[:, :, :2], k[:, :, :2])
    assert c.offset == 7
    c.restore(state)
    kk, _ = c.update_and_fetch(k[:, :, :1], k[:, :, :1])
    assert kk.shape[2] == 6 and mx.array_equal(kk[:, :, :5], k)


def test_kv_buffers_grow_by_short_blocks_up_to_a_block_then_by_blocks():
    """A short request's KV buffers grow 32 positions at a time from 16 (SmolLM2's 74 tokens: 96, not 128 or a
    256-block), longer ones by whole 256-blocks; what the cache returns is every token written, in order."""
    assert [buffer_positions(n) for n in (1, 16, 17, 26, 33, 74, 128, 129, 256, 257, 700)] == [
        16, 16, 32, 32, 64, 96, 128, 160, 256, 512, 768]
    cache, written = KVCache(), []
    for n, size in ((26, 32), (1, 32), (47, 96), (200, 512)):
        kv = mx.random.normal((1, 2, n, 4), key=mx.random.key(n))
        written.append(kv)
        keys, values = cache.update_and_fetch(kv, -kv)
        assert cache.keys.shape[2] == size
    assert mx.array_equal(keys, mx.concatenate(written, axis=2)) and mx.array_equal(values, -keys)


def test_rotating_cache_keeps_window_and_restores():
    c = RotatingKVCache(window=4)
    for t in range(6):
        x = mx.full((1, 1, 1, 2), float(t))
        k, _ = c.update_and_fetch(x, x)
    assert k[0, 0, :, 0].tolist() == [2.0, 3.0, 4.0, 5.0]
    state = c.checkpoint()
    c.update_and_fetch(x, x)
    c.restore(state)
    assert c.offset == 6 and c.keys[0, 0, :, 0].tolist() == [3.0, 4.0, 5.0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3")
    make_tiny("gemma3", path)  # has sliding-window layers
    return load_model(open_checkpoint(str(path)))


def test_chunked_prefill_equals_one_pass(tiny):
    ids = list(range(3, 40))
    full = tiny(mx.array([ids]), tiny.make_cache())[0, -1]
    for chunk in (4, 7, 64):
        batch = make_batch(tiny)
        batch.add(tiny.make_cache())
        for start in range(0, len(ids), chunk):
            piece = ids[start : start + chunk]
            logits = batch.step([piece], [[len(piece) - 1]])
        assert mx.allclose(logits[0], full, atol=1e-4)


def test_whole_cache_checkpoint_restore_gives_same_logits(tiny):
    cache = tiny.make_cache()
    tiny(mx.array([list(range(3, 20))]), cache)
    saved = checkpoint(cache)
    first = tiny(mx.array([[5, 6, 7]]), cache)
    restore(cache, saved)
    again = tiny(mx.array([[5, 6, 7]]), cache)
    assert mx.array_equal(first, again)


@pytest.fixture(scope="module")
def nets(tmp_path_factory, tiny):
    """A dense attention model, a hybrid (Gated DeltaNet + attention) and one with sliding windows (`tiny`)."""
    import torch
    import transformers
    from tiny import HYBRID_TEXT

    dense = tmp_path_factory.mktemp("qwen3")
    make_tiny("qwen3", dense)
    hybrid = tmp_path_factory.mktemp("qwen35")
    torch.manual_seed(0)
    transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**HYBRID_TEXT)).eval().save_pretrained(hybrid)
    return {"dense": load_model(open_checkpoint(str(dense))), "hybrid": load_model(open_checkpoint(str(hybrid))),
            "sliding": tiny}


@pytest.mark.parametrize("kind", ["dense", "hybrid", "sliding"])
def test_ragged_batch_steps_give_each_row_its_own_logits(nets, kind):
    """Rows of different lengths (one resumed mid-way, the others fresh), fed different numbers of tokens per step
    (prompt chunks and single tokens, padded to the longest) and leaving when done, give the logits each row gets
    alone."""
    net = nets[kind]
    rows = [list(range(3, 3 + n)) for n in (40, 9, 70)]
    chunks = [5, 1, 16]  # tokens per step: a chunk, decode-like steps, a bigger chunk
    pos = [0, 0, 11]  # row 2 resumes: its cache already holds its first 11 tokens
    batch = make_batch(net)
    for row, start in zip(rows, pos, strict=True):
        cache = net.make_cache()
        if start:
            net(mx.array([row[:start]]), cache)
        batch.add(cache)
    live = [0, 1, 2]  # the rows in the batch, in batch order
    got: list[list[mx.array]] = [[], [], []]
    while live:
        feed = [rows[i][pos[i] : pos[i] + chunks[i]] for i in live]
        logits = batch.step(feed, [list(range(len(t))) for t in feed])
        at = 0
        for i, t in zip(live, feed, strict=True):
            got[i].append(logits[at : at + len(t)])
            at, pos[i] = at + len(t), pos[i] + len(t)
        for b in reversed(range(len(live))):  # a row that is done leaves, as a finished request does
            if pos[live[b]] == len(rows[live[b]]):
                batch.remove(b)
                del live[b]
    for i, row in enumerate(rows):
        alone = net(mx.array([row]), net.make_cache())[0]
        assert mx.allclose(mx.concatenate(got[i]), alone[11 if i == 2 else 0 :], atol=1e-4), (kind, i)


# ------------------------------------------------------------------------------------------------ batched draws
MIXED = [SamplingParams(temperature=0.7, seed=1), SamplingParams(), SamplingParams(temperature=1.3, top_k=3, seed=2),
         SamplingParams(temperature=1.0, top_p=0.8, seed=3), SamplingParams(temperature=1.0, min_p=0.2, seed=4)]


def exact_distribution(params: SamplingParams, logits: np.ndarray) -> np.ndarray:
    """What `params` draws from, computed in float64 by the textbook rules."""
    s = logits / params.temperature
    order = np.argsort(-s)
    keep = np.ones_like(s, dtype=bool)
    if params.top_k:
        keep[order[params.top_k :]] = False
    p = np.exp(s - s.max()) * keep
    p /= p.sum()
    if params.top_p < 1:
        before = np.cumsum(p[order]) - p[order]
        keep[order[before >= params.top_p]] = False
    if params.min_p:
        keep &= s >= s.max() + np.log(params.min_p)
    p = np.exp(s - s.max()) * keep
    return p / p.sum()


def test_batched_draws_follow_each_rows_distribution():
    """One `draw` over rows with different temperatures and filters, greedy among them: over many steps each row's
    tokens follow its own exact distribution (chi-square, p = 0.001), and the greedy row is always the argmax."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(MIXED), 8)) * 1.5
    lp = mx.array(logits - np.log(np.exp(logits).sum(-1, keepdims=True)), dtype=mx.float32)
    samplers = [make_sampler(p) for p in MIXED]
    n = 3000
    drawn = np.array(mx.stack([draw(samplers, lp) for _ in range(n)]))
    for b, params in enumerate(MIXED):
        if params.greedy:
            assert (drawn[:, b] == logits[b].argmax()).all()
            continue
        p = exact_distribution(params, logits[b])
        counts = np.bincount(drawn[:, b], minlength=8)
        assert counts[p == 0].sum() == 0, (b, counts, p)
        live = p > 0
        stat = ((counts[live] - n * p[live]) ** 2 / (n * p[live])).sum()
        assert stat < CHI2_999[live.sum() - 1], (b, counts, n * p)


CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}  # chi-square, p = 0.001, by dof


def test_a_seeded_row_draws_the_same_tokens_in_any_batch():
    """A seeded row's n-th token depends on its seed, n and its own logits only: alone, or in batches of other rows
    (their number, order and settings changing from step to step), with or without drafts for the others."""
    rng = np.random.default_rng(1)
    steps = [mx.array(rng.normal(size=(1, 50)), dtype=mx.float32) for _ in range(30)]
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    first = make_sampler(params)
    alone = [first(lp).item() for lp in steps]
    row, others = make_sampler(params), [make_sampler(p) for p in MIXED]
    together = []
    for i, lp in enumerate(steps):
        company = others[: i % len(others)]
        at = i % (len(company) + 1)
        samplers = [*company[:at], row, *company[at:]]
        batch = mx.concatenate([mx.array(rng.normal(size=(1, 50)), dtype=mx.float32) if s is not row else lp
                                for s in samplers])
        drafts = [int(rng.integers(50)) if s is not row and i % 2 else None for s in samplers]
        together.append(draw(samplers, batch, drafts)[at].item())
    assert together == alone
    assert len(set(alone)) > 5
    other_seed = make_sampler(SamplingParams(temperature=1.0, top_p=0.95, seed=43))
    assert [other_seed(lp).item() for lp in steps] != alone


@pytest.mark.parametrize("kind", ["dense", "hybrid"])
def test_a_rows_kv_buffers_reserved_for_its_end_are_made_once_and_decode_the_same(nets, kind):
    """A decode row promoted with the positions it reaches at most (`end`) gets KV buffers of exactly that many when
    they fit in a block, made once; past a block, or past its end (a draft), they grow as before. Its logits equal,
    bit for bit, those of a row promoted without `end` (buffers growing by steps)."""
    from mlxq.engine.runner import Runner

    assert [buffer_positions(n, 40) for n in (1, 10, 40, 41)] == [40, 40, 40, 64]
    assert [buffer_positions(n, 300) for n in (10, 40)] == [16, 64]  # past a block: the steps
    net, prompt = nets[kind], list(range(3, 12))
    runs = {}
    for end in (0, len(prompt) + 30):
        runner = Runner(net, 0)
        runner.admit(prompt, None)
        logits = [runner.prefill([prompt], [[len(prompt) - 1]], [])[0]]
        runner.promote(0, end)
        sizes = []
        for _ in range(30):
            logits.append(runner.decode([int(mx.argmax(logits[-1]))])[0])
            mx.eval(logits[-1])
            sizes.append(runner._batches["decode"].positions)
        runner.close()
        runs[end] = (mx.stack(logits), sizes)
    assert set(runs[len(prompt) + 30][1]) == {len(prompt) + 30}
    assert runs[0][1][0] < runs[0][1][-1]
    assert mx.array_equal(runs[0][0], runs[len(prompt) + 30][0])


@pytest.mark.skipif(mx.metal.is_available(), reason="MLX's cache is handed back mid-step off Metal only")
def test_a_step_hands_back_what_the_layers_left_before_the_head(nets, monkeypatch):
    """Off Metal, what MLX kept of the buffers the layers freed is handed back before the head runs (the head reuses
    none of them), so a step holds one set at a time; the logits are the model's own."""
    from mlxq.engine.runner import Runner

    net, prompt = nets["dense"], list(range(3, 43))
    at_head = []
    head = net.head

    def look_then_head(x):
        at_head.append(mx.get_cache_memory())
        return head(x)

    monkeypatch.setattr(net, "head", look_then_head)
    limit = mx.set_cache_limit(1 << 30)  # process-wide: an earlier test's expert pool may hold it near 0
    try:
        runner = Runner(net, 0)
        runner.admit(prompt, None)
        got = runner.prefill([prompt], [[len(prompt) - 1]], [])
        runner.promote(0)
        mx.eval(runner.decode([5]))
        runner.close()
    finally:
        mx.set_cache_limit(limit)
    assert at_head == [0, 0]
    monkeypatch.undo()
    # the batched step's products differ in shape from the plain forward's, which BLAS may round differently (with one
    # OpenBLAS thread, as an earlier engine may leave the process: 1.2e-7 apart): the same values, not the same bits
    assert mx.allclose(got[0], net(mx.array([prompt]), net.make_cache())[0, -1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["dense", "hybrid", "sliding"])
def test_the_runner_decodes_every_kind_of_batch(nets, kind):
    """Greedy decode through the runner gives the tokens of the model stepped by hand on every batch kind: a `Batch`
    (dense, hybrid) and a `SerialBatch` (sliding windows); each tells what its KV buffers are sized for (`positions`,
    what the tests observe), and the answer grows with the buffers."""
    from mlxq.engine.runner import Runner

    net = nets[kind]
    prompt = list(range(3, 12))
    runner = Runner(net, 0)
    runner.admit(prompt, None)
    token = int(mx.argmax(runner.prefill([prompt], [[len(prompt) - 1]], [])[0]))
    runner.promote(0)
    got, sizes = [token], []
    for _ in range(24):
        got.append(int(mx.argmax(runner.decode([got[-1]])[0])))
        sizes.append(runner._batches["decode"].positions)
    runner.close()
    cache = net.make_cache()
    want = [int(mx.argmax(net(mx.array([prompt]), cache)[0, -1]))]
    for _ in range(24):
        want.append(int(mx.argmax(net(mx.array([[want[-1]]]), cache)[0, -1])))
    assert got == want
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]  # 9 + 24 positions: past the first buffer of 16 or 32
