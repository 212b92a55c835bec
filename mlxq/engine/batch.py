"""Continuous batching: the sequences being decoded advance together, one model call per step.

Each sequence is prefilled alone into ordinary single-row caches (see `scheduler.py`) and then joins a batch,
whose per-layer caches hold every row. Rows have different lengths, so each row keeps its own position: rope
rotates each row by its own offset (`cache.offset` is a [B] array), the row's new key and value are written at
that position, and a per-row mask hides the unused tail of the shorter rows. The model code is unchanged: the
attention layers only ask their cache for `make_mask(n)`, `offset` and `update_and_fetch`. Rows join and leave
between steps; leaving copies out a row's cache, so a finished sequence can go to the prompt cache.

Recurrent layers (Gated DeltaNet) need nothing more: their per-row states are stacked along the batch axis.
Caches that can be neither (sliding windows) are stepped one row at a time by `SerialBatch`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlxq.engine.cache import KVCache, RecurrentCache

_STEP = 256  # KV buffers grow and shrink in blocks of this many positions


def _round_up(n: int) -> int:
    return (n + _STEP - 1) // _STEP * _STEP


class Rows:
    """The token count of every row, shared by all layers of a batch (every layer has seen the same tokens),
    and what the attention layers need from it for the next step: offsets and mask, built once per step."""

    def __init__(self) -> None:
        self.lengths: list[int] = []
        self._update()

    def _update(self) -> None:
        self.offsets = mx.array(self.lengths, dtype=mx.int32)  # where each row's next token goes
        self.width = max(self.lengths, default=-1) + 1  # key positions the next step attends over
        visible = mx.arange(self.width)[None, :] <= self.offsets[:, None]  # [B, width]
        self.mask = visible[:, None, None, :]  # [B, 1, 1, width]: broadcasts over heads and the one query

    def add(self, length: int) -> None:
        self.lengths.append(length)
        self._update()

    def remove(self, i: int) -> None:
        del self.lengths[i]
        self._update()

    def advance(self) -> None:
        self.lengths = [n + 1 for n in self.lengths]
        self._update()


def _stack(a: mx.array | None, rows_a: int, b: mx.array | None, rows_b: int) -> mx.array | None:
    """`a` (rows_a rows) on top of `b` along the batch axis; None stands for rows that are still zero."""
    if a is None and b is None:
        return None
    if a is None:
        a = mx.zeros((rows_a, *b.shape[1:]), b.dtype)
    if b is None:
        b = mx.zeros((rows_b, *a.shape[1:]), a.dtype)
    return mx.concatenate([a, b], axis=0) if rows_a else b


def _fit(x: mx.array | None, size: int) -> mx.array | None:
    """`x` [B, H, T, D] cut or zero-padded to `size` positions."""
    if x is None or x.shape[2] == size:
        return x
    if x.shape[2] > size:
        return x[:, :, :size]
    pad = mx.zeros((*x.shape[:2], size - x.shape[2], x.shape[3]), x.dtype)
    return mx.concatenate([x, pad], axis=2)


def _take_rows(x: mx.array | None, keep: list[int]) -> mx.array | None:
    return None if x is None or not keep else x[mx.array(keep)]


class BatchKVCache:
    """Keys and values of every row, [B, heads, capacity, head_dim]; row i holds `rows.lengths[i]` tokens."""

    def __init__(self, rows: Rows) -> None:
        self.rows = rows
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def offset(self) -> mx.array:
        return self.rows.offsets

    def make_mask(self, n: int) -> mx.array:
        if n != 1:
            raise ValueError("a batched cache takes one token per row per step (prefill rows alone)")
        return self.rows.mask

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        width = self.rows.width
        if self.keys is None:
            B, H, _, D = keys.shape
            self.keys = mx.zeros((B, H, _round_up(width), D), keys.dtype)
            self.values = mx.zeros((B, H, _round_up(width), values.shape[3]), values.dtype)
        elif width > self.keys.shape[2]:
            self.keys, self.values = _fit(self.keys, _round_up(width)), _fit(self.values, _round_up(width))
        # One scatter per step writes every row at its own position (in place: the buffer has no other owner).
        where = self.rows.offsets.reshape(-1, 1, 1, 1)
        self.keys = mx.put_along_axis(self.keys, where, keys, axis=2)
        self.values = mx.put_along_axis(self.values, where, values, axis=2)
        return self.keys[:, :, :width], self.values[:, :, :width]

    def add(self, row: KVCache) -> None:
        """Appends a single-row cache as the last row (call before `rows.add`)."""
        size = _round_up(max(self.rows.width, row.offset + 1))
        n_rows = len(self.rows.lengths)
        rk = None if row.keys is None else row.keys[:, :, : row.offset]
        rv = None if row.values is None else row.values[:, :, : row.offset]
        self.keys = _stack(_fit(self.keys, size), n_rows, _fit(rk, size), 1)
        self.values = _stack(_fit(self.values, size), n_rows, _fit(rv, size), 1)

    def row(self, i: int) -> KVCache:
        """Row i as a single-row cache of its own (a copy, so it does not keep the batch buffer alive)."""
        out, n = KVCache(), self.rows.lengths[i]
        if self.keys is not None and n:
            out.keys = mx.contiguous(self.keys[i : i + 1, :, :n])
            out.values = mx.contiguous(self.values[i : i + 1, :, :n])
            out.offset = n
        return out

    def remove(self, keep: list[int]) -> None:
        """Keeps only the rows `keep` (call after `rows.remove`); the buffer shrinks to what they need."""
        size = _round_up(self.rows.width)
        self.keys = _fit(_take_rows(self.keys, keep), size)
        self.values = _fit(_take_rows(self.values, keep), size)

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]


class BatchRecurrentCache(RecurrentCache):
    """A recurrent layer's conv and recurrent states for every row, stacked along the batch axis."""

    def __init__(self, rows: Rows) -> None:
        super().__init__()
        self.rows = rows

    def add(self, row: RecurrentCache) -> None:
        n_rows = len(self.rows.lengths)
        self.conv = _stack(self.conv, n_rows, row.conv, 1)
        self.recurrent = _stack(self.recurrent, n_rows, row.recurrent, 1)

    def row(self, i: int) -> RecurrentCache:
        out = RecurrentCache()
        n = self.rows.lengths[i]
        conv = None if self.conv is None else mx.contiguous(self.conv[i : i + 1])
        rec = None if self.recurrent is None else mx.contiguous(self.recurrent[i : i + 1])
        out.restore((n, conv, rec))
        return out

    def remove(self, keep: list[int]) -> None:
        self.conv, self.recurrent = _take_rows(self.conv, keep), _take_rows(self.recurrent, keep)


def stackable(caches: list) -> bool:
    """Whether a model's caches can be batched by stacking rows (full attention and recurrent layers)."""
    return all(type(c) in (KVCache, RecurrentCache) for c in caches)


class Batch:
    """Rows decoded together with one model call per step. Rows are numbered in the order they joined; removing
    one renumbers those after it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.rows = Rows()
        self.caches: list | None = None

    def __len__(self) -> int:
        return len(self.rows.lengths)

    def add(self, cache: list) -> None:
        """A prefilled single-row cache (one per layer) joins as the last row."""
        if self.caches is None:
            self.caches = [
                BatchKVCache(self.rows) if isinstance(c, KVCache) else BatchRecurrentCache(self.rows) for c in cache
            ]
        for batch_cache, row in zip(self.caches, cache, strict=True):
            batch_cache.add(row)
        self.rows.add(cache[0].offset)

    def remove(self, i: int, *, keep_cache: bool = True) -> list | None:
        """Takes row i out; returns its cache as single-row caches when `keep_cache`."""
        out = [c.row(i) for c in self.caches] if keep_cache else None
        keep = [j for j in range(len(self)) if j != i]
        self.rows.remove(i)
        for c in self.caches:
            c.remove(keep)
        if out is not None:
            mx.eval([c.state for c in out])  # copy now, so the batch buffers are not shared at the next write
        return out

    def step(self, tokens: list[int]) -> mx.array:
        """Feeds one token per row; returns the next-token logits [B, V] (lazy)."""
        logits = self.model(mx.array(tokens, dtype=mx.uint32)[:, None], self.caches)[:, -1, :]
        self.rows.advance()
        return logits


class SerialBatch:
    """The same interface for caches that cannot be stacked: every row steps alone with its own cache."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.caches: list[list] = []

    def __len__(self) -> int:
        return len(self.caches)

    def add(self, cache: list) -> None:
        self.caches.append(cache)

    def remove(self, i: int, *, keep_cache: bool = True) -> list | None:
        cache = self.caches.pop(i)
        return cache if keep_cache else None

    def step(self, tokens: list[int]) -> mx.array:
        rows = [
            self.model(mx.array([[t]], dtype=mx.uint32), c)[:, -1, :] for t, c in zip(tokens, self.caches, strict=True)
        ]
        return mx.concatenate(rows, axis=0)


def make_batch(model: nn.Module) -> Batch | SerialBatch:
    return Batch(model) if stackable(model.make_cache()) else SerialBatch(model)
