"""The engine: one thread that owns MLX and runs every request of every caller (the Python API, Sessions, the
server). It is the only loop that runs a model; callers talk to it through `submit` and a callback, never
touching MLX themselves (`mlxq.engine.stream` is the callers' side).

Each loop iteration: take new requests, drop cancelled ones, admit waiting requests while the batch has room,
run one prefill step, then one decode step (two prefill steps when requests arrive during the first of a burst's:
see `_run`). Every row of a step samples its token in one pass (`sampling.draw`) after its own processors.

- Prefill: the requests being prefilled form one batch (`batch.py`) and run one forward pass together per
  iteration, each row feeding its own share of `prefill_chunk` prompt tokens (rows of different lengths, each
  at its own offset). Prompts that arrive together are prefilled together when they fit one pass; long ones a
  few at a time, oldest first (`_prefill_room`). A running stream waits at most one such step for its next
  token, however long the prompts are. A row whose prompt is done samples its first token from that same pass
  and moves to the decode batch.
- Decode: every running request advances by one token in one forward pass.

A prompt first resumes from a cache: the request's own `CacheSlot` (a Session's conversation) or else the
longest prefix the shared prompt cache holds; a finished request leaves its cache there for the next one.
Caches that cannot rewind (recurrent layers) are checkpointed where the request asked (`marks`), so prefill
chunks end there.

The model, its batches and every cache belong to the `Runner` (`runner.py`), which the loop drives with plain
data (token ids, row numbers); the runner of a group of processes replays those decisions on every member
(`mlxq.distributed`). A runner failure that ends the model for good (`EngineDown`: a member of the group is
gone) fails every request and stops the loop.

A request's tokens go through its `OutputProcessor` here (detokenize, stops, end-of-sequence, logprobs,
reasoning split, tool calls), so callers get finished pieces. They go out together once the next step is built,
as the loop starts waiting for MLX (`_flush`), so the callers' threads run while it holds no GIL. Errors stay
with their request: a processor or sampler that raises fails that request alone, and a failure of a shared model
step fails the requests in that step, while the engine goes on.
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
from functools import partial

import mlx.core as mx

from mlxq.engine.blas import BlasThreads
from mlxq.engine.constraints import GrammarProcessor
from mlxq.engine.output import Output, OutputProcessor, Reading, TokenLogprob, Usage
from mlxq.engine.prompt_cache import CacheSlot, resume_point
from mlxq.engine.runner import DECODE, PREFILL, Runner
from mlxq.engine.sampling import LogitsProcessor, SamplingParams, draw, make_sampler, penalize, seeded
from mlxq.engine.speculative import MTP, PromptLookup, draft_plan, mtp_drafts
from mlxq.engine.tokenizer import Tokenizer
from mlxq.errors import EngineDown, GenerationError, InvalidRequest, MlxqError
from mlxq.models.base import CausalLM

log = logging.getLogger("mlxq.engine")

PREFILL_CHUNK = 512  # prompt tokens per prefill step, shared by the rows being prefilled
MIN_SHARE = 128  # a long prompt's fewest tokens per prefill step (see Engine._prefill_room)
DEFAULT_MAX_BATCH = 32
DEFAULT_PROMPT_CACHE_BYTES = 1 << 30


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
    marks: list[int] = field(default_factory=list)  # prompt positions worth a checkpoint (caches that cannot rewind)
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)
    reading: Reading = field(default_factory=Reading)  # how the text reads back: reasoning split, tool calls
    slot: CacheSlot | None = None  # a conversation's own cache: resumed from, and left there afterwards
    # k: draft tokens checked per decode step, looked up in the prompt and answer; 'mtp': drafted by the model's MTP
    # head (`speculative.draft_plan`); 0: off
    speculative: int | str = 0
    on_output: Callable[[Output], None] = lambda out: None  # called on the engine thread; must not block
    # called on the engine thread after outputs went out, once for all requests that share it (they gave it
    # `on_output` one after another): a reader woken once for a step's outputs (`stream._Mailbox`); must not block
    on_flush: Callable[[], None] | None = None
    cancelled: bool = False
    finished: bool = False  # its last output went out

    def cancel(self) -> None:
        """Ends the request at the next step (from any thread)."""
        self.cancelled = True


# A sampled token, its logprob and the most likely tokens with theirs, best first (when the request asked for them)
Picked = tuple[int, float | None, list[tuple[int, float]]]


class _Sequence:
    """A request inside the engine: its sampler, processors, output processor and position."""

    def __init__(self, req: Request, tokenizer: Tokenizer):
        self.req = req
        self.sampler = make_sampler(req.params)
        self.procs = list(req.make_processors())  # after the penalties, which `penalize` applies to all rows
        self.out = OutputProcessor(tokenizer, max_tokens=req.max_tokens, stop=req.stop, ignore_eos=req.ignore_eos,
                                   reading=req.reading)
        self.generated = self.out.generated
        self.cached = self.pos = 0  # prompt tokens resumed from a cache / in the cache
        self.next_input = -1  # the last sampled token, which the next decode step feeds
        self.decoded = 0  # sampled tokens fed back (in the cache)
        drafter, self.max_draft = draft_plan(req.speculative)
        self.mtp = drafter == MTP  # drafts come from the MTP head (`speculative.mtp_drafts`), else from:
        self.lookup = PromptLookup(req.prompt) if drafter == "lookup" else None
        self.draft_len = self.max_draft  # guessed tokens per draft, adapted to how many the model takes (`checked`)
        self.guessed: list[int] | None = None  # positions of the last draft that were guesses (None: all of them)
        self.grammar = next((p for p in self.procs if isinstance(p, GrammarProcessor)), None)  # shapes the drafts

    def room(self) -> int:
        """Draft tokens to check after the next one: never more than the request may still take."""
        return min(self.draft_len, self.req.max_tokens - len(self.generated) - 1)

    def draft(self) -> list[int]:
        """Tokens to check after the next one (prompt lookup), never more than the request may still take. Under a
        grammar (JSON schema), the tokens it forces are drafted too, and looked-up tokens it forbids are not."""
        if self.lookup is None:
            return []
        self.lookup.extend(self.generated[len(self.lookup.tokens) - len(self.req.prompt) :])
        room = min(self.max_draft, self.req.max_tokens - len(self.generated) - 1)
        lookup = self.lookup
        self.guessed = None if self.grammar is None else []

        def guess(after: list[int]) -> list[int]:
            """Looked-up tokens after the draft so far: `draft_len` of them in all, however many forced tokens come
            between them."""
            tokens = lookup.draft(min(self.draft_len - len(self.guessed or ()), room - len(after)), after)
            if self.guessed is not None:
                self.guessed += range(len(after), len(after) + len(tokens))
            return tokens

        if self.grammar is None:
            return guess([])
        try:
            return self.grammar.draft(self.generated, guess, room)
        except GenerationError:  # the grammar lost track: this row's pick reports it, not the shared step
            return []

    def checked(self, drafted: int, accepted: int) -> None:
        """The next draft guesses twice as many tokens as were accepted of this one's guesses (at least one, at most
        the request's longest draft): each draft token costs its verification whether it is taken or not. Tokens a
        grammar forces are not guesses (the model nearly always takes them), and do not count."""
        guessed = range(drafted) if self.guessed is None else sorted({j for j in self.guessed if j < drafted})
        if not guessed:
            return
        taken = sum(j < accepted for j in guessed)
        grown = max(self.draft_len, 2 * len(guessed)) if taken == len(guessed) else 2 * taken
        self.draft_len = max(1, min(self.max_draft, grown))

    def process(self, logits: mx.array) -> mx.array:
        """This row's logits [1, V] (float32, penalized) after its processors (grammar, thinking control, guard)."""
        for proc in self.procs:
            logits = proc(self.generated, logits)
        return logits

    def accept(self, picked: Picked) -> Output:
        """Takes the sampled token; returns the output it makes final, finished if the request is done."""
        token, chosen, top = picked
        logprob = None if self.req.logprobs is None else TokenLogprob(token, chosen, top)
        out = self.out.add(token, logprob)
        self.next_input = token
        if out.finish_reason is not None:
            out.usage = self.usage()
        return out

    def end(self, reason: str) -> Output:
        out = self.out.finish(reason)
        out.usage = self.usage()
        return out

    def usage(self) -> Usage:
        return Usage(len(self.req.prompt), len(self.generated), self.cached, self.out.reasoning_tokens)

    @property
    def fed(self) -> list[int]:
        """The tokens in this sequence's cache: the prompt so far, then the sampled tokens decode steps fed."""
        if self.pos < len(self.req.prompt):
            return self.req.prompt[: self.pos]
        return self.req.prompt + self.generated[: self.decoded]


class Engine:
    """Runs `net` (a `CausalLM`, or a `Runner` that runs one) for many requests at once on its own thread.

    `max_batch`: requests run together (prefilling and decoding); more wait their turn. `prompt_cache_bytes`:
    bound of the shared prompt cache (0 turns it off; conversation slots are not counted; ignored when given a
    runner, which has its own). `prefill_chunk`: prompt tokens per prefill step. `prompt_cache_spill`: (directory,
    bytes): entries leaving the prompt cache go to disk there, up to that many bytes."""

    IDLE_S = 2.0  # an idle loop calls `runner.idle()` this often

    def __init__(self, net: CausalLM | Runner, tokenizer: Tokenizer, *, max_batch: int = DEFAULT_MAX_BATCH,
                 prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES, prefill_chunk: int = PREFILL_CHUNK,
                 prompt_cache_spill: tuple[str, int] | None = None):
        if max_batch < 1:
            raise InvalidRequest("max_batch must be >= 1")
        if prefill_chunk < 1:
            raise InvalidRequest("prefill_chunk must be >= 1")
        self.runner = net if isinstance(net, Runner) else Runner(net, prompt_cache_bytes, prompt_cache_spill)
        self.runner.attach(self.abort)
        self.net, self.tokenizer = self.runner.net, tokenizer
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.prompt_cache = self.runner.prompt_cache
        self.rewindable = self.runner.rewindable  # every layer can resume at any position (attention only)
        self._inbox: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: list[_Sequence] = []  # the runner's prefill rows, in row order
        self._running: list[_Sequence] = []  # its decode rows, in row order
        self._down: EngineDown | None = None  # set once the runner can no longer run the model
        self._thread: threading.Thread | None = None
        self._closed = False
        self._loop_done = False
        self._parked = threading.Event()
        # outputs made on the engine thread wait here until it next waits for MLX (`_flush`)
        self._outbox: list[tuple[Request, Output]] = []
        self._blas = BlasThreads()  # one BLAS thread for decode steps of several rows, measured for one (`blas.py`)
        self.steps = self.prefill_steps = self.failures = self.cancelled = 0
        self.drafted = self.accepted_drafts = 0  # speculative draft tokens checked / taken by decode steps

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
        if self._thread is not None and self._down is None:  # an aborted loop may be stuck for good
            self._parked.wait(timeout)

    def submit(self, request: Request) -> None:
        if not request.prompt:
            raise InvalidRequest("empty prompt")
        if request.max_tokens < 1:
            raise InvalidRequest("max_tokens must be >= 1")
        if self._down is not None:
            raise self._down
        if self._closed or not self.alive:
            raise GenerationError("the engine is not running")
        # an unseeded request's seed is drawn here, on the caller's thread and in submission order
        request.params = seeded(request.params)
        self._inbox.put(request)
        if self._loop_done or self._down is not None:  # closed meanwhile, after the loop's last look at the inbox
            self._drain_inbox()

    @property
    def pending(self) -> int:
        """Requests submitted and not finished yet."""
        return self._inbox.qsize() + len(self._waiting) + len(self._prefilling) + len(self._running)

    @property
    def down(self) -> EngineDown | None:
        """Why the engine can no longer run its model (a member of its group is gone), or None."""
        return self._down

    @property
    def alive(self) -> bool:
        return self._down is None and self._thread is not None and self._thread.is_alive() and not self._loop_done

    def stats(self) -> dict:
        return {
            "running": len(self._running),
            "prefilling": len(self._prefilling),
            "waiting": len(self._waiting),
            "steps": self.steps,
            "prefill_steps": self.prefill_steps,
            "drafted": self.drafted,
            "accepted_drafts": self.accepted_drafts,
            "failures": self.failures,
            "cancelled": self.cancelled,
            **self.runner.stats(),
        }

    def abort(self, error: EngineDown) -> None:
        """The model cannot run any more (a member of a group is gone): every request not finished ends with
        `error`, new ones are refused with it, and the loop stops. Callable from any thread, also while the loop
        is stuck in a step that will never finish (the runner's watchdog calls it then)."""
        if self._down is not None:
            return
        self._down = error
        self._closed = True
        for seq in self._snapshot():
            self._emit_error(seq.req, error)
        self._drain_inbox()
        self._inbox.put(None)

    def _snapshot(self) -> list[_Sequence]:
        """Every sequence the loop holds, read safely from another thread."""
        while True:
            try:
                return [*self._waiting, *self._prefilling, *self._running]
            except RuntimeError:  # the loop changed the deque meanwhile
                continue

    # ------------------------------------------------------------------------------------------ the loop
    def _run(self) -> None:
        mx.set_default_stream(mx.new_stream(mx.default_device()))  # MLX streams are per thread
        while self._take_new():
            self._guarded(self._prefill_phase, PREFILL)
            # A burst of requests reaches the engine spread over a few milliseconds (clients connecting one by one):
            # while the first are prefilled, the others arrive. Those start their prefill before the first decode
            # step of rows fresh from theirs: their first tokens come a decode step sooner, and the fresh rows wait
            # one prefill step more for their second token (once: never a row that is already streaming).
            if self._running and all(seq.decoded == 0 for seq in self._running) and self._inbox.qsize():
                if not self._take_new():
                    break
                self._guarded(partial(self._prefill_phase, only_new=True), PREFILL)
            self._guarded(self._decode_phase, DECODE)
        self._loop_done = True
        self._blas.idle()  # closed, maybe right after a step on one thread
        self._cancel_left()
        try:
            self.runner.close()
        except Exception:
            log.exception("closing the runner failed")

    def _prefill_phase(self, only_new: bool = False) -> None:
        """Admits waiting requests and runs a prefill step (`only_new`: only if a request was admitted)."""
        self._drop_cancelled(PREFILL, self._prefilling)
        admitted = self._admit()
        if self._prefilling and (admitted or not only_new):
            self._prefill_step()

    def _decode_phase(self) -> None:
        self._drop_cancelled(DECODE, self._running)
        if self._running:
            self._decode_step()

    def _guarded(self, phase: Callable[[], None], name: str) -> None:
        """Runs a phase; if its shared step fails, its batch is in an unknown state: the batch's requests fail and
        the engine goes on with a fresh one. If the model cannot run any more (`EngineDown`), every request fails
        and the loop stops."""
        if self._down is not None:
            return
        try:
            phase()
        except EngineDown as e:
            log.error("%s", e)
            self.abort(e)
        except Exception as e:
            if isinstance(e, MlxqError):  # a clear error (a damaged expert pack, say): its requests report it
                log.info("engine step failed: %s", e)
            else:
                log.exception("engine step failed")
            seqs = self._running if name == DECODE else self._prefilling
            for seq in seqs:
                self._fail(seq, e, clear_slot=False)
            seqs.clear()
            try:
                self.runner.reset(name)
            except EngineDown as down:
                self.abort(down)

    def _cancel_left(self) -> None:
        """On close, every request not finished yet ends as cancelled, so no caller waits forever."""
        for seq in [*self._waiting, *self._prefilling, *self._running]:
            self._emit(seq, seq.end("cancelled"))
        self._waiting.clear(), self._prefilling.clear(), self._running.clear()
        self._flush()
        self._drain_inbox()

    def _drain_inbox(self) -> None:
        while True:
            try:
                req = self._inbox.get_nowait()
            except queue.Empty:
                return
            if req is None:
                continue
            if self._down is not None:
                self._emit_error(req, self._down)
            else:
                _deliver((req, Output(finish_reason="cancelled", usage=Usage(len(req.prompt), 0, 0))))

    def _take_new(self) -> bool:
        """Moves submitted requests in (waiting for one when idle); False once closed."""
        block = not (self._waiting or self._prefilling or self._running)
        if block:
            self._flush()
            self._blas.idle()
        while True:
            try:
                req = self._inbox.get(block=block, timeout=self.IDLE_S if block else None)
            except queue.Empty:
                if block:  # idle: the runner may check on its group meanwhile
                    self._guarded(self.runner.idle, PREFILL)
                    continue
                return True
            if req is None or self._closed:
                if req is not None:
                    _deliver((req, Output(finish_reason="cancelled", usage=Usage(len(req.prompt), 0, 0))))
                return False
            try:
                self._waiting.append(_Sequence(req, self.tokenizer))
            except Exception as e:  # a bad sampler setting, say: this request fails
                self._emit_error(req, e)
            block = False

    def _admit(self) -> int:
        """Waiting requests join the prefill batch, oldest first, while the batch has room and the prefill step can
        take them (`_prefill_room`), resumed from a cache; returns how many joined."""
        joined = 0
        while (self._waiting and len(self._prefilling) + len(self._running) < self.max_batch
               and self._prefill_room(self._waiting[0])):
            seq = self._waiting.popleft()
            try:
                seq.cached = self.runner.admit(seq.req.prompt, seq.req.slot, seq.mtp)
            except EngineDown:
                self._waiting.appendleft(seq)
                raise
            except Exception as e:
                self._fail(seq, e)
                continue
            seq.pos = seq.cached
            self._prefilling.append(seq)
            joined += 1
        return joined

    def _prefill_room(self, seq: _Sequence) -> bool:
        """Whether `seq` may join the rows being prefilled: when all of them finish their prompts in one step
        together (short prompts arriving together share one pass), or each still gets `MIN_SHARE` tokens a step.
        Long prompts are otherwise prefilled a few at a time, so the first of them answer sooner, rather than all
        at the end. A prompt's remainder is its full length here, unless its own slot already holds a prefix."""
        rows = len(self._prefilling) + 1
        if rows == 1 or rows * MIN_SHARE <= self.prefill_chunk:
            return True
        slot, prompt = seq.req.slot, seq.req.prompt
        held = resume_point(slot.tokens, slot.marks, prompt, self.rewindable) if slot and slot.caches else 0
        longest = max([len(prompt) - held, *(len(s.req.prompt) - s.pos for s in self._prefilling)])
        return rows * longest <= self.prefill_chunk

    def _drop_cancelled(self, phase: str, seqs: list[_Sequence]) -> None:
        """Cancelled requests end: those waiting, and those in `phase` (whose work is kept for the next request)."""
        if phase == PREFILL:
            for seq in [s for s in self._waiting if s.req.cancelled]:
                self._waiting.remove(seq)
                self.cancelled += 1
                self._emit(seq, seq.end("cancelled"))
        for i in reversed([i for i, s in enumerate(seqs) if s.req.cancelled]):
            self.cancelled += 1
            self._leave(phase, seqs, i, seqs[i].end("cancelled"))  # what it computed serves the next request

    def _prefill_step(self) -> None:
        """One forward pass over every row being prefilled, each feeding its share of `prefill_chunk` prompt tokens
        (up to its next checkpoint mark). Rows whose prompt is done sample their first token and join the decode
        batch."""
        share = max(1, self.prefill_chunk // len(self._prefilling))
        tokens, at = [], []
        for seq in self._prefilling:
            prompt = seq.req.prompt
            target = min(len(prompt), seq.pos + share)
            if not self.rewindable:
                target = min([target, *(m for m in seq.req.marks if seq.pos < m < len(prompt))])
            tokens.append(prompt[seq.pos : target])
            at.append([target - seq.pos - 1] if target == len(prompt) else [])
        marks = [i for i, (seq, fed) in enumerate(zip(self._prefilling, tokens, strict=True))
                 if not self.rewindable and seq.pos + len(fed) in seq.req.marks]
        self._flush()
        self._blas.for_prefill()
        logits = self.runner.prefill(tokens, at, marks)
        self.prefill_steps += 1
        done: list[int] = []
        for i, (seq, fed) in enumerate(zip(self._prefilling, tokens, strict=True)):
            seq.pos += len(fed)
            if at[i]:
                done.append(i)
        if not done:
            return
        picks = self._pick([self._prefilling[i] for i in done], logits)
        for i, picked in reversed(list(zip(done, picks, strict=True))):
            seq = self._prefilling[i]
            out = self._accept(seq, picked)
            if out is None or out.finish_reason is not None:
                self._leave(PREFILL, self._prefilling, i, out)
            else:
                del self._prefilling[i]
                # its last token is never fed: the cache ends at most max_tokens - 1 past the prompt
                self.runner.promote(i, len(seq.req.prompt) + seq.req.max_tokens - 1)
                self._running.append(seq)

    def _decode_step(self) -> None:
        """One token for every running request, in one forward pass; more for a request whose draft is right.

        A row with a draft (`Request.speculative`) feeds its next token and then the draft, and gets logits at
        each of them: the token after position j is picked from them as plain decoding would (the processors see
        the tokens accepted so far), and while it equals draft token j + 1, that token's logits are valid too and
        the next is picked from them. The cache then keeps what was accepted (`Runner.rewind`). Drafts are looked
        up in the text (prompt lookup), or come from the model's MTP head, a pass of it per draft token for all the
        rows using it (`speculative.mtp_drafts`), each token with the distribution it was drawn from."""
        drafts = [seq.draft() for seq in self._running]
        qs: list[list] = [[None] * len(d) for d in drafts]  # what each MTP draft token was drawn from
        if mtp := [i for i, seq in enumerate(self._running) if seq.mtp]:
            self._blas.for_decode(len(mtp))
            for i, proposed in zip(mtp, mtp_drafts(self.runner, [self._running[i] for i in mtp]), strict=True):
                drafts[i], qs[i] = [t for t, _ in proposed], [q for _, q in proposed]
        self._blas.for_decode(len(self._running) + sum(len(d) for d in drafts))
        if any(drafts):
            self.drafted += sum(len(d) for d in drafts)
            logits = self.runner.verify([[s.next_input, *d] for s, d in zip(self._running, drafts, strict=True)])
            starts = [0]
            for d in drafts[:-1]:
                starts.append(starts[-1] + 1 + len(d))
            firsts = logits[mx.array(starts)]
        else:
            firsts = self.runner.decode([s.next_input for s in self._running])
        for seq in self._running:
            seq.decoded += 1
        picks = self._pick(self._running, firsts, [d[0] if d else None for d in drafts],
                           [q[0] if q else None for q in qs])
        self._blas.decoded()
        self.steps += 1
        outs = [self._accept(seq, picked) for seq, picked in zip(self._running, picks, strict=True)]
        taken = [1] * len(outs)  # tokens of what each row was fed that it keeps (its next token, then the draft's)
        while going := [i for i, (seq, out, draft, n) in enumerate(zip(self._running, outs, drafts, taken, strict=True))
                        if out is not None and out.finish_reason is None and n <= len(draft)
                        and seq.next_input == draft[n - 1]]:
            # the draft token just picked is in the cache, and the logits after it are valid: pick the next from them
            for i in going:
                self._running[i].decoded += 1
            self.accepted_drafts += len(going)
            following = [drafts[i][taken[i]] if taken[i] < len(drafts[i]) else None for i in going]
            q = [qs[i][taken[i]] if taken[i] < len(drafts[i]) else None for i in going]
            at = mx.array([starts[i] + taken[i] for i in going])
            picks = self._pick([self._running[i] for i in going], logits[at], following, q)
            for i, picked in zip(going, picks, strict=True):
                outs[i], taken[i] = self._accept(self._running[i], picked), taken[i] + 1
        for seq, draft, n in zip(self._running, drafts, taken, strict=True):
            if draft:
                seq.checked(len(draft), n - 1)
        if any(drafts):
            self.runner.rewind(taken)
        for i in reversed(range(len(outs))):
            if outs[i] is None or outs[i].finish_reason is not None:
                self._leave(DECODE, self._running, i, outs[i])

    def _pick(self, seqs: list[_Sequence], logits: mx.array, drafts: list[int | None] | None = None,
              qs: list[mx.array | None] | None = None) -> list[Picked | Exception]:
        """Each sequence's sampled token from row i of `logits` (given draft token i if any, drawn from qs[i]), all
        rows in one pass (`sampling.draw`) after each row's own processors; an exception for a row that failed."""
        failed: dict[int, Exception] = {}
        scores = penalize(logits.astype(mx.float32), [seq.req.params for seq in seqs], [seq.generated for seq in seqs])
        processed = {}
        for i, seq in enumerate(seqs):
            if seq.procs:
                try:
                    processed[i] = seq.process(scores[i : i + 1])
                except Exception as e:
                    failed[i] = e
        try:
            if processed:
                scores[mx.array(list(processed))] = mx.concatenate(list(processed.values()))
            tokens = draw([seq.sampler for seq in seqs], scores, drafts, qs)
            chosen, top = _logprobs(scores, tokens, [seq.req.logprobs for seq in seqs])
            self._flush()  # the last step's outputs go out as this thread starts waiting for MLX (GIL released)
            mx.eval(tokens, chosen, top)
        except Exception as e:  # find the rows that fail on their own; if the model step failed, that is all
            if len(seqs) == 1:
                return [failed.get(0, e)]
            return [failed.get(i) or self._pick([seq], logits[i : i + 1], drafts and [drafts[i]], qs and [qs[i]])[0]
                    for i, seq in enumerate(seqs)]
        tokens, chosen = tokens.tolist(), chosen.tolist() if chosen is not None else None
        picks: list[Picked | Exception] = []
        for i, seq in enumerate(seqs):
            k = seq.req.logprobs
            if i in failed:
                picks.append(failed[i])
            elif k is None:
                picks.append((tokens[i], None, []))
            else:
                best = sorted(zip(*(t[i].tolist() for t in top), strict=True), key=lambda t: -t[1]) if k else []
                picks.append((tokens[i], chosen[i], best[:k]))
        return picks

    def _accept(self, seq: _Sequence, picked: Picked | Exception) -> Output | None:
        """Hands the sampled token to the sequence and, unless it finished (see `_leave`), its output to the
        caller; None if the sequence failed."""
        try:
            if isinstance(picked, Exception):
                raise picked
            out = seq.accept(picked)
        except Exception as e:
            self._fail(seq, e)
            return None
        if out.finish_reason is None:
            self._emit(seq, out)  # every token, even one whose text is held back (its caller counts it)
        return out

    def _leave(self, phase: str, seqs: list[_Sequence], i: int, last: Output | None) -> None:
        """Takes sequence i out of `phase`; its cache goes to its slot or to the prompt cache, unless it failed
        (`last` None). Its last output goes out after that, so a caller that sees it finished finds its slot
        ready for the next request."""
        seq = seqs.pop(i)
        self.runner.leave(phase, i, seq.fed if last is not None else None)
        if last is not None:
            self._emit(seq, last)

    # ------------------------------------------------------------------------------------------ failures
    def _fail(self, seq: _Sequence, error: Exception, clear_slot: bool = True) -> None:
        self.failures += 1
        if not isinstance(error, MlxqError):
            log.error("request failed: %r", error)
        if seq.req.slot is not None and clear_slot:
            self.runner.clear_slot(seq.req.slot)
        self._emit_error(seq.req, error)

    def _emit_error(self, req: Request, error: Exception) -> None:
        if not isinstance(error, MlxqError):
            error = GenerationError(f"generation failed: {type(error).__name__}: {error}")
        out = Output(finish_reason="error", error=error)
        if threading.current_thread() is self._thread:
            self._outbox.append((req, out))  # after the request's earlier outputs
        else:  # `abort` from another thread: at once (the loop may be stuck)
            _deliver((req, out))

    def _emit(self, seq: _Sequence, out: Output) -> None:
        self._outbox.append((seq.req, out))

    def _flush(self) -> None:
        """Hands the outputs made so far to their callers. The loop calls this once the next step is built, just
        before it waits for MLX to compute it (or for requests): the callers' threads (the server's event loop, API
        readers) then run while this thread waits with the GIL released, not while it builds the step in Python,
        which they would slow down by taking the GIL from it."""
        outbox, self._outbox = self._outbox, []
        _deliver(*outbox)


def _deliver(*outputs: tuple[Request, Output]) -> None:
    """Gives each (request, output) to its request's `on_output`, then calls each distinct `on_flush` once."""
    flushes: dict[Callable[[], None], list[Request]] = {}
    for req, out in outputs:
        if req.finished:  # ended already (an engine aborted from another thread, say): nothing more goes out
            continue
        req.finished = out.finish_reason is not None
        try:
            req.on_output(out)
        except Exception:  # the receiver is gone: nobody wants the rest
            log.exception("output callback failed; cancelling the request")
            req.cancel()
            continue
        if req.on_flush is not None:
            flushes.setdefault(req.on_flush, []).append(req)
    for flush, reqs in flushes.items():
        try:
            flush()
        except Exception:
            log.exception("output callback failed; cancelling the request")
            for req in reqs:
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


def _logprobs(logits: mx.array, tokens: mx.array, asked: list[int | None]) -> tuple[mx.array | None, tuple]:
    """For rows that asked for logprobs (`asked[b]` not None): each row's chosen token's logprob [B], and the ids and
    logprobs [B, k] of the k most likely tokens, k the most any row asked for (unordered). Only then are the logits
    normalised: sampling needs no logprobs, and an exp over the vocabulary is most of a step's sampling time."""
    if all(k is None for k in asked):
        return None, ()
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    k = min(max(k or 0 for k in asked), logprobs.shape[-1])
    if not k:
        return chosen, ()
    top = mx.argpartition(-logprobs, k - 1, axis=-1)[:, :k]
    return chosen, (top, mx.take_along_axis(logprobs, top, axis=-1))
