"""Model families, keyed by the HF `model_type` (one module per family)."""

from __future__ import annotations

import importlib
from typing import Any

import mlx.nn as nn

from mlxq.errors import UnsupportedModel

# model_type -> module under mlxq.models
REGISTRY: dict[str, str] = {
    "llama": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "qwen3_moe": "llama",
    "mixtral": "llama",
    "bitnet": "bitnet",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "qwen3_5": "qwen3_5",
    "qwen3_5_text": "qwen3_5",
    "qwen3_5_moe": "qwen3_5",
    "qwen3_5_moe_text": "qwen3_5",
    "qwen3_next": "qwen3_5",
}


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Multimodal wrappers nest the language model's config under `text_config`."""
    inner = config.get("text_config")
    if not inner:
        return config
    return {**{k: v for k, v in config.items() if k != "text_config"}, **inner}


def build_model(config: dict[str, Any]) -> nn.Module:
    config = text_config(config)
    model_type = config.get("model_type")
    if model_type not in REGISTRY:
        raise UnsupportedModel(
            f"config.json: model_type '{model_type}' is not supported (known: {', '.join(sorted(REGISTRY))})"
        )
    module = importlib.import_module(f"mlxq.models.{REGISTRY[model_type]}")
    return module.Model(config)
