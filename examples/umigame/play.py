"""An umigame (lateral-thinking puzzle) game master on mlxq's Python API.

    python examples/umigame/play.py                  # scripted turns with the default model
    python examples/umigame/play.py --model DIR -i   # interactive, any model with a chat template
"""

from __future__ import annotations

import argparse
import sys
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="model name or path (default: smollm2)")
    ap.add_argument("-i", "--interactive", action="store_true", help="ask your own questions")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-span", type=int, default=8, help="shortest story span (characters) the guard blocks")
    args = ap.parse_args()
    try:
        model = mlxq.load(args.model)
    except MlxqError as e:
        print(f"mlxq: {e}", file=sys.stderr)
        return 2
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
