"""Prefill and decode tokens/s, mlxq vs mlx-lm: the same stored weights, prompt and token count, in the same run.

Both sides load one directory (`--weights float`: the model's weights as float32; `4bit`: those quantized to
4-bit affine, group 64), each with its own loader (`mlxq.load`, `mlx_lm.load`), compute in the same dtype, run their
own greedy generate loops and are timed alike, runs alternating, medians reported: `mlxq bench DIR --vs mlx-lm`
(mlxq.bench.runtime, where the rate definitions are). A ratio is reported only when both sides generated exactly
the same tokens.

    python bench/decode.py [--model smollm2] [--weights float|4bit] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import float_copy, parse_args, write_result  # noqa: E402

from mlxq.bench import runtime  # noqa: E402

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


def run(model: str, form: str, prompt_n: int, gen_n: int, runs: int) -> dict:
    result = runtime.run(str(stored_weights(model, form)), "mlx-lm", prompt_n, gen_n, runs)
    if not all(side["stable_tokens"] for side in result["sides"].values()):
        sys.exit(f"decode: {form}: a side generated different tokens from one run to the next (greedy)")
    result["same_tokens"] = same = result["agreeing_tokens"] == gen_n
    if not same:
        print(f"decode: {form}: mlxq and mlx-lm generate different tokens from position {result['agreeing_tokens']}:"
              " no ratio", file=sys.stderr)
    ratios = result["ratios"]
    result["ratios"] = {"decode_vs_mlx_lm": ratios["decode_tps_vs_mlx_lm"],
                        "prefill_vs_mlx_lm": ratios["prefill_tps_vs_mlx_lm"]} if same else {}
    return result


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
        "rate_definition": runtime.RATES,
        "results": results,
        "ratios": ratios,
    })
    if any(not r["same_tokens"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
