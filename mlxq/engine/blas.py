"""OpenBLAS's thread count for the engine's steps. Off Metal, MLX's CPU matmuls call the BLAS the process loaded
(OpenBLAS, preloaded on Linux); on a Mac that is Accelerate, and nothing here applies.

OpenBLAS splits a product of a few rows (a batched decode step: one row per request, or a row and its draft)
between its threads at about twice the CPU of one thread, and each product then waits for every thread to be
scheduled. Measured here (2 cores, shared): a 576x1536 product took 600-760 us of CPU at 4-8 rows on two threads
against 260-330 us on one; an 8-row SmolLM2 decode step took 419-1202 ms on two threads against 202-465 ms on one.
One row (a matrix-vector product) and longer products (16 rows and more, as in prefill) cost about the same CPU
split as not, and finish sooner split when a core is free. So decode steps of more than one row run on one
thread, and everything else on the thread count the process started with.
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _openblas() -> tuple[ctypes._CFuncPtr | None, int]:
    """(openblas_set_num_threads or None, the thread count the process started with), read once: an engine made
    after another one set 1 thread must still know the process's own count."""
    lib = ctypes.CDLL(None)  # the libraries loaded so far, the preloaded BLAS among them
    set_, get = getattr(lib, "openblas_set_num_threads", None), getattr(lib, "openblas_get_num_threads", None)
    return set_, get() if set_ is not None and get is not None else 1


class BlasThreads:
    """Sets OpenBLAS's thread count per step (a no-op when the process has not loaded OpenBLAS). The count is
    global to the process: the engine thread sets it before each step it runs."""

    def __init__(self) -> None:
        self._set, self.default = _openblas()
        self.now: int | None = None  # unknown until this engine sets it (another may have changed it)

    def for_decode(self, rows: int) -> None:
        """Before a decode step that feeds `rows` tokens in all."""
        self._use(1 if rows > 1 else self.default)

    def for_prefill(self) -> None:
        self._use(self.default)

    def _use(self, threads: int) -> None:
        if self._set is not None and threads != self.now:
            self._set(threads)
            self.now = threads
