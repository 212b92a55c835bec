"""An export's block-quantized tensors encoded on every core this process may run on.

A fit is many small numpy calls with Python between them, so threads spend their time waiting for the GIL
(session 11: the same wall time for a third more CPU). Worker processes start instead, one per core, once per
export, before the first tensor: forked on Linux, spawned elsewhere (`start_method`). This process reads and
transforms each tensor as before and hands its rows out in slices, first come first served: a worker maps a slice
that is a float32 view of the source file itself (most tensors of a float32 source), others are copied into memory
shared with the workers. Whoever encodes a slice writes its bytes at their place in the output file (pwrite), so
nothing encoded travels back. This process only feeds the workers (0.1-0.2 s of CPU in SmolLM2's exports, against
their 0.5-2 s) and waits. A worker runs only numpy and the codecs, never MLX (a forked child has none of MLX's
threads), ignores Ctrl-C (this process ends it), and exits when this process is gone (its end of the pipe closes).
`--method allocate`'s candidates are encoded the same way, a layer's at a time, into a scratch file read back once
all are written (`Encoders.wait`; export.requantized).

Memory: this process holds one tensor, as without workers; each worker a window of the source file (WINDOW_BYTES),
the working arrays of one slice, and SLOTS shared slices of at most `slice_weights` float32 weights (touched only
when copied, and as many importance values in a calibrated export).
"""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait
from pathlib import Path

import numpy as np

from mlxq.errors import MlxqError
from mlxq.formats.gguf.codecs import CODECS, block_rows, encode
from mlxq.formats.gguf.writer import write_at
from mlxq.glibc import glibc

# Weights a slice holds: each slice is one message to a worker (tens of microseconds, or ~0.5 ms when copied), and a
# worker's last slices are what the export waits for at its end. 2**19 is Q3_K's encoding step (the largest) and
# ~1 ms of Q4_0, the cheapest codec, per slice.
SLICE_WEIGHTS = max(1 << 19, *(c.chunk for c in CODECS.values()))
SLOTS = 2  # slices queued per worker: it starts the next the moment it ends one
# Below this many block-quantized weights an export stays in one process: forking and ending a worker costs ~10 ms,
# more than a small model's whole encoding gains
MIN_PARALLEL_WEIGHTS = 1 << 22
# ... and below this many, where workers are spawned: each is a fresh interpreter that imports the codecs (~0.2 s of
# CPU here) before its first slice, what one process takes to encode a few million weights. (SmolLM2's Q4_K_M, 2
# workers here: spawned 1.02-1.24 s, forked 0.81-0.94 s, one process 1.38-1.51 s)
MIN_SPAWNED_WEIGHTS = 1 << 26
MAX_WORKERS = 15  # one process feeds them all (only 2 cores tried)
WINDOW_BYTES = 64 << 20  # of the source file a worker maps at a time


def start_method() -> str:
    """How workers start: forked on Linux (at once, sharing this process's pages), spawned elsewhere: on macOS a
    process that has started Metal or Objective-C code must not fork without exec (its system libraries may abort or
    hang the child)."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def worker_count(weights: int) -> int:
    """Workers for an export of `weights` block-quantized weights: one per core this process may use, none on one
    core or for a small export (`MIN_PARALLEL_WEIGHTS`, or `MIN_SPAWNED_WEIGHTS` where workers are spawned)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    least = MIN_PARALLEL_WEIGHTS if start_method() == "fork" else MIN_SPAWNED_WEIGHTS
    return 0 if weights < least or cores < 2 else min(cores, MAX_WORKERS)


class EncodeError(MlxqError):
    """A tensor whose encoding failed, in this process or in a worker."""


@dataclass
class _Worker:
    pid: int
    conn: Connection
    busy: dict[int, tuple[str, str]]  # slot -> (tensor, type) handed to it and not yet done
    process: subprocess.Popen | None = None  # a spawned worker's handle (reaped through it); None when forked

    def reap(self) -> None:
        if self.process is not None:
            self.process.wait()
            return
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:  # reaped already
            pass


class Encoders:
    """Encodes tensors into the file at `path` (named `shown` in errors; each process opens it for writing when it
    first writes, so it need not exist yet) with `workers` processes besides this one (started as `start_method`
    says). A context manager around the writing: `finish` waits for every slice handed out (raising the first error)
    and lets the workers go; leaving the block reaps them, killed first when it is left on an error."""

    def __init__(self, path: Path, workers: int, widest: int, shown: Path):
        self.path, self.shown = path, shown
        self.slice_weights = max(SLICE_WEIGHTS, widest)  # a slice holds at least one row
        self.workers: list[_Worker] = []
        self._want = workers
        self.method = start_method()
        self._shared: mmap.mmap | None = None
        self._slots_file = None  # what the shared slots map, where workers are spawned
        self._free: list[tuple[_Worker, int]] = []
        self._fd = -1  # this process's own, for what it encodes itself

    # -------------------------------------------------------------------------------------------- life
    def __enter__(self) -> Encoders:
        if self._want:
            # each slot holds a slice's weights, then its importance; pages never touched (importance outside
            # calibrated exports) cost nothing. Forked workers inherit an anonymous shared mapping; spawned ones map
            # an unlinked temporary file, whose descriptor they are given (no name to clean up after a crash)
            size = self._want * SLOTS * 2 * self.slice_weights * 4
            if self.method == "fork":
                self._shared = mmap.mmap(-1, size)
            else:
                self._slots_file = tempfile.TemporaryFile()
                os.ftruncate(self._slots_file.fileno(), size)
                self._shared = mmap.mmap(self._slots_file.fileno(), size)
        try:
            for _ in range(self._want):
                self._start()
        except BaseException:
            self._end(kill=True)
            raise
        return self

    def _start(self) -> None:
        mine, theirs = Pipe()
        if self.method == "fork":
            worker = _Worker(self._fork(mine, theirs), mine, {})
        else:
            process = self._spawn(theirs)
            worker = _Worker(process.pid, mine, {}, process)
        theirs.close()
        first = len(self.workers) * SLOTS
        self.workers.append(worker)
        self._free += [(worker, first + k) for k in range(SLOTS)]

    def _spawn(self, theirs: Connection) -> subprocess.Popen:
        """A fresh interpreter serving `theirs` (`_serve_spawned`): not multiprocessing's spawn, which would run the
        caller's main script again in it, unless guarded. It sees this process's import path, and runs in a session
        of its own, so the terminal's Ctrl-C reaches only this process (which ends it)."""
        fds = (theirs.fileno(), self._slots_file.fileno())
        code = "from mlxq.formats.gguf.parallel import _serve_spawned; _serve_spawned()"
        return subprocess.Popen([sys.executable, "-c", code, *map(str, (*fds, len(self._shared), self.path,
                                                                       self.slice_weights))],
                                pass_fds=fds, stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})

    def _fork(self, mine: Connection, theirs: Connection) -> int:
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the export's code (its cleanup would remove the file)
            code = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                mine.close()
                for w in self.workers:  # so that each worker sees EOF once this process is gone
                    w.conn.close()
                _serve(theirs, self._shared, self.path, self.slice_weights)
                code = 0
            finally:
                os._exit(code)
        return pid

    def finish(self) -> None:
        """Waits for every slice handed out, raising the first error; the workers end once their last is done (so
        their exit overlaps what follows: the file's sync)."""
        for w in self.workers:
            try:
                w.conn.send(None)
            except OSError:  # a worker that died (broken pipe): what it held fails below, naming the tensor
                pass
        self.wait()
        self._free = []

    def wait(self) -> None:
        """Waits for every slice handed out, raising the first error; the workers stay for more."""
        while any(w.busy for w in self.workers):
            self._collect(block=True)

    def __exit__(self, kind, exc, tb) -> None:
        unfinished = kind is None and any(w.busy for w in self.workers)
        self._end(kill=kind is not None or unfinished)
        if unfinished:
            raise RuntimeError("Encoders left with slices not written (finish() was not called)")

    def _end(self, kill: bool) -> None:
        for w in self.workers:
            try:
                if kill:
                    os.kill(w.pid, signal.SIGKILL)
                else:
                    w.conn.send(None)  # (a second None, after finish's, is never read)
            except (OSError, ValueError):  # already gone
                pass
        for w in self.workers:
            w.conn.close()
            w.reap()
        self.workers, self._free = [], []
        if self._shared is not None:
            try:
                self._shared.close()
            except BufferError:  # a view of a slot still held (by a traceback): the mapping goes with the process
                pass
            self._shared = None
        if self._slots_file is not None:
            self._slots_file.close()
            self._slots_file = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -------------------------------------------------------------------------------------------- work
    def encode(self, name: str, offset: int, w: np.ndarray, kind: str, importance: np.ndarray | None) -> None:
        """Tensor `name`'s rows w [..., cols] encoded as `kind` (importance-weighted with `importance`) into the file
        from byte `offset` on: here, or slice by slice by the workers (returning once the last slice is handed
        out)."""
        codec = CODECS[kind]
        x, qw = block_rows(w, kind, importance)
        if not self.workers:
            try:
                data = encode(x, kind, qw)
            except Exception as e:
                raise self._failed(name, kind, f"{type(e).__name__}: {e}") from None
            if self._fd < 0:
                self._fd = os.open(self.path, os.O_WRONLY)
            write_at(self._fd, data, offset)
            return
        cols = x.shape[1]
        row_bytes = cols // codec.block * codec.size
        step = max(1, self.slice_weights // cols)
        mapped = _mapped_file(x)
        for r in range(0, x.shape[0], step):
            source = None if mapped is None else (mapped[0], mapped[1] + r * cols * 4)
            self._hand_out(name, kind, x[r : r + step], None if qw is None else qw[r : r + step],
                           offset + r * row_bytes, source)

    def _hand_out(self, name: str, kind: str, x: np.ndarray, qw: np.ndarray | None, at: int,
                  source: tuple[str, int] | None) -> None:
        """Slice x to the next free worker: its weights read by the worker from `source` (file, byte offset) or
        copied into its slot here, its importance copied."""
        self._collect(block=not self._free)
        worker, slot = self._free.pop(0)  # the worker that has been waiting longest
        xs, qs = _slot(self._shared, slot, self.slice_weights, *x.shape, qw is not None)
        if source is None:
            xs[...] = x
        if qw is not None:
            qs[...] = qw
        del xs, qs  # no view of the slots outlives its copy (their mapping closes only without one)
        try:
            worker.conn.send((slot, kind, *x.shape, qw is not None, at, source))
        except OSError:  # it died since its last slice came back (broken pipe)
            raise self._failed(name, kind, f"its worker process (pid {worker.pid}) died") from None
        worker.busy[slot] = (name, kind)

    def _collect(self, block: bool) -> None:
        """Frees the slots of slices done (waiting for one when `block`); raises a worker's error, or its death."""
        busy = [w for w in self.workers if w.busy]
        if block:
            wait([w.conn for w in busy])
        for w in busy:
            while w.busy and w.conn.poll():
                try:
                    slot, error = w.conn.recv()
                except (EOFError, OSError):
                    name, kind = next(iter(w.busy.values()))
                    raise self._failed(name, kind, f"its worker process (pid {w.pid}) died") from None
                name, kind = w.busy.pop(slot)
                if error is not None:
                    raise self._failed(name, kind, f"{error} (in a worker process)")
                self._free.append((w, slot))

    def _failed(self, name: str, kind: str, why: str) -> EncodeError:
        return EncodeError(f"{self.shown}: encoding tensor '{name}' as {kind} failed: {why}")


def _slot(shared: mmap.mmap, slot: int, slice_weights: int, rows: int, cols: int,
          weighted: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Slot `slot`'s weights [rows, cols] and importance (or None) as views of the shared memory."""
    start = slot * 2 * slice_weights * 4
    x = np.frombuffer(shared, np.float32, rows * cols, start).reshape(rows, cols)
    qw = np.frombuffer(shared, np.float32, rows * cols, start + slice_weights * 4).reshape(rows, cols)
    return x, qw if weighted else None


def _mapped_file(x: np.ndarray) -> tuple[str, int] | None:
    """(file, byte offset) of x's data when x is a C-contiguous float32 view of a file numpy maps (a float32 source
    tensor, as `mapped_float` gives it, with no transform): a worker maps that file itself, so the weights are not
    copied here. numpy's memmap whose base is the mapping itself starts at its `offset` in the file."""
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        return None
    base = x
    while base is not None and not (isinstance(base, np.memmap) and isinstance(base.base, mmap.mmap)):
        base = base.base if isinstance(base, np.ndarray) else None
    if base is None or base.filename is None:
        return None
    return base.filename, base.offset + (x.ctypes.data - base.ctypes.data)


class _Window:
    """A worker's view of the source file: WINDOW_BYTES of it mapped at a time (moved on as the slices go on), so
    the worker holds a bounded part of a large file, and maps it in few calls (one mapping per slice: 5-10 % slower
    exports of SmolLM2)."""

    def __init__(self):
        self.fds: dict[str, int] = {}
        self.file, self.start, self.mapped = None, 0, None

    def view(self, file: str, offset: int, count: int) -> np.ndarray:
        """`count` float32 values at byte `offset` of `file`."""
        end = offset + 4 * count
        if file != self.file or not self.start <= offset or end > self.start + len(self.mapped):
            if file not in self.fds:
                self.fds[file] = os.open(file, os.O_RDONLY)
            self.file = self.mapped = None  # unmapped (no view of it is left)
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            size = min(max(WINDOW_BYTES, end - start), os.fstat(self.fds[file]).st_size - start)
            self.mapped = mmap.mmap(self.fds[file], size, access=mmap.ACCESS_READ, offset=start)
            self.file, self.start = file, start
        return np.frombuffer(self.mapped, np.float32, count, offset - self.start)


def _serve_spawned() -> None:
    """A spawned worker (`Encoders._spawn`): its pipe, the slots' file and their size, the output and the slice
    weights from its command line; then as a forked one."""
    conn, slots, size, path, slice_weights = sys.argv[1:]
    _serve(Connection(int(conn)), mmap.mmap(int(slots), int(size)), Path(path), int(slice_weights))


def _serve(conn: Connection, shared: mmap.mmap, path: Path, slice_weights: int) -> None:
    """A worker's loop: a slice in, its bytes written into `path`, (slot, None or the error) back; ends on None or
    EOF."""
    libc = glibc()
    if libc is not None:
        # the heap keeps what a slice frees for the next: glibc's defaults hand much of it back and take it again
        # in a fresh process (SmolLM2's Q2_K: 186k page faults in the workers and 0.42-0.67 s of system time, against
        # 26k and 0.16-0.33 s)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: its largest
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    window = _Window()
    fd = -1
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the export is gone
            return
        if task is None:
            return
        slot, kind, rows, cols, weighted, at, source = task
        try:
            x, qw = _slot(shared, slot, slice_weights, rows, cols, weighted)
            if source is not None:
                x = window.view(*source, rows * cols).reshape(rows, cols)
            data = encode(x, kind, qw)
            x = None  # (a view of the window, which may move)
            if fd < 0:
                fd = os.open(path, os.O_WRONLY)
            write_at(fd, data, at)
            conn.send((slot, None))
        except Exception as e:
            conn.send((slot, f"{type(e).__name__}: {e}"))

