"""One rank of a test group (tests/test_distributed.py starts n of them on the ring backend, loopback only).

    python tests/group_worker.py PLAN.json

PLAN: {"cases": [{"model": dir, "parallel": mode, "out": dir, "probe": true, "expert_memory": null,
"combine": null}, ...]}. Every rank loads each case's model split that way (an experts split combining as
`combine` says); rank 0 runs `probe` (which the test also runs on the single-process model) unless the case says
not to, writes what it saw and the group's status to the case's `out` dir, and ends the group; the other ranks
follow. Each rank writes there what its expert pool read and how its MoE blocks combined.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np

import mlxq
from mlxq.distributed.split import expert_combines, set_expert_combine
from mlxq.engine import stream as streams
from mlxq.engine.prompt_cache import CacheSlot

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


def main(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    group = mx.distributed.init(backend="ring", strict=True)
    for case in plan["cases"]:
        model = mlxq.load(case["model"], group=group, parallel=case["parallel"],
                          expert_memory=case.get("expert_memory"))
        if case.get("combine"):  # how an experts split combines its blocks (every rank alike)
            set_expert_combine(model.net, case["combine"])
        out = Path(case["out"])
        if group.rank() == 0:
            if case.get("probe", True):
                probe(model, out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "status.json").write_text(json.dumps(model.status()))
            model.shutdown()
        else:
            model.follow()
        out.mkdir(parents=True, exist_ok=True)
        if (stats := model.expert_stats()) is not None:  # what this rank's own pool read
            (out / f"experts-{group.rank()}.json").write_text(json.dumps(stats.as_dict()))
        if case["parallel"] == "experts":  # how its MoE blocks combined
            (out / f"combines-{group.rank()}.json").write_text(json.dumps(expert_combines(model.net)))


if __name__ == "__main__":
    main(sys.argv[1])
