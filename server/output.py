"""Engine outputs -> OpenAI response pieces: reasoning split from content as the text streams, tool-call blocks
parsed out, logprobs and usage in OpenAI's shapes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlxq.engine.constraints import token_tables
from mlxq.engine.guards import THINK_CLOSE, THINK_OPEN
from mlxq.engine.scheduler import TokenLogprob, Usage
from mlxq.engine.tokenizer import Tokenizer
from server.prepare import Choice
from server.tools import OPEN as TOOL_OPEN
from server.tools import parse_tool_calls

Piece = tuple[str, str]  # (field, text): field is "content" or "reasoning_content"
_MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI writes this for impossible tokens


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag` (it may still become `tag`)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class TextSplitter:
    """Splits one choice's text, as it streams, into reasoning (a think block) and content, and holds back
    tool-call blocks to parse them whole at the end. Whitespace around the reasoning and the whitespace a
    template writes after `</think>` are dropped, as `split_reasoning` does for whole texts."""

    def __init__(self, choice: Choice):
        self.tools = choice.tools
        if choice.think_open:
            self.state = "reasoning"
        elif choice.reasoning:
            self.state = "start"  # not yet known whether the output opens a think block
        else:
            self.state = "content"
        self.pending = ""
        # At the start of the reasoning or of the content after it, leading whitespace is dropped.
        self.fresh = choice.reasoning or choice.think_open
        self.tool_text = ""
        self.reasoning_tokens = 0

    def feed(self, text: str, tokens: int = 0) -> list[Piece]:
        was = self.state
        self.pending += text
        pieces = self._advance(final=False)
        if "reasoning" in (was, self.state):  # the tags count as reasoning, as OpenAI counts them
            self.reasoning_tokens += tokens
        return pieces

    def finish(self) -> tuple[list[Piece], list[dict]]:
        """The rest of the text, and the tool calls found (OpenAI `tool_calls`)."""
        pieces = self._advance(final=True)
        calls: list[dict] = []
        if self.tool_text:
            rest, calls = parse_tool_calls(self.tool_text)
            if rest:
                pieces.append(("content", rest))
        return pieces, calls

    def _advance(self, final: bool) -> list[Piece]:
        out: list[Piece] = []
        while True:
            before = (self.state, len(self.pending))
            if self.state == "start":
                lead = self.pending.lstrip()
                if lead.startswith(THINK_OPEN):
                    self.pending, self.state, self.fresh = lead[len(THINK_OPEN) :], "reasoning", True
                elif THINK_OPEN.startswith(lead) and not final:
                    return out  # could still be `<think>`
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                end = self.pending.find(THINK_CLOSE)
                if end >= 0:
                    self._emit(out, "reasoning_content", self.pending[:end].rstrip())
                    self.pending, self.state, self.fresh = self.pending[end + len(THINK_CLOSE) :], "content", True
                elif final:  # cut off while thinking
                    self._emit(out, "reasoning_content", self.pending.rstrip())
                    self.pending = ""
                    return out
                else:
                    # Hold back what may be the start of `</think>`, and trailing whitespace (dropped if the block
                    # ends there).
                    keep = len(self.pending) - _partial_suffix(self.pending, THINK_CLOSE)
                    safe = self.pending[:keep].rstrip()
                    self._emit(out, "reasoning_content", safe)
                    self.pending = self.pending[len(safe) :]
                    return out
            elif self.state == "content":
                if self.tools and (at := self.pending.find(TOOL_OPEN)) >= 0:
                    self._emit(out, "content", self.pending[:at])
                    self.tool_text, self.pending, self.state = self.pending[at:], "", "tools"
                else:
                    keep = len(self.pending)
                    if self.tools and not final:
                        keep -= _partial_suffix(self.pending, TOOL_OPEN)
                    self._emit(out, "content", self.pending[:keep])
                    self.pending = self.pending[keep:]
                    return out
            else:  # tools: everything from the first block on is parsed at the end
                self.tool_text += self.pending
                self.pending = ""
                return out
            if (self.state, len(self.pending)) == before:
                return out

    def _emit(self, out: list[Piece], field_name: str, text: str) -> None:
        if self.fresh:
            text = text.lstrip()
        if text:
            self.fresh = False
            if out and out[-1][0] == field_name:
                out[-1] = (field_name, out[-1][1] + text)
            else:
                out.append((field_name, text))


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
def usage_json(
    usages: list[Usage | None], prompt_tokens: list[int], first_of_prompt: list[int], reasoning_tokens: int
) -> dict[str, Any]:
    """OpenAI usage: each prompt counted once (for n > 1 as well), completion tokens of every choice."""
    completion = sum(u.completion_tokens for u in usages if u is not None)
    cached = sum(usages[i].cached_tokens for i in first_of_prompt if usages[i] is not None)
    prompt = sum(prompt_tokens)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }
