"""The asyncio side of the engine: an API call's engine requests, their outputs delivered on the event loop.

The engine thread calls `on_output`; that only schedules a queue put on the loop (it must not block the engine).
Cancelling a `Submission` ends its requests at the engine's next step.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial

from mlxq.engine.scheduler import Engine, Output, Request
from mlxq.errors import InvalidRequest, MlxqError


class EngineUnavailable(MlxqError):
    status = 503


class Submission:
    """Outputs of one API call's requests (one per choice), as (choice index, Output) pairs."""

    def __init__(self, engine: Engine, requests: list[Request], max_pending: int):
        if not requests:  # nothing would ever arrive: the response would wait forever
            raise InvalidRequest("the request asks for no completions")
        if not engine.alive:
            raise EngineUnavailable("the engine is not running")
        if engine.pending + len(requests) > max_pending:
            raise EngineUnavailable(f"the server is busy ({engine.pending} requests queued or running); retry later")
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        self.requests = requests
        self.open = len(requests)  # choices not finished yet
        self.checked = time.monotonic()  # when the client was last seen connected
        for i, req in enumerate(requests):
            req.on_output = partial(self._push, i)
        try:
            for req in requests:
                engine.submit(req)
        except Exception:
            self.cancel()
            raise

    def _push(self, index: int, out: Output) -> None:  # on the engine thread
        # Raises once the loop is closed; the engine then cancels the request.
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, out))

    async def get(self, timeout: float | None = None) -> tuple[int, Output] | None:
        """The next output, or None after `timeout` seconds without one."""
        try:
            index, out = await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None
        if out.finish_reason is not None:
            self.open -= 1
        return index, out

    @property
    def done(self) -> bool:
        return self.open == 0

    def cancel(self) -> None:
        """Ends every request at the engine's next step (requests already finished are not affected)."""
        for req in self.requests:
            req.cancel()
