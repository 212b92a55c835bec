"""Prefill and decode tokens/s, mlxq vs mlx-lm: the same stored weights, prompt and token count, in the same run.

Both sides load one directory (`--weights float`: the model's weights as float32; `4bit`: those quantized to
4-bit affine, group 64), each with its own loader (`mlxq.load`, `mlx_lm.load`), and compute in the same dtype
(mlxq's default: float32 off Metal, float16 on Metal; mlx-lm's copy is cast to it). Each side runs its own greedy
generate loop (`Generation.steps`, `mlx_lm.generate.generate_step`), neither detokenizes, and this script times
both loops the same way: prefill rate = prompt tokens / time to the first generated token; decode rate =
(generated tokens - 1) / time from the first to the last generated token. Runs alternate (the machine is shared),
medians are reported, and a ratio is reported only when both sides generated exactly the same tokens.

    python bench/decode.py [--model smollm2] [--weights float|4bit] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import mlx.core as mx  # noqa: E402
from common import float_copy, median, parse_args, write_result  # noqa: E402

TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable type changed how "
    "knowledge spread across Europe. Before it, books were copied by hand, slowly and at great cost. "
)
WEIGHTS = ("float", "4bit")


def stored_weights(model: str, form: str) -> Path:
    """The directory both sides load: the float32 copy, or its 4-bit quantization (made once, cached)."""
    from mlxq.quant.pipeline import quantize
    from mlxq.quant.recipes import uniform

    src = float_copy(model)
    if form == "float":
        return src
    path = src.with_name(src.name.removesuffix("-f32") + "-4bit-g64")
    if not (path / "config.json").exists():
        quantize(str(src), path, uniform(4, 64), progress=False)
    return path


def timed(tokens: Iterable[int], prompt_n: int) -> tuple[list[int], float, float]:
    """Drains a generate loop: (tokens, prefill tokens/s, decode tokens/s) under the one definition above."""
    start = time.perf_counter()
    out, first = [], None
    for token in tokens:
        out.append(int(token))
        if first is None:
            first = time.perf_counter()
    last = time.perf_counter()
    return out, prompt_n / (first - start), (len(out) - 1) / (last - first)


def run(model: str, form: str, prompt_n: int, gen_n: int, runs: int) -> dict:
    import mlx_lm
    from mlx_lm.generate import generate_step

    import mlxq
    from mlxq.engine.generate import Generation

    path = stored_weights(model, form)
    ours = mlxq.load(str(path))
    dtype = ours.net.model.norm.weight.dtype  # mlxq's compute dtype on this backend
    theirs, _ = mlx_lm.load(str(path))
    theirs.set_dtype(dtype)
    ids = ours.tokenizer.encode(TEXT * (prompt_n // 30 + 2))[:prompt_n]

    def run_mlxq():
        gen = Generation(ours.net, ours.make_cache())
        return timed((step.token for step in gen.steps(ids, gen_n)), prompt_n)

    def run_mlx_lm():
        steps = generate_step(mx.array(ids), theirs, max_tokens=gen_n)  # greedy by default
        return timed((token for token, _ in steps), prompt_n)

    sides = {"mlxq": run_mlxq, "mlx_lm": run_mlx_lm}
    tokens = {name: fn()[0] for name, fn in sides.items()}  # warm-up (first-call allocations, compiles)
    figures = {name: {"prefill": [], "decode": []} for name in sides}
    for _ in range(runs):  # alternating, so load from elsewhere on the machine hits both alike
        for name, fn in sides.items():
            got, prefill, decode = fn()
            if got != tokens[name]:
                sys.exit(f"decode: {name} generated different tokens from one run to the next (greedy)")
            figures[name]["prefill"].append(round(prefill, 2))
            figures[name]["decode"].append(round(decode, 2))
    same = tokens["mlxq"] == tokens["mlx_lm"]
    if not same:
        at = next(i for i, (a, b) in enumerate(zip(tokens["mlxq"], tokens["mlx_lm"], strict=True)) if a != b)
        print(f"decode: {form}: mlxq and mlx-lm generate different tokens from position {at} "
              f"({tokens['mlxq'][at]} vs {tokens['mlx_lm'][at]}): no ratio", file=sys.stderr)
    med = {name: {k: median(v) for k, v in f.items()} for name, f in figures.items()}
    return {
        "weights": str(path),
        "compute_dtype": str(dtype),
        "same_tokens": same,
        "tokens_per_s": figures,
        "median_tokens_per_s": med,
        "ratios": {
            "decode_vs_mlx_lm": round(med["mlxq"]["decode"] / med["mlx_lm"]["decode"], 3),
            "prefill_vs_mlx_lm": round(med["mlxq"]["prefill"] / med["mlx_lm"]["prefill"], 3),
        } if same else {},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--weights", choices=WEIGHTS, action="append", help="the stored form(s) both sides load "
                    "(default: float; a full run does both)")
    ap.add_argument("--prompt-tokens", type=int, default=None)
    ap.add_argument("--gen-tokens", type=int, default=None)
    ap.add_argument("--runs", type=int, default=None)
    args = parse_args(ap)
    prompt_n = args.prompt_tokens or (128 if args.quick else 512)
    gen_n = args.gen_tokens or (32 if args.quick else 128)
    runs = args.runs or (2 if args.quick else 5)
    forms = args.weights or (["float"] if args.quick else list(WEIGHTS))

    results = {form: run(args.model, form, prompt_n, gen_n, runs) for form in forms}
    ratios = {}
    for form, r in results.items():
        tag = "" if form == "float" else f"{form}_"
        ratios.update({f"{tag}{k}": v for k, v in r["ratios"].items()})
    write_result("decode", {
        "model": args.model,
        "quick": args.quick,
        "prompt_tokens": prompt_n,
        "gen_tokens": gen_n,
        "runs": runs,
        "rate_definition": "prefill: prompt tokens / time to the first generated token; decode: (generated - 1) / "
                           "time from the first to the last generated token; greedy, no detokenization, both sides",
        "results": results,
        "ratios": ratios,
    })
    if any(not r["same_tokens"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
