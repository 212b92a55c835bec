"""Model names to opened checkpoints: local dirs, GGUF files, short aliases, `ollama:NAME`, hub ids."""

from __future__ import annotations

from pathlib import Path

from mlxq.errors import FormatError, ModelNotFound
from mlxq.formats.base import Checkpoint, TensorInfo, TensorSource
from mlxq.formats.fetch import ALIASES, DEFAULT_MODEL, fetch

__all__ = ["Checkpoint", "TensorInfo", "TensorSource", "open_checkpoint", "resolve", "DEFAULT_MODEL"]


def resolve(name: str | None) -> Path:
    """The local path a model name stands for, fetching pinned or hub files when needed."""
    name = name or DEFAULT_MODEL
    if name in ALIASES:
        return fetch(ALIASES[name])
    if name.startswith("ollama:"):
        from mlxq.formats.ollama import resolve_ollama

        return resolve_ollama(name.removeprefix("ollama:"))
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return _hub(name)
    raise ModelNotFound(f"{name}: no such file or directory, and not a known model name")


def _hub(repo_id: str) -> Path:
    """A hub repo through huggingface-hub's cache; an already cached copy works offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        why = type(e).__name__
        raise ModelNotFound(f"{repo_id}: not cached and cannot be downloaded from the hub ({why})") from None


def open_checkpoint(name: str | None, keep_quantized: bool = False) -> Checkpoint:
    """The checkpoint `name` stands for, its config checked against its tensors (`validate.check_config`)."""
    from mlxq.formats.validate import check_config

    path = resolve(name)
    if path.is_dir():
        from mlxq.formats.hf import open_hf_dir

        ckpt = open_hf_dir(path)
    elif path.suffix == ".gguf" or _is_gguf(path):
        from mlxq.formats.gguf import open_gguf

        ckpt = open_gguf(path, keep_quantized=keep_quantized)
    else:
        raise ModelNotFound(f"{path}: not a model directory or a GGUF file")
    check_config(ckpt)
    return ckpt


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
