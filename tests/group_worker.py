"""One rank of a test group (tests/test_distributed.py starts n of them on the ring backend, loopback only).

    python tests/group_worker.py PLAN.json

PLAN: {"cases": [{"model": dir, "parallel": mode, "out": dir, "probe": true | "mtp" | "session" | "spill" | false,
"expert_memory": null, "expert_options": null, "combine": null}, ...]}. Every rank loads each case's model split
that way (an experts split combining as `combine` says); rank 0 runs the probe (`PROBES`; the test also runs it on
the single-process model) unless the case says not to, writes what it saw and the group's status to the case's
`out` dir, and ends the group; the other ranks follow. Each rank writes there what its expert pool read, how its
MoE blocks combined, and its peak memory.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np

import mlxq
from mlxq.distributed.group import peak_rss_bytes
from mlxq.distributed.split import expert_combines, set_expert_combine
from mlxq.engine import stream as streams
from mlxq.engine.prompt_cache import CacheSlot
from mlxq.experts import expert_stats

TOKENS = [40, 74, 83, 84, 3, 91, 12, 150, 33, 7, 64, 99, 120, 5]
PROMPTS = ["Once upon a time", "The quick brown fox", "12 + 30 ="]


def probe(model, out: Path) -> None:
    """What a split model must do exactly as the single-process one: full-sequence logits; greedy generation of
    several requests at once (batched rows, micro-batches); a prompt resumed from the prompt cache; a conversation
    resumed from its own slot (as a Session's turns are); speculative decoding (`speculate`)."""
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "logits.npy", np.array(model.logits(TOKENS)))
    found: dict = {}

    def run(i: int, prompt: str) -> None:
        found[i] = model.generate(prompt, max_tokens=8, ignore_eos=True).tokens

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    again = model.generate(PROMPTS[0] + " there", max_tokens=6, ignore_eos=True)
    slot, turns, prompt = CacheSlot(), [], TOKENS[:6]  # a conversation's own cache, as a Session keeps it
    for more in ([], [9, 21, 33]):
        prompt = prompt + more
        request = model.request(prompt, max_tokens=5, ignore_eos=True)
        request.slot = slot
        r = streams.run(model.engine, request)
        turns.append({"tokens": r.tokens, "cached": r.usage.cached_tokens})
        prompt = prompt + r.tokens
    result = {"batched": [found[i] for i in range(len(PROMPTS))], "resumed": again.tokens,
              "resumed_cached": again.usage.cached_tokens, "slot": turns, **speculate(model)}
    (out / "result.json").write_text(json.dumps(result))


def speculate(model) -> dict:
    """Greedy answers with prompt-lookup drafts (`speculative`), one request beside a plain one in the same batch:
    a prompt whose tail occurred before, followed by the model's own continuation with every fifth token changed,
    so that some drafts are taken and some rolled back (`Runner.verify` / `Runner.rewind` on every rank). The
    engine's draft counters go with the tokens: every rank must have taken the same decisions."""
    head = TOKENS[:5]
    first = model.generate(head, max_tokens=12, ignore_eos=True).tokens
    prompt = head + [t ^ 1 if i % 5 == 4 else t for i, t in enumerate(first)] + head
    before = model.engine.stats()
    found: dict = {}

    def run(k: int) -> None:
        found[k] = model.generate(prompt, max_tokens=16, ignore_eos=True, speculative=k).tokens

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = model.engine.stats()
    return {"speculative": found[4], "speculative_plain": found[0],
            "drafted": after["drafted"] - before["drafted"],
            "accepted_drafts": after["accepted_drafts"] - before["accepted_drafts"]}


def probe_mtp(model, out: Path) -> None:
    """What a split model with an MTP head must do exactly as the single-process one: full-sequence logits, and
    greedy answers drafted by the head (`speculative='mtp'`), batched with a plain row, a prompt-lookup row and a
    second MTP row (the head's own batch, rows joining and leaving it), with the engine's draft counters: every
    rank must have taken the same decisions."""
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "logits.npy", np.array(model.logits(TOKENS)))
    # the head's own logits, every draft step of one request alone (its first steps read a whole prompt)
    runner, drafts = model.engine.runner, []

    def recording(tokens, first):
        drafts.append(np.array(type(runner).mtp_draft(runner, tokens, first)))
        return mx.array(drafts[-1])

    runner.mtp_draft = recording
    model.generate(TOKENS, max_tokens=10, ignore_eos=True, speculative="mtp")
    del runner.mtp_draft
    np.save(out / "draft_logits.npy", np.concatenate(drafts))
    prompts = [TOKENS[:6], TOKENS[3:12], TOKENS, TOKENS[7:]]
    plain = [model.generate(p, max_tokens=16, ignore_eos=True).tokens for p in prompts]
    before = model.engine.stats()
    found: dict = {}

    def run(i: int, speculative) -> None:
        found[i] = model.generate(prompts[i], max_tokens=16 - 4 * (i == 1), ignore_eos=True,
                                  speculative=speculative).tokens

    threads = [threading.Thread(target=run, args=(i, k)) for i, k in enumerate(("mtp", "mtp", 0, 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = model.engine.stats()
    result = {"plain": plain, "drafted_answers": [found[i] for i in range(len(prompts))],
              "drafted": after["drafted"] - before["drafted"],
              "accepted_drafts": after["accepted_drafts"] - before["accepted_drafts"]}
    (out / "result.json").write_text(json.dumps(result))


QUESTIONS = ["Is it soup?", "Did he die?", "Was he alone?"]


def probe_session(model, out: Path) -> None:
    """A conversation saved after two turns (`Session.save`: on a group, each rank its own share) and resumed from the
    file (`Session.load`): its third turn equals the uninterrupted conversation's, token for token, and runs only
    what is new. On a group, what must fail does, with one line on every rank, and the group goes on
    (`errors.json`): a file from another model, a rank's share corrupt, missing, or from another save, a share
    that cannot be written (no file kept)."""
    from mlxq.api import Session
    from mlxq.distributed.runner import share_path
    from mlxq.errors import MlxqError

    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "logits.npy", np.array(model.logits(TOKENS)))
    path = out / "conversation.session"
    talk = Session(model, system="Riddles.", max_tokens=6, logit_bias={159: -1e9})  # (159: the end of text)
    answers = []
    for q in QUESTIONS:
        if q == QUESTIONS[2]:
            talk.save(path)
        talk.ask(q)
        answers.append(talk.last.tokens)
    resumed = Session.load(model, path)
    resumed.ask(QUESTIONS[2])
    again = resumed.last.tokens
    result = {"answers": answers, "resumed": again, "resumed_cached": resumed.stats[0].cached_tokens,
              "resumed_processed": resumed.stats[0].processed_tokens}
    (out / "result.json").write_text(json.dumps(result))
    size = getattr(model, "group", None) and model.group.size()
    if not size:
        return
    last = size - 1

    def copy(to: str, ranks=range(size), source: Path = path) -> Path:
        for r in ranks:
            share_path(out / to, r).write_bytes(share_path(source, r).read_bytes())
        return out / to

    def after(session) -> list[int]:
        session.ask(QUESTIONS[2])
        return session.last.tokens

    def attempt(what) -> str:
        try:
            what()
        except MlxqError as e:
            return f"{type(e).__name__}: {e}"
        return "no error"

    corrupt = copy("corrupt.session")
    data = bytearray(share_path(corrupt, last).read_bytes())
    data[-8] ^= 0xFF  # an array's bytes: the checksum no longer matches
    share_path(corrupt, last).write_bytes(bytes(data))
    Session(model).save(out / "other.session")
    mixed = copy("mixed.session", ranks=range(last))
    share_path(mixed, last).write_bytes(share_path(out / "other.session", last).read_bytes())
    share_path(out / "blocked.session", last).mkdir()  # rank `last` cannot write its share there
    errors = {
        "foreign": attempt(lambda: Session.load(model, Path(model.checkpoint.path) / "single" / path.name)),
        "corrupt": attempt(lambda: Session.load(model, corrupt)),
        "missing": attempt(lambda: Session.load(model, copy("missing.session", ranks=range(last)))),
        "mixed": attempt(lambda: Session.load(model, mixed)),
        "blocked": attempt(lambda: resumed.save(out / "blocked.session")),
        "blocked_kept": (out / "blocked.session").exists(),
        "after": after(Session.load(model, path)) == again,  # and the group goes on
    }
    (out / "errors.json").write_text(json.dumps(errors))


def probe_spill(model, out: Path) -> None:
    """The prompt cache spilling to disk: room in memory for one entry and on disk for two, prompts of one length
    (entries of one size) that push each other out to disk and off it, then come back from disk. On a group, rank 0
    decides by its sizes and the other ranks replay it (each rank's files in `out/spill/rank<r>`)."""
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "logits.npy", np.array(model.logits(TOKENS)))
    # long enough that the attention layers' keys and values, which grow with them, are most of a file: a pipeline's
    # ranks then hold shares of very different sizes (rank 0's replayed decisions differ from a rank's own)
    prompts = [[(7 * i + 3 * k) % 150 + 5 for i in range(200)] for k in range(5)]
    model.generate(prompts[0], max_tokens=4, ignore_eos=True)
    entry = model.engine.stats()["prompt_cache"]["bytes"]  # one entry's (this rank's share of it), and its file's
    model.configure(prompt_cache_bytes=int(1.5 * entry), prompt_cache_spill=(str(out / "spill"), 1 << 30))
    for prompt in prompts[:2]:
        model.generate(prompt, max_tokens=4, ignore_eos=True)
    file = model.engine.stats()["prompt_cache"]["spilled_bytes"]
    model.configure(prompt_cache_spill=(str(out / "spill"), int(2.5 * file)))
    runs, answers = [], {}
    for k in [0, 1, 2, 3, 4, 3, 0, 2]:  # then next turns: 3's from disk, 0's and 2's dropped from it by then
        prompt = prompts[k] + answers[k] + [9, 9] if k in answers else prompts[k]
        r = model.generate(prompt, max_tokens=4, ignore_eos=True)
        answers[k] = r.tokens
        runs.append({"tokens": r.tokens, "cached": r.usage.cached_tokens})
    cache = model.engine.stats()["prompt_cache"]
    result = {"runs": runs, **{k: cache[k] for k in ("entries", "spilled_entries", "spill_writes", "spill_reads")}}
    (out / "result.json").write_text(json.dumps(result))


PROBES = {True: probe, "mtp": probe_mtp, "session": probe_session, "spill": probe_spill}


def main(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    group = mx.distributed.init(backend="ring", strict=True)
    for case in plan["cases"]:
        model = mlxq.load(case["model"], group=group, parallel=case["parallel"],
                          expert_memory=case.get("expert_memory"), expert_options=case.get("expert_options"))
        if case.get("combine"):  # how an experts split combines its blocks (every rank alike)
            set_expert_combine(model.net, case["combine"])
        out = Path(case["out"])
        if group.rank() == 0:
            if case.get("probe", True):
                PROBES[case.get("probe", True)](model, out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "status.json").write_text(json.dumps(model.status()))
            if (stats := model.expert_stats()) is not None:  # what the whole group's pools read (gathered)
                (out / "experts-group.json").write_text(json.dumps(stats.as_dict()))
            model.shutdown()
        else:
            model.follow()
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rss-{group.rank()}.json").write_text(json.dumps({  # measured here, in the rank's own process
            "peak_rss_bytes": peak_rss_bytes(), "mlx_cache_bytes": mx.get_cache_memory(),
            "mlx_peak_bytes": mx.get_peak_memory()}))
        if (stats := expert_stats(model.net)) is not None:  # what this rank's own pool read
            (out / f"experts-{group.rank()}.json").write_text(json.dumps(stats.as_dict()))
        if (out / "spill").is_dir():  # the files this rank keeps on disk for its share of the prompt cache
            files = sorted(p.name for p in (out / "spill" / f"rank{group.rank()}").glob("entry-*"))
            (out / f"spill-{group.rank()}.json").write_text(json.dumps(files))
        if case["parallel"] == "experts":  # how its MoE blocks combined
            (out / f"combines-{group.rank()}.json").write_text(json.dumps(expert_combines(model.net)))


if __name__ == "__main__":
    main(sys.argv[1])
