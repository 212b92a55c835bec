"""Rows run together: one model call per step for every row of a batch, each row feeding its own number of
tokens (a prompt chunk, one decoded token, or later a speculative draft to verify).

A batch keeps per-layer caches that hold every row, left-aligned: row b holds `lengths[b]` tokens at positions
0 .. lengths[b] - 1. A step feeds row b `counts[b]` tokens, padded on the right to the longest, n. Each row
keeps its own position: rope rotates row b by its own offset (`cache.offset` is a [B] array), its new keys and
values are written at its own positions, and the attention mask lets query i of row b see keys up to
lengths[b] + i, so neither another row's length nor a padded key is ever seen. Padded queries compute garbage
that nobody reads, and the keys they write lie past the row's end, to be overwritten by its next tokens.

Recurrent layers (Gated DeltaNet) stack their per-row states along the batch axis. Padding must not reach
them: the cache tells the layer which positions are real (`make_mask`), the layer zeroes the decay and write
gates there (the state passes through unchanged), and the conv state is taken per row at its last real input.

The model code is unchanged by all this: layers ask their cache for `make_mask(n)`, `offset` and
`update_and_fetch` / `update`, as they do for a single sequence. Caches that can be neither stacked nor masked
(sliding windows) are run one row at a time by `SerialBatch`, behind the same interface.
"""

from __future__ import annotations

import mlx.core as mx

from mlxq.engine.cache import KVCache, RecurrentCache, buffer_positions, checkpoint, restore
from mlxq.models.base import CausalLM

_ON_METAL = mx.metal.is_available()


class Rows:
    """The token count of every row, shared by all layers of a batch (every layer has seen the same tokens),
    and what the layers need for the next step: offsets, attention mask and real positions, built once."""

    def __init__(self) -> None:
        self.lengths: list[int] = []
        self.ends: list[int] = []  # the positions each row reaches at most (0: unknown), which buffers may reserve
        self.counts: list[int] = []

    def positions(self, n: int) -> int:
        """Positions of KV buffers that hold `n` for these rows (`buffer_positions`, with the rows' reservation)."""
        return buffer_positions(n, 0 if 0 in self.ends else max(self.ends, default=0))

    def begin(self, counts: list[int]) -> None:
        """Prepares a step that feeds row b `counts[b]` (>= 1) tokens."""
        self.counts, n = counts, max(counts)
        self.width = max(self.lengths) + n  # key positions this step attends over (padded writes included)
        same_count = len(set(counts)) == 1
        if same_count and len(set(self.lengths)) == 1:
            # One row, or rows of one length taking one count: an int offset and a causal mask, as one sequence.
            self.offset, self.mask = self.lengths[0], "causal" if n > 1 else None
        else:
            self.offset = mx.array(self.lengths, dtype=mx.int32)
            query = self.offset[:, None] + mx.arange(n)[None]  # [B, n]: each query's absolute position
            self.mask = (mx.arange(self.width)[None, None] <= query[..., None])[:, None]  # [B, 1, n, width]
        self.real = None if same_count else mx.arange(n)[None] < mx.array(counts)[:, None]  # [B, n]

    def end(self) -> None:
        self.lengths = [length + n for length, n in zip(self.lengths, self.counts, strict=True)]


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
    out = mx.zeros((*x.shape[:2], size, x.shape[3]), x.dtype)
    out[:, :, : x.shape[2]] = x  # written into the new buffer: no padding array beside it (as a concatenation makes)
    return out


def _take_rows(x: mx.array | None, keep: list[int]) -> mx.array | None:
    return None if x is None or not keep else x[mx.array(keep)]


class BatchKVCache:
    """Keys and values of every row, [B, heads, capacity, head_dim]; row i holds `rows.lengths[i]` tokens."""

    def __init__(self, rows: Rows) -> None:
        self.rows = rows
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def offset(self) -> int | mx.array:
        return self.rows.offset

    def make_mask(self, n: int) -> mx.array | str | None:
        return self.rows.mask

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        width, n = self.rows.width, keys.shape[2]
        if self.keys is None:
            B, H, _, D = keys.shape
            self.keys = mx.zeros((B, H, self.rows.positions(width), D), keys.dtype)
            self.values = mx.zeros((B, H, self.rows.positions(width), values.shape[3]), values.dtype)
        elif width > self.keys.shape[2]:
            size = self.rows.positions(width)
            self.keys, self.values = _fit(self.keys, size), _fit(self.values, size)
        offset = self.rows.offset
        if isinstance(offset, int):  # rows of one length: one slice, written in place
            self.keys[:, :, offset : offset + n] = keys
            self.values[:, :, offset : offset + n] = values
        else:  # one scatter writes every row at its own positions (in place: the buffer has no other owner)
            where = (offset[:, None] + mx.arange(n)[None])[:, None, :, None]  # [B, 1, n, 1]
            self.keys = mx.put_along_axis(self.keys, where, keys, axis=2)
            self.values = mx.put_along_axis(self.values, where, values, axis=2)
        return self.keys[:, :, :width], self.values[:, :, :width]

    def add(self, row: KVCache) -> None:
        """Appends a single-row cache as the last row (call after `Rows.ends` grew, before `Rows.lengths` does)."""
        size = self.rows.positions(max([row.offset, *self.rows.lengths]) + 1)
        n_rows = len(self.rows.lengths)
        rk = None if row.keys is None or not row.offset else row.keys[:, :, : row.offset]
        rv = None if row.values is None or not row.offset else row.values[:, :, : row.offset]
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

    def checkpoint_row(self, i: int) -> int:
        return self.rows.lengths[i]  # KV entries past a position are never read

    def checkpoint_all(self) -> None:
        return None  # the row lengths are the whole checkpoint

    def restore_all(self, state: None) -> None:
        pass

    def remove(self, keep: list[int]) -> None:
        """Keeps only the rows `keep` (call after `Rows.lengths` shrank); the buffer shrinks to what they need."""
        size = self.rows.positions(max(self.rows.lengths, default=0) + 1)
        self.keys = _fit(_take_rows(self.keys, keep), size)
        self.values = _fit(_take_rows(self.values, keep), size)

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]


class BatchRecurrentCache:
    """A recurrent layer's conv and recurrent states for every row, stacked along the batch axis (the fields of
    `RecurrentCache`, for B rows)."""

    def __init__(self, rows: Rows) -> None:
        self.rows = rows
        self.conv: mx.array | None = None
        self.recurrent: mx.array | None = None

    @property
    def offset(self) -> int | mx.array:
        return self.rows.offset

    def make_mask(self, n: int) -> mx.array | None:
        return self.rows.real

    def update(self, window: mx.array, recurrent: mx.array, n: int) -> None:
        if self.rows.real is None:
            self.conv = window[:, n:]
        else:  # each row's conv state ends at its last real input, not at the padding
            keep = window.shape[1] - n
            at = mx.array(self.rows.counts)[:, None] + mx.arange(keep)[None]  # [B, kernel - 1]
            self.conv = mx.take_along_axis(window, at[..., None], axis=1)
        self.recurrent = recurrent

    def add(self, row: RecurrentCache) -> None:
        n_rows = len(self.rows.lengths)
        self.conv = _stack(self.conv, n_rows, row.conv, 1)
        self.recurrent = _stack(self.recurrent, n_rows, row.recurrent, 1)

    def _row_states(self, i: int) -> tuple[mx.array | None, mx.array | None]:
        conv = None if self.conv is None else mx.contiguous(self.conv[i : i + 1])
        rec = None if self.recurrent is None else mx.contiguous(self.recurrent[i : i + 1])
        return conv, rec

    def row(self, i: int) -> RecurrentCache:
        out = RecurrentCache()
        out.restore(self.checkpoint_row(i))
        return out

    def checkpoint_row(self, i: int) -> tuple:
        return (self.rows.lengths[i], *self._row_states(i))

    def checkpoint_all(self) -> tuple:
        return self.conv, self.recurrent

    def restore_all(self, state: tuple) -> None:
        self.conv, self.recurrent = state

    def remove(self, keep: list[int]) -> None:
        self.conv, self.recurrent = _take_rows(self.conv, keep), _take_rows(self.recurrent, keep)

    @property
    def state(self) -> list[mx.array]:
        return [a for a in (self.conv, self.recurrent) if a is not None]


def stackable(caches: list) -> bool:
    """Whether a model's caches can be batched by stacking rows (full attention and recurrent layers)."""
    return all(type(c) in (KVCache, RecurrentCache) for c in caches)


def pad_rows(tokens: list[list[int]]) -> mx.array:
    """Token rows of different lengths as one [B, n] array, padded on the right."""
    n = max(len(t) for t in tokens)
    return mx.array([t + [0] * (n - len(t)) for t in tokens], dtype=mx.uint32)


def gather_rows(x: mx.array, at: list[list[int]]) -> mx.array | None:
    """The hidden states [M, D] at the wanted positions `at[b]` of each row b of x [B, n, D] (None: no position)."""
    n = x.shape[1]
    flat = [b * n + i for b, positions in enumerate(at) for i in positions]
    if not flat:
        return None
    h = x.reshape(-1, x.shape[-1])
    return h[flat[0] : flat[0] + 1] if len(flat) == 1 else h[mx.array(flat)]


def _gather_logits(net: CausalLM, x: mx.array, at: list[list[int]]) -> mx.array:
    """Logits [M, V] at the wanted positions of hidden states x [B, n, D]: the head runs on those alone."""
    h = gather_rows(x, at)
    return mx.zeros((0, 0)) if h is None else net.head(net.norm(h))


def forward(net: CausalLM, tokens: mx.array, caches: list, at: list[list[int]],
            hidden: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """The model over `tokens` [B, n] with `caches`: the logits only at positions `at[b]` of each row b, and the last
    layer's output [B, n, D] (before the final norm). `hidden` [B, n, D]: what a draft model (`models.mtp`) reads
    alongside the tokens."""
    x = net.embed(tokens) if hidden is None else net.embed(tokens, hidden)
    for layer, cache in zip(net.layers, caches, strict=True):
        x = layer(x, cache)
    if not _ON_METAL:
        # MLX's CPU backend keeps the buffers the layers freed (their slices of dequantized weights) for reuse, but
        # the head (its slices of biases) is made of other shapes and reuses none of them: handed back before it, a
        # step holds one set at a time, not both (SmolLM2 at Q2_K: ~2 MB less through prefill and every token)
        mx.eval(x)
        mx.clear_cache()
    return _gather_logits(net, x, at), x


def pad_hidden(hidden: list[mx.array]) -> mx.array:
    """Rows of hidden states [n_b, D] as one [B, n, D] array, padded on the right (as `pad_rows` pads tokens)."""
    n = max(h.shape[0] for h in hidden)
    return mx.stack([h if h.shape[0] == n else mx.pad(h, [(0, n - h.shape[0]), (0, 0)]) for h in hidden])


class Batch:
    """Rows run together with one model call per step. Rows are numbered in the order they joined; removing
    one renumbers those after it."""

    def __init__(self, net: CausalLM) -> None:
        self.net = net
        self.rows = Rows()
        self.caches: list | None = None
        self.hidden: mx.array | None = None  # the last step's last-layer output [B, n, D] (see `forward`)

    def __len__(self) -> int:
        return len(self.rows.lengths)

    @property
    def lengths(self) -> list[int]:
        """Tokens in each row's cache."""
        return self.rows.lengths

    @property
    def state(self) -> list[mx.array]:
        """Every array the caches hold (to evaluate after a step)."""
        return [a for c in self.caches or [] for a in c.state]

    @property
    def positions(self) -> int:
        """Positions the KV buffers are sized for (0 before any): it changes whenever they are replaced."""
        return _kv_positions(self.caches or [])

    def add(self, cache: list, end: int = 0) -> None:
        """Single-row caches (one per layer, fresh or resumed) join as the last row. `end`: the positions the row
        reaches at most (0: unknown), which the KV buffers reserve when it is short (`buffer_positions`)."""
        if self.caches is None:
            self.caches = [
                BatchKVCache(self.rows) if isinstance(c, KVCache) else BatchRecurrentCache(self.rows) for c in cache
            ]
        self.rows.ends.append(end)
        for batch_cache, row in zip(self.caches, cache, strict=True):
            batch_cache.add(row)
        self.rows.lengths.append(cache[0].offset)

    def remove(self, i: int, *, keep_cache: bool = True) -> list | None:
        """Takes row i out; returns its cache as single-row caches when `keep_cache`."""
        out = [c.row(i) for c in self.caches] if keep_cache else None
        keep = [j for j in range(len(self)) if j != i]
        del self.rows.lengths[i], self.rows.ends[i]
        for c in self.caches:
            c.remove(keep)
        if out is not None:
            mx.eval([c.state for c in out])  # copy now, so the batch buffers are not shared at the next write
        return out

    def checkpoint(self, i: int) -> list:
        """Row i's state now, per layer, in the form a single-row cache's `checkpoint()` has."""
        states = [c.checkpoint_row(i) for c in self.caches]
        mx.eval([a for s in states if isinstance(s, tuple) for a in s[1:] if a is not None])
        return states

    def step(self, tokens: list[list[int]], at: list[list[int]], hidden: list[mx.array] | None = None) -> mx.array:
        """Feeds row b the tokens `tokens[b]` (at least one), and the hidden states `hidden[b]` [len(tokens[b]), D]
        to a draft model; returns the logits at positions `at[b]` of each row (indices into tokens[b]), stacked in
        row order: [sum of len(at[b]), V], lazy. The last layer's output stays in `self.hidden`."""
        self.rows.begin([len(t) for t in tokens])
        logits, self.hidden = forward(self.net, pad_rows(tokens), self.caches, at,
                                      None if hidden is None else pad_hidden(hidden))
        self.rows.end()
        return logits

    def snapshot(self) -> tuple:
        """The batch's state now, for `rewind`: the row lengths and the recurrent layers' states (references:
        their arrays are replaced, never written, by a step)."""
        return list(self.rows.lengths), [c.checkpoint_all() for c in self.caches]

    def rewind(self, snapshot: tuple, kept: list[list[int]]) -> None:
        """Back to `snapshot`, then holding `kept[b]` more tokens in row b: the first tokens fed since. KV entries
        past a row's length are never read, so attention only moves its lengths back; recurrent layers restore
        their states and run the kept tokens again."""
        if all(isinstance(c, BatchKVCache) for c in self.caches):
            self.rows.lengths = [n + len(k) for n, k in zip(snapshot[0], kept, strict=True)]
            return
        self.restore(snapshot)
        self.step(kept, [[]] * len(kept))
        mx.eval(self.state)

    def restore(self, snapshot: tuple) -> None:
        """Back to `snapshot`, every layer (the first half of `rewind` where its kept tokens run elsewhere)."""
        lengths, states = snapshot
        self.rows.lengths = list(lengths)
        for c, state in zip(self.caches, states, strict=True):
            c.restore_all(state)


class SerialBatch:
    """The same interface for caches that cannot be stacked: every row steps alone with its own cache."""

    def __init__(self, net: CausalLM) -> None:
        self.net = net
        self.caches: list[list] = []

    def __len__(self) -> int:
        return len(self.caches)

    @property
    def lengths(self) -> list[int]:
        return [c[0].offset for c in self.caches]

    @property
    def state(self) -> list[mx.array]:
        return [a for cache in self.caches for c in cache for a in c.state]

    @property
    def positions(self) -> int:
        """`Batch.positions`, over every row's own buffers."""
        return sum(_kv_positions(c) for c in self.caches)

    def add(self, cache: list, end: int = 0) -> None:
        self.caches.append(cache)  # each row's own caches grow as one sequence's: `end` is not used

    def remove(self, i: int, *, keep_cache: bool = True) -> list | None:
        cache = self.caches.pop(i)
        return cache if keep_cache else None

    def checkpoint(self, i: int) -> list:
        return [c.checkpoint() for c in self.caches[i]]

    def snapshot(self) -> list:
        return [checkpoint(c) for c in self.caches]

    def rewind(self, snapshot: list, kept: list[list[int]]) -> None:
        """Back to `snapshot`, then every row runs its kept tokens again (a sliding window cannot drop tokens)."""
        for cache, state in zip(self.caches, snapshot, strict=True):
            restore(cache, state)
        self.step(kept, [[]] * len(kept))
        mx.eval(self.state)

    def step(self, tokens: list[list[int]], at: list[list[int]]) -> mx.array:
        rows = [forward(self.net, pad_rows([t]), c, [a])[0] for t, c, a in zip(tokens, self.caches, at, strict=True)]
        rows = [r for r, a in zip(rows, at, strict=True) if a]
        return mx.concatenate(rows, axis=0) if rows else mx.zeros((0, 0))


def _kv_positions(caches: list) -> int:
    """Positions the growing KV buffers among one row's (or one batch's) layer caches are sized for (0 before any)."""
    return max((c.keys.shape[2] for c in caches if isinstance(c, (KVCache, BatchKVCache)) and c.keys is not None),
               default=0)


def make_batch(net: CausalLM) -> Batch | SerialBatch:
    return Batch(net) if stackable(net.make_cache()) else SerialBatch(net)
