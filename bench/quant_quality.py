"""Quantization quality on real weights: SmolLM2-135M-Instruct, mlxq (RTN, calibrated) vs mlx_lm.convert.

Baseline: the default model's GGUF weights, dequantized once and saved as a float32 HF directory (every
quantizer starts from exactly these numbers). Each variant is scored against it on held-back Wikipedia text
(never part of the calibration mix): mean KL(baseline || variant), 99th percentile, top-1 agreement,
perplexity. Bits per weight count the codes plus float16 scales and biases. Evaluation runs in float32 on
dequantized weights (MLX's quantized matmul is slow on x86; the logits are the same up to float rounding).

    python bench/quant_quality.py [--quick]

Quick: 3-bit only plus the 2-bit mix, 2048 scored tokens. Full: 2/3/4 bits, every
mlxq method, the q3_k_m and q2_k mixes, 8192 scored tokens. Both calibrate on 8192 tokens (cached after the first run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import mlx.core as mx  # noqa: E402
from common import write_result  # noqa: E402

GROUP = 64


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def sizes(root: Path) -> dict[str, tuple[list[int], int]]:
    """name -> (shape, bytes) over a directory's shards."""
    out = {}
    for shard in sorted(root.glob("model*.safetensors")):
        for name, h in read_header(shard).items():
            out[name] = (h["shape"], h["data_offsets"][1] - h["data_offsets"][0])
    return out


def bits_per_weight(out: Path, baseline: dict) -> dict:
    """Weight matrices (codes + scales + biases, or float) per parameter, and the whole model."""
    got = sizes(out)
    matrix_params = matrix_bytes = 0
    for name, (shape, _) in baseline.items():
        if len(shape) < 2 or not name.endswith(".weight") or name not in got:
            continue
        n = 1
        for d in shape:
            n *= d
        base = name.removesuffix(".weight")
        matrix_params += n
        matrix_bytes += sum(got[k][1] for k in (name, base + ".scales", base + ".biases") if k in got)
    total_params = sum(_numel(s) for s, _ in baseline.values())
    return {
        "bpw": round(8 * matrix_bytes / matrix_params, 4),
        "bpw_all": round(8 * sum(b for _, b in got.values()) / total_params, 4),
        "size_mb": round(sum(b for _, b in got.values()) / 1e6, 2),
    }


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def make_baseline(root: Path) -> Path:
    """SmolLM2's GGUF weights dequantized to float32, as an HF directory with its tokenizer."""
    from mlxq.quant.pipeline import quantize
    from mlxq.quant.recipes import Recipe

    path = root / "smollm2-f32"
    if not (path / "config.json").exists():
        shutil.rmtree(path, ignore_errors=True)
        quantize("smollm2", path, Recipe("float", "float"), dtype=mx.float32, progress=False)
    return path


def run_mlx_lm(baseline: Path, out: Path, bits: int) -> None:
    from mlx_lm import convert

    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the result line
        convert(
            hf_path=str(baseline), mlx_path=str(out), quantize=True, q_bits=bits, q_group_size=GROUP, dtype="float16"
        )


def run_mlxq(
    baseline: Path, out: Path, recipe_name: str | None, bits: int | None, method: str, calib_tokens: int
) -> None:
    from mlxq.quant.pipeline import quantize
    from mlxq.quant.recipes import make_recipe

    recipe = make_recipe(recipe_name, bits, GROUP)
    quantize(
        str(baseline),
        out,
        recipe,
        method=method,
        calibrate=None if method == "rtn" else "default",
        calib_tokens=calib_tokens,
        progress=False,
    )


def llama_cpp_status() -> dict:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return {
            "skipped": f"llama_cpp is not importable ({e}); llama-cpp-python is not installed here, so "
            "llama.cpp K-quants were not measured"
        }
    return {"skipped": "llama_cpp is importable but the K-quant comparison is not implemented in this run"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()

    from mlxq.eval.metrics import load_for_eval, reference, score, windows
    from mlxq.eval.texts import heldout_text
    from mlxq.formats.fetch import cache_dir

    quick = args.quick
    eval_tokens, calib_tokens = (2048, 8192) if quick else (8192, 8192)
    bit_widths = (3,) if quick else (2, 3, 4)
    root = cache_dir() / "bench" / "quant_quality"
    root.mkdir(parents=True, exist_ok=True)
    baseline = make_baseline(root)
    base_sizes = sizes(baseline)

    ref_model = load_for_eval(str(baseline))
    wins = windows(ref_model.tokenizer.encode(heldout_text(), add_special_tokens=False), 512, eval_tokens)
    ref = reference(ref_model.logits, wins)
    base_scores = score(ref_model.logits, wins)
    del ref_model

    # (label, runner): label is "<tool>-<method>-<bits or recipe>"
    variants = []
    for b in bit_widths:
        variants.append((f"mlx_lm-rtn-{b}bit", lambda o, b=b: run_mlx_lm(baseline, o, b)))
        methods = ("rtn", "gptq") if quick else ("rtn", "search", "gptq")
        for m in methods:
            variants.append((f"mlxq-{m}-{b}bit", lambda o, b=b, m=m: run_mlxq(baseline, o, None, b, m, calib_tokens)))
    for mix in ("q2_k",) if quick else ("q2_k", "q3_k_m"):
        variants.append((f"mlxq-gptq-{mix}", lambda o, mix=mix: run_mlxq(baseline, o, mix, None, "gptq", calib_tokens)))
    if not quick:
        variants.append(("mlxq-rtn-q2_k", lambda o: run_mlxq(baseline, o, "q2_k", None, "rtn", calib_tokens)))

    results = {}
    for label, runner in variants:
        out = root / "runs" / label
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        runner(out)
        seconds = time.perf_counter() - start
        s = score(load_for_eval(str(out)).logits, wins, ref)
        results[label] = {
            "kl": round(s.kl, 5),
            "kl_p99": round(s.kl_p99, 4),
            "top1": round(s.top1, 4),
            "ppl": round(s.ppl, 3),
            **bits_per_weight(out, base_sizes),
            "seconds": round(seconds, 1),
        }
        print(f"{label:24s} " + " ".join(f"{k} {v}" for k, v in results[label].items()), file=sys.stderr, flush=True)
        shutil.rmtree(out, ignore_errors=True)
        mx.clear_cache()

    ratios = {}
    for b in bit_widths:
        peer = results[f"mlx_lm-rtn-{b}bit"]
        ratios[f"kl_{b}bit_vs_mlx_lm"] = round(results[f"mlxq-gptq-{b}bit"]["kl"] / peer["kl"], 4)
        ratios[f"ppl_{b}bit_vs_mlx_lm"] = round(results[f"mlxq-gptq-{b}bit"]["ppl"] / peer["ppl"], 4)
        ratios[f"kl_{b}bit_rtn_vs_mlx_lm"] = round(results[f"mlxq-rtn-{b}bit"]["kl"] / peer["kl"], 4)
    mix = results["mlxq-gptq-q2_k"]
    # "collapse": the model stops tracking the baseline (output like ternary on an ordinary model gives:
    # perplexity in the hundreds to thousands, top-1 agreement near chance)
    collapsed = mix["top1"] < 0.4 or mix["ppl"] > 5 * base_scores.ppl
    write_result(
        "quant_quality",
        {
            "quick": quick,
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)",
            "group_size": GROUP,
            "eval": {
                "text": "held-back wiki (second half of exllamav2 wiki.utf8)",
                "tokens": base_scores.tokens,
                "ctx": 512,
                "baseline_ppl": round(base_scores.ppl, 3),
            },
            "calibration": {
                "text": "default mix (wiki first half, c4, code, technical, multilingual)",
                "tokens": calib_tokens,
            },
            "results": results,
            "mix_2bit": {
                "recipe": "q2_k",
                "method": "gptq",
                "collapsed": collapsed,
                "criterion": "not collapsed: top-1 agreement >= 0.4 and perplexity <= 5x baseline",
            },
            "llama_cpp": llama_cpp_status(),
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
