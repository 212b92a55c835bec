"""Stop strings, matched incrementally: each token's new text is searched together with only the last
(longest stop - 1) characters before it, and what could still become a stop is held back, so a token costs
O((new text + longest stop) x stops) however long the output grows. Stop strings are bounded in number and length
(`check_stops`), which bounds that cost for any request."""

from __future__ import annotations

from mlxq.errors import InvalidRequest

MAX_STOPS = 16
MAX_STOP_CHARS = 256


def check_stops(stop: str | list[str] | None, field: str = "stop") -> list[str]:
    """The stop strings of a request as a list, or InvalidRequest naming `field`."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise InvalidRequest(f"{field}: at most {MAX_STOPS} stop strings")
    for s in stops:
        if not isinstance(s, str) or not s:
            raise InvalidRequest(f"{field}: stop strings must be non-empty strings")
        if len(s) > MAX_STOP_CHARS:
            raise InvalidRequest(f"{field}: a stop string has {len(s)} characters; at most {MAX_STOP_CHARS}")
    return stops


class StopMatcher:
    """Watches one output that grows at its end. `find(text, new_from)`: where the earliest stop starts in `text`
    (of which `text[new_from:]` is new since the last call), or -1; `held_back(text)`: how many trailing characters
    could still be the start of a stop (not safe to hand out yet)."""

    def __init__(self, stops: list[str]):
        self.stops = check_stops(stops)
        self.longest = max(map(len, self.stops), default=0)

    def find(self, text: str, new_from: int) -> int:
        if not self.stops:
            return -1
        start = max(0, new_from - self.longest + 1)  # a stop ending in the new text starts at most this early
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else -1

    def held_back(self, text: str) -> int:
        keep = 0
        for s in self.stops:
            tail = text[-(len(s) - 1) :] if len(s) > 1 else ""
            # the longest suffix of `tail` that starts `s`: try each place `s[0]` occurs, earliest first
            i = tail.find(s[0])
            while i >= 0:
                if s.startswith(tail[i:]):
                    keep = max(keep, len(tail) - i)
                    break
                i = tail.find(s[0], i + 1)
        return keep
