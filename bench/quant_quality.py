"""Quantization quality on real weights: SmolLM2-135M-Instruct, mlxq (RTN, calibrated) vs mlx_lm.convert.

Baseline: the default model's GGUF weights, dequantized once and saved as a float32 HF directory (every
quantizer starts from exactly these numbers). Each variant is scored against it on held-back Wikipedia text
(never part of the calibration mix): mean KL(baseline || variant), 99th percentile, top-1 agreement,
perplexity. Bits per weight count the codes plus float16 scales and biases. Evaluation runs in float32 on
dequantized weights (MLX's quantized matmul is slow on x86; the logits are the same up to float rounding).

    python bench/quant_quality.py [--quick]

Quick (about 5 minutes here once calibrated): 3 bits and llama.cpp's Q3_K_M, 2048 scored tokens. Full: 2/3/4 bits,
every mlxq method, the q3_k_m and q2_k mixes, llama.cpp's Q2_K, Q3_K_M, Q4_K_M and pure Q4_0 (when llama-cpp-python
is installed; it is a dev dependency), 8192 scored tokens. Both calibrate on 8192 tokens (cached after the first
run).
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
from common import stdout_to_stderr, write_result  # noqa: E402

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


# llama.cpp's mixes: label -> (`LLAMA_FTYPE_MOSTLY_*` name, pure). K-quants work on 256-weight super-blocks;
# SmolLM2's 576-wide rows do not divide into them, so llama.cpp falls back to 32-blocks (Q4_0, Q5_0, Q8_0)
# for every matrix but ffn_down, and its K mixes land near 5 bits here. Pure Q4_0 (4.5 bpw, every tensor)
# is the peer with the same bits as mlxq's 4-bit at group 64.
LLAMA_CPP_MIXES = {
    "Q2_K": ("Q2_K", False),
    "Q3_K_M": ("Q3_K_M", False),
    "Q4_K_M": ("Q4_K_M", False),
    "Q4_0-pure": ("Q4_0", True),
}


def llama_cpp_missing() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama_cpp is not importable ({e}); `make setup` installs it"
    return None


def run_llama_cpp(out: Path, mix: str) -> None:
    """llama.cpp's own quantizer on the same weights: the pinned GGUF, whose Q4_1 blocks it dequantizes
    exactly to the baseline's numbers before quantizing (allow_requantize). No importance matrix:
    llama-cpp-python cannot pass one."""
    import ctypes

    import llama_cpp

    from mlxq.formats.fetch import ALIASES, fetch

    params = llama_cpp.llama_model_quantize_default_params()
    ftype, pure = LLAMA_CPP_MIXES[mix]
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.pure = pure
    params.allow_requantize = True
    params.nthread = 2
    out.mkdir(parents=True)
    source = str(fetch(ALIASES["smollm2"])).encode()
    with stdout_to_stderr():
        rc = llama_cpp.llama_model_quantize(source, str(out / "model.gguf").encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {mix} failed with {rc}")


def gguf_bits_per_weight(path: Path) -> dict:
    """The same counts as `bits_per_weight`, from a GGUF's tensors (K-quant blocks carry their own scales)."""
    import gguf

    tensors = gguf.GGUFReader(path).tensors
    matrices = [t for t in tensors if t.name.endswith(".weight") and sum(d > 1 for d in t.shape) >= 2]
    total_bytes = sum(int(t.n_bytes) for t in tensors)
    matrix_params = sum(int(t.n_elements) for t in matrices)
    share: dict[str, int] = {}
    for t in matrices:
        share[t.tensor_type.name] = share.get(t.tensor_type.name, 0) + int(t.n_elements)
    return {
        "bpw": round(8 * sum(int(t.n_bytes) for t in matrices) / matrix_params, 4),
        "bpw_all": round(8 * total_bytes / sum(int(t.n_elements) for t in tensors), 4),
        "size_mb": round(total_bytes / 1e6, 2),
        "types": {k: round(v / matrix_params, 3) for k, v in sorted(share.items())},  # share of matrix weights
    }


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()

    from mlxq.eval.metrics import load_for_eval, reference, score, windows
    from mlxq.formats.fetch import cache_dir
    from mlxq.formats.texts import heldout_text

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
    for mix in () if quick else ("q2_k", "q3_k_m"):
        variants.append((f"mlxq-gptq-{mix}", lambda o, mix=mix: run_mlxq(baseline, o, mix, None, "gptq", calib_tokens)))
    if not quick:
        variants.append(("mlxq-rtn-q2_k", lambda o: run_mlxq(baseline, o, "q2_k", None, "rtn", calib_tokens)))
    llama_cpp_skipped = llama_cpp_missing()
    if not llama_cpp_skipped:
        for mix in ("Q3_K_M",) if quick else LLAMA_CPP_MIXES:
            variants.append((f"llama_cpp-{mix}", lambda o, mix=mix: run_llama_cpp(o, mix)))

    results = {}
    for label, runner in variants:
        out = root / "runs" / label
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        runner(out)
        seconds = time.perf_counter() - start
        gguf_file = out / "model.gguf"
        model_path = gguf_file if gguf_file.exists() else out
        s = score(load_for_eval(str(model_path)).logits, wins, ref)
        results[label] = {
            "kl": round(s.kl, 5),
            "kl_p99": round(s.kl_p99, 4),
            "top1": round(s.top1, 4),
            "ppl": round(s.ppl, 3),
            **(gguf_bits_per_weight(gguf_file) if gguf_file.exists() else bits_per_weight(out, base_sizes)),
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
    # against llama.cpp at the same bits per weight (its K mixes land at other widths here: see LLAMA_CPP_MIXES)
    if "mlxq-gptq-4bit" in results and "llama_cpp-Q4_0-pure" in results:
        ours, theirs = results["mlxq-gptq-4bit"], results["llama_cpp-Q4_0-pure"]
        ratios["kl_4bit_vs_llama_cpp_q4_0"] = round(ours["kl"] / theirs["kl"], 4)
    mix_2bit = None
    if "mlxq-gptq-q2_k" in results:
        mix = results["mlxq-gptq-q2_k"]
        # "collapse": the model stops tracking the baseline (output like ternary on an ordinary model gives:
        # perplexity in the hundreds to thousands, top-1 agreement near chance)
        mix_2bit = {
            "recipe": "q2_k",
            "method": "gptq",
            "collapsed": mix["top1"] < 0.4 or mix["ppl"] > 5 * base_scores.ppl,
            "criterion": "not collapsed: top-1 agreement >= 0.4 and perplexity <= 5x baseline",
        }
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
            "mix_2bit": mix_2bit,
            "llama_cpp": {"skipped": llama_cpp_skipped}
            if llama_cpp_skipped
            else {"version": _version("llama_cpp_python"), "imatrix": False, "source": "the pinned Q4_1 GGUF"},
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
