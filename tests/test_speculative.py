"""Speculative decoding with prompt lookup: the output is the one plain decoding gives (greedy: token for token on
dense, hybrid and real models; sampling: the same distribution), and a rejected draft leaves no trace in the cache
(attention lengths, DeltaNet states restored from the checkpoint taken before the pass)."""

from __future__ import annotations

import asyncio
import json
import threading

import mlx.core as mx
import numpy as np
import pytest
from fixtures_qwen3 import *  # noqa: F403  (pytest fixtures: qwen3_model, ...)
from fixtures_qwen35 import *  # noqa: F403  (pytest fixture: hybrid_model)

from mlxq.engine import stream as streams
from mlxq.engine.cache import KVCache
from mlxq.engine.prompt_cache import CacheSlot
from mlxq.engine.sampling import SamplingParams, make_sampler
from mlxq.engine.speculative import PromptLookup
from mlxq.errors import GenerationError


def test_prompt_lookup_drafts_what_followed_the_latest_longest_tail():
    lookup = PromptLookup([1, 2, 3, 9, 9, 2, 3, 7, 8, 4, 2, 3])
    assert lookup.draft(2) == [7, 8]  # "2 3" last followed by 7 8 (the earlier "2 3 9" is older)
    lookup.extend([7])
    assert lookup.draft(5) == [8, 4, 2, 3, 7]  # the trigram "2 3 7" wins, and the draft runs to the end
    assert PromptLookup([1, 2, 3, 4]).draft(3) == []  # nothing repeats
    assert lookup.draft(0) == []
    # A draft under way continues the text: after "2 3" + [7], the trigram "2 3 7" drafts what followed it.
    assert PromptLookup([1, 2, 3, 7, 8, 4, 9, 2, 3]).draft(3, after=[7]) == [8, 4, 9]
    assert PromptLookup([5, 6, 1, 2]).draft(2, after=[5, 6]) == [1, 2]  # the tail is all draft


SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "comment": {"type": "string"}},
          "required": ["answer", "comment"], "additionalProperties": False}


def test_a_grammar_drafts_what_it_forces_and_cuts_what_it_forbids(qwen3_model):
    """Under a JSON schema the draft starts with the tokens the grammar forces (the keys and punctuation), takes a
    looked-up guess only up to the first token the grammar forbids, never drafts an end of sequence, and leaves the
    grammar's state as it was (the decoded output goes on as if no draft had been made)."""
    from mlxq.engine.constraints import json_schema_processor

    tok = qwen3_model.tokenizer
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    grammar = json_schema_processor(tok, SCHEMA)
    forced = enc('{"answer": "')
    assert grammar.draft([], lambda after: [], 20) == forced  # nothing looked up: the forced tokens alone
    guesses = []

    def guess(after: list[int]) -> list[int]:
        guesses.append(list(after))
        return enc('no", "comment": "a b c') if after == forced else []  # what the text has after the prefix

    # After the forced prefix, the guess: "no" is allowed; its own '", "comment": "' is forced text again.
    assert tok.decode(grammar.draft([], guess, 40)) == '{"answer": "no", "comment": "a b c'
    assert guesses == [forced, enc('{"answer": "no", "comment": "a b c')]  # guessed again where the text ran out
    assert grammar.draft([], guess, 3) == forced[:3]  # k bounds the whole draft
    bad = enc('maybe", "comment": "x"}')  # "maybe" is not an allowed answer: nothing of it is drafted
    assert grammar.draft([], lambda after: bad, 40) == forced
    done = enc('{"answer": "no", "comment": "x"}')
    end = [next(iter(tok.eos_token_ids))]
    assert grammar.draft(done[:-1], lambda after: done[-1:] + end + enc("junk"), 8) == done[-1:]  # never the end
    assert grammar.draft(done, lambda after: end, 8) == []  # the grammar is done: nothing follows but the end
    # The grammar is where it was: the tokens of the output so far pass, and another answer would not.
    fresh = json_schema_processor(tok, SCHEMA)
    assert grammar.matcher.validate_tokens([]) == 0 and not grammar.matcher.is_error()
    probe = enc('{"answer": "yes", "comment": "y"}')
    assert grammar.matcher.validate_tokens(probe) == 0  # it has consumed `done` and stopped, as `fresh` would
    assert fresh.matcher.validate_tokens(probe) == len(probe)
    # Output the grammar cannot take (another processor's doing, say) fails the draft and then the pick, loudly.
    lost = json_schema_processor(tok, SCHEMA)
    with pytest.raises(GenerationError, match="lost track"):
        lost.draft(enc("hello"), lambda after: [], 4)
    with pytest.raises(GenerationError, match="lost track"):
        lost(enc("hello"), mx.zeros((1, 8)))


def test_a_draft_guesses_as_many_tokens_as_the_last_ones_earned(qwen3_model):
    """Under a grammar only looked-up guesses count against the draft length, however many forced tokens come
    between them; the length then follows the guesses alone: twice the guesses taken (at least one), grown when
    all were taken, and left alone by a draft of forced tokens only."""
    from mlxq.engine.constraints import json_schema_processor
    from mlxq.engine.scheduler import Request, _Sequence

    tok = qwen3_model.tokenizer
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    forced, text = enc('{"answer": "'), enc('no", "comment": "a b c d e f g h')
    seq = _Sequence(Request(enc("Q?"), 64, make_processors=lambda: [json_schema_processor(tok, SCHEMA)],
                            speculative=20), tok)  # room for guesses beyond the first

    class Text:  # the transcript's continuation after the forced prefix, as prompt lookup would find it
        tokens = seq.lookup.tokens

        def extend(self, tokens: list[int]) -> None:
            pass

        def draft(self, k: int, after: list[int]) -> list[int]:
            answer = forced + text
            return answer[len(after) : len(after) + max(k, 0)] if answer[: len(after)] == after else []

    seq.lookup = Text()
    seq.draft_len = 2
    draft = seq.draft()
    assert draft[: len(forced) + 2] == forced + text[:2] and seq.guessed == [len(forced), len(forced) + 1]
    seq.checked(len(draft), len(forced))  # the forced tokens taken, both guesses not
    assert seq.draft_len == 1
    seq.checked(len(draft), len(draft))  # everything taken: twice the guesses
    assert seq.draft_len == 4
    seq.guessed = []
    seq.checked(len(forced), 0)  # forced tokens only: nothing learnt about guesses
    assert seq.draft_len == 4
    seq.guessed = None  # a draft of guesses only (no grammar)
    seq.checked(6, 1)
    assert seq.draft_len == 2


def test_greedy_output_is_identical_under_a_json_schema(qwen3_model):
    """A JSON answer with drafts from the grammar and the transcript is the plain greedy one, token for token; the
    forced keys are drafted even where nothing repeats."""
    model = qwen3_model
    prompt = model.tokenizer.encode("The game master answers every question in JSON.")
    plain = model.generate(prompt, max_tokens=40, schema=SCHEMA)
    drafted0, accepted0 = engine_counts(model)
    fast = model.generate(prompt, max_tokens=40, schema=SCHEMA, speculative=6)
    drafted, accepted = engine_counts(model)
    assert fast.tokens == plain.tokens and fast.text == plain.text
    assert accepted - accepted0 > 0  # the keys came drafted: the prompt has no JSON to look up
    assert run_together(model, [prompt, prompt], [0, 6], schema=SCHEMA) == [plain.tokens, plain.tokens]


def repeating_prompt(model, text: str) -> list[int]:
    """A prompt whose tail occurred before, followed by the model's own greedy continuation of the first
    occurrence with every fifth token changed: drafts exist, and some are right and some wrong."""
    head = model.tokenizer.encode(text)
    first = model.generate(head, max_tokens=24).tokens
    return head + [t + 1 if i % 5 == 4 else t for i, t in enumerate(first)] + head


def engine_counts(model) -> tuple[int, int]:
    stats = model.engine.stats()
    return stats["drafted"], stats["accepted_drafts"]


@pytest.mark.parametrize("name", ["qwen3_model", "hybrid_model"])
def test_greedy_output_is_identical_with_and_without_drafts(name, request):
    model = request.getfixturevalue(name)
    prompts = [repeating_prompt(model, t) for t in ("Once upon a time a dragon", "The soup was cold and the")]
    plain = [model.generate(p, max_tokens=40).tokens for p in prompts]
    drafted0, accepted0 = engine_counts(model)
    fast = [model.generate(p, max_tokens=40, speculative=6).tokens for p in prompts]
    drafted, accepted = (a - b for a, b in zip(engine_counts(model), (drafted0, accepted0), strict=True))
    assert fast == plain
    assert 0 < accepted < drafted  # drafts were taken, and some were wrong (rolled back)
    # Batched: rows with and without drafts, each of its own length, in one engine.
    assert run_together(model, prompts, [0, 6]) == plain


def run_together(model, prompts: list[list[int]], speculative: list[int], **options) -> list[list[int]]:
    """Greedy answers to `prompts` submitted at once from threads (one batch), each with its own draft length."""
    out: list = [None] * len(prompts)

    def answer(i: int) -> None:
        out[i] = model.generate(prompts[i], max_tokens=40, speculative=speculative[i], **options).tokens

    threads = [threading.Thread(target=answer, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_greedy_output_is_identical_on_smollm2(smollm2):
    answer = '{"answer": "no", "hint": "he was not thirsty at all, he had hiccups", "solved": false}'
    msgs = [{"role": "user", "content": f"Reply with exactly this JSON and nothing else: {answer}"}]
    plain = smollm2.generate(msgs, max_tokens=48)
    drafted0, accepted0 = engine_counts(smollm2)
    fast = smollm2.generate(msgs, max_tokens=48, speculative=8)
    assert fast.tokens == plain.tokens and fast.text == plain.text
    drafted, accepted = engine_counts(smollm2)
    assert accepted - accepted0 >= len(plain.tokens) // 2  # the answer quotes the prompt: most tokens come drafted


def test_rollback_leaves_the_cache_exact(hybrid_model):
    """After a speculative answer with rejected drafts, the conversation's cache (DeltaNet states and KV) is the
    one a fresh pass over the same tokens gives."""
    model = hybrid_model
    prompt = repeating_prompt(model, "A man walks into a bar and")
    slot = CacheSlot()
    drafted0, accepted0 = engine_counts(model)
    out = run_in_slot(model, slot, prompt, max_tokens=30, speculative=6)
    drafted, accepted = engine_counts(model)
    assert 0 < accepted - accepted0 < drafted - drafted0
    assert slot.tokens == prompt + out.tokens[:-1]
    fresh = model.make_cache()
    mx.eval(model.net(mx.array([slot.tokens]), fresh))
    for held, want in zip(slot.caches, fresh, strict=True):
        assert held.offset == want.offset == len(slot.tokens)
        if isinstance(want, KVCache):
            n = want.offset
            pairs = [(held.keys[..., :n, :], want.keys[..., :n, :]), (held.values[..., :n, :], want.values[..., :n, :])]
        else:
            pairs = [(held.conv, want.conv), (held.recurrent, want.recurrent)]
        for a, b in pairs:
            assert np.allclose(np.array(a), np.array(b), atol=1e-4, rtol=1e-3)
    # and the next turn from that cache is what a fresh cache gives
    follow = slot.tokens + model.tokenizer.encode(" and then")
    assert run_in_slot(model, slot, follow, max_tokens=12, speculative=6).tokens == \
        model.generate(follow, max_tokens=12).tokens


def run_in_slot(model, slot: CacheSlot, prompt: list[int], **options):
    """`model.generate` resuming from and leaving its cache in `slot`, as a Session's turn does."""
    request = model.request(prompt, **options)
    request.slot = slot
    return streams.run(model.engine, request)


# ------------------------------------------------------------------------------------------------ sampling
def chi_square(counts: dict, probs: dict, n: int) -> float:
    return sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in probs.items())


def test_verify_draws_from_the_target_distribution():
    """Sampler.verify with a draft token: the token is distributed as the plain sampler's, whatever the draft. A draft
    read from the text (prompt lookup) is kept with probability p; one drawn from a distribution q (an MTP head's) is
    kept with min(1, p/q), else the token is drawn from max(0, p - q): the draft comes out as often as that makes
    it (always when q = p), and the tokens follow p, for a q that over- and under-weights tokens."""
    logits = mx.array([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    params = SamplingParams(temperature=0.8, top_k=5, seed=3)
    scores = np.array(logits[0]) / 0.8
    scores[5] = -np.inf
    p = np.exp(scores - scores.max())
    p /= p.sum()
    n = 6000
    rng = np.random.default_rng(0)
    for q in (None, np.array([0.05, 0.05, 0.5, 0.1, 0.2, 0.1]), p):
        sampler = make_sampler(params)
        if q is None:
            drafts = np.repeat([0, 3, 5], n // 3)  # the likeliest, an unlikely one, one the filter removes
            tokens = np.array(mx.concatenate([sampler.verify(logprobs, int(d)) for d in drafts]))
        else:
            drafts = rng.choice(6, size=n, p=q)
            qa = mx.array(q[None].astype(np.float32))
            tokens = np.array(mx.concatenate([sampler.verify(logprobs, int(d), qa) for d in drafts]))
        for part in np.split(np.arange(n), 3) if q is None else [np.arange(n)]:
            m, counts = len(part), np.bincount(tokens[part], minlength=6)
            assert counts[5] == 0
            stat = sum((counts[k] - m * p[k]) ** 2 / (m * p[k]) for k in range(5))
            assert stat < 18.47, (q, drafts[part[0]], counts, m * p)  # chi-square, 4 dof, p = 0.001
        if q is None:
            rate = float(p[drafts].mean())  # kept with p(draft), never drawn again
        else:
            keep = np.minimum(1.0, p / np.maximum(q, 1e-30))
            rest = np.maximum(p - q, 0.0)
            rest = rest / rest.sum() if rest.sum() > 1e-9 else 0 * rest
            rate = min(1.0, float((q * (keep + (1 - keep) * rest)).sum()))
        kept = (tokens == drafts).mean()
        assert abs(kept - rate) <= 4 * np.sqrt(rate * (1 - rate) / n) + 1e-6, (q, kept, rate)


def test_sampled_answers_keep_their_distribution(qwen3_model):
    """End to end: four sampled tokens, drafted from a prompt that repeats them, follow the model's exact joint
    distribution (computed from its logits), drafts accepted and rejected along the way."""
    model = qwen3_model
    ab = model.tokenizer.encode(" red blue")
    assert len(ab) == 2
    prompt = model.tokenizer.encode("Colours:") + ab * 4  # the tail " red blue" drafts " red blue ..."
    bias = {t: 30.0 for t in ab}  # two tokens carry almost all the mass; the model's logits weigh them

    def dist(prefix: tuple[int, ...]) -> np.ndarray:
        logits = np.array(model.logits(prompt + [ab[i] for i in prefix])[-1], dtype=np.float64)[ab]
        q = np.exp(logits - logits.max())
        return q / q.sum()

    exact = {(): 1.0}
    for _ in range(4):
        exact = {k + (t,): p * dist(k)[t] for k, p in exact.items() for t in range(2)}
    n = 480

    async def sample_all():
        return await asyncio.gather(*(model.agenerate(prompt, max_tokens=4, ignore_eos=True, speculative=3,
                                                      temperature=1.0, logit_bias=bias, seed=i) for i in range(n)))

    drafted0, accepted0 = engine_counts(model)
    results = asyncio.run(sample_all())
    drafted, accepted = engine_counts(model)
    assert n // 4 < accepted - accepted0 < drafted - drafted0  # drafts taken and drafts rejected
    counts: dict = {}
    for r in results:
        key = tuple(ab.index(t) for t in r.tokens)
        counts[key] = counts.get(key, 0) + 1
    assert sum(counts.values()) == n
    assert chi_square(counts, exact, n) < 37.70, (counts, exact)  # 15 degrees of freedom, p = 0.001


def test_the_server_takes_speculative_as_an_extension_field(qwen3_model):
    """`"mlxq": {"speculative": k}` on a chat request: drafts are checked, the answer is the plain one."""
    from test_server import MODEL, serving

    messages = [{"role": "user", "content": "Say: the blue bird sings, the blue bird sings, the blue bird"}]
    with serving(qwen3_model) as live:
        def ask(extra: dict):
            r = live.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                                    extra_body={"chat_template_kwargs": {"enable_thinking": False},
                                                                **extra})
            return r.choices[0].message.content

        plain = ask({})
        drafted = live.engine.stats()["drafted"]
        assert ask({"mlxq": {"speculative": 6}}) == plain
        assert live.engine.stats()["drafted"] > drafted
        bad = live.raw("/v1/chat/completions", json.dumps({"model": MODEL, "messages": messages,
                                                           "mlxq": {"speculative": -1}}).encode())
        assert bad[0] == 400
