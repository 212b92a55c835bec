"""What a failed fetch of a pinned test fixture means: only an unreachable registry may skip (and under CI=true
even that fails, see conftest.py); a checksum mismatch or a missing tool fails, with one line naming it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest

from mlxq.errors import ChecksumMismatch, DownloadError

T = TypeVar("T")


class MissingTool(RuntimeError):
    """A command-line tool a fixture needs is not installed (`make test` installs it)."""


def fetched(what: str, fetch: Callable[[], T]) -> T:
    """`fetch()`, with its failures turned into a test outcome that says which one it was."""
    try:
        return fetch()
    except (ChecksumMismatch, MissingTool) as e:
        failed, message = True, f"{what}: {e}"
    except DownloadError as e:
        failed, message = False, f"registry unreachable, cannot fetch {what}: {e}"
    # reported outside the except blocks: one line, not a chain of tracebacks
    if failed:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
