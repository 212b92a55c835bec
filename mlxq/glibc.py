"""glibc's allocator controls (mallopt, malloc_trim), where this process runs on glibc."""

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
