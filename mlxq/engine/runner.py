"""The model half of the engine: the network, the rows being prefilled and decoded, and every cache that holds
model state (the shared prompt cache, conversations' slots, checkpoints taken during prefill).

The scheduler (`scheduler.Engine`) decides what runs; the runner runs it. Its interface takes plain data (token
ids, row numbers, a slot) and never a request, a sampler or an output: that is what lets other processes replay
the scheduler's decisions on their share of a model (`mlxq.distributed`: rank 0 schedules, every rank runs).

Rows are numbered per phase (`PREFILL`, `DECODE`) in the order they joined, as the scheduler lists its
sequences; removing a row renumbers those after it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import mlx.core as mx

from mlxq.engine.batch import Batch, gather_rows, make_batch
from mlxq.engine.persist import fingerprint
from mlxq.engine.prompt_cache import CacheSlot, DiskSpill, PromptCache
from mlxq.errors import EngineDown, InvalidRequest
from mlxq.loading import trim_heap
from mlxq.models.base import CausalLM
from mlxq.models.mtp import MTPDraft

log = logging.getLogger("mlxq.engine")
_ON_METAL = mx.metal.is_available()

PREFILL, DECODE = "prefill", "decode"


@dataclass
class _Row:
    slot: CacheSlot | None  # where the row's cache goes when it finishes (else the prompt cache)
    marks: dict[int, list] = field(default_factory=dict)  # position -> checkpoint of every layer
    mtp: bool = False  # drafts with the model's MTP head
    # hidden states [n, D] (after the final norm) the MTP head has not read yet, with the tokens fed there
    unseen: list[tuple[mx.array, list[int]]] = field(default_factory=list)


class Runner:
    """Runs `net` (a `CausalLM`) for the scheduler. `prompt_cache_bytes`: bound of the shared prompt cache (0 turns
    it off; conversation slots are not counted). `spill`: (directory, bytes) where entries leaving the prompt cache
    go, within that many bytes on disk. `new_batch`: makes the batches rows run in (`batch.make_batch`, or a
    pipeline stage's micro-batches). `rewindable`: whether the whole model resumes anywhere (default: whether
    `net`'s layers do)."""

    def __init__(self, net: CausalLM, prompt_cache_bytes: int, spill: tuple[str, int] | None = None,
                 new_batch: Callable[[], Any] | None = None, rewindable: bool | None = None,
                 cache_fingerprint: str | None = None):
        self.net = net
        evaluate_all(net)
        self.new_batch = new_batch or partial(make_batch, net)
        model = cache_fingerprint or (spill and fingerprint(net))  # what the spill's files are stamped with
        disk = None if spill is None else DiskSpill(spill[0], spill[1], model, net.make_cache)
        self.prompt_cache = PromptCache(net.make_cache, prompt_cache_bytes, disk, rewindable)
        self.rewindable = self.prompt_cache.rewindable  # every layer can resume at any position (attention only)
        self._batches = {PREFILL: self.new_batch(), DECODE: self.new_batch()}
        self._rows: dict[str, list[_Row]] = {PREFILL: [], DECODE: []}
        self._before: tuple | None = None  # the decode batch before a `verify` pass, and what the pass fed
        # The MTP head as a draft model (Qwen3.5 checkpoints that keep it), with a batch of the decode rows using it
        self.mtp = MTPDraft(net) if getattr(net, "mtp", None) is not None else None
        self._mtp_batch = Batch(self.mtp) if self.mtp else None
        self._mtp_out: mx.array | None = None  # the head's last output per row, normed: what its next step reads
        self._mtp_start: tuple | None = None  # the MTP batch after the first step of a round of drafts
        self.fetched: dict | None = None  # the prompt cache's plan at the last `admit` (None: a slot resumed it)

    def attach(self, abort: Callable[[EngineDown], None]) -> None:
        """The scheduler's `abort`, for a runner that can find the model gone while a step runs (a group's)."""

    def admit(self, prompt: list[int], slot: CacheSlot | None, mtp: bool = False, replay: dict | None = None) -> int:
        """A new row in the prefill batch, resumed from the longest prefix of `prompt` that its slot or else the
        prompt cache holds; returns that prefix's length. `mtp`: the row drafts with the model's MTP head. The
        prompt cache's plan is kept in `fetched`, which the other ranks of a group replay (`replay`)."""
        if mtp and self.mtp is None:
            # the field first, so the server's error names it as its param
            raise InvalidRequest("speculative: 'mtp' but this model has no multi-token-prediction head (mtp.* weights)")
        caches, n, self.fetched = None, 0, None
        if slot is not None:
            caches, n = slot.take(prompt, self.rewindable)
        if caches is None:
            caches, n, self.fetched = self.prompt_cache.fetch(prompt, replay)
        self._batches[PREFILL].add(caches)
        self._rows[PREFILL].append(_Row(slot, mtp=mtp))
        return n

    def prefill(self, tokens: list[list[int]], at: list[list[int]], marks: list[int]) -> mx.array:
        """One pass feeding prefill row b `tokens[b]`; returns the logits at positions `at[b]` (evaluated, stacked in
        row order). The rows in `marks` keep a checkpoint of their state after it (caches that cannot rewind)."""
        batch = self._batches[PREFILL]
        logits = batch.step(tokens, at)
        mx.eval(logits, batch.state, self._note_hidden(PREFILL, tokens))
        if not _ON_METAL:
            # MLX's CPU backend keeps the freed buffers of a prompt's products (a few MB per weight shape) for reuse:
            # decode reuses few of them, and they stay in the process's memory through all of its tokens
            mx.clear_cache()
        for i in marks:
            self._rows[PREFILL][i].marks[batch.lengths[i]] = batch.checkpoint(i)
        return logits

    def decode(self, tokens: list[int]) -> mx.array:
        """One token for every decode row; the logits [rows, vocab], lazy (sampling joins the same graph)."""
        batch = self._batches[DECODE]
        logits = batch.step([[t] for t in tokens], [[0]] * len(tokens))
        self._note_hidden(DECODE, [[t] for t in tokens])
        return logits

    def verify(self, tokens: list[list[int]]) -> mx.array:
        """One pass feeding decode row b `tokens[b]`: its next token, then a speculative draft to check. Returns the
        logits after every token fed (stacked in row order, lazy); `rewind` then says how many each row keeps."""
        batch = self._batches[DECODE]
        self._before = (batch.snapshot(), tokens)
        return batch.step(tokens, [list(range(len(t))) for t in tokens])

    def rewind(self, keep: list[int]) -> None:
        """After `verify`: decode row b holds only the first `keep[b]` tokens it was fed (the draft's rejected tail
        goes). Recurrent state cannot drop tokens, so such a batch goes back to its checkpoint from before the pass
        and runs the kept tokens again."""
        snapshot, fed = self._before
        self._before = None
        self._note_hidden(DECODE, [t[:k] for k, t in zip(keep, fed, strict=True)])
        if all(k == len(t) for k, t in zip(keep, fed, strict=True)):
            return
        self._batches[DECODE].rewind(snapshot, [t[:k] for k, t in zip(keep, fed, strict=True)])

    def _note_hidden(self, phase: str, fed: list[list[int]]) -> list[mx.array]:
        """Rows drafting with the MTP head keep the hidden states at the tokens `fed[b]` they kept of the step just
        run, which their next draft reads; returns them (lazy)."""
        batch, out = self._batches[phase], []
        for b, (row, tokens) in enumerate(zip(self._rows[phase], fed, strict=True)):
            if row.mtp and tokens:
                out.append(self.net.norm(batch.hidden[b, : len(tokens)]))
                row.unseen.append((out[-1], list(tokens)))
        return out

    def mtp_draft(self, tokens: list[int], first: bool) -> mx.array:
        """One step of the MTP head for every decode row drafting with it (in row order); its logits [rows, V], lazy.
        A round's `first` step reads, per row, every hidden state the head has not read yet, each with the token
        that followed it (the last one: `tokens[r]`, the row's next token), which is exactly what the head caches
        for good. Each further step reads the previous step's draft token `tokens[r]` with the head's own output;
        `mtp_end` drops what those cached."""
        batch = self._mtp_batch
        if first:
            rows = [row for row in self._rows[DECODE] if row.mtp]
            hidden = [mx.concatenate([h for h, _ in row.unseen]) for row in rows]
            fed = [[t for _, seen in row.unseen for t in seen][1:] + [t] for row, t in zip(rows, tokens, strict=True)]
            for row in rows:
                row.unseen = []
            at = [[len(f) - 1] for f in fed]
        else:
            hidden, fed, at = [h[None] for h in self._mtp_out], [[t] for t in tokens], [[0]] * len(tokens)
        logits = batch.step(fed, at, hidden)
        self._mtp_out = self.mtp.norm(gather_rows(batch.hidden, at))
        if first:
            self._mtp_start = batch.snapshot()
        return logits

    def mtp_state(self) -> list[mx.array]:
        """Every array a step of the MTP head leaves (its caches, its output), to evaluate the step whole."""
        return [*self._mtp_batch.state, self._mtp_out]

    def mtp_end(self) -> None:
        """After a round of `mtp_draft` steps: the head's cache holds only what the first step fed (what later steps
        cached was read from its own guesses, and is read again from the model's hidden states once verified)."""
        self._mtp_batch.restore(self._mtp_start)
        self._mtp_out = self._mtp_start = None

    def lengths(self, phase: str) -> list[int]:
        """Tokens in the cache of each row of `phase`."""
        return list(self._batches[phase].lengths)

    def state(self, phase: str) -> list[mx.array]:
        """Every array the caches of `phase` hold (to evaluate a step whole)."""
        return self._batches[phase].state

    def promote(self, i: int, end: int = 0) -> None:
        """Prefill row i, its prompt done, becomes the last decode row. `end`: the positions its cache reaches at most
        (its prompt and every token it may still feed; 0: unknown), which its KV buffers may reserve at once."""
        self._batches[DECODE].add(self._batches[PREFILL].remove(i), end)
        if not _ON_METAL:
            # The row's decode buffers, made now (often for good: reserved to `end`, they never grow), and what
            # prefilling and copying the row freed handed back: MLX's cache, and the heap's free pages (the KV
            # buffers of a small model are heap blocks, and their holes stay otherwise; SmolLM2: 1.5-2 MB less
            # through every token that follows)
            mx.eval(self._batches[DECODE].state)
            mx.clear_cache()
            trim_heap()
        self._rows[DECODE].append(self._rows[PREFILL].pop(i))
        if self._rows[DECODE][-1].mtp:
            self._mtp_batch.add(self.mtp.make_cache())

    def leave(self, phase: str, i: int, fed: list[int] | None, replay: dict | bool | None = None) -> dict | None:
        """Takes row i out of `phase`. `fed`: the tokens its cache holds, which then go to its slot, or to the prompt
        cache; None drops the cache (the request failed) and empties its slot. Returns the prompt cache's plan when
        it took the cache (`PromptCache.store`), which the other ranks of a group replay (`replay`: that plan, or
        False for none)."""
        if phase == DECODE and self._rows[DECODE][i].mtp:
            self._mtp_batch.remove(sum(row.mtp for row in self._rows[DECODE][:i]), keep_cache=False)
        row = self._rows[phase].pop(i)
        keep = fed is not None and (row.slot is not None or self.prompt_cache.max_bytes > 0)
        if keep and not _ON_METAL:
            # the copy the row's cache is kept as reuses the memory of what MLX kept from the steps (SmolLM2: 2 MB
            # less at the end of a request)
            mx.clear_cache()
        cache = self._batches[phase].remove(i, keep_cache=keep)
        if cache is None or not fed:
            if row.slot is not None:
                row.slot.clear()
            return None
        try:
            if row.slot is not None:
                row.slot.put(fed, cache, row.marks, self.rewindable)
            elif replay is not False:
                return self.prompt_cache.store(fed, cache, row.marks, plan=replay or None)
        except Exception:  # a cache that is not kept costs time later, nothing else
            log.exception("storing a finished request's cache failed")
        return None

    def reset(self, phase: str) -> None:
        """After a failed step the batch is in an unknown state: every row of `phase` is dropped, their slots
        emptied, and the phase starts again with a fresh batch."""
        for row in self._rows[phase]:
            if row.slot is not None:
                row.slot.clear()
        self._batches[phase], self._rows[phase] = self.new_batch(), []
        if phase == DECODE and self.mtp is not None:
            self._mtp_batch = Batch(self.mtp)

    def score(self, tokens: list[int]) -> mx.array:
        """Logits [len(tokens), vocab] at every position of `tokens`, from fresh caches, outside the batches."""
        batch = self.new_batch()
        batch.add(self.net.make_cache())
        logits = batch.step([tokens], [list(range(len(tokens)))])
        mx.eval(logits)
        return logits

    def clear_slot(self, slot: CacheSlot) -> None:
        slot.clear()

    def idle(self) -> None:
        """Called while the scheduler has nothing to run (a group of processes checks its members here)."""

    def close(self) -> None:
        """The scheduler stopped."""

    def stats(self) -> dict:
        pc = self.prompt_cache
        return {
            "prompt_cache": {
                "entries": len(pc),
                "bytes": pc.nbytes,
                "max_bytes": pc.max_bytes,
                "hits": pc.hits,
                "misses": pc.misses,
                **({} if pc.spill is None else {"spilled_entries": len(pc.spill), "spilled_bytes": pc.spill.nbytes,
                                                "spill_writes": pc.spill.writes, "spill_reads": pc.spill.reads}),
            },
        }


def evaluate_all(net) -> None:
    """Computes every array the model holds, private tables included (rope frequencies). An unevaluated array
    belongs to the stream of the thread that made it, and the engine thread cannot evaluate it."""
    found: list[mx.array] = []

    def walk(value) -> None:
        if isinstance(value, mx.array):
            found.append(value)
        elif isinstance(value, dict):  # modules are dicts
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(net)
    mx.eval(found)
