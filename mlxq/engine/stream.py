"""The callers' side of the engine: a submission's outputs read by a blocking thread or by asyncio, and the
pieces the Python API hands out (`Chunk`, `Result`, `Timings`).

The engine thread calls each request's `on_output`, which only puts the output on a queue: a thread-safe queue
for blocking readers, or for asyncio the event loop's `_Mailbox` (it must never block the engine). This is the one
place a thread crosses into asyncio; the server uses it too.
"""

from __future__ import annotations

import asyncio
import queue
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

from mlxq.engine.output import Output, TokenLogprob, Usage
from mlxq.engine.scheduler import Engine, Request


class _Mailbox:
    """Outputs for the streams of one event loop. The engine hands a step's outputs to them one after another
    (`post`), then wakes the loop once for all of them (`wake`, the requests' `on_flush`): each
    `call_soon_threadsafe` writes to the loop's wake-up pipe, and each wake-up takes the GIL from the engine
    thread."""

    _of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = weakref.ref(loop)
        self.items: deque[Callable[[], None]] = deque()
        self.woken = False  # a `_drain` is scheduled and has not started taking items

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Mailbox | None:
        """The loop's mailbox (made on the loop's own thread, where Submissions are made, so never made twice);
        None for a loop that takes no weak reference."""
        try:
            box = cls._of.get(loop)
            if box is None:
                box = cls._of[loop] = cls(loop)
            return box
        except TypeError:
            return None

    def post(self, deliver: Callable[[], None]) -> None:  # on the engine thread
        loop = self.loop()
        if loop is None or loop.is_closed():  # the engine then cancels the request
            raise RuntimeError("the event loop is closed")
        self.items.append(deliver)

    def wake(self) -> None:  # on the engine thread, after posting
        loop = self.loop()
        if self.items and not self.woken and loop is not None:
            self.woken = True
            loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:  # on the loop
        self.woken = False  # before taking: items posted from now on are followed by a wake that schedules a drain
        while self.items:
            self.items.popleft()()


class Submission:
    """The outputs of requests submitted together (one per choice), as (index, Output) pairs, read with `get`
    (blocking) or, when made with `loop`, with `aget` on that event loop. `cancel` ends every request."""

    def __init__(self, engine: Engine, requests: list[Request], *, loop: asyncio.AbstractEventLoop | None = None):
        self._loop = loop
        self._mailbox = None if loop is None else _Mailbox.of(loop)
        self._queue: queue.SimpleQueue | asyncio.Queue = queue.SimpleQueue() if loop is None else asyncio.Queue()
        self.requests = requests
        self.open = len(requests)  # requests not finished yet
        for i, req in enumerate(requests):
            req.on_output = partial(self._push, i)
            req.on_flush = self._mailbox.wake if self._mailbox is not None else None
        try:
            for req in requests:
                engine.submit(req)
        except Exception:
            self.cancel()
            raise

    def _push(self, index: int, out: Output) -> None:  # on the engine thread
        if self._loop is None:
            self._queue.put((index, out))
        elif self._mailbox is None:  # raises once the loop is closed; the engine then cancels the request
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, out))
        else:  # likewise
            self._mailbox.post(partial(self._queue.put_nowait, (index, out)))

    def get(self, timeout: float | None = None) -> tuple[int, Output] | None:
        """The next output, or None after `timeout` seconds without one."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        return self._count(item)

    async def aget(self, timeout: float | None = None) -> tuple[int, Output] | None:
        """The next output, or None after `timeout` seconds without one."""
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None
        return self._count(item)

    def _count(self, item: tuple[int, Output]) -> tuple[int, Output]:
        if item[1].finish_reason is not None:
            self.open -= 1
        return item

    @property
    def done(self) -> bool:
        return self.open == 0

    def cancel(self) -> None:
        """Ends every request at the engine's next step (requests already finished are not affected)."""
        for req in self.requests:
            req.cancel()


# ------------------------------------------------------------------------------------------------ the API's pieces
@dataclass
class Timings:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0  # from the call to the first token (queueing included)
    decode_s: float = 0.0  # from the first token to the last
    first_token_s: float = 0.0
    # streamed experts' counters over the call (`mlxq.experts.ExpertStats.as_dict()`; requests running at the same
    # time share the pool, so theirs are counted too); None when the experts are not streamed
    experts: dict | None = None

    @property
    def prefill_tps(self) -> float:
        return (self.prompt_tokens - self.cached_tokens) / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        return (self.generated_tokens - 1) / self.decode_s if self.decode_s and self.generated_tokens > 1 else 0.0


@dataclass
class Chunk:
    """A piece of streamed output."""

    text: str  # content
    reasoning: str = ""  # think-block text (models with thinking control)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with `logprobs=k`: one per token
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls" | "cancelled" on the last chunk
    tool_calls: list[dict] = field(default_factory=list)  # on the last chunk: OpenAI-shaped calls
    usage: Usage | None = None  # on the last chunk


@dataclass
class Result:
    text: str
    tokens: list[int]
    finish_reason: str
    reasoning: str | None = None
    tool_calls: list[dict] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    usage: Usage | None = None
    timings: Timings = field(default_factory=Timings)


class _Reader:
    """Outputs -> chunks, timed from the call (`timings`, filled in as they come); raises a request's error."""

    def __init__(self, timings: Timings | None) -> None:
        self.t0 = time.perf_counter()
        self.timings = timings if timings is not None else Timings()
        self.first: float | None = None
        self.done = False

    def chunk(self, item: tuple[int, Output]) -> Chunk:
        out = item[1]
        if out.error is not None:
            raise out.error
        now = time.perf_counter()
        if out.tokens:
            if self.first is None:
                self.first = now
                self.timings.first_token_s = self.timings.prefill_s = now - self.t0
            self.timings.decode_s = now - self.first
            self.timings.generated_tokens += len(out.tokens)
        if out.usage is not None:
            self.timings.prompt_tokens, self.timings.cached_tokens = out.usage.prompt_tokens, out.usage.cached_tokens
        self.done = out.finish_reason is not None
        return Chunk(out.text, out.reasoning, out.tokens, out.logprobs, out.finish_reason, out.tool_calls, out.usage)


def stream(engine: Engine, request: Request, timings: Timings | None = None) -> Iterator[Chunk]:
    """Submits `request`; yields its chunks as the engine makes them. Closing the iterator early (a `break`)
    cancels the request."""
    reader, sub = _Reader(timings), Submission(engine, [request])
    try:
        while not reader.done:
            yield reader.chunk(sub.get())
    finally:
        sub.cancel()


async def astream(engine: Engine, request: Request, timings: Timings | None = None) -> AsyncIterator[Chunk]:
    """`stream` for asyncio: outputs arrive on the running event loop, which is never blocked."""
    reader, sub = _Reader(timings), Submission(engine, [request], loop=asyncio.get_running_loop())
    try:
        while not reader.done:
            yield reader.chunk(await sub.aget())
    finally:
        sub.cancel()


class Collector:
    """Chunks -> one `Result`."""

    def __init__(self) -> None:
        self.timings = Timings()
        self.text, self.reasoning, self.tokens, self.logprobs = [], [], [], []
        self.last: Chunk | None = None

    def add(self, chunk: Chunk) -> None:
        self.text.append(chunk.text)
        self.reasoning.append(chunk.reasoning)
        self.tokens += chunk.tokens
        self.logprobs += chunk.logprobs
        self.last = chunk

    def result(self) -> Result:
        last = self.last
        return Result("".join(self.text), self.tokens, last.finish_reason, "".join(self.reasoning) or None,
                      last.tool_calls, self.logprobs, last.usage, self.timings)


def run(engine: Engine, request: Request) -> Result:
    """Submits `request` and waits for its whole result."""
    collector = Collector()
    for chunk in stream(engine, request, collector.timings):
        collector.add(chunk)
    return collector.result()


async def arun(engine: Engine, request: Request) -> Result:
    """`run` for asyncio."""
    collector = Collector()
    async for chunk in astream(engine, request, collector.timings):
        collector.add(chunk)
    return collector.result()
