"""Per-layer caches behind one interface.

Every cache knows its token position (`offset`), builds the attention mask for the next chunk, and can
`checkpoint()` its state at the current position and `restore()` it later: the server's prompt cache
and speculative decoding rewind through that, for attention and recurrent layers alike.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

_STEP = 256  # grow KV buffers in blocks, so decode writes in place instead of concatenating
_SHORT_STEP = 32  # the blocks of a short request's buffers
_FIRST = 16  # the smallest buffer


def buffer_positions(n: int, reserved: int = 0) -> int:
    """Positions a KV buffer holding `n` is given: `_FIRST`, then blocks of `_SHORT_STEP` up to `_STEP` (a short
    request holds little more than its tokens: SmolLM2's 74 take 4.2 MB as 96, not 5.6 as 128 or 11.3 as 256; the
    copies each growth makes add up to about four times the last buffer), then whole blocks of `_STEP`.
    `reserved`: the positions its rows reach at most (0: unknown). When that is at least `n` and no more than `_STEP`,
    the buffer gets exactly that, and never grows: a growth holds the old buffers and the new at once (SmolLM2's
    3.3 MB for 74 tokens, not 4.2 MB as 96 after 2.8 MB as 64)."""
    if n <= reserved <= _STEP:
        return reserved
    if n <= _FIRST:
        return _FIRST
    step = _SHORT_STEP if n <= _STEP else _STEP
    return (n + step - 1) // step * step


class KVCache:
    """Growing key/value buffers for a full-attention layer; arrays are [B, heads, tokens, head_dim]."""

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        end = self.offset + n
        if self.keys is None or end > self.keys.shape[2]:
            self._grow(keys, values, end)
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def _grow(self, keys: mx.array, values: mx.array, end: int) -> None:
        size = buffer_positions(end)
        B, H, _, Dk = keys.shape
        new_k = mx.zeros((B, H, size, Dk), keys.dtype)
        new_v = mx.zeros((B, H, size, values.shape[3]), values.dtype)
        if self.keys is not None and self.offset:
            new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_k, new_v

    def make_mask(self, n: int) -> mx.array | str | None:
        """Mask for `n` new queries against everything cached so far plus themselves."""
        return "causal" if n > 1 else None

    # KV entries past a position are never read, so a position is a complete checkpoint.
    def checkpoint(self) -> Any:
        return self.offset

    def restore(self, state: Any) -> None:
        self.offset = state

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return (self.keys.nbytes + self.values.nbytes) * self.offset // self.keys.shape[2]

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]


class RotatingKVCache:
    """Sliding-window attention: keeps the last `window` tokens in a ring buffer."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.keys: mx.array | None = None  # chronological, at most window + chunk - 1 tokens
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        # Keep the simple chronological layout: the chunk attends to the (window - 1) tokens before it,
        # and after the step only the last (window - 1) stay, which is all the next token can see.
        if self.keys is None:
            all_k, all_v = keys, values
        else:
            all_k = mx.concatenate([self.keys, keys], axis=2)
            all_v = mx.concatenate([self.values, values], axis=2)
        self.offset += keys.shape[2]
        self._n_queries = keys.shape[2]
        self.keys = all_k[..., -(self.window - 1) :, :] if self.window > 1 else all_k[..., :0, :]
        self.values = all_v[..., -(self.window - 1) :, :] if self.window > 1 else all_v[..., :0, :]
        return all_k, all_v

    def make_mask(self, n: int) -> mx.array | None:
        """Causal and windowed: query i (absolute p) sees keys in (p - window, p]."""
        cached = 0 if self.keys is None else self.keys.shape[2]
        total = cached + n
        q_pos = mx.arange(self.offset, self.offset + n)[:, None]
        k_pos = mx.arange(self.offset - cached, self.offset - cached + total)[None, :]
        return (k_pos <= q_pos) & (k_pos > q_pos - self.window)

    def checkpoint(self) -> Any:
        return (self.offset, self.keys, self.values)  # arrays are immutable: no copy needed

    def restore(self, state: Any) -> None:
        self.offset, self.keys, self.values = state

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]


class RecurrentCache:
    """A recurrent layer (Gated DeltaNet): the last (kernel - 1) inputs of its causal conv, [B, kernel - 1,
    channels], and its recurrent state, [B, heads, Dv, Dk] in float32. Both are small and fixed-size, and
    are replaced (never written in place) on every update, so a checkpoint is just the references."""

    def __init__(self) -> None:
        self.conv: mx.array | None = None
        self.recurrent: mx.array | None = None
        self.offset = 0

    def update(self, window: mx.array, recurrent: mx.array, n: int) -> None:
        """Stores the states after `n` more tokens; `window` is the conv's input over them, [B, kernel - 1 + n,
        channels] (the previous conv state, then the n new inputs), whose last kernel - 1 rows are the new
        conv state."""
        self.conv, self.recurrent = window[:, n:], recurrent
        self.offset += n

    def make_mask(self, n: int) -> mx.array | None:
        """Which of the `n` new positions hold real tokens, [B, n], or None when all do (see batch.py)."""
        return None

    def checkpoint(self) -> Any:
        return (self.offset, self.conv, self.recurrent)

    def restore(self, state: Any) -> None:
        self.offset, self.conv, self.recurrent = state

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)

    @property
    def state(self) -> list[mx.array]:
        return [a for a in (self.conv, self.recurrent) if a is not None]


def checkpoint(caches: list) -> list:
    """Snapshot every layer's cache at the current position."""
    return [c.checkpoint() for c in caches]


def restore(caches: list, states: list) -> None:
    for c, s in zip(caches, states, strict=True):
        c.restore(s)
