"""Prompt lookup: speculative drafts read from the text itself.

An answer often repeats what it has read (a JSON answer's keys and quoted values, a summary quoting its source):
when the last few tokens occurred before, in the prompt or in the answer so far, the tokens that followed them
then are a good guess for what follows now. The engine feeds such a draft after the next token and checks it in
the same forward pass (`Engine._decode_step`): every draft token the model would have picked anyway comes for
free, and the first it would not have picked is replaced by the model's own choice, so the output is exactly
what plain decoding gives (greedy) or distributed as it (sampling: `Sampler.verify`).
"""

from __future__ import annotations

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
