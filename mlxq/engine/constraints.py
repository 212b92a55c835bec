"""Constrained decoding through llguidance: JSON schema, any JSON object, regex, Lark grammar.

A grammar becomes a logits processor. Each step it feeds llguidance the tokens sampled since the last step,
asks for the bitmask of tokens that keep the output inside the grammar, and sets every other logit to -inf.
Once the grammar can take nothing more, llguidance allows only end-of-sequence, so the output stops exactly
where the grammar ends. The llguidance tokenizer (about a second to build for a 150k vocabulary) and the
per-token byte table are built once per tokenizer and shared by every request.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

import llguidance
import llguidance.hf
import mlx.core as mx

from mlxq.engine.tokenizer import Tokenizer
from mlxq.errors import GenerationError, InvalidRequest, TokenizerError

# Compact JSON with the usual separators: a free whitespace lexeme would let a weak model loop on spaces
# forever, and this is the layout models see most in training data.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass
class TokenTables:
    """What constrained decoding and the guards need to know about a tokenizer, built once."""

    ll: llguidance.LLTokenizer
    token_bytes: list[bytes]  # the bytes each token writes; b"" for special tokens
    vocab_size: int
    _bit_index: dict[int, tuple[mx.array, mx.array, mx.array]] = field(default_factory=dict)
    _derived: dict[str, Any] = field(default_factory=dict)

    def derived(self, name: str, build: Callable[[TokenTables], Any]) -> Any:
        """A further per-tokenizer table (the guards' blank and normalised-text tables), built once."""
        with _lock:
            if name not in self._derived:
                self._derived[name] = build(self)
            return self._derived[name]

    def bit_index(self, width: int) -> tuple[mx.array, mx.array, mx.array]:
        """(word, shift, in_vocab) arrays that expand a bitmask over `vocab_size` tokens to `width` logits."""
        if width not in self._bit_index:
            ids = mx.arange(width, dtype=mx.uint32)
            last_word = (self.vocab_size + 31) // 32 - 1
            index = (mx.minimum(ids // 32, last_word), ids % 32, ids < self.vocab_size)
            mx.eval(index)  # a lazy array can only be evaluated on the thread that made it, and this is shared
            self._bit_index[width] = index
        return self._bit_index[width]

    def id_of(self, text: str) -> int | None:
        """The id of a token that is exactly `text` (a special token such as `<think>`), if there is one."""
        ids = self.ll.tokenize_str(text, parse_special=True)
        return ids[0] if len(ids) == 1 and self.token_bytes[ids[0]] == b"" else None


_tables: WeakKeyDictionary[Tokenizer, TokenTables] = WeakKeyDictionary()
_lock = threading.RLock()


def token_tables(tokenizer: Tokenizer) -> TokenTables:
    """The cached tables for `tokenizer` (built on first use, thread-safe)."""
    with _lock:
        if tokenizer not in _tables:
            try:
                ll = llguidance.hf.from_tokenizer(tokenizer.hf, n_vocab=tokenizer.vocab_size,
                                                  eos_token=sorted(tokenizer.eos_token_ids))
            except ValueError as e:
                raise TokenizerError(f"constrained decoding needs a fast tokenizer ({e})") from None
            raw = [b"" if ll.is_special_token(t) else ll.decode_bytes([t]) for t in range(ll.vocab_size)]
            _tables[tokenizer] = TokenTables(ll, raw, ll.vocab_size)
        return _tables[tokenizer]


def apply_bitmask(tables: TokenTables, logits: mx.array, bitmask: bytes) -> mx.array:
    """Logits [1, V] with every token whose bit is clear (and every id past the vocabulary) set to -inf."""
    words = mx.array(memoryview(bitmask).cast("I"))
    word, shift, in_vocab = tables.bit_index(logits.shape[-1])
    allowed = (((words[word] >> shift) & 1) == 1) & in_vocab
    return mx.where(allowed, logits, -mx.inf)


class GrammarProcessor:
    """A logits processor that keeps the output inside an llguidance grammar. Create one per request.

    `start_after`: a token id (e.g. `</think>`) before which the processor lets everything through; the grammar
    applies to the tokens after it. `finished` tells whether the output so far is a complete match."""

    def __init__(self, tokenizer: Tokenizer, grammar: str, *, start_after: int | None = None):
        self.tables = token_tables(tokenizer)
        self.matcher = llguidance.LLMatcher(self.tables.ll, grammar, log_level=0)
        if self.matcher.is_error():
            raise InvalidRequest(f"invalid grammar: {self.matcher.get_error()}")
        self.start_after = start_after
        self._start: int | None = 0 if start_after is None else None  # index of the first constrained token
        self._consumed = 0
        self._generated: list[int] = []

    def __call__(self, generated: list[int], logits: mx.array) -> mx.array:
        self._generated = generated  # the loop's own list, so `finished` can catch up after the last step
        if not self._sync():
            return logits
        return apply_bitmask(self.tables, logits, self.matcher.compute_bitmask())

    def _sync(self) -> bool:
        """Feeds the matcher the tokens it has not seen; False while the grammar has not started yet."""
        generated = self._generated
        if self._start is None:
            if self.start_after not in generated:
                return False
            self._start = self._consumed = generated.index(self.start_after) + 1
        new = generated[self._consumed :]
        self._consumed = len(generated)
        if (new and not self.matcher.consume_tokens(new)) or self.matcher.is_error():  # lost, and stays lost
            raise GenerationError(f"constrained decoding lost track of the grammar: {self.matcher.get_error()}")
        return True

    def draft(self, generated: list[int], guess: Callable[[list[int]], list[int]], k: int) -> list[int]:
        """Up to `k` speculative draft tokens after `generated`, as the grammar shapes them: the tokens it forces come
        first (JSON keys and punctuation: certain, up to the model's own tokenization), then what `guess(draft so
        far)` proposes, cut before the first token the grammar forbids (the model could never pick it), and so on in
        turn. An end of sequence is never drafted: nothing is read after it. The matcher is left as it was."""
        self._generated = generated
        if not self._sync():
            return guess([])[:k]
        ends, draft = self.tables.ll.eos_tokens, []
        while len(draft) < k and not self.matcher.is_stopped():
            more = self.matcher.compute_ff_tokens()
            if not more:
                proposed = guess(draft)
                proposed = proposed[: next((i for i, t in enumerate(proposed) if t in ends), len(proposed))]
                more = proposed[: self.matcher.validate_tokens(proposed)]
            more = more[: k - len(draft)]
            if not more or not self.matcher.consume_tokens(more):
                break
            draft += more
        if draft:
            self.matcher.rollback(len(draft))
        return draft

    @property
    def finished(self) -> bool:
        """True when the output so far is a complete match of the grammar (it may have stopped there)."""
        return self._sync() and self.matcher.is_accepting()

    @property
    def stopped(self) -> bool:
        """True when the grammar admits nothing more than end-of-sequence."""
        return self._sync() and self.matcher.is_stopped()


def json_grammar(schema: dict | None, *, leading_newlines: bool = False, field: str = "schema") -> str:
    """llguidance grammar for a JSON value matching `schema`; None means any JSON object. Errors name `field`."""
    schema = {"type": "object"} if schema is None else schema
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{field}: a JSON schema must be a JSON object")
    options = schema.get("x-guidance", {})
    if not isinstance(options, dict):
        raise InvalidRequest(f"{field}: 'x-guidance' must be an object of llguidance options")
    body = {**schema, "x-guidance": {**JSON_OPTIONS, **options}}
    try:
        text = json.dumps(body)
    except (TypeError, ValueError, RecursionError) as e:
        raise InvalidRequest(f"{field}: the JSON schema is not serialisable: {e}") from None
    # After a think block, models write a newline or two before the answer; allow those, nothing more.
    prefix = '/\\n{0,2}/ ' if leading_newlines else ""
    return llguidance.LLMatcher.grammar_from_lark(f"start: {prefix}json\njson: %json {text}")


def json_schema_processor(tokenizer: Tokenizer, schema: dict | None = None, *,
                          start_after: int | None = None) -> GrammarProcessor:
    """Output is JSON that validates against `schema` (None: any JSON object), then end-of-sequence.
    With `start_after` (the `</think>` id), the JSON follows the think block and up to two newlines."""
    return GrammarProcessor(tokenizer, json_grammar(schema, leading_newlines=start_after is not None),
                            start_after=start_after)


def regex_processor(tokenizer: Tokenizer, pattern: str, *, start_after: int | None = None) -> GrammarProcessor:
    """Output matches the regular expression `pattern` (Rust regex syntax) in full."""
    return GrammarProcessor(tokenizer, llguidance.LLMatcher.grammar_from_regex(pattern), start_after=start_after)


def lark_processor(tokenizer: Tokenizer, grammar: str, *, start_after: int | None = None) -> GrammarProcessor:
    """Output is a sentence of the Lark grammar `grammar` (llguidance's Lark dialect, `start` rule)."""
    return GrammarProcessor(tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), start_after=start_after)


def response_format_grammar(response_format: dict[str, Any] | None, *, leading_newlines: bool = False) -> str | None:
    """The grammar for an OpenAI `response_format` ({"type": "text" | "json_object" | "json_schema"}), or None
    for text."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_grammar(None, leading_newlines=leading_newlines)
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:
            raise InvalidRequest("response_format: json_schema.schema is required")
        return json_grammar(schema, leading_newlines=leading_newlines, field="response_format")
    raise InvalidRequest(f"response_format: type must be text, json_object or json_schema, not {str(kind)[:40]!r}")


def response_format_processor(tokenizer: Tokenizer, response_format: dict[str, Any] | None,
                              *, start_after: int | None = None) -> GrammarProcessor | None:
    """The processor for an OpenAI `response_format`, or None for text."""
    grammar = response_format_grammar(response_format, leading_newlines=start_after is not None)
    return None if grammar is None else GrammarProcessor(tokenizer, grammar, start_after=start_after)
