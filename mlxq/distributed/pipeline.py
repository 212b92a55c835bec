"""Pipeline parallel: each rank runs a contiguous range of layers. Rank 0 embeds the tokens and runs its layers,
each rank sends its output to the next (`mx.distributed.send` / `recv`), and the last sends back the hidden states
of the positions the step samples from, which rank 0 turns into logits (it holds the final norm and the head).

A model with an MTP head (`models.mtp`) keeps it on rank 0, beside the embedding and head it shares; it reads the
hidden state at every position fed (a prompt's whole, which it caches), so the last rank then sends back every
position's, as much as every other hop carries, and rank 0 keeps them as the batch's `hidden`.

Rows run in micro-batches that go down the pipeline one after another: while rank 1 runs the first, rank 0 runs
the second. With m micro-batches over n ranks a step keeps each rank busy m / (m + n - 1) of the time instead of
1 / n. Each micro-batch is a `Batch` of its own (its rows' caches stacked); `PipelineBatch` gives the runner the
interface of one batch over all of them. A stream runs its work in the order it is queued, so each micro-batch's
part of the step is queued (`mx.async_eval`) before the next is built, and rank 0 waits for the first result only
once every micro-batch is on its way. Every send and receive is queued that way, one by one: within one graph MLX
may run two of them in either order, and the bytes of two messages would then land in each other's place.
"""

from __future__ import annotations

import copy

import mlx.core as mx
import mlx.nn as nn

from mlxq.distributed.split import mtp_head
from mlxq.engine.batch import Batch, gather_rows, pad_rows
from mlxq.models.base import CausalLM


class Stage(CausalLM):
    """One rank's layers of a pipeline, behind the `CausalLM` contract: rank 0's `embed` is the embedding, the
    others' receives the previous rank's output; rank 0 alone has the final norm and the head."""

    def __init__(self, net: CausalLM, cache_template: list, rank: int, size: int, group, rewindable: bool,
                 returns_hidden: bool = False):
        super().__init__()
        self.net = net
        self.rank, self.size, self._group = rank, size, group
        self._template = cache_template
        self.rewindable = rewindable  # whether every layer of the whole model resumes anywhere (not only these)
        self.returns_hidden = returns_hidden  # the last rank sends back every position (rank 0 has an MTP head)
        self.hidden = net.args.hidden_size
        self.dtype = net.layers[0].input_layernorm.weight.dtype  # of the activations: the weights' load dtype

    @property
    def layers(self) -> list[nn.Module]:
        return self.net.layers

    @property
    def norm(self):
        return self.net.norm

    @property
    def mtp(self) -> nn.Module | None:
        return mtp_head(self.net)

    def embed(self, tokens: mx.array) -> mx.array:
        """The input of this rank's first layer: the embedding on rank 0, else what the previous rank sent."""
        if self.rank == 0:
            return self.net.embed(tokens)
        return mx.distributed.recv((*tokens.shape, self.hidden), self.dtype, self.rank - 1, group=self._group)

    def head(self, x: mx.array) -> mx.array:
        return self.net.head(x)

    def forward_out(self, x: mx.array, at: list[list[int]]) -> mx.array:
        """What this rank does with its last layer's output: send it on, or (the last rank) send the hidden states of
        the positions `at` back to rank 0. The returned array is evaluated to run it."""
        if self.rank < self.size - 1:
            return mx.distributed.send(x, self.rank + 1, group=self._group)
        h = x if self.returns_hidden else gather_rows(x, at)
        return x if h is None else mx.distributed.send(h, 0, group=self._group)

    def back(self, shape: tuple[int, ...]) -> mx.array:
        """On rank 0: the hidden states the last rank sends back ([n, D] at the positions asked for, or [rows, n, D]
        for every position)."""
        return mx.distributed.recv((*shape, self.hidden), self.dtype, self.size - 1, group=self._group)

    def logits(self, h: mx.array) -> mx.array:
        return self.net.head(self.net.norm(h))

    def make_cache(self) -> list:
        return copy.deepcopy(self._template)

    def make_batch(self) -> PipelineBatch:
        return PipelineBatch(self, micro=self.size)


class PipelineBatch:
    """Rows in `micro` micro-batches (a new row joins the smallest), with the interface of one `Batch`: rows are
    numbered in the order they joined, whichever micro-batch holds them."""

    def __init__(self, stage: Stage, micro: int):
        self.stage = stage
        self.parts = [Batch(stage) for _ in range(micro)]
        self.where: list[tuple[int, int]] = []  # row -> (micro-batch, row in it)
        self.hidden: mx.array | None = None  # on rank 0 of a model with an MTP head: the last step's, as `Batch`'s

    def __len__(self) -> int:
        return len(self.where)

    @property
    def lengths(self) -> list[int]:
        return [self.parts[p].lengths[j] for p, j in self.where]

    @property
    def state(self) -> list[mx.array]:
        return [a for part in self.parts for a in part.state]

    @property
    def positions(self) -> int:
        """`Batch.positions`, over every micro-batch's buffers."""
        return sum(part.positions for part in self.parts)

    def add(self, cache: list, end: int = 0) -> None:
        p = min(range(len(self.parts)), key=lambda k: len(self.parts[k]))
        self.parts[p].add(cache, end)
        self.where.append((p, len(self.parts[p]) - 1))

    def remove(self, i: int, *, keep_cache: bool = True) -> list | None:
        p, j = self.where.pop(i)
        self.where = [(q, k - (q == p and k > j)) for q, k in self.where]
        return self.parts[p].remove(j, keep_cache=keep_cache)

    def checkpoint(self, i: int) -> list:
        p, j = self.where[i]
        return self.parts[p].checkpoint(j)

    def _rows(self, p: int) -> list[int]:
        """The rows micro-batch p holds, in its own order."""
        return [i for i, (q, _) in enumerate(self.where) if q == p]

    def snapshot(self) -> list:
        """`Batch.snapshot` of every micro-batch (None for one without rows), for `rewind`."""
        return [part.snapshot() if len(part) else None for part in self.parts]

    def rewind(self, snapshot: list, kept: list[list[int]]) -> None:
        """`Batch.rewind` down the pipeline. Whether the kept tokens run again is the whole model's to say (a
        recurrent layer on any rank): every rank then restores its micro-batches and runs them, so the sends and
        receives pair up, even a rank whose own layers are all attention."""
        if self.stage.rewindable:
            for p, part in enumerate(self.parts):
                if snapshot[p] is not None:
                    part.rewind(snapshot[p], [kept[i] for i in self._rows(p)])
            return
        for part, state in zip(self.parts, snapshot, strict=True):
            if state is not None:
                part.restore(state)
        self.step(kept, [[]] * len(kept))
        mx.eval(self.state)

    def step(self, tokens: list[list[int]], at: list[list[int]]) -> mx.array:
        """`Batch.step` over every micro-batch, down the pipeline one after another; on rank 0 the logits at the
        positions `at`, stacked in row order (lazy); elsewhere an empty array, the step already run."""
        stage, sent, back, ran = self.stage, [], [], []
        for p, part in enumerate(self.parts):
            rows = self._rows(p)
            if not rows:
                continue
            part.rows.begin([len(tokens[i]) for i in rows])
            x = stage.embed(pad_rows([tokens[i] for i in rows]))
            for layer, cache in zip(stage.layers, part.caches, strict=True):
                x = layer(x, cache)
            part.rows.end()
            out = stage.forward_out(x, [at[i] for i in rows])
            mx.async_eval(out)
            sent.append(out)
            back += [(i, k) for i in rows for k in range(len(at[i]))]
            ran.append(rows)
        if stage.rank or not (back or stage.returns_hidden):
            mx.eval(sent)
            return mx.zeros((0, 0))
        # One message per micro-batch with positions (or every micro-batch, whole), read in the order they were sent:
        # queued one by one, since within one graph MLX may run two receives in either order.
        found, whole = [], []
        for rows in ran:
            if stage.returns_hidden:
                x = stage.back((len(rows), max(len(tokens[i]) for i in rows)))
                mx.async_eval(x)
                whole.append(x)
                h = gather_rows(x, [at[i] for i in rows])
            elif n := sum(len(at[i]) for i in rows):
                h = stage.back((n,))
                mx.async_eval(h)
            else:
                h = None
            if h is not None:
                found.append(h)
        if whole:
            self.hidden = self._in_row_order(ran, whole)
        if not back:
            return mx.zeros((0, 0))
        logits = stage.logits(mx.concatenate(found))
        order = sorted(range(len(back)), key=back.__getitem__)
        return logits if order == list(range(len(back))) else logits[mx.array(order)]

    @staticmethod
    def _in_row_order(ran: list[list[int]], whole: list[mx.array]) -> mx.array:
        """Every micro-batch's hidden states [rows, n, D] as one [B, n, D] in row order (padded to the longest)."""
        n = max(x.shape[1] for x in whole)
        x = mx.concatenate([mx.pad(x, [(0, 0), (0, n - x.shape[1]), (0, 0)]) for x in whole])
        order = [i for rows in ran for i in rows]
        return x if order == sorted(order) else x[mx.array(sorted(range(len(order)), key=order.__getitem__))]
