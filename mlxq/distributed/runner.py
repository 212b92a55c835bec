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
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable
from typing import Any

import mlx.core as mx

from mlxq.distributed.control import Control, Link
from mlxq.engine.prompt_cache import CacheSlot
from mlxq.engine.runner import DECODE, PREFILL, Runner
from mlxq.errors import EngineDown, InvalidRequest
from mlxq.models.base import CausalLM


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


NO_MTP = "speculative='mtp' does not run on a group of processes yet"


class GroupRunner(Runner):
    """Rank 0's runner: every operation goes to the other ranks first, then runs here. One operation at a time
    (the engine thread and `Model.logits` may both call), each fully evaluated before the next, so a step stuck
    on a lost rank is one the watchdog can see."""

    def __init__(self, net: CausalLM, prompt_cache_bytes: int, control: Control, slots: SlotNumbers,
                 new_batch: Callable[[], Any] | None = None, rewindable: bool | None = None):
        self.control, self.slots = control, slots
        self._lock = threading.Lock()
        control.post("start", prompt_cache_bytes=prompt_cache_bytes)
        super().__init__(net, prompt_cache_bytes, new_batch=new_batch, rewindable=rewindable)

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

    def admit(self, prompt, slot, mtp=False):
        if mtp:  # the other ranks would have to run the head's steps too
            raise InvalidRequest(NO_MTP)
        return self._run("admit", {"prompt": prompt, "slot": self.slots.number(slot)},
                         lambda: Runner.admit(self, prompt, slot))

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

    def mtp_draft(self, tokens, first):  # never called: no row drafts with the MTP head here (see `admit`)
        raise InvalidRequest(NO_MTP)

    def mtp_end(self):
        raise InvalidRequest(NO_MTP)

    def promote(self, i):
        return self._run("promote", {"i": i}, lambda: Runner.promote(self, i))

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

    def close(self) -> None:
        if self.control.state != "degraded":
            self._run("stop", {}, lambda: None)

    def stats(self) -> dict:
        return {**super().stats(), "group": self.control.status()}


def follow(net: CausalLM, link: Link, new_batch: Callable[[], Any] | None = None,
           rewindable: bool | None = None) -> None:
    """Runs rank 0's operations on this rank's share `net` until rank 0 ends the group; raises EngineDown if rank 0
    is lost. An operation that fails here is reported to rank 0 and ends the group."""
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
                runner = Runner(net, args["prompt_cache_bytes"], new_batch=new_batch, rewindable=rewindable)
            elif op == "stop":
                runner = None
            elif op == "admit":
                runner.admit(args["prompt"], slot(args["slot"]))
            elif op == "prefill":
                runner.prefill(args["tokens"], args["at"], args["marks"])
            elif op in ("decode", "verify"):
                mx.eval(getattr(runner, op)(args["tokens"]), runner.state(DECODE))
            elif op == "rewind":
                runner.rewind(args["keep"])
            elif op == "promote":
                runner.promote(args["i"])
            elif op == "leave":
                runner.leave(args["phase"], args["i"], args["fed"], args["plan"])
            elif op == "reset":
                runner.reset(args["phase"])
            elif op == "score":
                runner.score(args["tokens"])
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
