"""Speculative decoding with prompt lookup against plain decoding, on the same engine in the same run.

SmolLM2-135M-Instruct, greedy (so both give the same tokens, which is checked), on two tasks:
1. `json_game_master`: a lateral-thinking-puzzle game master several turns into the game, answering the next
   questions in JSON (four of them, each asked of the transcript; constrained to the game's schema), as the
   umigame service does: the answers repeat keys, values and phrases of the transcript.
2. `summary`: a summary of a passage given in the prompt.

Figures per task: decode tokens/s with drafts and without (`speculative_vs_plain` = ours / plain; goal >= 1.5x on
the JSON task), tokens per decode step (1 + accepted draft tokens per step) and the share of drafted tokens taken.
And what a draft costs on this machine: the time of one step feeding 1 + k tokens (a verification of k drafted
tokens) over that of a plain one-token step (`verify_cost`), at the JSON prompt's length.

    python bench/speculative.py [--model smollm2] [--draft 8] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "examples" / "umigame"))

from common import median, parse_args, write_result  # noqa: E402
from puzzle import SCHEMA  # noqa: E402  (the umigame service's answer schema)

PUZZLE = (
    "A man walks into a restaurant by the sea and orders turtle soup. After one spoonful he asks the chef: 'Is this "
    "really turtle soup?' The chef says yes. The man goes home and takes his own life that night. Why?"
)
STORY = (
    "Years ago the man was shipwrecked on an island with his friends. When the food ran out, one friend died, and the "
    "others fed the man a soup they called turtle soup. Tasting real turtle soup, he understood what he had eaten."
)
SYSTEM = (
    "You are the game master of a lateral thinking puzzle.\n"
    f"Puzzle: {PUZZLE}\nHidden story (never tell it): {STORY}\n"
    'Answer every question with a JSON object: {"answer": "yes" | "no" | "irrelevant", "solved": true | false, '
    '"comment": "a short remark"}. Keep the comment short and never quote the hidden story.'
)
TURNS = [
    ("Was the soup poisoned?", {"answer": "no", "solved": False, "comment": "The soup was not poisoned."}),
    ("Had the man eaten turtle soup before?", {"answer": "yes", "solved": False,
                                                "comment": "He thinks he had eaten turtle soup before."}),
    ("Was the man ever shipwrecked?", {"answer": "yes", "solved": False, "comment": "Yes, he was shipwrecked."}),
    ("Did someone die on the island?", {"answer": "yes", "solved": False, "comment": "Yes, someone died."}),
]
NEXT_QUESTIONS = [  # each asked of the transcript above: more decoded tokens per measurement, less noise
    "Was the soup he had eaten on the island really turtle soup?",
    "Did the chef lie to the man?",
    "Did his friends lie to him on the island?",
    "Was the man a sailor?",
]

PASSAGE = (
    "The city council met on Tuesday to discuss the new library. The library will be built next to the central "
    "park and will open in the spring of next year. It will have a reading room for children, a room for "
    "computers, and a large hall for talks and concerts. The council said the library will cost twelve million "
    "dollars, paid by the city and by a gift from a local family. Some members of the council asked whether the "
    "city can pay for the staff of the new library. The mayor said the city will hire ten new workers and that "
    "the old library on Main Street will close when the new library opens. People who live near the park said "
    "they are happy about the library but worried about traffic and parking. The council will meet again next "
    "month to talk about parking near the new library."
)


def game_master_prompts() -> list[list[dict]]:
    msgs = [{"role": "system", "content": SYSTEM}]
    for question, answer in TURNS:
        msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": json.dumps(answer)}]
    return [[*msgs, {"role": "user", "content": q}] for q in NEXT_QUESTIONS]


TASKS = {
    "json_game_master": (game_master_prompts, dict(schema=SCHEMA)),
    "summary": (lambda: [[{"role": "user", "content": f"Summarize this news story in three sentences:\n\n{PASSAGE}"}]],
                {}),
}


def measure(model, prompts: list[list[dict]], options: dict, draft: int, max_tokens: int) -> dict:
    """One greedy answer to each prompt, one after the other; decode tokens/s over them all (each answer from its
    first token to its last) and the decode steps they took."""
    before = model.engine.stats()
    results = [model.generate(p, max_tokens=max_tokens, speculative=draft, **options) for p in prompts]
    after = model.engine.stats()
    decoded = sum(len(r.tokens) - 1 for r in results)  # each answer's first token comes from prefill
    decode_s = sum(r.timings.decode_s for r in results)
    return {"tokens": [r.tokens for r in results], "decode_tps": decoded / decode_s if decode_s else 0.0,
            "decoded": decoded, "steps": after["steps"] - before["steps"],
            "accepted": after["accepted_drafts"] - before["accepted_drafts"],
            "drafted": after["drafted"] - before["drafted"]}


def run_task(model, name: str, draft: int, max_tokens: int, repeats: int) -> dict:
    build, options = TASKS[name]
    prompts = build()
    for p in prompts:  # warm up: every prompt is in the prompt cache for the runs below
        model.generate(p, max_tokens=4, **options)
    plain, fast = [], []
    for _ in range(repeats):  # alternated, so a change in machine load hits both alike
        plain.append(measure(model, prompts, options, 0, max_tokens))
        fast.append(measure(model, prompts, options, draft, max_tokens))
    tokens = plain[0]["tokens"]
    identical = all(r["tokens"] == tokens for r in plain + fast)
    plain_tps, fast_tps = median([r["decode_tps"] for r in plain]), median([r["decode_tps"] for r in fast])
    decoded = plain[0]["decoded"]
    out = {
        "answers": len(prompts),
        "completion_tokens": sum(len(t) for t in tokens),
        "identical_output": identical,
        "plain_decode_tps": round(plain_tps, 2),
        "speculative_decode_tps": round(fast_tps, 2),
        "speculative_vs_plain": round(fast_tps / plain_tps, 3) if plain_tps else None,
        "tokens_per_step": round(decoded / fast[0]["steps"], 3) if fast[0]["steps"] else None,
        "accepted_per_step": round(fast[0]["accepted"] / fast[0]["steps"], 3) if fast[0]["steps"] else None,
        "draft_acceptance": round(fast[0]["accepted"] / fast[0]["drafted"], 3) if fast[0]["drafted"] else None,
        "texts": [model.tokenizer.decode(t, skip_special_tokens=True) for t in tokens],
    }
    print(f"{name}: plain {out['plain_decode_tps']} tok/s, prompt lookup {out['speculative_decode_tps']} tok/s "
          f"({out['speculative_vs_plain']}x), {out['tokens_per_step']} tokens/step, identical={identical}",
          flush=True)
    return out


def verify_cost(model, context: list[int], ks: tuple[int, ...], repeats: int) -> dict:
    """Time of a step feeding 1 + k tokens over that of a plain one-token step (medians, and fastest runs), after
    `context` (in a batch of its own, on this thread), the settings interleaved so machine load hits them alike."""
    import time

    import mlx.core as mx

    from mlxq.engine.batch import make_batch

    net = model.engine.net
    batch = make_batch(net)
    batch.add(net.make_cache())
    mx.eval(batch.step([context], [[len(context) - 1]]), batch.state)
    length, times = batch.lengths[0], {k: [] for k in (0, *ks)}
    for _ in range(repeats):
        for k in times:
            start = time.perf_counter()
            mx.eval(batch.step([context[-1 - k :]], [list(range(k + 1))]), batch.state)
            times[k].append(time.perf_counter() - start)
            batch.rows.lengths = [length]  # back to the context: the step's keys are never read
    # On a shared machine the fastest of the repeats is closest to what the step itself costs; both are kept.
    return {"plain_step_ms": {"median": round(median(times[0]) * 1000, 1), "min": round(min(times[0]) * 1000, 1)},
            **{f"draft_{k}": {"median": round(median(times[k]) / median(times[0]), 3),
                              "min": round(min(times[k]) / min(times[0]), 3)} for k in ks}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--draft", type=int, default=8, help="draft tokens per step")
    args = parse_args(ap)

    import os

    import mlxq

    load_before = [round(x, 2) for x in os.getloadavg()]
    model = mlxq.load(args.model)
    max_tokens, repeats = (64, 1) if args.quick else (128, 3)
    tasks = {name: run_task(model, name, args.draft, max_tokens, repeats) for name in TASKS}
    context = model.tokenizer.apply_chat_template(game_master_prompts()[0], add_generation_prompt=True)
    cost = verify_cost(model, context, (1, 2, 4, args.draft), 5 if args.quick else 20)
    print(f"verify cost (step feeding 1 + k tokens / a plain step): {cost}", flush=True)
    write_result("speculative", {
        "model": args.model, "draft": args.draft, "quick": args.quick, "max_tokens": max_tokens,
        "repeats": repeats, "loadavg_before": load_before, "verify_cost": cost, "prompt_lookup": tasks,
        "speculative_vs_plain": tasks["json_game_master"]["speculative_vs_plain"],
        "goal_json_1_5x": bool(tasks["json_game_master"]["speculative_vs_plain"] or 0) and
        tasks["json_game_master"]["speculative_vs_plain"] >= 1.5,
    })


if __name__ == "__main__":
    main()
