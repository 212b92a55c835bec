"""A tiny random Qwen3.5 (Gated DeltaNet + gated attention layers, so caches that cannot rewind freely) with the
REAL Qwen3 tokenizer and chat template, for the engine and server tests.

    from fixtures_qwen3 import *  # noqa: F403  (the Qwen3 tokenizer fixture this one uses)
    from fixtures_qwen35 import *  # noqa: F403  (pytest fixture: hybrid_model)
"""

from __future__ import annotations

import pytest
from tiny import HYBRID_TEXT

__all__ = ["hybrid_model"]


@pytest.fixture(scope="session")
def hybrid_model(qwen3_tokenizer_dir, tmp_path_factory):
    """`mlxq.Model`: tiny random Qwen3.5 text model (three DeltaNet layers, one attention layer)."""
    import torch
    import transformers

    import mlxq

    assert hasattr(transformers, "Qwen3_5ForCausalLM"), f"transformers {transformers.__version__} has no Qwen3.5"
    path = tmp_path_factory.mktemp("tiny-qwen35")
    tok = transformers.AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))
    torch.manual_seed(0)
    config = transformers.Qwen3_5TextConfig(
        **{**HYBRID_TEXT, "vocab_size": len(tok), "max_position_embeddings": 2048},
        tie_word_embeddings=True,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
    )
    transformers.Qwen3_5ForCausalLM(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return mlxq.load(str(path))
