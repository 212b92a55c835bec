"""The control plane of a group: rank 0 tells the other ranks what to run, and watches that they are alive.

Activations and partial sums go through MLX's collectives (`mx.distributed`, the ring backend over Ethernet or
Thunderbolt). The steps themselves go over one plain TCP connection from rank 0 to each other rank, as JSON
lines, because:
- a rank waiting for its next step then waits in the kernel. MLX's ring backend polls its sockets while a receive
  is pending, so a rank waiting on a collective for the next step would keep a core busy as long as the server
  is idle;
- rank 0 learns at once which rank is gone (its connection closes), also while idle;
- each rank answers heartbeats from a reader thread while its main thread computes, so a rank that is alive
  but stuck (stopped, swapping, wedged) is found within `rank_timeout`, and a step that never ends (a collective
  waiting on a rank that will never send) within `step_timeout`.

When a rank is lost the group is degraded for good: the engine fails every request (`EngineDown`), the other
ranks are told to exit (they may be stuck in a collective that will never finish), and /health says so.

Messages, rank 0 -> rank: {"op": name, "args": {...}} (steps, `runner.py`), {"op": "ping"}, {"op": "abort"};
rank -> rank 0: {"hello": rank, "token": ...}, {"ready": {...}}, {"pong": n}, {"error": "..."}.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import secrets
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator

import mlx.core as mx
import numpy as np

from mlxq.errors import ConfigError, EngineDown, GenerationError

log = logging.getLogger("mlxq.distributed")

HEARTBEAT_S = 1.0
RANK_TIMEOUT_S = 15.0  # a rank silent this long (no heartbeat answered) is lost
STEP_TIMEOUT_S = 600.0  # a step running this long is stuck (a collective waits on a rank that will never send)
CONNECT_TIMEOUT_S = 120.0
EXCHANGE_BYTES = 4096


def _line(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class Control:
    """Rank 0's end: listens on `host`, accepts the other ranks, sends them steps, watches them."""

    def __init__(self, size: int, host: str = "127.0.0.1", *, rank_timeout: float = RANK_TIMEOUT_S,
                 step_timeout: float = STEP_TIMEOUT_S):
        self.size = size
        self.rank_timeout, self.step_timeout = rank_timeout, step_timeout
        self.token = secrets.token_hex(16)
        self._listener = socket.create_server((host, 0))
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        self._conns: dict[int, socket.socket] = {}
        self._send_lock = threading.Lock()
        self.last_seen: dict[int, float] = {}
        self.ready: dict[int, dict] = {}  # what each other rank holds, once loaded
        self.own: dict = {}  # and rank 0
        self._ready = threading.Condition()
        self.state, self.error = "starting", None
        self.on_down: Callable[[EngineDown], None] = lambda error: None
        self._busy_since: float | None = None
        self._down_lock = threading.Lock()
        self._closed = False
        self._pings = 0

    # ------------------------------------------------------------------------------------------ start-up
    def accept(self, timeout: float = CONNECT_TIMEOUT_S) -> None:
        """Waits for every other rank to connect and prove it belongs to this group (the token handed out with the
        start-up handshake); then starts watching them."""
        deadline = time.monotonic() + timeout
        while len(self._conns) < self.size - 1:
            self._listener.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                missing = sorted(set(range(1, self.size)) - set(self._conns))
                raise GenerationError(f"distributed: ranks {missing} did not connect within {timeout:.0f} s") from None
            conn.settimeout(10.0)
            try:
                hello = json.loads(_first_line(conn) or b"{}")
            except (OSError, ValueError):
                conn.close()
                continue
            rank = hello.get("hello")
            if hello.get("token") != self.token or not isinstance(rank, int) or not 0 < rank < self.size:
                conn.close()  # not one of ours
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self.rank_timeout)  # bounds a send to a rank that stopped reading
            self._conns[rank] = conn
            self.last_seen[rank] = time.monotonic()
        self._listener.close()
        threading.Thread(target=self._read_all, name="mlxq-control-read", daemon=True).start()
        threading.Thread(target=self._heartbeat, name="mlxq-control-beat", daemon=True).start()

    def wait_ready(self) -> dict[int, dict]:
        """Waits for every rank to have loaded its share (what each says about it, by rank)."""
        with self._ready:
            while len(self.ready) < self.size - 1 and self.state != "degraded":
                self._ready.wait(1.0)
        if self.state == "degraded":
            raise GenerationError(f"distributed: the group failed while loading: {self.error}")
        self.state = "ok"
        return dict(self.ready)

    # ------------------------------------------------------------------------------------------ steps
    def post(self, op: str, **args) -> None:
        """Sends a step to every other rank (in order: each runs the steps in the order they were posted)."""
        if self.state == "degraded":
            raise EngineDown(f"the distributed group is degraded: {self.error}")
        self._send_all(_line({"op": op, "args": args}))
        if self.state == "degraded":
            raise EngineDown(f"the distributed group is degraded: {self.error}")

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Marks rank 0 running a step, so the watchdog can tell one that never ends."""
        self._busy_since = time.monotonic()
        try:
            yield
        finally:
            self._busy_since = None

    def down(self, reason: str) -> EngineDown:
        """The group is lost: fails the engine's requests, tells the other ranks to exit. Returns the error."""
        with self._down_lock:
            if self.state == "degraded" or self._closed:
                return EngineDown(f"the distributed group is degraded: {self.error or reason}")
            self.state, self.error = "degraded", reason
        error = EngineDown(f"the distributed group is degraded: {reason}")
        log.error("distributed group degraded: %s", reason)
        with self._ready:
            self._ready.notify_all()
        self._send_all(_line({"op": "abort", "args": {"reason": reason}}), quiet=True)
        try:
            self.on_down(error)
        except Exception:
            log.exception("failing the engine's requests failed")
        return error

    def lost(self, error: BaseException, wait: float = 1.0) -> EngineDown:
        """A collective failed (MLX: 'connection to a peer was lost'): usually a rank died, which the reader thread
        names as soon as its connection closes; wait a moment for that, else report the failure as it is."""
        deadline = time.monotonic() + wait
        while self.state != "degraded" and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.down(f"a step failed ({type(error).__name__}: {error})")

    def close(self) -> None:
        """Ends the group: the other ranks leave `follow()`."""
        if self._closed:
            return
        if self.state != "degraded":
            self._send_all(_line({"op": "exit", "args": {}}), quiet=True)
        self._closed = True
        for conn in self._conns.values():
            with contextlib.suppress(OSError):
                conn.close()

    def status(self) -> dict:
        now = time.monotonic()
        ranks = [{"rank": 0, **self.own}]
        for rank in range(1, self.size):
            seen = self.last_seen.get(rank)
            ranks.append({"rank": rank, **self.ready.get(rank, {}),
                          "last_heard_s": None if seen is None else round(now - seen, 1)})
        return {"state": self.state, "error": self.error, "size": self.size, "ranks": ranks}

    # ------------------------------------------------------------------------------------------ inside
    def _send_all(self, data: bytes, quiet: bool = False) -> None:
        failed = None
        with self._send_lock:
            for rank, conn in self._conns.items():
                try:
                    conn.sendall(data)
                except OSError as e:
                    failed = failed or (rank, e)
        if failed and not quiet:
            rank, e = failed
            why = "stopped reading" if isinstance(e, TimeoutError) else f"disconnected ({e.strerror or e})"
            self.down(f"rank {rank} {why}")

    def _read_all(self) -> None:
        sel = selectors.DefaultSelector()
        buffers: dict[int, bytes] = {}
        for rank, conn in self._conns.items():
            conn.setblocking(False)
            sel.register(conn, selectors.EVENT_READ, rank)
            buffers[rank] = b""
        while not self._closed and sel.get_map():
            for key, _ in sel.select(timeout=0.5):
                rank = key.data
                try:
                    chunk = key.fileobj.recv(1 << 16)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(key.fileobj)
                    if not self._closed:
                        self.down(f"rank {rank} disconnected")
                    continue
                *lines, buffers[rank] = (buffers[rank] + chunk).split(b"\n")
                for line in lines:
                    self._take(rank, line)
        sel.close()

    def _take(self, rank: int, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            return
        self.last_seen[rank] = time.monotonic()
        if "ready" in msg:
            with self._ready:
                self.ready[rank] = msg["ready"]
                self._ready.notify_all()
        elif "error" in msg:
            self.down(f"rank {rank}: {msg['error']}")

    def _heartbeat(self) -> None:
        while not self._closed and self.state != "degraded":
            time.sleep(HEARTBEAT_S)
            self._pings += 1
            self._send_all(_line({"op": "ping", "args": {"n": self._pings}}))
            now = time.monotonic()
            for rank, seen in list(self.last_seen.items()):
                if now - seen > self.rank_timeout:
                    self.down(f"rank {rank} stopped answering ({now - seen:.0f} s without a heartbeat)")
            busy = self._busy_since
            if busy is not None and now - busy > self.step_timeout:
                self.down(f"a step has run for {now - busy:.0f} s (a rank is not taking part)")


def exchange(group, me: dict, size: int = EXCHANGE_BYTES) -> list[dict]:
    """Every rank's `me`, by rank: an all_gather of fixed-size JSON blocks over the group's collectives (the start-up
    handshake; what each rank found saving or loading its share of a cache)."""
    blob = json.dumps(me).encode()
    if len(blob) > size:
        raise ConfigError("distributed: a message to every rank is too large")
    block = np.zeros(size, np.uint8)
    block[: len(blob)] = np.frombuffer(blob, np.uint8)
    gathered = mx.distributed.all_gather(mx.array(block), group=group)
    mx.eval(gathered)
    raw = np.array(gathered).reshape(group.size(), size)
    return [json.loads(bytes(row).rstrip(b"\0")) for row in raw]


def _first_line(conn: socket.socket, limit: int = 4096) -> bytes:
    """The first line a connection sends, read byte by byte: a buffered reader would also take what follows it (the
    rank's next message), which the reader thread must see."""
    line = b""
    while not line.endswith(b"\n") and len(line) < limit:
        byte = conn.recv(1)
        if not byte:
            break
        line += byte
    return line


class Link:
    """A rank's end: connects to rank 0, answers heartbeats from its own thread, hands steps to `receive`."""

    def __init__(self, address: str, token: str, rank: int, timeout: float = CONNECT_TIMEOUT_S):
        host, port = address.rsplit(":", 1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock = socket.create_connection((host, int(port)), timeout=10.0)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise GenerationError(f"distributed: rank {rank} cannot reach rank 0 at {address} ({e})") from None
                time.sleep(0.2)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.settimeout(None)
        self.rank = rank
        self._lock = threading.Lock()
        self._steps: queue.SimpleQueue[dict | None] = queue.SimpleQueue()
        self.send({"hello": rank, "token": token})
        threading.Thread(target=self._read, name="mlxq-link-read", daemon=True).start()

    def send(self, message: dict) -> None:
        with self._lock:
            self._sock.sendall(_line(message))

    def receive(self) -> dict:
        """The next step from rank 0 (blocking, in the kernel); EngineDown once rank 0 is gone."""
        msg = self._steps.get()
        if msg is None:
            raise EngineDown(f"rank {self.rank}: rank 0 closed the connection")
        return msg

    def _read(self) -> None:
        reader = self._sock.makefile("rb")
        try:
            for line in reader:
                msg = json.loads(line)
                if msg["op"] == "ping":
                    self.send({"pong": msg["args"]["n"]})
                elif msg["op"] == "abort":
                    # the main thread may be stuck in a collective that will never finish: nothing to save
                    log.error("rank %d: rank 0 ended the group (%s)", self.rank, msg["args"].get("reason"))
                    os._exit(3)
                else:
                    self._steps.put(msg)
        except (OSError, ValueError):
            pass
        self._steps.put(None)
