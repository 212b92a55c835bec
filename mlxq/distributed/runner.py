"""One engine over a group of processes. Rank 0's scheduler drives a `GroupRunner`, which posts each runner
operation (plain data: token ids, row numbers, a slot's number) to the other ranks, then runs it on its own share
of the model. Every other rank `follow`s: it runs the same operations in the same order on its share, with the
same `Runner`, so the collectives inside each forward pass pair up across ranks and every rank's caches (batches,
prompt cache, conversation slots, checkpoints) hold the same rows in the same places.

Any failure inside an operation ends the group (`EngineDown`): once one rank has run a step another has not,
their collectives no longer pair up, and nothing short of a restart puts them back in step.

Speculative decoding fits the same scheme: `verify` (a decode step over a row's next token and its draft, with
logits at each) and `rewind` (how many of them each row keeps; a recurrent model restores the checkpoint taken
before the pass and runs the kept tokens again) are runner operations with plain data, replayed the same way.
Drafts from the model's MTP head too: which rows draft with it goes with `admit`, and each step of the head
(`mtp_draft`, the draft tokens rank 0 sampled) is replayed by every rank holding part of the head (tensor and
experts splits: collectives inside); a pipeline keeps the whole head on rank 0, and its other ranks skip them.

A prompt cache that spills to disk replays rank 0's plans too (which entries are written, dropped and read back),
each rank in a directory of its own (`rank_spill`); a rank that cannot read back a file rank 0 read ends the group.

A conversation's cache saved to disk (`Session.save` / `load`) is split as the model is: each rank writes and reads
its own share (`share_path`: rank 0's file holds the conversation too, each other rank's lies beside it on that
rank's own disk), atomically and with its share's fingerprint, all stamped with one save's id. The ranks then tell
each other what they found (`agree`, one all_gather), so all of them keep or drop the result alike and report the
same one line: a missing, corrupt or foreign share, or one from another save, fails the save or load on every
rank, and the group goes on.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import secrets
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxq import errors
from mlxq.distributed.control import Control, Link, exchange
from mlxq.engine import persist
from mlxq.engine.prompt_cache import CacheSlot
from mlxq.engine.runner import DECODE, PREFILL, Runner
from mlxq.errors import EngineDown, FormatError, InvalidRequest, MlxqError
from mlxq.experts import expert_stats
from mlxq.models.base import CausalLM

log = logging.getLogger("mlxq.distributed")


class SlotNumbers:
    """Conversation slots are objects on rank 0 (a Session's) and numbers on the wire. Kept by the model, not the
    runner: slots outlive an engine restart. A slot that is garbage collected on rank 0 is dropped on the others
    with the next operation."""

    def __init__(self) -> None:
        self._numbers: weakref.WeakKeyDictionary[CacheSlot, int] = weakref.WeakKeyDictionary()
        self._next = itertools.count(1)
        self._dropped: list[int] = []

    def number(self, slot: CacheSlot | None) -> int | None:
        if slot is None:
            return None
        n = self._numbers.get(slot)
        if n is None:
            n = self._numbers[slot] = next(self._next)
            weakref.finalize(slot, self._dropped.append, n)
        return n

    def take_dropped(self) -> list[int]:
        out, self._dropped[:] = list(self._dropped), []
        return out


def rank_spill(spill: tuple[str, int] | None, rank: int) -> tuple[str, int] | None:
    """Where rank `rank` spills its share of the prompt cache (a directory of its own, on its own disk), within the
    bound rank 0 decides by (`PromptCache`: the other ranks replay its plans)."""
    return None if spill is None else (str(Path(spill[0]) / f"rank{rank}"), spill[1])


def share_path(path: str | Path, rank: int) -> Path:
    """Where rank `rank` keeps its share of a cache saved to `path` (on its own disk)."""
    path = Path(path)
    return path if rank == 0 else path.with_name(f"{path.name}.rank{rank}")


def _attempt(what: Callable[[], Any]) -> tuple[Any, dict | None]:
    """`what()`, and the one-line error it raised (an MlxqError: a file missing, corrupt, foreign), else None."""
    try:
        return what(), None
    except MlxqError as e:
        return None, {"kind": type(e).__name__, "message": str(e)[:1000]}


def agree(group, rank: int, found: dict | None, save_id: str | None = None) -> MlxqError | None:
    """What every rank found saving or loading its share (`found`: its error, or None; `save_id`: the save its share
    came from): the first rank's error, or a share from another save than rank 0's, as the same error on every rank;
    None when all is well."""
    everyone = exchange(group, {"error": found, "id": save_id})
    for r, seen in enumerate(everyone):
        if seen["error"] is not None:
            kind = getattr(errors, seen["error"]["kind"], MlxqError)
            return kind(seen["error"]["message"] if r == rank else f"rank {r}: {seen['error']['message']}")
        if seen["id"] != everyone[0]["id"]:
            return FormatError(f"rank {r}: its share of the saved cache is from another save than rank 0's file")
    return None


def save_share(group, path: Path, fingerprint: str, slot: CacheSlot, extra: dict) -> MlxqError | None:
    """This rank's share of `slot` to `path`, as every rank of `group` does at once; the error every rank sees, or
    None. Each writes its share beside its place, then the other ranks move theirs in place, then rank 0, whose
    file a load starts from: a save that fails anywhere leaves no new file from rank 0 (and a share that replaced
    an earlier save's makes that save fail to load, by its id, never load wrong)."""
    rank, pending = group.rank(), path.with_name(f".{path.name}.pending")

    def place() -> None:
        try:
            os.replace(pending, path)
        except OSError as e:
            raise InvalidRequest(f"{path}: cannot be written: {e.strerror or e}") from None

    try:
        _, error = _attempt(lambda: persist.save(pending, fingerprint, slot.tokens, slot.caches, slot.marks, extra))
        failed = agree(group, rank, error)
        if failed is None:
            failed = agree(group, rank, _attempt(place)[1] if rank else None)
        if failed is None and rank == 0:
            place()
        return failed
    except InvalidRequest as e:
        return e
    finally:
        pending.unlink(missing_ok=True)


def _load_share(path: Path, fingerprint: str, make_cache: Callable[[], list], rank: int,
                size: int) -> tuple[tuple | None, dict | None, str | None]:
    """(tokens, caches, marks, extra) of this rank's share, the error, the save it came from."""
    loaded, error = _attempt(lambda: persist.load(path, fingerprint, make_cache))
    if error is not None:
        return None, error, None
    stamp = loaded[3].get("group") if isinstance(loaded[3], dict) else None
    if not isinstance(stamp, dict) or stamp.get("rank") != rank or stamp.get("size") != size:
        return None, {"kind": "FormatError", "message": f"{path}: is not rank {rank}'s share of a cache saved by a "
                      f"group of {size}"}, None
    return loaded, None, stamp.get("id")


def gather_expert_stats(group, net: CausalLM) -> list[dict | None]:
    """What each rank's expert pool counted so far, by rank (one all_gather)."""
    own = expert_stats(net)
    return [m["stats"] for m in exchange(group, {"stats": None if own is None else dataclasses.asdict(own)})]


class GroupRunner(Runner):
    """Rank 0's runner: every operation goes to the other ranks first, then runs here. One operation at a time
    (the engine thread and `Model.logits` may both call), each fully evaluated before the next, so a step stuck
    on a lost rank is one the watchdog can see."""

    def __init__(self, net: CausalLM, prompt_cache_bytes: int, control: Control, slots: SlotNumbers,
                 new_batch: Callable[[], Any] | None = None, rewindable: bool | None = None, group=None,
                 spill: tuple[str, int] | None = None, cache_fingerprint: str | None = None):
        self.control, self.slots, self.group = control, slots, group
        self._lock = threading.Lock()
        control.post("start", prompt_cache_bytes=prompt_cache_bytes, spill=spill)
        super().__init__(net, prompt_cache_bytes, rank_spill(spill, 0), new_batch, rewindable, cache_fingerprint)

    def attach(self, abort: Callable[[EngineDown], None]) -> None:
        self.control.on_down = abort

    def _run(self, op: str, args: dict, local: Callable[[], Any]) -> Any:
        with self._lock:
            self._post(op, args)
            return self._local(op, local)

    def _post(self, op: str, args: dict) -> None:
        if dropped := self.slots.take_dropped():
            args = {**args, "drop": dropped}
        self.control.post(op, **args)

    def _local(self, op: str, local: Callable[[], Any]) -> Any:
        try:
            with self.control.step():
                return local()
        except EngineDown:
            raise
        except RuntimeError as e:  # MLX's collectives: a rank's connection was lost
            raise self.control.lost(e) from None
        except Exception as e:
            raise self.control.down(f"rank 0: {op} failed ({type(e).__name__}: {e})") from None

    def admit(self, prompt, slot, mtp=False, replay=None):
        """Runs here first (no collectives in it): the other ranks replay how rank 0's prompt cache (and its spill)
        resumed the row."""
        if mtp and self.mtp is None:  # refused here, before the other ranks run anything
            return Runner.admit(self, prompt, slot, mtp)
        with self._lock:
            n = self._local("admit", lambda: Runner.admit(self, prompt, slot, mtp))
            self._post("admit", {"prompt": prompt, "slot": self.slots.number(slot), "mtp": mtp,
                                 "fetched": self.fetched})
            return n

    def prefill(self, tokens, at, marks):
        return self._run("prefill", {"tokens": tokens, "at": at, "marks": marks, "lengths": self.lengths(PREFILL)},
                         lambda: Runner.prefill(self, tokens, at, marks))

    def _decode_step(self, op: str, args: dict, step: Callable[[], mx.array]) -> mx.array:
        """A step of the decode batch, evaluated whole (logits and caches) while the watchdog looks on."""
        def local():
            logits = step()
            mx.eval(logits, self.state(DECODE))
            return logits

        return self._run(op, {**args, "lengths": self.lengths(DECODE)}, local)

    def decode(self, tokens):
        return self._decode_step("decode", {"tokens": tokens}, lambda: Runner.decode(self, tokens))

    def verify(self, tokens):
        return self._decode_step("verify", {"tokens": tokens}, lambda: Runner.verify(self, tokens))

    def rewind(self, keep):
        """Every rank keeps the same tokens: a recurrent model runs them again, with collectives in the pass."""
        return self._run("rewind", {"keep": keep, "lengths": self.lengths(DECODE)}, lambda: Runner.rewind(self, keep))

    def mtp_draft(self, tokens, first):
        def local():
            logits = Runner.mtp_draft(self, tokens, first)
            mx.eval(logits, self.mtp_state())
            return logits

        return self._run("mtp_draft", {"tokens": tokens, "first": first}, local)

    def mtp_end(self):
        return self._run("mtp_end", {}, lambda: Runner.mtp_end(self))

    def promote(self, i, end=0):
        return self._run("promote", {"i": i, "end": end}, lambda: Runner.promote(self, i, end))

    def leave(self, phase, i, fed, replay=None):
        """Runs here first (no collectives in it): the other ranks replay how rank 0's prompt cache took the row."""
        with self._lock:
            plan = self._local("leave", lambda: Runner.leave(self, phase, i, fed))
            self._post("leave", {"phase": phase, "i": i, "fed": fed, "plan": False if plan is None else plan})
            return plan

    def reset(self, phase):
        return self._run("reset", {"phase": phase}, lambda: Runner.reset(self, phase))

    def score(self, tokens):
        return self._run("score", {"tokens": tokens}, lambda: Runner.score(self, tokens))

    def clear_slot(self, slot):
        return self._run("clear_slot", {"slot": self.slots.number(slot)}, lambda: Runner.clear_slot(self, slot))

    def save_slot(self, slot: CacheSlot, path: str | Path, fingerprint: str, extra: dict) -> None:
        """Every rank writes its share of `slot` (`share_path`, `save_share`); on any failure rank 0 keeps none."""
        path, save_id = Path(path), secrets.token_hex(8)
        stamp = {"group": {"id": save_id, "rank": 0, "size": self.group.size()}}
        failed = self._run("save_slot", {"slot": self.slots.number(slot), "path": str(path), "id": save_id},
                           lambda: save_share(self.group, path, fingerprint, slot, {**extra, **stamp}))
        if failed is not None:
            raise failed

    def load_slot(self, slot: CacheSlot, path: str | Path, fingerprint: str) -> dict:
        """Every rank reads its share of a cache `save_slot` wrote into `slot`; all of them or none."""
        path = Path(path)
        found: list = []

        def local():
            loaded, error, save_id = _load_share(path, fingerprint, self.net.make_cache, 0, self.group.size())
            found.append(loaded)
            return agree(self.group, 0, error, save_id)

        failed = self._run("load_slot", {"slot": self.slots.number(slot), "path": str(path)}, local)
        if failed is not None:
            raise failed
        slot.tokens, slot.caches, slot.marks, extra = found[0]
        return {k: v for k, v in extra.items() if k != "group"}

    def expert_stats(self) -> list[dict | None]:
        """Every rank's streaming counters (`ExpertStats` fields; None where a rank streams nothing), by rank."""
        return self._run("expert_stats", {}, lambda: gather_expert_stats(self.group, self.net))

    def close(self) -> None:
        if self.control.state != "degraded":
            self._run("stop", {}, lambda: None)

    def stats(self) -> dict:
        return {**super().stats(), "group": self.control.status()}


def follow(net: CausalLM, link: Link, new_batch: Callable[[], Any] | None = None,
           rewindable: bool | None = None, group=None, fingerprint: str = "") -> None:
    """Runs rank 0's operations on this rank's share `net` until rank 0 ends the group; raises EngineDown if rank 0
    is lost. An operation that fails here is reported to rank 0 and ends the group (but a cache file that cannot be
    saved or loaded fails only that save or load, on every rank). `fingerprint`: of this rank's share (`group`'s
    rank), stamped on the caches it saves."""
    runner: Runner | None = None
    slots: dict[int, CacheSlot] = {}

    def slot(number: int | None) -> CacheSlot | None:
        return None if number is None else slots.setdefault(number, CacheSlot())

    while True:
        msg = link.receive()
        op, args = msg["op"], msg["args"]
        for number in args.pop("drop", []):
            slots.pop(number, None)
        if op == "exit":
            return
        try:
            if "lengths" in args and args["lengths"] != runner.lengths(PREFILL if op == "prefill" else DECODE):
                raise RuntimeError(f"out of step with rank 0: its rows hold {args['lengths']} tokens, these hold "
                                   f"{runner.lengths(PREFILL if op == 'prefill' else DECODE)}")
            if op == "start":
                runner = Runner(net, args["prompt_cache_bytes"], rank_spill(args["spill"], link.rank), new_batch,
                                rewindable, fingerprint)
            elif op == "stop":
                runner = None
            elif op == "admit":  # a rank without the MTP head (a pipeline's others) runs none of its steps
                runner.admit(args["prompt"], slot(args["slot"]), args["mtp"] and runner.mtp is not None,
                             args["fetched"])
            elif op == "prefill":
                runner.prefill(args["tokens"], args["at"], args["marks"])
            elif op in ("decode", "verify"):
                mx.eval(getattr(runner, op)(args["tokens"]), runner.state(DECODE))
            elif op == "mtp_draft" and runner.mtp is not None:
                mx.eval(runner.mtp_draft(args["tokens"], args["first"]), runner.mtp_state())
            elif op == "mtp_end" and runner.mtp is not None:
                runner.mtp_end()
            elif op in ("mtp_draft", "mtp_end"):
                pass
            elif op == "rewind":
                runner.rewind(args["keep"])
            elif op == "promote":
                runner.promote(args["i"], args["end"])
            elif op == "leave":
                runner.leave(args["phase"], args["i"], args["fed"], args["plan"])
            elif op == "reset":
                runner.reset(args["phase"])
            elif op == "score":
                runner.score(args["tokens"])
            elif op == "save_slot":
                stamp = {"group": {"id": args["id"], "rank": link.rank, "size": group.size()}}
                failed = save_share(group, share_path(args["path"], link.rank), fingerprint, slot(args["slot"]), stamp)
                if failed is not None:
                    log.error("rank %d: %s", link.rank, failed)
            elif op == "load_slot":
                path = share_path(args["path"], link.rank)
                loaded, error, save_id = _load_share(path, fingerprint, net.make_cache, link.rank, group.size())
                if (failed := agree(group, link.rank, error, save_id)) is not None:
                    log.error("rank %d: %s", link.rank, failed)
                else:
                    into = slot(args["slot"])
                    into.tokens, into.caches, into.marks, _ = loaded
            elif op == "expert_stats":
                gather_expert_stats(group, net)
            elif op == "clear_slot":
                slot(args["slot"]).clear()
            else:
                raise ValueError(f"unknown operation '{op}'")
        except Exception as e:
            why = f"{op} failed ({type(e).__name__}: {e})"
            try:
                link.send({"error": why})
            except OSError:
                pass
            raise EngineDown(f"rank {link.rank}: {why}") from None
