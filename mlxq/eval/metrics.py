"""Perplexity and KL divergence against a reference model, over fixed windows of a text.

The text is tokenized once and cut into non-overlapping windows of `ctx` tokens; in each window every
position but the last predicts the next token. Perplexity is exp(mean negative log-likelihood); KL is
KL(reference || model) per position, averaged; top-1 agreement is how often both models' argmax agree.

Models are evaluated in float32 with quantized weights dequantized (mlxq.quant.source): MLX's quantized
matmul is slow on the x86 CPU backend, and the logits are the quantized model's up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import mlx.core as mx

from mlxq.errors import InvalidRequest

CTX = 512
MAX_TOKENS = 8192


@dataclass
class Scores:
    tokens: int  # predictions scored
    ppl: float
    kl: float | None = None  # mean KL(reference || model), nats per token
    kl_p99: float | None = None
    top1: float | None = None  # fraction of positions where both argmaxes agree
    ref_ppl: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def load_for_eval(name: str):
    """A float32 `mlxq.api.Model` of any checkpoint, quantized ones dequantized."""
    from mlxq.api import Model
    from mlxq.engine.tokenizer import load_tokenizer
    from mlxq.formats import open_checkpoint
    from mlxq.loading import load_model
    from mlxq.quant.source import float_checkpoint

    ckpt = float_checkpoint(open_checkpoint(name))
    net = load_model(ckpt, dtype=mx.float32)
    tok = load_tokenizer(ckpt.tokenizer_dir, ckpt.gguf_file, ckpt.chat_template)
    return Model(net, tok, ckpt, name)


def windows(tokens: list[int], ctx: int = CTX, max_tokens: int | None = MAX_TOKENS) -> list[list[int]]:
    if max_tokens:
        tokens = tokens[:max_tokens]
    out = [tokens[i : i + ctx] for i in range(0, len(tokens), ctx)]
    out = [w for w in out if len(w) >= 2]
    if not out:
        raise InvalidRequest("the text gives fewer than 2 tokens: nothing to score")
    return out


def _logprobs(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


Logits = Callable[[list[int]], mx.array]


def reference(ref: Logits, wins: list[list[int]]) -> list[mx.array]:
    """The reference's log-probabilities per window (kept, so several models can be compared to it)."""
    out = []
    for w in wins:
        lp = _logprobs(ref(w)[:-1])
        mx.eval(lp)
        out.append(lp)
    return out


def score(
    model: Logits,
    wins: list[list[int]],
    ref: list[mx.array] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Scores:
    """Perplexity of `model` on the windows; with reference log-probabilities, also KL, its 99th
    percentile, top-1 agreement and the reference's own perplexity."""
    nll = ref_nll = kl_sum = agree = 0.0
    kls, n = [], 0
    for i, w in enumerate(wins):
        lp = _logprobs(model(w)[:-1])
        target = mx.array(w[1:])[:, None]
        nll += -mx.take_along_axis(lp, target, axis=-1).sum().item()
        if ref is not None:
            rlp = ref[i]
            if rlp.shape != lp.shape:
                raise InvalidRequest(
                    f"reference and model disagree on vocabulary size ({rlp.shape[-1]} vs {lp.shape[-1]})"
                )
            kl = (mx.exp(rlp) * (rlp - lp)).sum(axis=-1)
            kls.append(kl)
            kl_sum += kl.sum().item()
            agree += (rlp.argmax(-1) == lp.argmax(-1)).sum().item()
            ref_nll += -mx.take_along_axis(rlp, target, axis=-1).sum().item()
        n += len(w) - 1
        if progress is not None:
            progress(len(w))
    scores = Scores(n, math.exp(nll / n))
    if ref is not None:
        all_kl = mx.sort(mx.concatenate(kls))
        scores.kl, scores.top1, scores.ref_ppl = kl_sum / n, agree / n, math.exp(ref_nll / n)
        scores.kl_p99 = all_kl[min(int(0.99 * n), n - 1)].item()
    return scores
