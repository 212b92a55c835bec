"""Arrays cut into blocks of rows that can be joined again without a copy.

A reader that knows which tensors a model will fuse (q/k/v, gate/up) makes them as one array and hands out its
row blocks (`cut_rows`); the model's fusion joins them (`joined_rows`) and gets that array back, instead of
allocating a new one and copying every part into it (at load, that copy was a tenth of the weights' page faults).
"""

from __future__ import annotations

import weakref

import mlx.core as mx


class _Whole:
    """The array some parts were cut from, kept while any of them lives (they share its memory anyway)."""

    def __init__(self, array: mx.array, parts: int):
        self.array, self.parts = array, parts


# id(part) -> (a weak reference to the part, its index, what it was cut from); an entry goes with its part
_CUTS: dict[int, tuple[weakref.ref, int, _Whole]] = {}


def cut_rows(whole: mx.array, sizes: list[int]) -> list[mx.array]:
    """`whole` [sum(sizes), ...] as its blocks of `sizes` rows (slices: no copy), remembered as its parts."""
    if sum(sizes) != whole.shape[0]:
        raise ValueError(f"cut_rows: {sizes} rows do not make {whole.shape[0]}")
    holder, parts, start = _Whole(whole, len(sizes)), [], 0
    for i, n in enumerate(sizes):
        part = whole[start : start + n]
        start += n
        key = id(part)
        _CUTS[key] = (weakref.ref(part, lambda _, key=key: _CUTS.pop(key, None)), i, holder)
        parts.append(part)
    return parts


def joined_rows(parts: list[mx.array]) -> mx.array:
    """`parts` concatenated along their rows: the very array they were cut from when they are all its parts, in
    order (no copy), else a new one."""
    hits = [_CUTS.get(id(p)) for p in parts]
    if all(h is not None and h[0]() is p for h, p in zip(hits, parts, strict=True)):
        holder = hits[0][2]
        if len(parts) == holder.parts and all(h[2] is holder and h[1] == i for i, h in enumerate(hits)):
            return holder.array
    return mx.concatenate(parts, axis=0)
