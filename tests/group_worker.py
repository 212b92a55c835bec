"""One rank of a test group (tests/test_distributed.py starts n of them on the ring backend, loopback only).

    python tests/group_worker.py PLAN.json

PLAN: {"cases": [{"model": dir, "parallel": mode, "out": dir, "probe": true}, ...]}. Every rank loads each case's
model split that way; rank 0 runs `probe` (which the test also runs on the single-process model) unless the case
says not to, writes what it saw and the group's status to the case's `out` dir, and ends the group; the other
ranks follow.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np

import mlxq
from mlxq.engine import stream as streams
from mlxq.engine.prompt_cache import CacheSlot

TOKENS = [40, 74, 83, 84, 3, 91, 12, 150, 33, 7, 64, 99, 120, 5]
PROMPTS = ["Once upon a time", "The quick brown fox", "12 + 30 ="]


def probe(model, out: Path) -> None:
    """What a split model must do exactly as the single-process one: full-sequence logits; greedy generation of
    several requests at once (batched rows, micro-batches); a prompt resumed from the prompt cache; a conversation
    resumed from its own slot (as a Session's turns are)."""
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
              "resumed_cached": again.usage.cached_tokens, "slot": turns}
    (out / "result.json").write_text(json.dumps(result))


def main(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    group = mx.distributed.init(backend="ring", strict=True)
    for case in plan["cases"]:
        model = mlxq.load(case["model"], group=group, parallel=case["parallel"])
        if group.rank() == 0:
            out = Path(case["out"])
            if case.get("probe", True):
                probe(model, out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "status.json").write_text(json.dumps(model.status()))
            model.shutdown()
        else:
            model.follow()


if __name__ == "__main__":
    main(sys.argv[1])
