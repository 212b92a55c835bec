"""Reading expert blocks: positioned reads from a small thread pool into aligned staging buffers.

Honest I/O: on Linux the packs are opened with O_DIRECT (reads bypass the page cache, so a "cold" read really
comes from the device, and the cache does not grow behind the budget); on macOS with F_NOCACHE. Where the file
system refuses O_DIRECT (tmpfs), reads fall back to the page cache and `direct` says so. Staging buffers come
from mmap (page aligned, as O_DIRECT wants; on Linux, from a huge page up, backed by huge pages: `staging`); every
read starts and ends on the packs' 16 KiB boundaries.
Adjacent experts are read with one call. Each block's CRC-32 is checked before it is handed on.

Reads are tasks on a queue served by reader threads; a thread that waits for reads nobody has started yet does
them itself (`finish`). A layer's single missing expert is then read by the forward pass's own thread, without
waking a reader (on a busy machine that wake-up alone takes longer than reading an expert), and several are read in
parallel.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import queue
import random
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlxq.errors import FormatError
from mlxq.experts.pack import LayerPack, Packs

DEFAULT_THREADS = 4
MACOS = sys.platform == "darwin"  # (a name, so that a test can take the macOS path on Linux)
F_NOCACHE = 48  # <sys/fcntl.h> on Darwin, for Pythons whose fcntl module does not name it
MAX_MERGE = 8 << 20  # largest single read when adjacent experts are merged
HUGE_PAGE = 2 << 20  # (x86-64's and arm64's transparent huge page with 4 KiB base pages)


def open_uncached(path: Path, direct: bool = True) -> tuple[int, bool]:
    """A read-only descriptor that bypasses the page cache where the platform allows; (fd, bypassing)."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:  # e.g. tmpfs: EINVAL
            pass
    fd = os.open(path, os.O_RDONLY)
    if direct and MACOS:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", F_NOCACHE), 1)
        return fd, True
    return fd, False


def drop_cached(path: Path) -> None:
    """Ask the kernel to drop a file's cached pages (between benchmark runs; a no-op where unsupported)."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def staging(size: int) -> memoryview:
    """A page-aligned buffer of `size` bytes for O_DIRECT reads; unmapped when its last view goes. From a huge page up,
    where the platform has transparent huge pages (Linux), it is backed by them: physically contiguous memory, so the
    block layer hands a large read to the device as one request, where 4 KiB pages split it into one request per
    `max_segments` pages (a virtio disk: 6 requests for one 3.9 MB expert, read 2.5x slower than as one request)."""
    if not _huge(size):
        return memoryview(mmap.mmap(-1, size))
    span = staging_bytes(size)
    # private and anonymous (a shared mapping is shmem, which `enabled` does not cover), one huge page longer so
    # that a huge-page-aligned start lies inside it
    buf = mmap.mmap(-1, span + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(buf)) % HUGE_PAGE
    try:
        buf.madvise(mmap.MADV_HUGEPAGE, start, span)
    except OSError:  # a kernel built without transparent huge pages: 4 KiB pages, as below a huge page
        pass
    return memoryview(buf)[start : start + size]


def staging_bytes(size: int) -> int:
    """Memory a `staging(size)` buffer takes once read into (huge pages are resident whole)."""
    return -(-size // HUGE_PAGE) * HUGE_PAGE if _huge(size) else size


def _huge(size: int) -> bool:
    """Whether a staging buffer of `size` bytes is backed by huge pages: from one up, where the platform has them."""
    return size >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE")


class _Staging(threading.local):
    buf: memoryview | None = None

    def get(self, size: int, keep: int) -> memoryview:
        if size > keep:
            return staging(size)  # this read's alone
        if self.buf is None or len(self.buf) < size:
            self.buf = staging(size)  # (the old one goes when the last view of it does)
        return self.buf


class IOCounters:
    """What the reader did: reads, bytes, summed read time, and the wall time with at least one read in flight
    (bytes / busy time is the rate the device delivered while we were asking)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reads = self.bytes = 0
        self.read_s = self.busy_s = 0.0
        self._in_flight, self._since = 0, 0.0

    def start(self) -> float:
        now = time.perf_counter()
        with self._lock:
            if self._in_flight == 0:
                self._since = now
            self._in_flight += 1
        return now

    def done(self, started: float, nbytes: int) -> None:
        now = time.perf_counter()
        with self._lock:
            self.reads += 1
            self.bytes += nbytes
            self.read_s += now - started
            self._in_flight -= 1
            if self._in_flight == 0:
                self.busy_s += now - self._since

    def snapshot(self) -> tuple[int, int, float, float]:
        with self._lock:
            busy = self.busy_s + (time.perf_counter() - self._since if self._in_flight else 0.0)
            return self.reads, self.bytes, self.read_s, busy


class Read:
    """One queued read: run by a reader thread or by whoever waits for it first."""

    def __init__(self, fn: Callable[[], None]):
        self._fn = fn
        self._claim = threading.Lock()
        self._done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        if not self._claim.acquire(blocking=False):
            return  # someone else has it
        try:
            self._fn()
        except BaseException as e:  # handed to the waiter
            self.error = e
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        self._done.wait()

    def result(self) -> None:
        self.run()
        self.wait()
        if self.error is not None:
            raise self.error


def finish(reads: list[Read]) -> None:
    """Wait for `reads`, first doing any that no reader thread has taken yet, last queued first (the readers take
    from the front): waiting on a read a reader has while a later one sits in the queue would leave one read fewer in
    flight than there are threads to make them. Raises the first failed read's error."""
    for read in reversed(reads):
        read.run()
    for read in reads:
        read.result()


class PackReader:
    """Reads runs of adjacent expert blocks on `threads` threads; `sink(position, payload)` gets each checked
    block (a memoryview into the staging buffer, valid only during the call). A thread keeps a staging buffer of
    at most `keep` bytes between reads (default: one expert)."""

    def __init__(self, packs: Packs, threads: int = DEFAULT_THREADS, direct: bool = True, verify: bool = True,
                 keep: int | None = None):
        self.packs, self.verify = packs, verify
        self.keep = min(MAX_MERGE, keep or max(lp.stride for lp in packs.layers.values()))
        self.fds: dict[int, int] = {}
        bypass = []
        for layer, lp in packs.layers.items():
            self.fds[layer], ok = open_uncached(packs.path(lp), direct)
            bypass.append(ok)
        self.direct = all(bypass)
        self.threads = threads
        self.io = IOCounters()
        self._staging = _Staging()
        self._queue: queue.SimpleQueue[Read | None] = queue.SimpleQueue()
        self._workers = [threading.Thread(target=self._serve, name=f"mlxq-experts-io-{i}", daemon=True)
                         for i in range(threads)]
        for w in self._workers:
            w.start()

    @property
    def held_bound(self) -> int:
        """Staging memory held between reads: a buffer of at most `keep` bytes per reader thread and per thread that
        claims reads (the forward pass's)."""
        return (self.threads + 1) * staging_bytes(self.keep)

    def runs(self, lp: LayerPack, positions: list[int]) -> list[tuple[int, int]]:
        """Sorted positions -> (first, count) runs of adjacent experts, each at most MAX_MERGE bytes."""
        limit = max(1, MAX_MERGE // lp.stride)
        out: list[tuple[int, int]] = []
        for p in positions:
            if out and out[-1][0] + out[-1][1] == p and out[-1][1] < limit:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((p, 1))
        return out

    def submit(self, layer: int, first: int, count: int, sink: Callable[[int, memoryview], None]) -> Read:
        read = Read(lambda: self._read(layer, first, count, sink))
        self._queue.put(read)
        return read

    def _serve(self) -> None:
        while (read := self._queue.get()) is not None:
            read.run()

    def _read(self, layer: int, first: int, count: int, sink: Callable[[int, memoryview], None]) -> None:
        lp = self.packs.layers[layer]
        size = lp.stride * count
        view = self._staging.get(size, self.keep)[:size]
        started = self.io.start()
        try:
            got = os.preadv(self.fds[layer], [view], lp.experts[first].offset)
        except OSError as e:
            raise FormatError(f"{self.packs.path(lp)}: layer {layer} expert {first}: read failed ({e})") from None
        finally:
            self.io.done(started, size)
        for i in range(count):
            start = i * lp.stride
            payload = view[start : start + min(lp.payload, max(0, got - start))]
            if self.verify or len(payload) < lp.payload:  # a short read is always an error
                lp.check_block(self.packs.path(lp), first + i, payload)
            sink(first + i, payload)

    def close(self) -> None:
        for _ in self._workers:
            self._queue.put(None)
        for w in self._workers:
            w.join()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def measure_read_rate(packs: Packs, threads: int = DEFAULT_THREADS, seconds: float = 3.0, direct: bool = True,
                      seed: int = 0, span: int = 1) -> dict:
    """The device's read rate at the expert size: random single-expert reads (one per call, the layer's stride; `span`
    adjacent experts a call for a larger read) from every pack, on `threads` threads, for about `seconds`. The
    ceiling the streaming reader is held to."""
    layers = list(packs.layers.values())
    rng = random.Random(seed)
    fds = {lp.layer: open_uncached(packs.path(lp), direct) for lp in layers}
    stop = time.perf_counter() + seconds
    totals = IOCounters()

    def worker(wseed: int) -> None:
        r = random.Random(wseed)
        buf = staging(span * max(lp.stride for lp in layers))  # (the runtime's buffers: the same requests)
        while time.perf_counter() < stop:
            lp = r.choice(layers)
            p = r.randrange(lp.n_experts - span + 1)
            started = totals.start()
            os.preadv(fds[lp.layer][0], [buf[: span * lp.stride]], lp.experts[p].offset)
            totals.done(started, span * lp.stride)

    try:
        with ThreadPoolExecutor(max_workers=threads) as ex:
            for f in [ex.submit(worker, rng.random()) for _ in range(threads)]:
                f.result()
    finally:
        for fd, _ in fds.values():
            os.close(fd)
    return _rate(totals, threads, all(ok for _, ok in fds.values()), span * max(lp.stride for lp in layers))


def measure_burst_rate(packs: Packs, batch: float, gap_s: float, threads: int = DEFAULT_THREADS,
                       seconds: float = 3.0, direct: bool = True, seed: int = 0, span: int = 1) -> dict:
    """The device's read rate in a decode step's pattern, without a model: bursts of `batch` (on average) random
    experts of one layer handed at once to a `PackReader` like the runtime's (the same threads and merging, the
    waiting thread claiming reads too: the same reads in flight), waited for, then `gap_s` idle, as the forward
    pass computes between two layers' reads. Counted as the runtime counts (bytes over the time at least one read
    was in flight). A device whose first read after idling is slow (a VM's virtual disk) gives short bursts less
    than back-to-back reads. Not a strict ceiling: the gaps here are idle, and an idle CPU can take longer to
    notice a completion than one busy computing (measured on a 2-core VM: this probe came out below the runtime's
    own rate in the same pattern). `span` > 1: each burst's reads are runs of that many adjacent experts (one
    larger expert's read)."""
    layers = list(packs.layers.values())
    rng = random.Random(seed)
    stride = max(lp.stride for lp in layers)
    reader = PackReader(packs, threads, direct, keep=span * stride)
    stop = time.perf_counter() + seconds
    try:
        while time.perf_counter() < stop:
            lp = rng.choice(layers)
            k = min(int(batch) + (rng.random() < batch - int(batch)), lp.n_experts // span)
            firsts = sorted(span * i for i in rng.sample(range(lp.n_experts // span), k))
            runs = reader.runs(lp, firsts) if span == 1 else [(first, span) for first in firsts]
            finish([reader.submit(lp.layer, first, count, lambda p, payload: None) for first, count in runs])
            time.sleep(gap_s)
    finally:
        reader.close()
    return {**_rate(reader.io, threads, reader.direct, span * stride), "batch": batch, "gap_s": gap_s}


def read_shape(reads: int, summed_s: float, busy_s: float) -> dict:
    """What a read rate is made of: rate = bytes a read x reads in flight / time a read takes. The summed read time
    over the busy time is the average number in flight (the integral of in-flight reads over time is their summed
    durations)."""
    return {"ms_per_read": 1e3 * summed_s / reads if reads else 0.0,
            "reads_in_flight": summed_s / busy_s if busy_s else 0.0}


def _rate(totals: IOCounters, threads: int, direct: bool, read_bytes: int) -> dict:
    reads, nbytes, read_s, busy = totals.snapshot()
    return {
        "threads": threads,
        "direct": direct,
        "read_bytes": read_bytes,
        "reads": reads,
        "bytes": nbytes,
        "seconds": busy,
        "gb_per_s": nbytes / busy / 1e9 if busy else 0.0,
        **read_shape(reads, read_s, busy),
    }
