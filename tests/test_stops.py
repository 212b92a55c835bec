"""Stop strings matched incrementally (issue 10, defect 4): the same answers as searching the whole text every
token, while each token looks at its new text and a window of the longest stop's length, never the whole output."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxq.engine.stops import MAX_STOP_CHARS, MAX_STOPS, StopMatcher, check_stops
from mlxq.errors import InvalidRequest


def whole_text_stop(text: str, stops: list[str]) -> int:
    """The oracle: the earliest stop anywhere in the text."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def whole_text_held_back(text: str, stops: list[str]) -> int:
    """The oracle: the longest end of the text that begins some stop."""
    return max((k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])),
               default=0)


ALPHABET = "ab\u00e9 "  # few letters: stops overlap and repeat, which is where matchers go wrong


@settings(max_examples=300, deadline=None, derandomize=True)
@given(pieces=st.lists(st.text(ALPHABET, max_size=6), max_size=25),
       stops=st.lists(st.text(ALPHABET, min_size=1, max_size=7), min_size=1, max_size=4))
def test_incremental_matching_equals_whole_text_search(pieces, stops):
    matcher, text = StopMatcher(stops), ""
    for piece in pieces:
        before = len(text)
        text += piece
        at = matcher.find(text, before)
        assert at == whole_text_stop(text, stops)
        if at >= 0:
            return
        assert matcher.held_back(text) == whole_text_held_back(text, stops)


class Probe(str):
    """A text that records how much of itself the matcher reads."""

    read: list[int]

    def find(self, sub, start=0, *args):
        Probe.read.append(len(self) - start)
        return str.find(self, sub, start, *args)

    def __getitem__(self, key):
        piece = str.__getitem__(self, key)
        Probe.read.append(len(piece))
        return piece


def test_each_token_reads_a_window_not_the_output():
    """16 stops as long as allowed and a 16k-character output: per token, the matcher reads only the new text
    and one window of the longest stop per stop (the old matcher read the whole output, per stop, per token)."""
    stops = [("xyz"[i % 3] * (MAX_STOP_CHARS - 2)) + f"{i:02d}" for i in range(MAX_STOPS)]
    matcher, text = StopMatcher(stops), ""
    for n in range(4000):
        before = len(text)
        text = Probe(text + "ab x" if n % 7 else text + "x" * 4)
        Probe.read = []
        assert matcher.find(text, before) == -1
        matcher.held_back(text)
        assert max(Probe.read) <= MAX_STOP_CHARS + 4
    assert len(text) >= 16000


def test_limits_are_checked():
    assert check_stops("x") == ["x"] and check_stops(None) == []
    with pytest.raises(InvalidRequest, match="^stop: at most 16"):
        check_stops(["a"] * (MAX_STOPS + 1))
    with pytest.raises(InvalidRequest, match="non-empty"):
        check_stops(["a", ""])
    with pytest.raises(InvalidRequest, match=f"at most {MAX_STOP_CHARS}"):
        StopMatcher(["a" * (MAX_STOP_CHARS + 1)])


def test_the_api_applies_the_limits(smollm2):
    with pytest.raises(InvalidRequest, match="stop"):
        smollm2.generate("Hello", max_tokens=2, stop=["z" * (MAX_STOP_CHARS + 1)])
    out = smollm2.generate("The capital of France is", max_tokens=12, stop=[" Paris", "."], raw=True)
    assert " Paris" not in out.text and "." not in out.text
