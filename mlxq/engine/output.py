"""The output processor: one request's sampled tokens -> the text its caller gets, the same for every caller
(API, Session, server).

It detokenizes, ends the request at end-of-sequence, a stop string or `max_tokens`, holds back text that may
still become a stop string, records logprobs, and reads the text back as the request asked: a think block split
off as reasoning, tool-call blocks parsed out of the content. It runs on the engine thread, so callers receive
finished pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlxq.engine.guards import THINK_CLOSE, THINK_OPEN
from mlxq.engine.stops import StopMatcher
from mlxq.engine.tokenizer import Tokenizer
from mlxq.engine.tools import OPEN as TOOL_OPEN
from mlxq.engine.tools import ToolPlan, parse_tool_calls
from mlxq.errors import MlxqError


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the most likely tokens, best first


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens resumed from a cache
    reasoning_tokens: int = 0  # completion tokens inside the think block (its tags included)


@dataclass
class Output:
    """What a request produced since its last output. The last one has `finish_reason` and `usage`, or
    `error` when the request failed."""

    text: str = ""  # content (the whole text when the request does not split reasoning off)
    reasoning: str = ""  # think-block text, for requests that split it off
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[dict] = field(default_factory=list)  # on the last output: the calls parsed from the content
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls" | "cancelled" | "error"
    usage: Usage | None = None
    error: MlxqError | None = None


@dataclass(frozen=True)
class Reading:
    """How a request's text is read back."""

    reasoning: bool = False  # split a think block off as reasoning
    think_open: bool = False  # the prompt itself opened the think block
    tools: ToolPlan | None = None  # parse tool-call blocks out of the content


# What may still become `</think>` or `<tool_call>` is held back as a stop string would be.
_THINK_CLOSE, _TOOL_OPEN = StopMatcher([THINK_CLOSE]), StopMatcher([TOOL_OPEN])

Piece = tuple[str, str]  # (field, text): field is "content" or "reasoning"


class TextSplitter:
    """Splits one output's text, as it streams, into reasoning (a think block) and content, and holds back
    tool-call blocks to parse them whole at the end. Whitespace around the reasoning, and the blank line a
    template writes after `</think>`, are dropped."""

    def __init__(self, reading: Reading):
        self.tools = reading.tools if reading.tools and reading.tools.functions else None
        if reading.think_open:
            self.state = "reasoning"
        elif reading.reasoning:
            self.state = "start"  # not yet known whether the output opens a think block
        else:
            self.state = "content"
        self.pending = ""
        # At the start of the reasoning or of the content after it, leading whitespace is dropped.
        self.fresh = reading.reasoning or reading.think_open
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
            rest, calls = parse_tool_calls(self.tool_text, self.tools)
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
                    self._emit(out, "reasoning", self.pending[:end].rstrip())
                    self.pending, self.state, self.fresh = self.pending[end + len(THINK_CLOSE) :], "content", True
                elif final:  # cut off while thinking
                    self._emit(out, "reasoning", self.pending.rstrip())
                    self.pending = ""
                    return out
                else:
                    # Hold back what may be the start of `</think>`, and trailing whitespace (dropped if the block
                    # ends there).
                    keep = len(self.pending) - _THINK_CLOSE.held_back(self.pending)
                    safe = self.pending[:keep].rstrip()
                    self._emit(out, "reasoning", safe)
                    self.pending = self.pending[len(safe) :]
                    return out
            elif self.state == "content":
                if self.tools and (at := self.pending.find(TOOL_OPEN)) >= 0:
                    self._emit(out, "content", self.pending[:at])
                    self.tool_text, self.pending, self.state = self.pending[at:], "", "tools"
                else:
                    keep = len(self.pending)
                    if self.tools and not final:
                        keep -= _TOOL_OPEN.held_back(self.pending)
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


def split_reasoning(text: str, think_open: bool = False) -> tuple[str | None, str]:
    """(reasoning, content) of a finished text, as `TextSplitter` reads it while streaming; reasoning is None
    when there is none. `think_open`: the prompt opened the think block (Qwen3.5 templates do)."""
    splitter = TextSplitter(Reading(reasoning=True, think_open=think_open))
    pieces = splitter.feed(text)
    pieces += splitter.finish()[0]
    reasoning = "".join(t for f, t in pieces if f == "reasoning").strip()
    return reasoning or None, "".join(t for f, t in pieces if f == "content").strip()


# ------------------------------------------------------------------------------------------------ the processor
class OutputProcessor:
    """One request's tokens -> `Output`s: detokenized, cut at end-of-sequence / a stop string / `max_tokens`, read
    back as `reading` says."""

    def __init__(self, tokenizer: Tokenizer, *, max_tokens: int, stop: list[str], ignore_eos: bool = False,
                 reading: Reading = Reading()):
        self.detok = tokenizer.detokenizer()
        self.eos = tokenizer.eos_token_ids
        self.max_tokens, self.stops, self.ignore_eos = max_tokens, StopMatcher(stop), ignore_eos
        self.splitter = TextSplitter(reading)
        self.generated: list[int] = []
        self.text, self.emitted = "", 0

    def add(self, token: int, logprob: TokenLogprob | None = None) -> Output:
        """Takes one sampled token; returns the output it makes final, with `finish_reason` once done.
        End-of-sequence ends the output without being part of it (not in `generated`, `tokens` or `logprobs`)."""
        finish, cut = None, False
        if token in self.eos and not self.ignore_eos:
            finish, token, logprob = "stop", None, None
        else:
            self.generated.append(token)
            before = len(self.text)
            self.text += self.detok.add(token)
            at = self.stops.find(self.text, before)
            if at >= 0:
                self.text, finish, cut = self.text[:at], "stop", True
            elif len(self.generated) >= self.max_tokens:
                finish = "length"
        if finish is None:
            safe = max(self.emitted, len(self.text) - self.stops.held_back(self.text))
        else:
            if not cut:
                self.text += self.detok.flush()
            safe = len(self.text)
        out = self._read(self.text[self.emitted : safe], [] if token is None else [token], finish)
        self.emitted = safe
        if logprob is not None:
            out.logprobs.append(logprob)
        return out

    def finish(self, reason: str) -> Output:
        """Ends the request early ("cancelled"): the text held back so far, read back as a whole."""
        out = self._read(self.text[self.emitted :], [], reason)
        self.emitted = len(self.text)
        return out

    def _read(self, text: str, tokens: list[int], finish: str | None) -> Output:
        pieces = self.splitter.feed(text, len(tokens))
        calls: list[dict] = []
        if finish is not None:
            more, calls = self.splitter.finish()
            pieces += more
            if calls and finish in ("stop", "length"):
                finish = "tool_calls"
        return Output(
            text="".join(t for f, t in pieces if f == "content"),
            reasoning="".join(t for f, t in pieces if f == "reasoning"),
            tokens=tokens,
            tool_calls=calls,
            finish_reason=finish,
        )

    @property
    def reasoning_tokens(self) -> int:
        return self.splitter.reasoning_tokens
