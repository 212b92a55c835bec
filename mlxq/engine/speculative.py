"""Prompt lookup: speculative drafts read from the text itself.

An answer often repeats what it has read (a JSON answer's keys and quoted values, a summary quoting its source):
when the last few tokens occurred before, in the prompt or in the answer so far, the tokens that followed them
then are a good guess for what follows now. The engine feeds such a draft after the next token and checks it in
the same forward pass (`Engine._decode_step`): every draft token the model would have picked anyway comes for
free, and the first it would not have picked is replaced by the model's own choice, so the output is exactly
what plain decoding gives (greedy) or distributed as it (sampling: `sampling.draw`).

The other drafter is the model's own multi-token-prediction head (`speculative="mtp"`, `mtp_drafts` below): its
drafts carry the distribution they were drawn from, which the verification takes into account.
"""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx

from mlxq.engine.sampling import Sampler, propose
from mlxq.errors import InvalidRequest

MAX_NGRAM = 3  # the longest tail looked up first
MIN_NGRAM = 2  # shorter tails match too often by chance: a draft that fails costs its verification


class PromptLookup:
    """Where each n-gram (MIN_NGRAM..MAX_NGRAM tokens) of a growing token list last occurred with a token after it,
    kept up to date as tokens arrive, so a draft costs a few dictionary lookups however long the text is."""

    def __init__(self, tokens: list[int]):
        self.tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> the position right after its latest occurrence
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            end = len(self.tokens)  # the n-grams ending here get `t` as their continuation
            for n in range(MIN_NGRAM, min(MAX_NGRAM, end) + 1):
                self._after[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(t)

    def draft(self, k: int, after: list[int] | tuple[int, ...] = ()) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest tail found; with `after`, the
        tail is that of the text continued by those tokens (a draft already under way)."""
        if k < 1:
            return []
        text = self.tokens[-MAX_NGRAM:] + list(after[-MAX_NGRAM:])
        for n in range(min(MAX_NGRAM, len(text)), MIN_NGRAM - 1, -1):
            at = self._after.get(tuple(text[-n:]))
            if at is not None:
                return self.tokens[at : at + k]
        return []


# ------------------------------------------------------------------------------------------ the MTP head
MTP = "mtp"  # `speculative=MTP`: drafts from the model's own multi-token-prediction head (`mlxq.models.mtp`)
MTP_DRAFT = 3  # its longest draft: each further token of a draft is right less often


def draft_plan(speculative: int | str) -> tuple[str | None, int]:
    """A request's `speculative` option as (drafter, longest draft): k > 0 -> prompt lookup of up to k tokens,
    'mtp' -> the MTP head, 0 -> none."""
    if speculative == MTP:
        return MTP, MTP_DRAFT
    if isinstance(speculative, bool) or not isinstance(speculative, int) or speculative < 0:
        raise InvalidRequest(f"speculative: must be a number of draft tokens >= 0 or '{MTP}', got {speculative!r}")
    return ("lookup" if speculative else None), speculative


class Drafting(Protocol):
    """What the MTP drafter needs of a running request."""

    next_input: int  # its next token, sampled and not yet fed

    sampler: Sampler  # draws its draft tokens as it draws its own

    def room(self) -> int:
        """Draft tokens it may take now."""


class MTPSteps(Protocol):
    """The runner's side (`Runner.mtp_draft`, `Runner.mtp_end`)."""

    def mtp_draft(self, tokens: list[int], first: bool) -> mx.array: ...

    def mtp_end(self) -> None: ...


def mtp_drafts(runner: MTPSteps, seqs: list[Drafting]) -> list[list[tuple]]:
    """Drafts of every request drafting with the MTP head, in one pass of the head per draft token for all of them
    (the first reads what the model computed since the last round): per request, up to its `room()` pairs
    (token, q). Each token is drawn from the head's output after the previous one and fed back; q is what
    `sampling.draw` needs to keep the model's distribution under sampling."""
    rooms = [seq.room() for seq in seqs]
    drafts: list[list[tuple]] = [[] for _ in seqs]
    tokens = [seq.next_input for seq in seqs]
    if max(rooms, default=0) < 1:
        return drafts
    for j in range(max(rooms)):
        drawn, qs = propose([seq.sampler for seq in seqs], runner.mtp_draft(tokens, j == 0).astype(mx.float32))
        mx.eval(drawn, [q for q in qs if q is not None])
        tokens = drawn.tolist()
        for r, (token, q) in enumerate(zip(tokens, qs, strict=True)):
            if j < rooms[r]:
                drafts[r].append((token, q))
    runner.mtp_end()
    return drafts
