"""`ollama:NAME[:TAG]` -> the GGUF blob in a local Ollama store (read-only; Ollama itself is not needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlxq.errors import FormatError, ModelNotFound

MODEL_LAYER = "application/vnd.ollama.image.model"


def ollama_root() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def resolve_ollama(name: str) -> Path:
    """Ollama keeps a manifest per name and tag; its model layer is a GGUF file stored by digest."""
    base, _, tag = name.partition(":")
    repo = base if "/" in base else f"library/{base}"
    root = ollama_root()
    manifest = root / "manifests" / "registry.ollama.ai" / repo / (tag or "latest")
    if not manifest.exists():
        raise ModelNotFound(f"ollama:{name}: no manifest at {manifest} (pull it with Ollama first)")
    try:
        layers = json.loads(manifest.read_text())["layers"]
        digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == MODEL_LAYER)
    except (ValueError, KeyError, StopIteration, TypeError):
        raise FormatError(f"{manifest}: no model layer in the Ollama manifest") from None
    blob = root / "blobs" / digest.replace(":", "-")
    if not blob.exists():
        raise ModelNotFound(f"ollama:{name}: blob {blob} is missing")
    return blob
