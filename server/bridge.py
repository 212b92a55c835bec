"""The server's admission policy over the engine's `Submission` (`mlxq.engine.stream`, where engine outputs cross
into asyncio): requests are refused with a 503 when the engine is gone or too busy, and each submission keeps
when its client was last seen connected."""

from __future__ import annotations

import asyncio
import time

from mlxq.engine.scheduler import Engine, Request
from mlxq.engine.stream import Submission
from mlxq.errors import InvalidRequest, MlxqError


class EngineUnavailable(MlxqError):
    status = 503


class ServerSubmission(Submission):
    """One API call's requests (one per choice), outputs delivered on the running event loop."""

    def __init__(self, engine: Engine, requests: list[Request], max_pending: int):
        if not requests:  # nothing would ever arrive: the response would wait forever
            raise InvalidRequest("the request asks for no completions")
        if not engine.alive:
            raise engine.down or EngineUnavailable("the engine is not running")
        if engine.pending + len(requests) > max_pending:
            raise EngineUnavailable(f"the server is busy ({engine.pending} requests queued or running); retry later")
        self.checked = time.monotonic()  # when the client was last seen connected
        super().__init__(engine, requests, loop=asyncio.get_running_loop())
