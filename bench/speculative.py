"""Speculative decoding with prompt lookup against plain decoding, on the same engine in the same run.

SmolLM2-135M-Instruct, greedy (so both give the same tokens, which is checked), on two tasks:
1. `json_game_master`: a lateral-thinking-puzzle game master several turns into the game, answering the next
   questions in JSON (four of them, each asked of the transcript; constrained to the game's schema), as the
   umigame service does: the answers repeat keys, values and phrases of the transcript.
2. `summary`: a summary of a passage given in the prompt.

Figures per task: decode tokens/s with drafts and without (`speculative_vs_plain` = ours / plain; goal >= 1.5x on
the JSON task), tokens per decode step (1 + accepted draft tokens per step) and the share of drafted tokens taken.
The machine may be shared, so plain and drafted answers alternate prompt by prompt (which goes first alternating),
each repeat gives one ratio from what both sides decoded in it, the figure is the median over repeats, and the goal's
verdict is `robust` when leaving out any one repeat does not change it (`common.rounds_verdict`); every repeat
records the load average.
And what a draft costs on this machine: the time of one step feeding 1 + k tokens (a verification of k drafted
tokens) over that of a plain one-token step (`verify_cost`), at the JSON prompt's length.

MTP (`speculative="mtp"`, drafts from Qwen3.5's own multi-token-prediction head): no real Qwen3.5 checkpoint is at
hand here, so no acceptance rate; instead (`mtp_rows`):
1. exactness: greedy answers with and without MTP drafts through the engine on tiny random Qwen3.5s (dense, MoE)
   with random heads;
2. cost: one draft + verify step against one plain decode step, run on the engine's runner, on a random Qwen3.5 of
   a small real model's shape (`COST_SHAPE`), for drafts of 1 and 3 tokens, all accepted or all rejected (a
   rejection on a hybrid restores the DeltaNet states and runs the kept token again), and the acceptance a draft
   of one token needs to break even.

    python bench/speculative.py [--model smollm2] [--draft 8] [--quick] [--only lookup|mtp]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "examples" / "umigame"))

from common import median, parse_args, rounds_verdict, write_result  # noqa: E402
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


def answer(model, prompt: list[dict], options: dict, draft: int, max_tokens: int) -> dict:
    """One greedy answer: its tokens, decode seconds (its first token to its last) and the decode steps it took."""
    before = model.engine.stats()
    r = model.generate(prompt, max_tokens=max_tokens, speculative=draft, **options)
    after = model.engine.stats()
    return {"tokens": r.tokens, "decoded": len(r.tokens) - 1, "decode_s": r.timings.decode_s,  # 1st from prefill
            **{k: after[key] - before[key] for k, key in
               (("steps", "steps"), ("accepted", "accepted_drafts"), ("drafted", "drafted"))}}


def total(answers: list[dict]) -> dict:
    out = {k: sum(a[k] for a in answers) for k in ("decoded", "decode_s", "steps", "accepted", "drafted")}
    return {**out, "decode_tps": out["decoded"] / out["decode_s"] if out["decode_s"] else 0.0}


def run_task(model, name: str, draft: int, max_tokens: int, repeats: int) -> dict:
    """Each repeat answers every prompt plainly and with drafts, back to back (which goes first alternating), and
    gives one ratio: drafted decode tokens/s over plain, over the repeat's answers."""
    build, options = TASKS[name]
    prompts = build()
    for p in prompts:  # warm up: every prompt is in the prompt cache for the runs below
        model.generate(p, max_tokens=4, **options)
    rounds, plain_tokens, identical = [], None, True
    for r in range(repeats):
        sides: dict[int, list[dict]] = {0: [], draft: []}
        for i, p in enumerate(prompts):
            for k in ((0, draft) if (r + i) % 2 == 0 else (draft, 0)):
                sides[k].append(answer(model, p, options, k, max_tokens))
        plain_tokens = plain_tokens or [a["tokens"] for a in sides[0]]
        identical &= all([a["tokens"] for a in side] == plain_tokens for side in sides.values())
        plain, fast = total(sides[0]), total(sides[draft])
        rounds.append({"plain_decode_tps": round(plain["decode_tps"], 2), "speculative_decode_tps":
                       round(fast["decode_tps"], 2), "ratio": round(fast["decode_tps"] / plain["decode_tps"], 3),
                       "loadavg_1m": round(os.getloadavg()[0], 2)})
        print(f"{name} repeat {r}: {rounds[-1]}", file=sys.stderr, flush=True)
    out = {
        "answers": len(prompts),
        "completion_tokens": sum(len(t) for t in plain_tokens),
        "identical_output": identical,
        "plain_decode_tps": round(median([x["plain_decode_tps"] for x in rounds]), 2),
        "speculative_decode_tps": round(median([x["speculative_decode_tps"] for x in rounds]), 2),
        "speculative_vs_plain": rounds_verdict([x["ratio"] for x in rounds], lambda x: x >= 1.5),
        "repeats": rounds,
        # counts, the same in every repeat (greedy, same tokens): load does not change them
        "tokens_per_step": round(fast["decoded"] / fast["steps"], 3) if fast["steps"] else None,
        "accepted_per_step": round(fast["accepted"] / fast["steps"], 3) if fast["steps"] else None,
        "draft_acceptance": round(fast["accepted"] / fast["drafted"], 3) if fast["drafted"] else None,
        "texts": [model.tokenizer.decode(t, skip_special_tokens=True) for t in plain_tokens],
    }
    print(f"{name}: plain {out['plain_decode_tps']} tok/s, prompt lookup {out['speculative_decode_tps']} tok/s "
          f"({out['speculative_vs_plain']['median']}x over {repeats} repeats, robust "
          f"{out['speculative_vs_plain']['robust']}), {out['tokens_per_step']} tokens/step, identical={identical}",
          flush=True)
    return out


# ------------------------------------------------------------------------------------------------------ MTP
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, linear_key_head_dim=16, linear_value_head_dim=8, linear_num_key_heads=2,
            linear_num_value_heads=4, vocab_size=256)
TINY_MOE = dict(TINY, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                shared_expert_intermediate_size=48)
# Qwen3.5-0.8B's proportions as we read its config (hidden 1024, 24 layers, 248320 tokens, tied head): random
# weights, built in memory; the head is shared by the model and the MTP head, so each draft token costs one pass of it
COST_SHAPE = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=256, linear_key_head_dim=128, linear_value_head_dim=128,
                  linear_num_key_heads=16, linear_num_value_heads=16, vocab_size=248320, tie_word_embeddings=True)


def qwen35_config(shape: dict) -> dict:
    moe = "num_experts" in shape
    return {"model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text", "linear_conv_kernel_dim": 4,
            "full_attention_interval": 4, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
            "tie_word_embeddings": False, "mtp_num_hidden_layers": 1, "eos_token_id": 2, **shape}


OUTPUTS = ("o_proj.weight", "out_proj.weight", "down_proj.weight")


def random_qwen35(shape: dict, seed: int = 0):
    """A Qwen3.5 network with an MTP head and random weights, in memory (layer outputs scaled down, as in
    `mlxq.bench.synthetic`, so deep random networks keep some dependence on their input)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxq.models import build_model
    from mlxq.models.qwen3_5 import Model

    net = build_model(qwen35_config(shape))
    weights = dict(tree_flatten(net.parameters()))
    for i, (name, w) in enumerate(weights.items()):
        key = mx.random.key(seed * 100003 + i)
        if name.endswith("norm.weight") or name.endswith("dt_bias"):
            continue
        scale = 1.0 if "embed" in name else w.shape[-1] ** -0.5 * (0.1 if name.endswith(OUTPUTS) else 1.0)
        weights[name] = (mx.random.normal(w.shape, key=key) * scale).astype(w.dtype)
    net.load_weights(list(weights.items()))
    assert isinstance(net, Model) and "mtp" in net
    return net


def mtp_exactness(shape: dict, max_tokens: int) -> dict:
    """Greedy answers with and without MTP drafts through the engine (a tiny checkpoint with a character tokenizer)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    import mlxq
    from mlxq.bench.synthetic import char_tokenizer

    net = random_qwen35(shape)
    with tempfile.TemporaryDirectory() as tmp:
        mx.save_safetensors(f"{tmp}/model.safetensors", dict(tree_flatten(net.parameters())))
        Path(tmp, "config.json").write_text(json.dumps(qwen35_config(shape)))
        char_tokenizer(Path(tmp), shape["vocab_size"])
        model = mlxq.load(tmp)
    prompts = ["Once upon a time a dragon", "The soup was cold and the waiter", "A man walks into a bar and"]
    plain = [model.generate(p, max_tokens=max_tokens, ignore_eos=True).tokens for p in prompts]
    before = model.engine.stats()
    fast = [model.generate(p, max_tokens=max_tokens, ignore_eos=True, speculative="mtp").tokens for p in prompts]
    after = model.engine.stats()
    return {"answers": len(prompts), "tokens": sum(map(len, plain)), "identical_output": fast == plain,
            "drafted": after["drafted"] - before["drafted"],
            "accepted": after["accepted_drafts"] - before["accepted_drafts"]}


def mtp_step_cost(shape: dict, steps: int) -> dict:
    """Seconds per plain decode step and per draft + verify step (drafts of 1 and 3 tokens, all accepted or all
    rejected), one row on the engine's runner after a 128-token prompt; medians over `steps`."""
    import mlx.core as mx

    from mlxq.engine.runner import Runner

    net = random_qwen35(shape)
    prompt = [(7 * i + 3) % 5000 + 100 for i in range(128)]

    def start(mtp: bool) -> tuple[Runner, int]:
        runner = Runner(net, 0)
        runner.admit(prompt, None, mtp=mtp)
        logits = runner.prefill([prompt], [[len(prompt) - 1]], [])
        runner.promote(0)
        return runner, mx.argmax(logits[0]).item()

    runner, token = start(False)
    plain = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        token = mx.argmax(runner.decode([token])[0]).item()
        plain.append(time.perf_counter() - t0)
    out = {"plain_step_s": median(plain[1:])}
    for k in (1, 3):
        for accept in (True, False):
            runner, token = start(True)
            times, heads = [], []
            for _ in range(steps + 1):
                t0 = time.perf_counter()
                fed = [token]
                for j in range(k):
                    fed.append(mx.argmax(runner.mtp_draft([fed[-1]], j == 0)[0]).item())
                runner.mtp_end()
                t1 = time.perf_counter()
                logits = runner.verify([fed])
                keep = k + 1 if accept else 1
                token = mx.argmax(logits[keep - 1]).item()
                mx.eval(runner.state("decode"))
                runner.rewind([keep])
                times.append(time.perf_counter() - t0)
                heads.append(t1 - t0)
            name = f"draft{k}_{'accepted' if accept else 'rejected'}"
            out[f"{name}_step_s"] = median(times[1:])
            out[f"{name}_vs_plain"] = round(median(times[1:]) / out["plain_step_s"], 3)
            out[f"draft{k}_head_s"] = median(heads[1:])
    # a draft of one token, accepted with probability a: (1 + a) tokens for a * A + (1 - a) * R seconds
    p, a1, r1 = out["plain_step_s"], out["draft1_accepted_step_s"], out["draft1_rejected_step_s"]
    out["draft1_break_even_acceptance"] = round((r1 - p) / (p + r1 - a1), 3) if p + r1 - a1 > 0 else None
    return out


def mtp_rows(quick: bool) -> dict:
    """--quick: shorter answers, fewer steps, and the cost measured on a third of the layers and a quarter of the
    vocabulary (building and running the full shape takes minutes here)."""
    max_tokens, steps = (24, 3) if quick else (48, 8)
    shape = dict(COST_SHAPE, num_hidden_layers=8, vocab_size=65536) if quick else COST_SHAPE
    exact = {"dense": mtp_exactness(TINY, max_tokens), "moe": mtp_exactness(TINY_MOE, max_tokens)}
    for name, row in exact.items():
        print(f"mtp exactness ({name}, tiny random Qwen3.5): identical={row['identical_output']}, "
              f"{row['accepted']} of {row['drafted']} random drafts accepted", flush=True)
    cost = mtp_step_cost(shape, steps)
    print(f"mtp step cost (random Qwen3.5, {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, "
          f"vocabulary {shape['vocab_size']}): plain {cost['plain_step_s']:.3f} s; draft of 1 + verify "
          f"{cost['draft1_accepted_vs_plain']}x accepted, {cost['draft1_rejected_vs_plain']}x rejected; break-even "
          f"acceptance {cost['draft1_break_even_acceptance']}", flush=True)
    return {"exactness": exact, "step_cost": {"shape": shape, "steps": steps, **cost},
            "acceptance": "not measured: no real Qwen3.5 checkpoint is cached here (random heads are always wrong)"}


def verify_cost(model, context: list[int], ks: tuple[int, ...], repeats: int) -> dict:
    """Time of a step feeding 1 + k tokens over that of a plain one-token step (medians, and fastest runs), after
    `context` (in a batch of its own, on this thread), the settings interleaved so machine load hits them alike."""
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
    ap.add_argument("--only", choices=["lookup", "mtp"], help="only prompt lookup, or only the MTP rows")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats of each task (full run)")
    args = parse_args(ap)

    import mlxq

    result = {"model": args.model, "draft": args.draft, "quick": args.quick,
              "load_average": [round(x, 2) for x in os.getloadavg()]}
    if args.only != "mtp":
        model = mlxq.load(args.model)
        max_tokens, repeats = (64, 1) if args.quick else (128, args.repeats)
        tasks = {name: run_task(model, name, args.draft, max_tokens, repeats) for name in TASKS}
        context = model.tokenizer.apply_chat_template(game_master_prompts()[0], add_generation_prompt=True)
        cost = verify_cost(model, context, (1, 2, 4, args.draft), 5 if args.quick else 20)
        print(f"verify cost (step feeding 1 + k tokens / a plain step): {cost}", flush=True)
        result |= {
            "max_tokens": max_tokens, "repeats": repeats, "verify_cost": cost, "prompt_lookup": tasks,
            "method": "per repeat: every prompt answered plain and drafted back to back (first side alternating), "
                      "one ratio per repeat from the decode tokens/s of its answers; figure = median over repeats; "
                      "goal >= 1.5 on the JSON task; robust = >= 3 repeats and the verdict unchanged with any "
                      "one repeat left out",
            "speculative_vs_plain": tasks["json_game_master"]["speculative_vs_plain"]["median"],
            "goal_json_1_5x": tasks["json_game_master"]["speculative_vs_plain"]["goal_met"],
            "goal_json_1_5x_robust": tasks["json_game_master"]["speculative_vs_plain"]["robust"],
        }
    if args.only != "lookup":
        result["mtp"] = mtp_rows(args.quick)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    write_result("speculative" if args.only is None else f"speculative_{args.only}", result)


if __name__ == "__main__":
    main()
