"""An umigame (lateral-thinking puzzle) game master on mlxq's Python API.

    python examples/umigame/play.py                  # scripted turns with the default model
    python examples/umigame/play.py --model DIR -i   # interactive, any model with a chat template
    python examples/umigame/play.py --players 16     # 16 players at once: throughput and turn latency
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import puzzle  # noqa: E402

import mlxq  # noqa: E402
from mlxq.api import Session  # noqa: E402
from mlxq.errors import MlxqError  # noqa: E402


def new_game(model: mlxq.Model, args: argparse.Namespace) -> Session:
    # The secret guard blocks verbatim spans of the story; what the player already read (the question)
    # stays sayable. Thinking is off: the answer must be the JSON, nothing else.
    return Session(model, system=puzzle.SYSTEM, secrets=puzzle.STORY, public=[puzzle.QUESTION],
                   min_span=args.min_span, enable_thinking=False, max_tokens=args.max_tokens,
                   temperature=args.temperature, seed=args.seed)


def turn(game: Session, question: str) -> bool:
    print(f"\nQ: {question}")
    try:
        reply = game.ask(question, schema=puzzle.SCHEMA)
    except MlxqError as e:
        print(f"   (no answer: {e})")
        return False
    s = game.stats[-1]
    print(f"A: {reply['answer']}  solved={reply['solved']}  {reply['comment']}")
    print(f"   [{s.processed_tokens} new + {s.cached_tokens} cached prompt tokens, "
          f"first token {s.first_token_s * 1000:.0f} ms, {s.generated_tokens} generated]")
    return bool(reply["solved"])


async def player(model: mlxq.Model, args: argparse.Namespace, seed: int) -> tuple[list, int]:
    """One player asking the scripted questions (until solved) with `ask_async`: its turns' stats, and failures."""
    game = new_game(model, argparse.Namespace(**{**vars(args), "seed": seed}))
    failures = 0
    for question in puzzle.SCRIPT:
        try:
            reply = await game.ask_async(question, schema=puzzle.SCHEMA)
        except MlxqError:
            failures += 1
            continue
        if reply["solved"]:
            break
    return game.stats, failures


def play_many(model: mlxq.Model, args: argparse.Namespace) -> int:
    """`--players N`: N games at once, each its own Session, every turn of every game batched by the one engine."""
    model.configure(max_batch=max(args.players, 1))

    async def everyone():
        return await asyncio.gather(*(player(model, args, args.seed + i) for i in range(args.players)))

    t0 = time.perf_counter()
    results = asyncio.run(everyone())
    wall = time.perf_counter() - t0
    turns = [t for stats, _ in results for t in stats]
    tokens = sum(t.generated_tokens for t in turns)
    failures = sum(f for _, f in results)

    def p(values: list[float], q: int) -> float:
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]

    totals, firsts = [t.total_s for t in turns], [t.first_token_s for t in turns]
    print(f"{args.players} players, {len(turns)} turns ({failures} without an answer) in {wall:.1f} s")
    print(f"  throughput: {tokens / wall:.1f} generated tokens/s aggregate ({tokens} tokens)")
    if turns:
        print(f"  turn latency: p50 {p(totals, 50) * 1000:.0f} ms, p95 {p(totals, 95) * 1000:.0f} ms")
        print(f"  first token:  p50 {p(firsts, 50) * 1000:.0f} ms, p95 {p(firsts, 95) * 1000:.0f} ms")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="model name or path (default: smollm2)")
    ap.add_argument("-i", "--interactive", action="store_true", help="ask your own questions")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-span", type=int, default=8, help="shortest story span (characters) the guard blocks")
    ap.add_argument("--players", type=int, default=0, help="play N scripted games at once and report throughput")
    args = ap.parse_args()
    try:
        model = mlxq.load(args.model)
    except MlxqError as e:
        print(f"mlxq: {e}", file=sys.stderr)
        return 2
    if args.players:
        return play_many(model, args)
    game = new_game(model, args)
    print(f"【{puzzle.TITLE}】\n{puzzle.QUESTION}")
    if not args.interactive:
        for question in puzzle.SCRIPT:
            if turn(game, question):
                break
        return 0
    print("\n質問をどうぞ（空行で終了）")
    while question := input("> ").strip():
        if turn(game, question):
            print("正解！ 真相: " + "".join(puzzle.STORY))
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
