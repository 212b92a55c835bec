"""glibc's allocator controls (mallopt, malloc_trim), and a Linux call Python's os module lacks (sync_file_range),
where this process runs on glibc."""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """glibc, or None on another system or C library (its allocator settings are glibc's own)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (a libc.so.6 without them is not glibc)
    except (OSError, AttributeError):
        return None
    return libc


SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writing the range's dirty pages out, without waiting for them
WRITE_BEHIND_BYTES = 16 << 20  # of a file written between starts of its write-out (`WriteBehind`)


def start_writeback(fd: int) -> bool:
    """Starts writing out the dirty pages of the file open as `fd` (Linux's sync_file_range), without waiting, so that
    the fsync that completes the file has less left to wait for; elsewhere nothing (macOS's fsync does not wait for
    the disk anyway). Whether it started (a failure only leaves the work to the fsync)."""
    libc = glibc()
    if libc is None:
        return False
    call = libc.sync_file_range
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return call(fd, 0, 0, SYNC_FILE_RANGE_WRITE) == 0  # offset 0, length 0: the whole file


class WriteBehind:
    """A file written front to back whose write-out starts every WRITE_BEHIND_BYTES (`start_writeback`): the fsync that
    completes it then waits for about its last part, not the whole (SmolLM2's Q2_K GGUF export: 25-32 ms -> 3-6 ms;
    a multi-gigabyte shard or expert pack: seconds)."""

    def __init__(self, fd: int):
        self.fd = fd
        self._started = 0  # where the file's data stood when its write-out last started

    def wrote(self, upto: int) -> None:
        """The file's data is written (or being written) up to byte `upto`."""
        if upto >= self._started + WRITE_BEHIND_BYTES:
            start_writeback(self.fd)
            self._started = upto
