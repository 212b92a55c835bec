"""One exception tree. The CLI prints one line and exits 2; the server maps these to OpenAI errors."""

from __future__ import annotations


class MlxqError(Exception):
    """Base of every error mlxq raises on purpose. `str(err)` is one line meant for the user."""

    status = 400  # HTTP status the server answers with

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ModelNotFound(MlxqError):
    """A model name that names no local path, cached file or known alias."""

    status = 404


class FormatError(MlxqError):
    """A checkpoint file that is truncated, corrupt, or not what its extension says."""


class UnsupportedModel(MlxqError):
    """An architecture or tensor type mlxq does not implement."""


class ConfigError(MlxqError):
    """A config field that is missing or has a value we cannot use."""


class TokenizerError(MlxqError):
    """No usable tokenizer or chat template for a model."""


class InvalidRequest(MlxqError):
    """Bad arguments from the user: CLI options, API parameters, request bodies."""


class DownloadError(MlxqError):
    """A pinned file could not be fetched, or its checksum did not match."""

    status = 502


class ChecksumMismatch(DownloadError):
    """A pinned file (downloaded or cached) whose sha256 is not the pinned one: damaged or tampered with."""


class GenerationError(MlxqError):
    """Generation that cannot give a usable answer: empty content after a retry, a grammar left incomplete."""

    status = 500


class EngineDown(GenerationError):
    """The engine can no longer run its model: a member of a distributed group died or stopped answering. Every
    request fails with it; the server's /health reports the group degraded."""

    status = 503
