"""Engine outputs -> OpenAI response pieces: logprobs and usage in OpenAI's shapes (the engine's output processor
has already split reasoning from content and parsed tool calls)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlxq.engine.constraints import token_tables
from mlxq.engine.output import TokenLogprob, Usage
from mlxq.engine.tokenizer import Tokenizer

_MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI writes this for impossible tokens


# ------------------------------------------------------------------------------------------------ logprobs
class TokenText:
    """A token's text and bytes as OpenAI reports them."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.raw = token_tables(tokenizer).token_bytes

    def bytes_of(self, token: int) -> bytes:
        raw = self.raw[token] if 0 <= token < len(self.raw) else b""
        if raw:
            return raw
        special = self.tokenizer.hf.convert_ids_to_tokens(token)  # special tokens write no bytes of their own
        return (special or "").encode()

    def text_of(self, token: int) -> str:
        return self.bytes_of(token).decode("utf-8", "replace")


def _lp(value: float) -> float:
    return value if value > _MIN_LOGPROB else _MIN_LOGPROB


def chat_logprobs(items: list[TokenLogprob], text: TokenText) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        return {"token": text.text_of(token), "logprob": _lp(logprob), "bytes": list(text.bytes_of(token))}

    content = [{**entry(i.token, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]} for i in items]
    return {"content": content, "refusal": None}


@dataclass
class CompletionLogprobs:
    """The legacy completions shape; `offset` carries text offsets across streamed chunks."""

    text: TokenText
    offset: int = 0

    def block(self, items: list[TokenLogprob]) -> dict[str, Any]:
        tokens, offsets = [], []
        for i in items:
            tokens.append(self.text.text_of(i.token))
            offsets.append(self.offset)
            self.offset += len(tokens[-1])
        return {
            "tokens": tokens,
            "token_logprobs": [_lp(i.logprob) for i in items],
            "top_logprobs": [{self.text.text_of(t): _lp(lp) for t, lp in i.top} for i in items],
            "text_offset": offsets,
        }


# ------------------------------------------------------------------------------------------------ usage
def usage_json(usages: list[Usage | None], prompt_tokens: list[int], first_of_prompt: list[int]) -> dict[str, Any]:
    """OpenAI usage: each prompt counted once (for n > 1 as well), completion tokens of every choice."""
    completion = sum(u.completion_tokens for u in usages if u is not None)
    reasoning_tokens = sum(u.reasoning_tokens for u in usages if u is not None)
    cached = sum(usages[i].cached_tokens for i in first_of_prompt if usages[i] is not None)
    prompt = sum(prompt_tokens)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }
