"""The engine thread: one thread owns MLX and runs every request; callers talk to it through `submit` and a
callback, never touching MLX themselves.

Each loop iteration: take new requests, drop cancelled ones, run up to one chunk of prompt tokens, oldest waiting
request first (so a long prompt delays the others' next token by one chunk, not by its whole length, and short
prompts that arrive together join the batch together), then one decode step of every running request together
(`batch.py`). A prompt first resumes from the longest prefix the prompt
cache holds; a finished request leaves its cache there for the next one.

A request's text is detokenized here, and stop strings, end-of-sequence and `max_tokens` end it here, so the
caller gets finished text pieces. Errors stay with their request: a processor or sampler that raises fails that
request alone, and a failure of the shared model step fails the requests in that step, while the engine goes on.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import mlx.core as mx

from mlxq.engine.batch import make_batch
from mlxq.engine.cache import checkpoint
from mlxq.engine.prompt_cache import PromptCache
from mlxq.engine.sampling import LogitsProcessor, SamplingParams, make_sampler, penalty_processors
from mlxq.engine.stops import StopMatcher
from mlxq.errors import GenerationError, InvalidRequest, MlxqError

if TYPE_CHECKING:
    from mlxq.api import Model
    from mlxq.engine.tokenizer import Tokenizer

log = logging.getLogger("mlxq.engine")

PREFILL_CHUNK = 256


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the most likely tokens, best first


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens resumed from the prompt cache


@dataclass
class Output:
    """What a request produced since its last output. The last one has `finish_reason` and `usage`, or
    `error` when the request failed."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    usage: Usage | None = None
    error: MlxqError | None = None


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    # Builds this request's own logits processors; called on the engine thread, since MLX arrays and streams
    # belong to the thread that makes them.
    make_processors: Callable[[], list[LogitsProcessor]] = list
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the k most likely
    marks: list[int] = field(default_factory=list)  # prompt positions worth a prompt-cache checkpoint
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)
    on_output: Callable[[Output], None] = lambda out: None  # called on the engine thread; must not block
    cancelled: bool = False

    def cancel(self) -> None:
        """Ends the request at the next step (from any thread)."""
        self.cancelled = True


class _Sequence:
    """A request inside the engine: its sampler, detokenizer, cache while prefilling, and output so far."""

    def __init__(self, req: Request, tokenizer: Tokenizer):
        self.req = req
        self.sampler = make_sampler(req.params)
        self.stops = StopMatcher(req.stop)
        self.procs = penalty_processors(req.params) + list(req.make_processors())
        self.eos = tokenizer.eos_token_ids
        self.detok = tokenizer.detokenizer()
        self.generated: list[int] = []
        self.text, self.emitted = "", 0
        self.cache: list | None = None  # while prefilling; then the row lives in the batch
        self.cached = self.pos = 0  # prompt tokens resumed from the prompt cache / already in the cache
        self.marks: dict[int, list] = {}  # position -> cache checkpoint, for the prompt cache
        self.next_input = req.prompt[-1]

    def pick(self, logits: mx.array) -> tuple:
        """Lazy (token, logprobs, chosen logprob, top ids, top logprobs) from this row's logits [1, V]."""
        logits = logits.astype(mx.float32)
        for proc in self.procs:
            logits = proc(self.generated, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = self.sampler(logprobs)
        if self.req.logprobs is None:
            return (token,)
        chosen = logprobs[0, token]
        k = min(self.req.logprobs, logprobs.shape[-1])
        if not k:
            return token, chosen
        top = mx.argpartition(-logprobs[0], k - 1)[:k]
        return token, chosen, top, logprobs[0, top]

    def accept(self, picked: tuple) -> Output:
        """Takes the sampled token; returns the output it makes final, finished if the request is done."""
        token = picked[0].item()
        self.generated.append(token)
        out = Output(tokens=[token])
        if self.req.logprobs is not None:
            top = []
            if len(picked) > 2:
                top = sorted(zip(picked[2].tolist(), picked[3].tolist(), strict=True), key=lambda t: -t[1])
            out.logprobs.append(TokenLogprob(token, picked[1].item(), top))
        finish, cut = None, False
        if token in self.eos and not self.req.ignore_eos:
            finish = "stop"
        else:
            before = len(self.text)
            self.text += self.detok.add(token)
            at = self.stops.find(self.text, before)
            if at >= 0:
                self.text, finish, cut = self.text[:at], "stop", True
            elif len(self.generated) >= self.req.max_tokens:
                finish = "length"
        if finish is None:
            safe = max(self.emitted, len(self.text) - self.stops.held_back(self.text))
        else:
            if not cut:
                self.text += self.detok.flush()
            safe = len(self.text)
        out.text, self.emitted = self.text[self.emitted : safe], safe
        out.finish_reason = finish
        return out

    def usage(self) -> Usage:
        return Usage(len(self.req.prompt), len(self.generated), self.cached)

    @property
    def fed(self) -> list[int]:
        """The tokens in this sequence's cache: the last prompt token, or later the last sampled token, has not
        been run yet."""
        if not self.generated:
            return self.req.prompt[:-1]
        return self.req.prompt + self.generated[:-1]


class Engine:
    """Runs `model` (an `mlxq.Model`) for many requests at once on its own thread.

    `max_batch`: requests decoded together; more wait their turn. `prompt_cache_bytes`: bound of the prompt
    cache (0 turns it off). `prefill_chunk`: prompt tokens run per loop iteration."""

    def __init__(
        self, model: Model, *, max_batch: int = 8, prompt_cache_bytes: int = 1 << 30, prefill_chunk: int = PREFILL_CHUNK
    ):
        if max_batch < 1:
            raise InvalidRequest("max_batch must be >= 1")
        self.model, self.net, self.tokenizer = model, model.net, model.tokenizer
        _evaluate_all(self.net)
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.prompt_cache = PromptCache(self.net.make_cache, prompt_cache_bytes)
        self._inbox: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._batch = make_batch(self.net)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._loop_done = False
        self._parked = threading.Event()
        self.steps = self.failures = self.cancelled = 0

    # ------------------------------------------------------------------------------------------ public
    def start(self) -> Engine:
        self._thread = threading.Thread(target=_thread_main, args=([self],), name="mlxq-engine", daemon=True)
        self._thread.start()
        ref = weakref.ref(self)  # the thread must be parked before the interpreter shuts down (_thread_main)
        atexit.register(lambda: (engine := ref()) is not None and engine.close())
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stops the loop after its current step; requests not finished end as cancelled."""
        self._closed = True
        self._inbox.put(None)
        if self._thread is not None:
            self._parked.wait(timeout)

    def submit(self, request: Request) -> None:
        if not request.prompt:
            raise InvalidRequest("empty prompt")
        if request.max_tokens < 1:
            raise InvalidRequest("max_tokens must be >= 1")
        if self._closed or not self.alive:
            raise GenerationError("the engine is not running")
        self._inbox.put(request)
        if self._loop_done:  # closed meanwhile, after the loop's last look at the inbox
            self._drain_inbox()

    @property
    def pending(self) -> int:
        """Requests submitted and not finished yet."""
        return self._inbox.qsize() + len(self._waiting) + len(self._prefilling) + len(self._running)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._loop_done

    def stats(self) -> dict:
        pc = self.prompt_cache
        return {
            "running": len(self._running),
            "prefilling": len(self._prefilling),
            "waiting": len(self._waiting),
            "steps": self.steps,
            "failures": self.failures,
            "cancelled": self.cancelled,
            "prompt_cache": {
                "entries": len(pc),
                "bytes": pc.nbytes,
                "max_bytes": pc.max_bytes,
                "hits": pc.hits,
                "misses": pc.misses,
            },
        }

    # ------------------------------------------------------------------------------------------ the loop
    def _run(self) -> None:
        mx.set_default_stream(mx.new_stream(mx.default_device()))  # MLX streams are per thread
        while self._take_new():
            try:
                self._drop_cancelled()
                if self._prefilling:
                    self._prefill_some()
                if self._running:
                    self._decode()
            except Exception as e:  # the shared step failed: its requests fail, the engine goes on
                log.exception("engine step failed")
                self._fail_all(e)
        self._loop_done = True
        self._cancel_left()

    def _cancel_left(self) -> None:
        """On close, every request not finished yet ends as cancelled, so no caller waits forever."""
        for seq in [*self._waiting, *self._prefilling, *self._running]:
            self._emit(seq, Output(finish_reason="cancelled", usage=seq.usage()))
        self._waiting.clear(), self._prefilling.clear(), self._running.clear()
        self._drain_inbox()

    def _drain_inbox(self) -> None:
        while True:
            try:
                req = self._inbox.get_nowait()
            except queue.Empty:
                return
            if req is not None:
                _deliver(req, Output(finish_reason="cancelled", usage=Usage(len(req.prompt), 0, 0)))

    def _take_new(self) -> bool:
        """Moves submitted requests in (waiting for one when idle); False once closed."""
        block = not (self._waiting or self._prefilling or self._running)
        while True:
            try:
                req = self._inbox.get(block=block)
            except queue.Empty:
                break
            if req is None or self._closed:
                if req is not None:
                    _deliver(req, Output(finish_reason="cancelled", usage=Usage(len(req.prompt), 0, 0)))
                return False
            try:
                self._waiting.append(_Sequence(req, self.tokenizer))
            except Exception as e:  # a bad sampler setting, say: this request fails
                self._emit_error(req, e)
            block = False
        while self._waiting and len(self._prefilling) + len(self._running) < self.max_batch:
            self._prefilling.append(self._waiting.popleft())
        return True

    def _drop_cancelled(self) -> None:
        for queue_ in (self._waiting, self._prefilling):
            for seq in [s for s in queue_ if s.req.cancelled]:
                queue_.remove(seq)
                self.cancelled += 1
                self._emit(seq, Output(finish_reason="cancelled", usage=seq.usage()))
        for i in reversed([i for i, s in enumerate(self._running) if s.req.cancelled]):
            seq = self._running[i]
            self._leave(i, store=True)  # what it computed may serve the next request
            self.cancelled += 1
            self._emit(seq, Output(finish_reason="cancelled", usage=seq.usage()))

    def _prefill_some(self) -> None:
        """Runs up to `prefill_chunk` prompt tokens, oldest request first: short prompts that arrive together all
        join the next decode step (a full batch at once), while a long prompt delays the running requests' next
        token by one chunk at most."""
        budget = self.prefill_chunk
        for seq in list(self._prefilling):
            while budget > 0:
                ran = self._prefill(seq, budget)
                if ran is None:  # joined the batch, or failed
                    break
                budget -= ran
            if budget <= 0:
                return

    def _prefill(self, seq: _Sequence, budget: int) -> int | None:
        """Runs up to `budget` more prompt tokens of `seq`; returns how many, or None once the sequence is fully
        prefilled and has joined the batch (its last prompt token is run by the next decode step, which samples
        its first token) or has failed."""
        ran = 0
        try:
            prompt = seq.req.prompt
            if seq.cache is None:
                seq.cache, seq.cached = self.prompt_cache.fetch(prompt)
                seq.pos = seq.cached
            end = len(prompt) - 1
            # Caches that cannot rewind are checkpointed where a later prompt may resume: chunks end there.
            marks = [] if self.prompt_cache.rewindable else [p for p in seq.req.marks if seq.pos < p < end]
            target = min([end, seq.pos + budget, *marks])
            if target > seq.pos:
                self.net(mx.array(prompt[seq.pos : target], dtype=mx.uint32)[None], seq.cache)
                mx.eval([c.state for c in seq.cache])
                ran, seq.pos = target - seq.pos, target
                if target in marks or (target == end and not self.prompt_cache.rewindable):
                    seq.marks[target] = checkpoint(seq.cache)
        except Exception as e:
            self._prefilling.remove(seq)
            self._fail(seq, e)
            return None
        if seq.pos < end:
            return ran
        self._prefilling.remove(seq)
        self._batch.add(seq.cache)
        seq.cache = None
        self._running.append(seq)
        return None

    def _decode(self) -> None:
        logits = self._batch.step([s.next_input for s in self._running])
        picks: list[tuple | Exception] = []
        for i, seq in enumerate(self._running):
            try:
                picks.append(seq.pick(logits[i : i + 1]))
            except Exception as e:
                picks.append(e)
        try:
            mx.eval([p for p in picks if not isinstance(p, Exception)])
        except Exception:  # find the rows that fail on their own; if the model step failed, that is all
            picks = [_evaluated(p) for p in picks]
        self.steps += 1
        done: list[tuple[int, Exception | None]] = []
        for i, (seq, picked) in enumerate(zip(self._running, picks, strict=True)):
            if isinstance(picked, Exception):
                done.append((i, picked))
                continue
            try:
                out = seq.accept(picked)
            except Exception as e:
                done.append((i, e))
                continue
            seq.next_input = out.tokens[0]
            if out.finish_reason:
                out.usage = seq.usage()
                done.append((i, None))
            if out.text or out.logprobs or out.finish_reason:
                self._emit(seq, out)
        for i, error in reversed(done):
            seq = self._running[i]
            self._leave(i, store=error is None)
            if error is not None:
                self._fail(seq, error)

    def _leave(self, i: int, store: bool) -> None:
        """Takes running sequence i out of the batch, its cache into the prompt cache when `store`."""
        seq = self._running.pop(i)
        store = store and self.prompt_cache.max_bytes > 0
        cache = self._batch.remove(i, keep_cache=store)
        if cache is not None:
            try:
                self.prompt_cache.store(seq.fed, cache, seq.marks)
            except Exception:  # a cache that is not kept costs time later, nothing else
                log.exception("prompt cache store failed")

    # ------------------------------------------------------------------------------------------ failures
    def _fail(self, seq: _Sequence, error: Exception) -> None:
        self.failures += 1
        if not isinstance(error, MlxqError):
            log.error("request failed: %r", error)
        self._emit_error(seq.req, error)

    def _fail_all(self, error: Exception) -> None:
        """The batch is in an unknown state: its requests fail (prefilling ones have their own caches)."""
        for seq in self._running:
            self._fail(seq, error)
        self._running.clear()
        self._batch = make_batch(self.net)

    def _emit_error(self, req: Request, error: Exception) -> None:
        if not isinstance(error, MlxqError):
            error = GenerationError(f"generation failed: {type(error).__name__}: {error}")
        _deliver(req, Output(finish_reason="error", error=error))

    def _emit(self, seq: _Sequence, out: Output) -> None:
        _deliver(seq.req, out)


def _deliver(req: Request, out: Output) -> None:
    try:
        req.on_output(out)
    except Exception:  # the receiver is gone: nobody wants the rest
        log.exception("output callback failed; cancelling the request")
        req.cancel()


def _thread_main(box: list[Engine]) -> None:
    engine = box.pop()  # the parked thread must not keep the engine (and its model) alive
    parked = engine._parked
    engine._run()
    del engine
    # Never let this thread end: MLX keeps its compile cache in thread-local storage, whose destructor takes
    # the GIL, and a thread ending while the interpreter shuts down aborts the process ("terminate called
    # without an active exception"). A parked daemon thread just stops with the process.
    parked.set()
    threading.Event().wait()


def _evaluated(picked: tuple | Exception) -> tuple | Exception:
    if isinstance(picked, Exception):
        return picked
    try:
        mx.eval(picked)
        return picked
    except Exception as e:
        return e


def _evaluate_all(net) -> None:
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
