"""The contract every model family satisfies, and the one forward pass they share.

The engine and calibration drive a network through these parts, not through `__call__` alone: the engine
runs the layers over a batch of ragged rows and applies the head only to the positions it samples from
(a prompt chunk needs no logits but its last); calibration runs one decoder layer at a time.

    x = embed(tokens)                         [B, L] -> [B, L, hidden]
    x = layer(x, cache) for each of layers    one cache per layer, as make_cache() gives them
    logits = head(norm(x))                    [.., hidden] -> [.., vocab]
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class CausalLM(nn.Module):
    """A decoder-only language model. Families keep HF's module layout (`model.embed_tokens`, `model.layers`,
    `model.norm`, optional `lm_head`), which is what their weights are named after; they override `embed`
    and `head` where the family differs (Gemma's embedding scale and logit soft-cap) and give `make_cache`."""

    @property
    def layers(self) -> list[nn.Module]:
        """The decoder layers, each called as `layer(x, cache)`."""
        return self.model.layers

    @property
    def norm(self) -> nn.Module:
        """The final norm, applied before the head."""
        return self.model.norm

    def embed(self, tokens: mx.array) -> mx.array:
        return self.model.embed_tokens(tokens)

    def head(self, x: mx.array) -> mx.array:
        """Logits of normed hidden states: `lm_head`, or the tied embedding matrix."""
        if "lm_head" in self:
            return self.lm_head(x)
        return self.model.embed_tokens.as_linear(x)

    def make_cache(self) -> list:
        """Fresh caches, one per layer (`mlxq.engine.cache`)."""
        raise NotImplementedError

    def __call__(self, tokens: mx.array, cache: list) -> mx.array:
        x = self.embed(tokens)
        for layer, c in zip(self.layers, cache, strict=True):
            x = layer(x, c)
        return self.head(self.norm(x))
