"""Thinking control (real Qwen3 template and tokenizer) and the secret guard."""

from __future__ import annotations

import mlx.core as mx
from fixtures_qwen3 import *  # noqa: F403  (pytest fixtures: qwen3_model, ...)
from fixtures_qwen3 import END_THINK, THINK

from mlxq.engine.guards import (
    normalize,
    prompt_opens_think,
    secret_guard_processor,
    thinking_processor,
)
from mlxq.engine.output import split_reasoning

PROMPT = [{"role": "user", "content": "Tell me a story."}]
TOWARD_THINK = {THINK: 30.0, END_THINK: 30.0}  # the model would open (or close) a think block at every step


def longest_common(a: str, b: str) -> int:
    """Length of the longest common substring of a and b."""
    best = 0
    for i in range(len(a)):
        for j in range(i + best + 1, len(a) + 1):
            if a[i:j] not in b:
                break
            best = j - i
    return best


def teacher(token_ids: list[int]):
    """A processor that pushes the model to write `token_ids` in order: a model that WOULD leak."""
    def push(generated: list[int], logits: mx.array) -> mx.array:
        if len(generated) < len(token_ids):
            logits[:, token_ids[len(generated)]] = logits[:, token_ids[len(generated)]] + 100.0
        return logits
    return push


def test_thinking_off_never_thinks_and_content_is_not_empty(qwen3_model):
    model, tok = qwen3_model, qwen3_model.tokenizer
    ids = tok.apply_chat_template(PROMPT, enable_thinking=False)
    assert tok.decode(ids).endswith("<think>\n\n</think>\n\n")  # the real Qwen3 template's "no thinking" hint
    assert not prompt_opens_think(tok, ids)
    biased = model.generate(ids, max_tokens=8, temperature=1.0, seed=0, logit_bias=TOWARD_THINK)
    assert THINK in biased.tokens  # without the mask the model opens a think block
    for seed in range(6):
        proc = thinking_processor(tok, False, prompt=ids)
        out = model.generate(ids, max_tokens=8, temperature=1.0, seed=seed, logit_bias=TOWARD_THINK,
                             logits_processors=[proc])
        assert THINK not in out.tokens and END_THINK not in out.tokens
        reasoning, content = split_reasoning(out.text)
        assert reasoning is None and content, out.text


def test_greedy_blank_output_gets_visible_content(qwen3_model):
    model, tok = qwen3_model, qwen3_model.tokenizer
    ids = tok.apply_chat_template(PROMPT, enable_thinking=False)
    assert model.generate(ids, max_tokens=6).text.strip() == ""  # this random model greedily writes blank lines
    out = model.generate(ids, max_tokens=6, logits_processors=[thinking_processor(tok, False, prompt=ids)])
    assert out.text.strip()


def test_thinking_budget_forces_the_close(qwen3_model):
    model, tok = qwen3_model, qwen3_model.tokenizer
    ids = tok.apply_chat_template(PROMPT, enable_thinking=True)
    proc = thinking_processor(tok, True, budget=5, prompt=ids)
    out = model.generate(ids, max_tokens=24, temperature=1.0, seed=3, logit_bias={THINK: 30.0},
                         logits_processors=[proc])
    start = out.tokens.index(THINK)
    assert out.tokens[start + 6] == END_THINK  # 5 tokens of reasoning, then the forced close
    assert out.tokens.count(THINK) == 1  # no nested or second block
    reasoning, content = split_reasoning(out.text)
    assert reasoning and content
    # A template that pre-opens the block (Qwen3.5, Qwen3-thinking): the budget counts from the first token.
    opened = ids + tok.encode("<think>\n", add_special_tokens=False)
    assert prompt_opens_think(tok, opened)
    proc = thinking_processor(tok, True, budget=3, prompt=opened)
    out = model.generate(opened, max_tokens=12, temperature=1.0, seed=0, logits_processors=[proc])
    assert out.tokens[3] == END_THINK and split_reasoning(out.text, think_open=True)[1]


def test_split_reasoning():
    assert split_reasoning("<think>\nhmm\n</think>\n\nYes.") == ("hmm", "Yes.")
    assert split_reasoning("hmm, so\n</think>\n\nYes.", think_open=True) == ("hmm, so", "Yes.")  # opened by the prompt
    assert split_reasoning("<think>\n\n</think>\n\nYes.") == (None, "Yes.")
    assert split_reasoning("<think>still going") == ("still going", "")
    assert split_reasoning("still going", think_open=True) == ("still going", "")
    assert split_reasoning("Plain answer.") == (None, "Plain answer.")


def test_normalize():
    assert normalize("The Man, ATE  soup!") == "themanatesoup"
    assert normalize("ウミガメの　スープ。") == normalize("ｳﾐｶﾞﾒのスープ") == "ウミガメのスープ"


SECRET_EN = "The man realised that the soup he ate on the island was made of his friend."
SECRET_JA = "男はかつて遭難し、仲間の肉をウミガメのスープだと言われて食べていた。"


def leak_check(model, secret: str, token_ids: list[int], min_span: int, **guard):
    ids = model.tokenizer.apply_chat_template(PROMPT, enable_thinking=False)
    leaked = model.generate(ids, max_tokens=len(token_ids), logits_processors=[teacher(token_ids)])
    assert normalize(secret) in normalize(leaked.text)  # without the guard: verbatim leak
    proc = secret_guard_processor(model.tokenizer, [secret], min_span=min_span, **guard)
    out = model.generate(ids, max_tokens=len(token_ids), logits_processors=[teacher(token_ids), proc])
    assert proc.blocked > 0
    return normalize(out.text)


def test_secret_guard_blocks_verbatim_leaks(qwen3_model):
    tok = qwen3_model.tokenizer
    out = leak_check(qwen3_model, SECRET_EN, tok.encode(" " + SECRET_EN.upper()), min_span=10)
    assert longest_common(out, normalize(SECRET_EN)) < 10, out
    out = leak_check(qwen3_model, SECRET_JA, tok.encode(SECRET_JA), min_span=6)
    assert longest_common(out, normalize(SECRET_JA)) < 6, out


def test_secret_guard_catches_other_tokenizations(qwen3_model):
    tok = qwen3_model.tokenizer
    spelled = [t for ch in SECRET_JA for t in tok.encode(ch)]  # one character at a time, not BPE merges
    assert spelled != tok.encode(SECRET_JA)
    out = leak_check(qwen3_model, SECRET_JA, spelled, min_span=6)
    assert longest_common(out, normalize(SECRET_JA)) < 6, out


def test_secret_guard_allows_public_spans_and_bans_short_secrets(qwen3_model):
    model, tok = qwen3_model, qwen3_model.tokenizer
    ids = tok.apply_chat_template(PROMPT, enable_thinking=False)
    public = "ウミガメのスープを注文した"
    says = tok.encode(public)
    proc = secret_guard_processor(tok, [SECRET_JA + public], min_span=6, public=[public])
    out = model.generate(ids, max_tokens=len(says), logits_processors=[teacher(says), proc])
    assert out.text == public  # every 6-character window of it is public, so nothing it says is masked
    word = tok.encode("人肉")
    proc = secret_guard_processor(tok, ["人肉"], min_span=8)  # shorter than min_span: banned whole
    out = model.generate(ids, max_tokens=len(word), logits_processors=[teacher(word), proc])
    assert "人肉" not in out.text and proc.blocked


def test_thinking_support_is_known_without_building_the_tables(qwen3_model, smollm2):
    """A vocabulary without `<think>` answers at once (the llguidance tables took 1.1 s of SmolLM2's first token); one
    with it answers as the tables do."""
    from mlxq.engine import constraints
    from mlxq.engine.controls import supports_thinking
    from mlxq.engine.guards import THINK_OPEN
    from mlxq.engine.tokenizer import Tokenizer

    smol = Tokenizer(smollm2.tokenizer.hf)  # a fresh key: no other test has built its tables
    assert supports_thinking(smol) is False
    assert smol not in constraints._tables
    tables = constraints.token_tables(smol)
    assert tables.id_of(THINK_OPEN) is None
    qwen = Tokenizer(qwen3_model.tokenizer.hf)
    assert supports_thinking(qwen) is True
    assert constraints.token_tables(qwen).id_of(THINK_OPEN) == THINK
