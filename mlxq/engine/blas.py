"""OpenBLAS's thread count for the engine's steps. Off Metal, MLX's CPU matmuls call the BLAS the process loaded
(OpenBLAS, preloaded on Linux); on a Mac that is Accelerate, and nothing here applies.

OpenBLAS splits a product of a few rows (a batched decode step: one row per request, or a row and its draft)
between its threads at about twice the CPU of one thread, and each product then waits for every thread to be
scheduled. Measured here (2 cores, shared): a 576x1536 product took 600-760 us of CPU at 4-8 rows on two threads
against 260-330 us on one; an 8-row SmolLM2 decode step took 419-1202 ms on two threads against 202-465 ms on one.
Longer products (16 rows and more, as in prefill) cost about the same CPU split as not, and finish sooner split
when a core is free: prefill runs on the thread count the process started with. So decode steps of more than one
row run on one thread.

One row (a matrix-vector product) is split at little extra CPU, and finishes sooner split only while the second
thread gets a core at once: on an idle machine the two counts run a SmolLM2 step about alike, on a busy one
(load ~7 on 2 cores) one thread ran 1.2-1.7x faster on 0.4-0.7 of the CPU. Which holds depends on the machine and its
load, so one-row steps run on whichever of the two has been faster lately (`Faster`), measured step by step.
"""

from __future__ import annotations

import ctypes
import functools
import statistics
import time
from collections import deque
from collections.abc import Callable


@functools.cache
def _openblas() -> tuple[ctypes._CFuncPtr | None, int]:
    """(openblas_set_num_threads or None, the thread count the process started with), read once: an engine made
    after another one set 1 thread must still know the process's own count."""
    lib = ctypes.CDLL(None)  # the libraries loaded so far, the preloaded BLAS among them
    set_, get = getattr(lib, "openblas_set_num_threads", None), getattr(lib, "openblas_get_num_threads", None)
    return set_, get() if set_ is not None and get is not None else 1


class Faster:
    """Of two settings, the one whose recent steps took less time (the median of each one's last `WINDOW`, since
    one step on a shared machine can take ten times the others). Until each has a window's worth they take
    turns; after that every `EXPLORE`th step runs the other one, so that its time stays current."""

    WINDOW, EXPLORE = 5, 16

    def __init__(self, options: tuple[int, int]) -> None:
        self.options = options
        self.times = {option: deque(maxlen=self.WINDOW) for option in options}
        self.steps = 0

    def pick(self) -> int:
        self.steps += 1
        if short := [o for o in self.options if len(self.times[o]) < self.WINDOW]:
            return min(short, key=lambda o: len(self.times[o]))
        best, other = sorted(self.options, key=lambda o: statistics.median(self.times[o]))
        return other if self.steps % self.EXPLORE == 0 else best

    def took(self, option: int, seconds: float) -> None:
        self.times[option].append(seconds)


class BlasThreads:
    """Sets OpenBLAS's thread count per step (a no-op when the process has not loaded OpenBLAS). The count is
    global to the process: the engine thread sets it before each step it runs. `clock`: what times one-row steps."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._set, self.default = _openblas()
        self.now: int | None = None  # unknown until this engine sets it (another may have changed it)
        self._clock = clock
        self.one_row = Faster((self.default, 1)) if self._set is not None and self.default > 1 else None
        self._timing: tuple[int, float] | None = None  # the running one-row step: (threads, start)

    def for_decode(self, rows: int) -> None:
        """Before a decode step that feeds `rows` tokens in all; `decoded` when it is done."""
        self._timing = None
        if rows > 1 or self.one_row is None:
            self._use(1 if rows > 1 else self.default)
            return
        threads = self.one_row.pick()
        self._use(threads)
        self._timing = (threads, self._clock())

    def decoded(self) -> None:
        """After a decode step (its tokens picked): a one-row step's time counts for the thread count it ran on."""
        if self._timing is not None:
            threads, start = self._timing
            self.one_row.took(threads, self._clock() - start)
            self._timing = None

    def for_prefill(self) -> None:
        self._use(self.default)

    def idle(self) -> None:
        """No step to run: the process's own count back, for whatever else it runs meanwhile (after a decode step of
        several rows it would stay on one thread)."""
        self._use(self.default)

    def _use(self, threads: int) -> None:
        if self._set is not None and threads != self.now:
            self._set(threads)
            self.now = threads
