"""Prompt cache: the model state of earlier requests, kept so a new request runs only what is new.

A request whose prompt starts with tokens an earlier request already ran (the same system prompt, or the
conversation so far in a multi-turn chat) resumes from the longest such prefix. Full-attention KV can resume at
any position (entries past it are simply not read), so an entry keeps its keys and values once and serves every
prefix of its tokens. Other layers (recurrent states, sliding windows) cannot rewind, so an entry also keeps their
checkpoints at a few positions (the end of each prompt, the end of the conversation before the assistant turn),
and such a model resumes only at one of those.

Entries are independent copies, never written again; fetching builds fresh caches from them, so two requests can
resume from one entry at once. The total size is bounded in bytes, least recently used entries leave first.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxq.engine import persist
from mlxq.engine.cache import KVCache, checkpoint, restore
from mlxq.errors import InvalidRequest

log = logging.getLogger("mlxq.engine")


def common_prefix(a: list[int], b: list[int]) -> int:
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def resume_point(held: list[int], marks: Iterable[int], tokens: list[int], rewindable: bool) -> int:
    """The longest prefix of `tokens` that a cache holding `held` resumes at: anywhere in their common prefix when
    every layer rewinds freely, else the furthest checkpoint (`marks`) within it. At least one token of `tokens`
    is left to run, since its logits start the answer."""
    n = min(common_prefix(held, tokens), len(tokens) - 1)
    return n if rewindable else max((p for p in marks if p <= n), default=0)


def _state_bytes(state: Any) -> int:
    if isinstance(state, mx.array):
        return state.nbytes
    if isinstance(state, (tuple, list)):
        return sum(_state_bytes(s) for s in state)
    return 0


@dataclass
class _Entry:
    tokens: list[int]
    kv: dict[int, tuple[mx.array, mx.array]]  # layer -> keys, values [1, heads, len(tokens), head_dim]
    marks: dict[int, dict[int, Any]] = field(default_factory=dict)  # position -> {layer: checkpoint}

    @property
    def nbytes(self) -> int:
        kv = sum(k.nbytes + v.nbytes for k, v in self.kv.values())
        return kv + sum(_state_bytes(s) for mark in self.marks.values() for s in mark.values())



class PromptCache:
    """Longest-prefix reuse across requests, bounded by `max_bytes`. `make_cache` builds a model's empty caches
    (one per layer); every layer is a `KVCache` or has `checkpoint()`/`restore()`. With a `spill`, entries leaving
    memory go to disk, and come back when a prompt resumes further from one of them than from memory.
    `rewindable`: whether the whole model resumes anywhere (default: whether these layers do; a pipeline rank's
    few layers may, and the model not).

    The only decisions that depend on sizes or on the disk (whether an entry fits, which entries leave, which spill
    files are written, dropped and read back) are returned by `store` and `fetch` as their plans; another cache
    holding the same rows with other shares of the model (a rank of a group) replays them with `plan=`, so both
    keep the same entries, in memory and on disk, whatever their own sizes."""

    def __init__(self, make_cache: Callable[[], list], max_bytes: int, spill: DiskSpill | None = None,
                 rewindable: bool | None = None):
        self.make_cache = make_cache
        self.max_bytes = max_bytes
        self.spill = spill
        template = make_cache()
        self.kv_layers = [i for i, c in enumerate(template) if type(c) is KVCache]
        self.rewindable = len(self.kv_layers) == len(template) if rewindable is None else rewindable
        self.n_layers = len(template)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # oldest first
        self._next_id = 0
        self.nbytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    # ----------------------------------------------------------------------------------------- fetch
    def fetch(self, tokens: list[int], plan: dict | None = None) -> tuple[list, int, dict]:
        """Fresh caches holding the longest cached prefix of `tokens`, its length, and the plan followed: {"file":
        the spill file read back (or None), "read": whether it could be, "stored": `store`'s plan for it}. At least
        one token is left to run (its logits start the answer), so the length is at most len(tokens) - 1."""
        best, best_n = self._best(tokens)
        done: dict = {"file": None, "read": False, "stored": None}
        if plan is not None:
            done = plan
        elif self.spill is not None and self.spill.resume_point(tokens, self.rewindable) > best_n:
            done["file"] = self.spill.pick(tokens, self.rewindable)
        if done["file"] is not None and plan is not None and not plan["read"]:
            self.spill.drop(done["file"])  # the file another process could not read
        elif done["file"] is not None:
            spilled = self.spill.take(done["file"], must=plan is not None)
            if spilled is not None:  # back into memory (others may leave for disk meanwhile)
                done["read"], done["stored"] = True, self.store(*spilled, plan=done["stored"])
                best, best_n = self._best(tokens)
        if best is None:
            self.misses += 1
            return self.make_cache(), 0, done
        self.hits += 1
        self._entries.move_to_end(best)
        return self._caches(self._entries[best], best_n), best_n, done

    def _best(self, tokens: list[int]) -> tuple[int | None, int]:
        best, best_n = None, 0
        for key, entry in self._entries.items():
            n = resume_point(entry.tokens, entry.marks, tokens, self.rewindable)
            if n > best_n:
                best, best_n = key, n
        return best, best_n

    def _caches(self, entry: _Entry, n: int) -> list:
        """Fresh caches holding the first `n` tokens of `entry` (a mark's position, for layers that cannot rewind)."""
        caches = self.make_cache()
        mark = entry.marks.get(n, {})
        for i, cache in enumerate(caches):
            if i in entry.kv:
                keys, values = entry.kv[i]
                cache.update_and_fetch(keys[:, :, :n], values[:, :, :n])
            else:
                cache.restore(mark[i])
        return caches

    # ----------------------------------------------------------------------------------------- store
    def store(self, tokens: list[int], caches: list, marks: dict[int, list] | None = None,
              plan: dict | None = None) -> dict:
        """Keeps `caches` (single-row, holding exactly `tokens`) and `marks`, checkpoints of the whole cache at
        earlier positions (as `cache.checkpoint()` gives them), for the layers that cannot rewind. Returns the plan
        it followed: {"stored": whether a new entry was kept, "evicted": the entries that left, "spilled": what the
        spill did with each (`DiskSpill.put`)}."""
        done: dict = {"stored": False, "evicted": [], "spilled": []}
        if self.max_bytes <= 0 or not tokens:
            return done
        if any(caches[i].offset != len(tokens) for i in self.kv_layers):
            raise ValueError(f"prompt cache: caches hold {caches[self.kv_layers[0]].offset} tokens, not {len(tokens)}")
        for key, old in self._entries.items():
            if common_prefix(old.tokens, tokens) == len(tokens):  # already held by a longer entry
                if not self.rewindable:  # which gains the new positions' checkpoints
                    self.nbytes -= old.nbytes
                    new_marks = self._marks(tokens, caches, marks)
                    old.marks = {**old.marks, **new_marks}
                    self.nbytes += old.nbytes
                self._entries.move_to_end(key)
                self._evict(done, plan)
                return done
        entry = _Entry(list(tokens), {})
        for i in self.kv_layers:
            c = caches[i]
            entry.kv[i] = (mx.contiguous(c.keys[:, :, : len(tokens)]), mx.contiguous(c.values[:, :, : len(tokens)]))
        if not self.rewindable:
            entry.marks = self._marks(tokens, caches, marks)
        mx.eval([kv for kv in entry.kv.values()])
        # An entry whose tokens are a prefix of the new one's adds nothing the new one lacks (its marks move over).
        for key in [k for k, e in self._entries.items() if common_prefix(e.tokens, tokens) == len(e.tokens)]:
            old = self._entries.pop(key)
            self.nbytes -= old.nbytes
            entry.marks = {**old.marks, **entry.marks}
        size = entry.nbytes
        if not (size <= self.max_bytes if plan is None else plan["stored"]):
            return done
        self._entries[self._next_id] = entry
        self._next_id += 1
        self.nbytes += size
        done["stored"] = True
        self._evict(done, plan)
        return done

    def _marks(self, tokens: list[int], caches: list, marks: dict[int, list] | None) -> dict[int, dict[int, Any]]:
        """Checkpoints of the layers that cannot rewind: at the end of `tokens` and at the given positions."""
        others = [i for i in range(len(caches)) if i not in self.kv_layers]
        out = {pos: {i: mark[i] for i in others} for pos, mark in (marks or {}).items() if 0 < pos < len(tokens)}
        out[len(tokens)] = {i: caches[i].checkpoint() for i in others}
        return out

    def _evict(self, done: dict, plan: dict | None = None) -> None:
        """Drops the least recently used entries until the cache fits its bound, or replaying `plan`, the entries
        it names; they go to the spill, if any. Notes both in `done`."""
        if plan is not None:
            for key, spilled in zip(plan["evicted"], plan["spilled"] or [None] * len(plan["evicted"]), strict=True):
                if (old := self._entries.pop(key, None)) is not None:
                    self.nbytes -= old.nbytes
                    self._spill(old, spilled)
            done["evicted"], done["spilled"] = list(plan["evicted"]), list(plan["spilled"])
            return
        while self.nbytes > self.max_bytes and self._entries:
            key, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes
            done["evicted"].append(key)
            if self.spill is not None:
                done["spilled"].append(self._spill(old))

    def _spill(self, old: _Entry, plan: dict | None = None) -> dict | None:
        if self.spill is None:
            return None
        marks = {p: [mark.get(i) for i in range(self.n_layers)] for p, mark in old.marks.items()}
        return self.spill.put(old.tokens, self._caches(old, len(old.tokens)), marks, plan)

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0


class DiskSpill:
    """Prompt-cache entries that left memory, one file each (`persist`) under `directory`, bounded by `max_bytes`
    on disk, oldest first out. `model` is the model's fingerprint: files are only ever read back by the model
    that wrote them. Files of an earlier run are removed at start (their index was in memory). A file that cannot
    be written or read back costs the time to recompute it, nothing else."""

    def __init__(self, directory: str | Path, max_bytes: int, model: str, make_cache: Callable[[], list]):
        self.dir = Path(directory)
        self.max_bytes, self.model, self.make_cache = max_bytes, model, make_cache
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InvalidRequest(f"{self.dir}: cannot hold the prompt cache spill: {e.strerror or e}") from None
        for stale in self.dir.glob("entry-*.safetensors"):
            stale.unlink(missing_ok=True)
        self._files: OrderedDict[Path, tuple[list[int], list[int], int]] = OrderedDict()  # tokens, marks, size
        self._next = 0
        self.nbytes = 0
        self.writes = self.reads = 0

    def __len__(self) -> int:
        return len(self._files)

    def put(self, tokens: list[int], caches: list, marks: dict[int, list], plan: dict | None = None) -> dict:
        """Writes an entry leaving memory, unless a file holds its tokens already; then drops the oldest files
        until the spill fits its bound. Returns the plan followed, which `plan` replays: {"file": the file written
        (None: none), "dropped": the files dropped}."""
        done: dict = {"file": None, "dropped": []}
        if plan is None and any(held == tokens for held, _, _ in self._files.values()):
            return done
        name = f"entry-{self._next}.safetensors" if plan is None else plan["file"]
        self._next += 1
        if name is not None:
            path = self.dir / name
            try:
                size = persist.save(path, self.model, tokens, caches, marks, {})
                self.writes += 1
                self._files[path] = (list(tokens), sorted(marks), size)
                self.nbytes += size
                done["file"] = name
            except Exception:  # here, a later `take` of it fails (`must`)
                log.exception("spilling a prompt-cache entry to %s failed", path)
        if plan is not None:
            for dropped in plan["dropped"]:
                self.drop(dropped)
            return plan
        while self.nbytes > self.max_bytes and self._files:
            done["dropped"].append(next(iter(self._files)).name)
            self.drop(done["dropped"][-1])
        return done

    def resume_point(self, tokens: list[int], rewindable: bool) -> int:
        return max((resume_point(held, marks, tokens, rewindable) for held, marks, _ in self._files.values()),
                   default=0)

    def pick(self, tokens: list[int], rewindable: bool) -> str:
        """The file `tokens` resume furthest from."""
        return max(self._files, key=lambda p: resume_point(self._files[p][0], self._files[p][1], tokens,
                                                           rewindable)).name

    def take(self, name: str, must: bool = False) -> tuple[list[int], list, dict[int, list]] | None:
        """File `name` read back as (tokens, caches, marks) for `PromptCache.store`; the file stays (the entry may
        leave memory again). An unreadable file is dropped (None), unless it `must` be read (another process read
        its own and went on from it): then the error is raised."""
        path = self.dir / name
        try:
            if path not in self._files:
                raise InvalidRequest(f"{path}: no such prompt-cache file")
            held, caches, marks, _ = persist.load(path, self.model, self.make_cache)
        except Exception as e:
            if must:
                raise
            log.warning("dropping an unreadable prompt-cache file: %s", e)
            self.drop(name)
            return None
        self.reads += 1
        self._files.move_to_end(path)
        return held, caches, marks

    def drop(self, name: str) -> None:
        path = self.dir / name
        if path in self._files:
            self.nbytes -= self._files.pop(path)[2]
        path.unlink(missing_ok=True)


class CacheSlot:
    """One conversation's own cache between its requests (a Session's turns). The engine resumes a request from it
    and leaves the request's cache in it afterwards: handed over, not copied into the shared prompt cache, and
    never evicted, so however many other conversations run, the next turn runs only its new tokens. Caches that
    cannot rewind keep whole-cache checkpoints (`marks`) at the end of the conversation so far and at the end of
    what ran, where the next turn can resume. One request uses a slot at a time."""

    MAX_MARKS = 4  # checkpoints kept (the newest): a recurrent checkpoint is a copy of every recurrent state

    def __init__(self) -> None:
        self.tokens: list[int] = []  # what the caches hold
        self.caches: list | None = None
        self.marks: dict[int, list] = {}  # position -> checkpoint of every layer

    def take(self, tokens: list[int], rewindable: bool) -> tuple[list | None, int]:
        """The caches rewound to the longest prefix of `tokens` they can resume at, and its length; (None, 0)
        when there is nothing to resume. The slot is empty until `put`."""
        caches, self.caches = self.caches, None
        if caches is None:
            return None, 0
        n = resume_point(self.tokens, self.marks, tokens, rewindable)
        if n == 0:
            self.clear()
            return None, 0
        restore(caches, [n] * len(caches) if rewindable else self.marks[n])
        self.tokens = self.tokens[:n]
        self.marks = {p: m for p, m in self.marks.items() if p <= n}
        return caches, n

    def put(self, tokens: list[int], caches: list, marks: dict[int, list], rewindable: bool) -> None:
        """Keeps `caches` (holding exactly `tokens`) and, for caches that cannot rewind, the request's checkpoints
        `marks` and one at the end."""
        self.tokens, self.caches = list(tokens), caches
        if rewindable:
            self.marks = {}
            return
        kept = {**self.marks, **{p: m for p, m in marks.items() if 0 < p < len(tokens)}}
        kept[len(tokens)] = checkpoint(caches)
        self.marks = dict(sorted(kept.items())[-self.MAX_MARKS :])

    def clear(self) -> None:
        self.tokens, self.caches, self.marks = [], None, {}
