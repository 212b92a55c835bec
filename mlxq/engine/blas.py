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


class BlasThreads:
    """Sets OpenBLAS's thread count per step (a no-op when the process has not loaded OpenBLAS). The count is
    global to the process: the engine thread sets it before each step it runs."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(None)  # the libraries loaded so far, the preloaded BLAS among them
        self._set = getattr(lib, "openblas_set_num_threads", None)
        get = getattr(lib, "openblas_get_num_threads", None)
        self.default = self.now = get() if self._set is not None and get is not None else 1

    def for_decode(self, rows: int) -> None:
        """Before a decode step that feeds `rows` tokens in all."""
        self._use(1 if rows > 1 else self.default)

    def for_prefill(self) -> None:
        self._use(self.default)

    def _use(self, threads: int) -> None:
        if self._set is not None and threads != self.now:
            self._set(threads)
            self.now = threads
