"""Guards applied while decoding: thinking control and the secret guard.

Both are logits processors (see `mlxq.engine.sampling.LogitsProcessor`), created fresh per request.
"""

from __future__ import annotations

import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import mlx.core as mx

from mlxq.engine.constraints import TokenTables, token_tables
from mlxq.engine.tokenizer import Tokenizer

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_SECRETS_KEPT = 64  # secrets whose tables stay cached per tokenizer (one game has a few)
_lock = threading.Lock()


# ------------------------------------------------------------------------------------------------ thinking
@dataclass(frozen=True)
class ThinkTags:
    """Token sequences of `<think>`, `</think>` (one special token each in Qwen3 / Qwen3.5 vocabularies)
    and of the blank line a template writes after `</think>`."""

    open: tuple[int, ...]
    close: tuple[int, ...]
    newline: tuple[int, ...]


def think_tags(tokenizer: Tokenizer) -> ThinkTags:
    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(text, add_special_tokens=False))

    return ThinkTags(ids(THINK_OPEN), ids(THINK_CLOSE), ids("\n\n"))


def _ends_with(tokens: list[int], seq: tuple[int, ...]) -> bool:
    return not seq or (len(tokens) >= len(seq) and tuple(tokens[-len(seq) :]) == seq)


def prompt_opens_think(tokenizer: Tokenizer, prompt: list[int]) -> bool:
    """True when the prompt ends inside an open think block (Qwen3.5 and Qwen3-thinking templates write
    `<think>\\n` after the assistant header), so the model's output starts with reasoning."""
    tags = think_tags(tokenizer)

    def last(seq: tuple[int, ...]) -> int:
        n = len(seq)
        return max((i for i in range(len(prompt) - n, -1, -1) if tuple(prompt[i : i + n]) == seq), default=-1)

    return last(tags.open) > last(tags.close)


class ThinkingProcessor:
    """Thinking control for one request.

    - `enable_thinking=False`: `<think>` and `</think>` can never be sampled, so no think block can open and
      eat the answer (a model may ignore the template's "no thinking" hint; it cannot get past a -inf logit).
    - `enable_thinking=True`: the output starts with `<think>` (forced unless the prompt opened it already).
    - `budget`: after that many tokens inside a think block, `</think>` and a blank line are forced.
    - Inside a think block, end-of-sequence and a nested `<think>` are masked: a turn cannot end with reasoning
      only. One think block per turn: once it closes, both tags are masked.
    - `require_content`: until the first visible (non-blank) content token, end-of-sequence and blank tokens
      are masked, so the visible answer is never empty (when `max_tokens` leaves room for one token).
    - `think_open`: the prompt already opened the think block (see `prompt_opens_think`).
    """

    def __init__(self, tokenizer: Tokenizer, enable_thinking: bool, budget: int | None = None, *,
                 think_open: bool = False, require_content: bool = True):
        tables = token_tables(tokenizer)
        self.tags = think_tags(tokenizer)
        self.enable_thinking = enable_thinking
        self.budget = budget
        self.require_content = require_content
        self.inside = think_open and enable_thinking
        self.thought = 0  # tokens inside the think block
        self.thought_done = False  # after a think block closes, no second one may open
        self.content_started = False
        # Thinking on: the turn starts with the think block (as Qwen3 does), so nothing precedes the reasoning.
        self._forcing: list[int] = list(self.tags.open) if enable_thinking and not think_open else []
        self._seen = 0
        self._eos = mx.array(sorted(tokenizer.eos_token_ids))
        self._blank, self._blank_set = tables.derived("blank", _blank_tokens)

    def __call__(self, generated: list[int], logits: mx.array) -> mx.array:
        for i in range(self._seen, len(generated)):
            self._track(generated[: i + 1])
        self._seen = len(generated)
        if self._forcing:
            return _only(logits, self._forcing[0])
        if self.inside:
            if self.budget is not None and self.thought >= self.budget:
                self._forcing = list(self.tags.close + self.tags.newline)
                return _only(logits, self._forcing[0])
            logits[:, self._eos] = -mx.inf
            return self._ban(generated, logits, (self.tags.open,))  # no nested block
        if not self.enable_thinking or self.thought_done:
            logits = self._ban(generated, logits, (self.tags.open, self.tags.close))  # one think block at most
        if self.require_content and not self.content_started:
            logits[:, self._eos] = -mx.inf
            logits[:, self._blank] = -mx.inf
        return logits

    def _track(self, tokens: list[int]) -> None:
        token = tokens[-1]
        if self._forcing and token == self._forcing[0]:
            self._forcing.pop(0)
        if self.inside and _ends_with(tokens, self.tags.close):
            self.inside, self.thought_done = False, True
        elif self.inside:
            self.thought += 1
        elif _ends_with(tokens, self.tags.open):
            self.inside, self.thought = True, 0
        elif token not in self._blank_set:
            self.content_started = True

    @staticmethod
    def _ban(generated: list[int], logits: mx.array, tags: tuple[tuple[int, ...], ...]) -> mx.array:
        """Masks each tag's last token once the rest of the tag is out (always, for a one-token tag)."""
        for tag in tags:
            if tag and _ends_with(generated, tag[:-1]):
                logits[:, tag[-1]] = -mx.inf
        return logits


def _blank_tokens(tables: TokenTables) -> tuple[mx.array, frozenset[int]]:
    """Tokens that write nothing visible (whitespace, special tokens), as an id array and a set."""
    ids = [t for t, b in enumerate(tables.token_bytes) if not b.strip()]
    return mx.array(ids), frozenset(ids)


def _only(logits: mx.array, token: int) -> mx.array:
    """Logits that allow only `token`."""
    keep = mx.arange(logits.shape[-1]) == token
    return mx.where(keep, logits, -mx.inf)


def thinking_processor(tokenizer: Tokenizer, enable_thinking: bool, budget: int | None = None, *,
                       prompt: list[int] | None = None, require_content: bool = True) -> ThinkingProcessor:
    """Thinking control (see `ThinkingProcessor`). Pass the prompt ids so a template that pre-opens `<think>`
    is noticed."""
    think_open = prompt is not None and prompt_opens_think(tokenizer, prompt)
    return ThinkingProcessor(tokenizer, enable_thinking, budget, think_open=think_open,
                             require_content=require_content)


# ------------------------------------------------------------------------------------------------ secrets
def normalize(text: str) -> str:
    """NFKC, case-folded, letters/numbers/marks only: the form in which secrets are compared."""
    return "".join(c for c in unicodedata.normalize("NFKC", text).casefold() if unicodedata.category(c)[0] in "LNM")


def _normalize_token(raw: bytes) -> bytes:
    """A token's bytes in normalised form. Byte-level vocabularies split many CJK characters over two or three
    tokens; bytes that are not a whole character are kept as they are, so the pieces still join up."""
    text = raw.decode("utf-8", "surrogateescape")
    keep = []
    for c in unicodedata.normalize("NFKC", text).casefold():
        if "\udc80" <= c <= "\udcff" or unicodedata.category(c)[0] in "LNM":
            keep.append(c)
    return "".join(keep).encode("utf-8", "surrogateescape")


def _normalized_tokens(tables: TokenTables) -> list[bytes]:
    return [_normalize_token(b) if b else b"" for b in tables.token_bytes]


class _Secret:
    """One secret, precomputed once: its normalised bytes, where its characters start, and for each substring
    of it the tokens whose normalised text starts with that substring."""

    def __init__(self, text: str, min_span: int, public: bytes, norm_tokens: list[bytes]):
        data = self.data = normalize(text).encode()
        # chars[i]: characters starting before byte i, so bytes [a, b) hold chars[b] - chars[a] characters
        self.chars = [0]
        for byte in data:
            self.chars.append(self.chars[-1] + _starts_char(byte))
        self.span = min(min_span, self.chars[-1])  # a secret shorter than min_span is banned whole
        self.public = public
        self.ends_with: dict[int, list[int]] = {}  # byte -> positions p with data[p - 1] == byte
        for p in range(1, len(data) + 1):
            self.ends_with.setdefault(data[p - 1], []).append(p)
        longest = max(64, 4 * self.span)
        self.subs = {data[a:b] for a in range(len(data)) for b in range(a + 1, min(a + longest, len(data)) + 1)}
        table: dict[bytes, list[int]] = {}
        always = []  # tokens that hold a whole non-public span by themselves
        for t, s in enumerate(norm_tokens):
            for k in range(1, len(s) + 1):
                if s[:k] not in self.subs:
                    break
                table.setdefault(s[:k], []).append(t)
            if len(s) >= self.span and self._holds_span(s):
                always.append(t)
        self.starting = {key: mx.array(ids) for key, ids in table.items()}
        self.always = always

    def _holds_span(self, s: bytes) -> bool:
        starts = [i for i in range(len(s)) if _starts_char(s[i])] + [len(s)]
        for i in range(len(starts) - self.span):
            window = s[starts[i] : starts[i + self.span]]
            if window in self.subs and window not in self.public:
                return True
        return False

    def banned(self, tail: bytes) -> list[mx.array]:
        """Token-id arrays that, after normalised output ending in `tail`, would complete a secret span."""
        out = []
        for p in self.ends_with.get(tail[-1], ()) if tail else ():
            matched = 1  # the output's tail equals data[p - matched : p]
            while matched < min(p, len(tail)) and self.data[p - matched - 1] == tail[-matched - 1]:
                matched += 1
            start = p - matched
            # Walk the continuations of the secret from p, shortest first; ban the tokens that begin with the
            # first one completing a span the player has not seen. Longer tokens begin with it too.
            for end in range(p + 1, len(self.data) + 1):
                key = self.data[p:end]
                if key not in self.starting:
                    break  # no token begins with this continuation
                if self.chars[end] - self.chars[start] >= self.span and self._window(end) not in self.public:
                    out.append(self.starting[key])
                    break
        return out

    def _window(self, end: int) -> bytes:
        """The `span`-character stretch of the secret that ends at byte `end`."""
        first = end - 1
        while first > 0 and self.chars[end] - self.chars[first] < self.span:
            first -= 1
        return self.data[first:end]


def _starts_char(byte: int) -> bool:
    return byte & 0xC0 != 0x80  # not a UTF-8 continuation byte


class SecretGuard:
    """Masks, while decoding, every token that would make the output reproduce `min_span` or more consecutive
    characters of a secret, compared in normalised form (NFKC, case-folded, whitespace and punctuation
    dropped), so "The Man ATE..." and "the man, ate" count alike, and Japanese is compared character by
    character. The check is on text, not on token ids, so every tokenization of the secret is caught (the
    byte-level pieces of a CJK character included), not only the few a token n-gram list would hold.
    Spans that also occur in `public` text (what the player already knows, such as the puzzle) are allowed.
    A secret shorter than `min_span` characters is banned whole.

    Limits, honestly:
    - Paraphrase, translation, summary, spelling out with separators the normaliser keeps (digits for
      letters, romaji for kana) and yes/no answers that confirm the secret are not caught: this stops verbatim
      leaks, not meaning. Pair it with a prompt that tells the model not to reveal the story.
    - It works within one output; a span leaked half in one turn and half in the next is not caught.
    - Per-token normalisation misses compositions across a token boundary (a combining mark in its own token).
    - Span length counts characters that start inside the span, so a span may be cut one partial character
      early; a short `min_span` also bans common phrases the secret happens to contain.
    - If another processor (a grammar) allows only tokens the guard would ban, the guard yields, so the
      grammar's output stays valid.
    """

    def __init__(self, tokenizer: Tokenizer, secrets: Iterable[str], min_span: int = 8,
                 public: Iterable[str] = ()):
        tables = token_tables(tokenizer)
        self.norm_tokens = tables.derived("normalized", _normalized_tokens)
        seen = b"\x00".join(normalize(p).encode() for p in public)
        cache = tables.derived("secrets", lambda _: OrderedDict())
        self.secrets = []
        for text in secrets:
            if not normalize(text):
                continue
            key = (text, min_span, seen)
            with _lock:  # per-secret tables are built once per tokenizer, kept for the last _SECRETS_KEPT
                if key not in cache:
                    cache[key] = _Secret(text, min_span, seen, self.norm_tokens)
                cache.move_to_end(key)
                while len(cache) > _SECRETS_KEPT:
                    cache.popitem(last=False)
                self.secrets.append(cache[key])
        always = sorted({t for s in self.secrets for t in s.always})
        self.always = mx.array(always) if always else None
        self.tail = b""
        self._seen = 0
        self._keep = 4 * max([min_span, *(len(s.data) for s in self.secrets)], default=0)
        self.blocked = 0  # steps at which the guard masked a token the other processors allowed

    def __call__(self, generated: list[int], logits: mx.array) -> mx.array:
        for t in generated[self._seen :]:
            self.tail = (self.tail + self.norm_tokens[t])[-self._keep :]
        self._seen = len(generated)
        bans = [a for s in self.secrets for a in s.banned(self.tail)]
        if self.always is not None:
            bans.append(self.always)
        if not bans:
            return logits
        ids = mx.concatenate(bans)
        masked = mx.array(logits)
        masked[:, ids] = -mx.inf
        if not mx.any(masked > -mx.inf).item():
            return logits  # another processor allows only banned tokens: it wins (see Limits)
        if mx.any(logits[:, ids] > -mx.inf).item():
            self.blocked += 1
        return masked


def secret_guard_processor(tokenizer: Tokenizer, secrets: list[str], min_span: int = 8,
                           public: Iterable[str] = ()) -> SecretGuard:
    """A `SecretGuard` for one request (the per-secret tables are built here; the per-tokenizer ones are
    cached)."""
    return SecretGuard(tokenizer, secrets, min_span, public)
