"""Multi-token prediction (Qwen3.5 / Qwen3-Next `mtp.*`): a one-layer model trained to guess the token after next,
which makes speculative drafts (`mlxq.engine.speculative`).

At position t it reads the hidden state the main model's head reads there (after the final norm, as vLLM feeds
it) and the embedding of token t + 1, normalises each, concatenates them (embedding first), projects them back to
the hidden size (`fc`), runs its own full-attention decoder layer(s) with their own KV cache, the final `norm`,
and the main model's head: logits for token t + 2. Its normed output is the hidden state of its next step, so it
drafts several tokens by feeding itself. All its norms are zero-centred in HF checkpoints (the family's `sanitize`
adds the 1), and its layer routes to experts in MoE checkpoints like the network's own layers.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlxq.engine.cache import KVCache
from mlxq.models.layers import Linear


class MTP(nn.Module):
    """The checkpoint's `mtp.*` tensors; `layers` are the family's decoder blocks, called as `layer(x, cache)`."""

    def __init__(self, hidden: int, eps: float, layers: list[nn.Module]):
        super().__init__()
        self.pre_fc_norm_embedding = nn.RMSNorm(hidden, eps=eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(hidden, eps=eps)
        self.fc = Linear(2 * hidden, hidden, bias=False)
        self.layers = layers
        self.norm = nn.RMSNorm(hidden, eps=eps)

    def combine(self, embedded: mx.array, hidden: mx.array) -> mx.array:
        """The layers' input from the embeddings of tokens t + 1 and the hidden states at t, both [B, n, hidden]."""
        both = [self.pre_fc_norm_embedding(embedded), self.pre_fc_norm_hidden(hidden)]
        return self.fc(mx.concatenate(both, axis=-1))


class MTPDraft:
    """The MTP head with the main model's embedding and head, in the parts the engine's batches run a model by
    (`mlxq.models.base`), `embed` taking the hidden states alongside the tokens. Not a module: it shares `net`'s
    weights without becoming their second owner."""

    def __init__(self, net: nn.Module):
        self.net, self.mtp = net, net.mtp

    @property
    def layers(self) -> list[nn.Module]:
        return self.mtp.layers

    @property
    def norm(self) -> nn.Module:
        return self.mtp.norm

    def embed(self, tokens: mx.array, hidden: mx.array) -> mx.array:
        return self.mtp.combine(self.net.embed(tokens), hidden)

    def head(self, x: mx.array) -> mx.array:
        return self.net.head(x)

    def make_cache(self) -> list:
        return [KVCache() for _ in self.mtp.layers]
