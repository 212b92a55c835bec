"""Prefill and decode tokens/s, mlxq vs mlx-lm: same model, same weights, same prompt, same run.

mlx-lm runs its own model class (mlx_lm.models.<type>) with the very arrays mlxq loaded, through its
own `stream_generate`, whose reported prompt/generation tokens-per-second are used as they are.

    python bench/decode.py [--model smollm2] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import mlx.core as mx  # noqa: E402
from common import median, write_result  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable type changed how "
    "knowledge spread across Europe. Before it, books were copied by hand, slowly and at great cost. "
)


def mlx_lm_twin(config: dict, weights: list):
    """mlx-lm's own model for this config, holding mlxq's arrays (no copy)."""
    import importlib

    from mlx_lm.models.base import BaseModelArgs  # noqa: F401  (mlx-lm must be importable)

    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    model.load_weights(weights)
    mx.eval(model.parameters())
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompt-tokens", type=int, default=None)
    ap.add_argument("--gen-tokens", type=int, default=None)
    ap.add_argument("--runs", type=int, default=None)
    args = ap.parse_args()
    prompt_n = args.prompt_tokens or (128 if args.quick else 512)
    gen_n = args.gen_tokens or (32 if args.quick else 128)
    runs = args.runs or (2 if args.quick else 5)

    import mlx_lm
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    import mlxq
    from mlxq.loading import load_model
    from mlxq.models import text_config

    model = mlxq.load(args.model)
    config = text_config(model.checkpoint.config)
    plain = load_model(model.checkpoint, fuse=False)  # checkpoint layout, which mlx-lm's classes expect
    theirs = mlx_lm_twin(config, list(tree_flatten(plain.parameters())))
    del plain
    tok = TokenizerWrapper(model.tokenizer.hf)
    ids = model.tokenizer.encode(TEXT * (prompt_n // 30 + 2))[:prompt_n]

    model.configure(prompt_cache_bytes=0)  # every run prefills the whole prompt, as mlx-lm's does

    def run_mlxq() -> tuple[float, float]:
        timings = model.generate(ids, max_tokens=gen_n, ignore_eos=True).timings
        return timings.prefill_tps, timings.decode_tps

    def run_mlx_lm() -> tuple[float, float]:
        *_, last = mlx_lm.stream_generate(theirs, tok, ids, max_tokens=gen_n)
        return last.prompt_tps, last.generation_tps

    run_mlxq(), run_mlx_lm()  # warm-up: first-call allocations and compiles
    figures = {"mlxq": {"prefill": [], "decode": []}, "mlx_lm": {"prefill": [], "decode": []}}
    for _ in range(runs):  # interleaved, so load from elsewhere on the machine hits both alike
        for name, fn in (("mlxq", run_mlxq), ("mlx_lm", run_mlx_lm)):
            p, d = fn()
            figures[name]["prefill"].append(round(p, 2))
            figures[name]["decode"].append(round(d, 2))
    med = {k: {m: median(v) for m, v in f.items()} for k, f in figures.items()}
    write_result("decode", {
        "model": args.model,
        "dtype": str(model.net.model.norm.weight.dtype),
        "prompt_tokens": prompt_n,
        "gen_tokens": gen_n,
        "runs": runs,
        "tokens_per_s": figures,
        "median_tokens_per_s": med,
        "ratios": {
            "decode_vs_mlx_lm": round(med["mlxq"]["decode"] / med["mlx_lm"]["decode"], 3),
            "prefill_vs_mlx_lm": round(med["mlxq"]["prefill"] / med["mlx_lm"]["prefill"], 3),
        },
    })


if __name__ == "__main__":
    main()
