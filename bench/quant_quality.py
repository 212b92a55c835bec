"""Quantization quality on real weights (SmolLM2-135M-Instruct): mlxq's recipes against the peers' best methods at
equal bits per weight, all calibrated on the same text.

Baseline: the default model's GGUF weights dequantized once to a float32 HF directory; every quantizer starts from
exactly these numbers. Each variant is scored against it on held-back Wikipedia text (never part of the calibration
mix): mean KL(baseline || variant), its 99th percentile, top-1 agreement, perplexity. Evaluation runs in float32 on
dequantized weights (the logits of the quantized model up to float rounding).

Calibration: the same 16 sequences of 512 tokens (8192 tokens of mlxq's default mix) for every calibrated method.

Peers (each at the group size and bits of the mlxq variant it is compared with):
- mlx-lm: `mlx_lm.convert` (round to nearest); from `mlx_lm.quant` GPTQ (packs 2, 4 or 8 bits only), AWQ and DWQ
  (distillation of the quantized scales and biases: on this text, one pass of 4 optimizer steps; the time its
  default recipe would take here is estimated; its quantized matmuls run dequantized in float, the same function,
  checked on the real model in the run: `dequantized_matmul`) at 3 bits only (their CPU cost: see "not_run"), dynamic
  quant (two widths mixed by gradient sensitivity, aimed at the bits per weight of mlxq's q3_k_m / q2_k: the pair
  whose uniform models bracket that figure, `dynamic_bits`).
- llama.cpp with an importance matrix from the same text (llama-imatrix, llama-quantize; bench/llama_cpp_tools.py):
  pure IQ4_NL and Q4_0, 4.5 bits per weight like 4-bit at group 64. No llama.cpp type goes below 4.5 bpw on
  SmolLM2's 576-wide rows (its K and IQ types need rows in multiples of 256; llama-quantize falls back to a
  32-block type there): a pure Q3_K run records that fallback (only the 1536-wide ffn_down gets Q3_K), no ratio.

Bits per weight count the codes plus float16 scales and biases (`bpw`: weight matrices, `bpw_all`: every tensor).
Ratios compare only variants whose `bpw` agree within 0.05; `X_vs_PEER` = mlxq's KL / the peer's.
`kl_{b}bit_vs_best_peer` divides by the lowest KL among the peers at that width; the goal is <= 0.8.

    python bench/quant_quality.py [--quick] [--resume] [--only PATTERN ...]

Resumable: every finished variant is stored in the bench work directory (~/.cache/mlxq/bench/quant_quality/results)
under a fingerprint of what determines it (label; baseline weights; calibration and evaluation tokens; settings;
mlx, mlx-lm and llama.cpp versions; the sha256 of the runner's source and of the scoring modules: `Variant.code`,
mlxq.bench.store), so a result survives changes to code it does not run through.
`--resume` reuses the stored results whose fingerprint matches exactly and lists them under "reused" (with when and
at which commit they were measured). `--only` runs the variants whose labels match the patterns (fnmatch), in the
order the patterns are given (a variant another needs comes first); the others are listed as not measured, and no
best-peer ratio is given for a width whose peers were not all measured. Run it from a checkout that does not change
while it runs (the code fingerprint is read from disk when each result is stored).

Quick (about 90 CPU-seconds once the baseline and calibration statistics are cached: 2 minutes on a lightly loaded
machine here): 3 bits, 512 scored tokens, mlxq's GPTQ against `mlx_lm.convert` only; the calibrated peers run in the
full run (it says so).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import hashlib
import json
import math
import shutil
import signal
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).parent))

import llama_cpp_tools as llama_cpp  # noqa: E402
import mlx.core as mx  # noqa: E402
from common import float_copy, parse_args, stdout_to_stderr, write_result  # noqa: E402

from mlxq.bench.store import VariantStore, commit, digest, tree_digest  # noqa: E402

GROUP = 64
CALIB_TOKENS, SEQ_LEN = 8192, 512
BPW_TOLERANCE = 0.05
GOAL = 0.8  # mlxq's KL / the best peer's, at equal bits per weight


# ------------------------------------------------------------------------------------------------- sizes
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


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def bits_per_weight(out: Path, baseline: dict) -> dict:
    """Weight matrices (codes + scales + biases, or float) per parameter, and the whole model."""
    got = sizes(out)
    matrix_params = matrix_bytes = 0
    for name, (shape, _) in baseline.items():
        if len(shape) < 2 or not name.endswith(".weight") or name not in got:
            continue
        base = name.removesuffix(".weight")
        matrix_params += _numel(shape)
        matrix_bytes += sum(got[k][1] for k in (name, base + ".scales", base + ".biases") if k in got)
    total_params = sum(_numel(s) for s, _ in baseline.values())
    return {
        "bpw": round(8 * matrix_bytes / matrix_params, 4),
        "bpw_all": round(8 * sum(b for _, b in got.values()) / total_params, 4),
        "size_mb": round(sum(b for _, b in got.values()) / 1e6, 2),
    }


# ------------------------------------------------------------------------------------------------- mlxq
def run_mlxq(baseline: Path, out: Path, recipe_name: str | None, bits: int | None, method: str) -> dict | None:
    """mlxq's quantizer; for a mix, also mlx-lm's bits-per-weight count of the result (what dynamic quant aims at)."""
    from mlxq.quant.pipeline import quantize
    from mlxq.quant.recipes import make_recipe

    calibrate = None if method == "rtn" else "default"
    quantize(str(baseline), out, make_recipe(recipe_name, bits, GROUP), method=method, calibrate=calibrate,
             calib_tokens=CALIB_TOKENS, progress=False)
    return {"bpw_mlx_lm": round(mlx_lm_bpw(out), 4)} if recipe_name else None


# ------------------------------------------------------------------------------------------------- mlx-lm
def load_mlx_lm(baseline: Path):
    from mlx_lm.utils import load

    return load(str(baseline), return_config=True)


def save_mlx_lm(baseline: Path, out: Path, model, tokenizer, config: dict) -> None:
    """Saves as `mlx_lm.convert --dtype float16` would: float16 scales, biases and unquantized tensors."""
    from mlx_lm.utils import save

    model.set_dtype(mx.float16)
    save(str(out), str(baseline), model, tokenizer, config)


def run_mlx_lm_rtn(baseline: Path, out: Path, bits: int, batches: list) -> None:
    from mlx_lm import convert

    convert(hf_path=str(baseline), mlx_path=str(out), quantize=True, q_bits=bits, q_group_size=GROUP,
            dtype="float16")


def run_mlx_lm_gptq(baseline: Path, out: Path, bits: int, batches: list) -> None:
    """mlx-lm's GPTQ on every linear; the tied embedding (not a linear) at the same bits, round to nearest."""
    from mlx_lm.quant.gptq import gptq_quantize

    model, tokenizer, config = load_mlx_lm(baseline)
    model, config["quantization"] = gptq_quantize(model, mx.array(batches), bits, GROUP, bits, GROUP)
    save_mlx_lm(baseline, out, model, tokenizer, config)


def run_mlx_lm_awq(baseline: Path, out: Path, bits: int, batches: list) -> None:
    """mlx-lm's AWQ (scale and clip search per block), the embedding at the same bits and group."""
    from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config

    model, tokenizer, config = load_mlx_lm(baseline)
    awq_quantize(model, mx.array(batches), AWQ_MODEL_CONFIGS[config["model_type"]], group_size=GROUP, bits=bits,
                 embed_group_size=GROUP, embed_bits=bits)
    save_mlx_lm(baseline, out, model, tokenizer, update_config(model, config))


@contextlib.contextmanager
def dequantized_matmul():
    """While inside, `mx.quantized_matmul` (what mlx's QuantizedLinear and a tied QuantizedEmbedding's `as_linear`
    call) computes `x @ dequantize(w, scales, biases).T` in float: the same function of the same scales and biases,
    so their gradients are the same in exact arithmetic. Why: MLX's CPU quantized matmul is about 12x slower than
    dequantizing and multiplying in float here (a 3-bit SmolLM2 forward of 4 x 511 tokens: 696 s against 57 s at
    load 14), which made mlx-lm's DWQ take hours on this machine."""
    original = mx.quantized_matmul

    def matmul(x, w, /, scales, biases=None, transpose=True, group_size=None, bits=None, mode="affine", *,
               stream=None):
        dense = mx.dequantize(w, scales, biases, group_size, bits, mode=mode, dtype=x.dtype, stream=stream)
        return mx.matmul(x, dense.T if transpose else dense, stream=stream)

    mx.quantized_matmul = matmul
    try:
        yield
    finally:
        mx.quantized_matmul = original


def check_dequantized_matmul(model, tokens: list[int], tolerance: float = 1e-3) -> dict:
    """`model`'s logits on `tokens` through MLX's quantized matmul and through `dequantized_matmul`: their largest
    difference relative to the largest logit must stay within float rounding (`tolerance`), else ValueError."""
    x = mx.array([tokens])
    start = time.perf_counter()
    quantized = model(x)
    mx.eval(quantized)
    middle = time.perf_counter()
    with dequantized_matmul():
        dense = model(x)
        mx.eval(dense)
    end = time.perf_counter()
    diff, scale = mx.abs(quantized - dense).max().item(), mx.abs(quantized).max().item()
    check = {"tokens": len(tokens), "max_abs_logit_diff": diff, "max_abs_logit": scale, "tolerance": tolerance,
             "seconds_quantized": round(middle - start, 1), "seconds_dequantized": round(end - middle, 1)}
    if not diff <= tolerance * scale:
        raise ValueError(f"the dequantized matmul differs from MLX's quantized matmul: {check}")
    return check


def run_mlx_lm_dwq(baseline: Path, out: Path, bits: int, batches: list) -> dict:
    """mlx-lm's DWQ (`dwq_quantize`, unchanged) with its own optimizer settings (Adam, learning rate 1e-6, batch 4,
    temperature 2), starting from round to nearest, distilling from the float model on the calibration sequences
    (used for validation too: there is no other text of the same kind), with its quantized matmuls computed as
    `dequantized_matmul` (checked first on the real student) and its own gradient checkpointing on (memory).
    Returns how far that got, the check, and what the default recipe would cost."""
    import mlx.optimizers as optimizers
    from mlx_lm.quant.dwq import dwq_quantize
    from mlx_lm.utils import quantize_model

    teacher, tokenizer, config = load_mlx_lm(baseline)
    student = copy.deepcopy(teacher)
    _, config = quantize_model(student, config, group_size=GROUP, bits=bits)
    check = check_dequantized_matmul(student, batches[0][:128])
    data = [(seq, 0) for seq in batches]
    batch_size = 4
    start = time.perf_counter()
    with dequantized_matmul():
        dwq_quantize(student, lambda batch, idx, split: teacher(batch), optimizers.Adam(learning_rate=1e-6,
                     bias_correction=True), data, data, batch_size=batch_size, max_seq_length=SEQ_LEN, seed=123,
                     dtype=mx.float32, gradient_checkpoint=True)
    seconds = time.perf_counter() - start
    save_mlx_lm(baseline, out, student, tokenizer, config)
    steps = len(batches) // batch_size
    return {"steps": steps, "batch_size": batch_size, "learning_rate": 1e-6, "temperature": 2.0,
            "train_tokens": len(batches) * SEQ_LEN, "validation_passes": 2,
            "changed": "mx.quantized_matmul computed as x @ dequantize(w, scales, biases).T in float32 while "
                       "dwq_quantize runs (mlx-lm's code unchanged): the same function of the trained scales and "
                       "biases, about 12x faster on this CPU than MLX's quantized matmul",
            "dequantized_matmul_check": check,
            # mlx-lm's own option (--grad-checkpoint): the same gradients, layer activations recomputed in the
            # backward pass; without it a step of 4 x 511 tokens needs about 13 GB here (3.9 GB at batch 1, 1.8 GB
            # with it) and was killed for memory on this shared 24 GB machine
            "gradient_checkpoint": True,
            "default_recipe": "2048 samples x up to 1025 tokens, batch 4, learning rate 1e-6 (about 512 steps)",
            # this run's time (its two validation passes included) scaled by the tokens the default recipe trains on
            "default_recipe_hours_here_about": round(seconds * 2048 * 1025 / (len(batches) * SEQ_LEN) / 3600, 1)}


def run_mlx_lm_dynamic(baseline: Path, out: Path, low: int, high: int, target_bpw: float, batches: list) -> dict:
    """mlx-lm's dynamic quant: per-layer sensitivities from gradients on the calibration sequences, then the most
    sensitive layers at `high` bits, as many as fit within `target_bpw` (mlx-lm's own bpw count): `dynamic_threshold`
    in place of its `estimate_threshold`, which bisects the threshold only to 1e-3 of the sensitivities' range and
    stopped at 4.086 bpw for a target of 4.145 here (below the bench's tolerance for equal bits)."""
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities
    from mlx_lm.utils import quantize_model

    model, tokenizer, config = load_mlx_lm(baseline)
    sens = dict(estimate_sensitivities(model, mx.array(batches), low, GROUP, high, GROUP))
    threshold, bpw = dynamic_threshold(model, sens, target_bpw, low, high)

    def predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        return {"bits": high, "group_size": GROUP} if sens[path] > threshold else True

    model, config = quantize_model(model, config, group_size=GROUP, bits=low, quant_predicate=predicate)
    save_mlx_lm(baseline, out, model, tokenizer, config)
    return {"low_bits": low, "high_bits": high, "target_bpw_mlx_lm": round(target_bpw, 4), "bpw_mlx_lm": round(bpw, 4),
            "high_layers": sum(v > threshold for v in sens.values()), "layers": len(sens)}


def dynamic_threshold(model, sens: dict[str, float], target_bpw: float, low: int, high: int) -> tuple[float, float]:
    """The sensitivity threshold that puts the most layers at `high` bits, most sensitive first, with mlx-lm's bits
    per weight of the result (`compute_bits_per_weight`, as `estimate_threshold` counts it) at most `target_bpw`;
    returns it and that bits per weight. The count grows with each layer added, so the number is bisected exactly."""
    import mlx.nn as nn
    from mlx_lm.utils import compute_bits_per_weight

    ranked = sorted(sens.values(), reverse=True)

    def threshold(n: int) -> float:  # n layers above it
        return ranked[0] + 1 if n == 0 else ranked[n - 1] - 1 if n == len(ranked) else (ranked[n - 1] + ranked[n]) / 2

    def bpw(n: int) -> float:
        q = copy.deepcopy(model)
        nn.quantize(q, group_size=GROUP, bits=low, class_predicate=lambda p, m: hasattr(m, "to_quantized") and (
            {"bits": high, "group_size": GROUP} if sens[p] > threshold(n) else True))
        return float(compute_bits_per_weight(q))

    lo, hi = 0, len(ranked)  # bpw(lo) <= target (else no layer at high bits), find the largest such n
    if bpw(hi) <= target_bpw:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if bpw(mid) <= target_bpw else (lo, mid)
    return threshold(lo), bpw(lo)


def mlx_lm_bpw(path: Path) -> float:
    """mlx-lm's own bits-per-weight figure for a saved directory, counted as dynamic quant counts while it searches
    (on the float32 model: float32 scales and biases)."""
    from mlx_lm.utils import compute_bits_per_weight, load

    model, _ = load(str(path), lazy=True)
    model.set_dtype(mx.float32)
    return float(compute_bits_per_weight(model))


# ------------------------------------------------------------------------------------------------- llama.cpp
def run_llama_cpp(work: Path, out: Path, ftype: str, text: str) -> dict:
    """llama.cpp's quantizer on the same weights (the pinned GGUF, dequantized exactly to float32 first), every
    tensor `ftype`, with an importance matrix from the calibration text (both made once per run)."""
    import re

    from mlxq.formats.fetch import ALIASES, fetch

    f32 = work / "f32.gguf"
    if not f32.exists():
        llama_cpp.float_gguf(fetch(ALIASES["smollm2"]), f32)
    imatrix = work / f"imatrix-{hashlib.sha256(text.encode()).hexdigest()[:12]}.gguf"  # per calibration text
    if not imatrix.exists():
        (work / "calibration.txt").write_text(text)
        llama_cpp.importance_matrix(f32, work / "calibration.txt", imatrix, ctx=SEQ_LEN, chunks=CALIB_TOKENS // SEQ_LEN)
    out.mkdir(parents=True)
    llama_cpp.quantize(f32, out / "model.gguf", ftype, imatrix=imatrix, pure=True)
    chunks = re.search(r"computing over (\d+) chunks", imatrix.with_name(imatrix.name + ".log").read_text())
    return {"imatrix_tokens": int(chunks.group(1)) * SEQ_LEN if chunks else None, "pure": True}


# ------------------------------------------------------------------------------------------------- plan
class Variant(NamedTuple):
    label: str  # "<tool>-<method>-<width>"
    bits: int  # 0 for mixes
    run: Callable  # (output directory, results so far) -> a note for the record, or None
    needs: tuple[str, ...] = ()  # labels whose results this one reads (part of its fingerprint)
    code: tuple[str, ...] = ()  # the source its result depends on (mlxq.bench.store.source_digests units)


# The code a result depends on, part of its fingerprint: the scoring (this file's scoring and bits-per-weight
# functions and the modules that load a variant and compute SmolLM2's logits) plus the runner's own source. Other code
# (serving, other model families, other runners in this file) may change without invalidating a stored result.
HERE = "bench/quant_quality.py:"
SCORING = (HERE + "measure", HERE + "read_header", HERE + "sizes", HERE + "_numel", HERE + "bits_per_weight",
           "mlxq/eval/metrics.py", "mlxq/api.py:Model.logits", "mlxq/loading.py", "mlxq/formats/__init__.py",
           "mlxq/formats/base.py", "mlxq/formats/hf.py", "mlxq/formats/validate.py", "mlxq/quant/source.py",
           "mlxq/models/__init__.py", "mlxq/models/base.py", "mlxq/models/layers.py", "mlxq/models/llama.py",
           "mlxq/models/moe.py:is_moe_layer", "mlxq/engine/cache.py:KVCache")
MLXQ_CODE = (*SCORING, HERE + "run_mlxq", HERE + "mlx_lm_bpw", "mlxq/quant/", "mlxq/formats/texts.py")
MLX_LM_CODE = (*SCORING, HERE + "load_mlx_lm", HERE + "save_mlx_lm")
DWQ_CODE = (HERE + "dequantized_matmul", HERE + "check_dequantized_matmul")
LLAMA_CPP_CODE = (*SCORING, HERE + "run_llama_cpp", "bench/llama_cpp_tools.py", "mlxq/formats/gguf/",
                  "mlxq/kernels/kquants.py")


def plan(quick: bool, baseline: Path, batches: list, text: str, work: Path) -> list[Variant]:
    """Each width's compared pair comes first (mlxq's GPTQ, then its peers), widest first, so a run cut short still
    holds whole comparisons."""
    variants = []
    llama_cpp_types = {4: ("IQ4_NL", "Q4_0"), 3: ("Q3_K",)}
    for b in (3,) if quick else (4, 3, 2):
        variants.append(Variant(f"mlxq-gptq-{b}bit", b, lambda o, _, b=b: run_mlxq(baseline, o, None, b, "gptq"),
                                code=MLXQ_CODE))
        peers = {"rtn": run_mlx_lm_rtn} if quick else {"rtn": run_mlx_lm_rtn, "gptq": run_mlx_lm_gptq,
                                                        "awq": run_mlx_lm_awq, "dwq": run_mlx_lm_dwq}
        for m, fn in peers.items():
            if m == "gptq" and b not in (2, 4):
                continue  # recorded in "not_run"
            if m in ("awq", "dwq") and b != 3:
                continue  # recorded in "not_run"
            code = (*MLX_LM_CODE, HERE + fn.__name__, *(DWQ_CODE if m == "dwq" else ()))
            variants.append(Variant(f"mlx_lm-{m}-{b}bit", b, lambda o, _, b=b, fn=fn: fn(baseline, o, b, batches),
                                    code=code))
        if quick:
            continue
        for ftype in llama_cpp_types.get(b, ()):
            variants.append(Variant(f"llama_cpp-imatrix-{ftype}", b,
                                    lambda o, _, ftype=ftype: run_llama_cpp(work, o, ftype, text), code=LLAMA_CPP_CODE))
        for m in ("rtn", "search"):  # mlxq's other methods, for the record (no ratio)
            variants.append(Variant(f"mlxq-{m}-{b}bit", b, lambda o, _, b=b, m=m: run_mlxq(baseline, o, None, b, m),
                                    code=MLXQ_CODE))
    if quick:
        return variants
    for mix in ("q3_k_m", "q2_k"):
        ours = f"mlxq-gptq-{mix}"
        variants.append(Variant(ours, 0, lambda o, _, mix=mix: run_mlxq(baseline, o, mix, None, "gptq"),
                                code=MLXQ_CODE))
        # aimed at mlx-lm's own bits-per-weight count of the mlxq mix, between the two widths that bracket it
        variants.append(Variant(f"mlx_lm-dynamic-{mix}", 0, lambda o, done, ours=ours: run_mlx_lm_dynamic(
            baseline, o, *dynamic_bits(done[ours]["run"]["bpw_mlx_lm"]), done[ours]["run"]["bpw_mlx_lm"], batches),
                                needs=(ours,), code=(*MLX_LM_CODE, HERE + "run_mlx_lm_dynamic", HERE + "dynamic_bits",
                                                    HERE + "dynamic_threshold")))
    return variants


def dynamic_bits(target_bpw_mlx_lm: float) -> tuple[int, int]:
    """The (low, high) widths for dynamic quant that bracket `target_bpw_mlx_lm`: low is the widest whose uniform
    model stays within it (mlx-lm's count: the bits plus a float32 scale and bias per group), so the mix can reach the
    target (2/3 bits tops out below a mix of 3.6 bpw, 3/4 bits reaches it)."""
    low = math.floor(target_bpw_mlx_lm - 2 * 32 / GROUP)
    if not 2 <= low < 8:
        raise ValueError(f"no dynamic-quant widths bracket {target_bpw_mlx_lm} bits per weight")
    return low, low + 1


def select(variants: list[Variant], patterns: list[str] | None) -> list[Variant]:
    """The variants whose labels match `patterns` (fnmatch), in the patterns' order, each after those it needs."""
    if not patterns:
        return variants
    by_label = {v.label: v for v in variants}
    chosen: dict[str, Variant] = {}

    def add(v: Variant) -> None:
        for need in v.needs:
            add(by_label[need])
        chosen.setdefault(v.label, v)

    for pattern in patterns:
        matched = [v for v in variants if fnmatch.fnmatchcase(v.label, pattern)]
        if not matched:
            sys.exit(f"quant_quality: error: --only {pattern!r} matches no variant ({', '.join(by_label)})")
        for v in matched:
            add(v)
    return list(chosen.values())


NOT_RUN = {
    "mlx_lm-gptq-3bit": "mlx_lm.quant.gptq packs only 2, 4 or 8 bits (assert bits in {2, 4, 8})",
    "mlx_lm-awq-2bit, mlx_lm-awq-4bit": "AWQ's scale and clip search takes about 80 CPU-seconds per block on this "
                                        "text here (40 CPU-minutes a width): run at 3 bits, where GPTQ cannot",
    "mlx_lm-dwq-2bit, mlx_lm-dwq-4bit": "DWQ trains on the CPU here (see mlx_lm-dwq-3bit's seconds): 3 bits only",
    "llama_cpp-2bit, llama_cpp-3bit": "no llama.cpp type below 4.5 bpw fits SmolLM2's 576-wide rows (K/IQ types "
                                      "need multiples of 256; llama-quantize falls back to a 32-block type): see "
                                      "llama_cpp-imatrix-Q3_K's bpw and types",
}


# ------------------------------------------------------------------------------------------------- run
def measure(variants: list[Variant], results: dict, reused: dict, store: VariantStore, resume: bool, wins, ref,
            base_sizes: dict, work: Path) -> None:
    """Runs and scores each variant into `results` and the store (a peer that fails is recorded as such; the others
    still run); with `resume`, a stored result whose fingerprint matches is taken instead (noted in `reused`)."""
    from mlxq.eval.metrics import load_for_eval, score

    for label, bits, runner, needs, code in variants:
        missing = [need for need in needs if "kl" not in results.get(need, {})]
        if missing:
            results[label] = {"bits": bits, "failed": f"needs {', '.join(missing)}, which has no result"}
            continue
        extra = {need: results[need] for need in needs}
        hit = store.get(label, extra, code) if resume else None
        if hit is not None:
            results[label] = hit["result"]
            reused[label] = {"stored": hit["stored"], "commit": hit["commit"]}
            print(f"{label:28s} reused (stored {hit['stored']}, commit {hit['commit']})", file=sys.stderr, flush=True)
            continue
        out = work / "runs" / label / "kept"
        shutil.rmtree(out.parent, ignore_errors=True)
        out.parent.mkdir(parents=True)
        start = time.perf_counter()
        try:
            with stdout_to_stderr():
                note = runner(out, results)
        except Exception as e:  # a peer that fails here is recorded as such; the others still get their figures
            results[label] = {"bits": bits, "failed": f"{type(e).__name__}: {e}"}
            print(f"{label:28s} failed: {results[label]['failed']}", file=sys.stderr, flush=True)
            shutil.rmtree(out.parent, ignore_errors=True)
            continue
        seconds = time.perf_counter() - start
        gguf_file = out / "model.gguf"
        s = score(load_for_eval(str(gguf_file if gguf_file.exists() else out)).logits, wins, ref)
        results[label] = {
            "bits": bits,
            "kl": round(s.kl, 5),
            "kl_p99": round(s.kl_p99, 4),
            "top1": round(s.top1, 4),
            "ppl": round(s.ppl, 3),
            **(llama_cpp.bits_per_weight(gguf_file) if gguf_file.exists() else bits_per_weight(out, base_sizes)),
            "seconds": round(seconds, 1),
            **({"run": note} if note else {}),
        }
        store.put(label, results[label], extra, code)
        print(f"{label:28s} " + " ".join(f"{k} {v}" for k, v in results[label].items()), file=sys.stderr, flush=True)
        shutil.rmtree(out.parent, ignore_errors=True)
        mx.clear_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resume", action="store_true", help="reuse stored results whose fingerprint matches")
    parser.add_argument("--only", nargs="+", metavar="PATTERN", help="run only these variants (fnmatch), in order")
    args = parse_args(parser)

    from mlxq.eval.metrics import load_for_eval, reference, score, windows
    from mlxq.formats.fetch import cache_dir
    from mlxq.formats.texts import calibration_texts, heldout_text
    from mlxq.quant.calibrate import token_batches

    quick = args.quick
    eval_tokens = 512 if quick else 8192
    work = cache_dir() / "bench" / "quant_quality"
    work.mkdir(parents=True, exist_ok=True)
    baseline = float_copy("smollm2")
    base_sizes = sizes(baseline)

    ref_model = load_for_eval(str(baseline))
    tok = ref_model.tokenizer
    batches = token_batches(tok, calibration_texts(), CALIB_TOKENS, SEQ_LEN)  # what mlxq calibrates on
    text = "".join(tok.decode(seq) for seq in batches)  # the same, for llama-imatrix (it tokenizes itself)
    wins = windows(tok.encode(heldout_text(), add_special_tokens=False), 512, eval_tokens)
    ref = reference(ref_model.logits, wins)
    base_scores = score(ref_model.logits, wins)
    del ref_model

    versions = {"mlx": mx.__version__, "mlx_lm": _version("mlx-lm"), "llama_cpp": llama_cpp.VERSION}
    inputs = {"baseline": tree_digest(baseline), "calibration": digest(batches), "calibration_text": digest(text),
              "eval": digest(wins), "group_size": GROUP, "calib_tokens": CALIB_TOKENS, "seq_len": SEQ_LEN,
              "versions": versions}
    root = Path(__file__).resolve().parent.parent
    store = VariantStore(work / "results", inputs, root)
    everything = plan(quick, baseline, batches, text, work)
    variants = select(everything, args.only)
    results, reused = {}, {}
    # a run stopped by hand (Ctrl-C, kill -INT or -TERM) still records the variants it finished; a background job
    # starts with SIGINT ignored, so the handlers are set here
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    try:
        measure(variants, results, reused, store, args.resume, wins, ref, base_sizes, work)
    except KeyboardInterrupt:
        print(f"quant_quality: interrupted after {len(results)} of {len(variants)} variants", file=sys.stderr)
    not_measured = {v.label: v.bits for v in everything if v.label not in results}
    ratios, best = compare({k: r for k, r in results.items() if "failed" not in r}, calibrated_peers=not quick,
                           not_measured=not_measured)
    skipped = ("quick: mlx-lm's GPTQ, AWQ, DWQ and dynamic quant and llama.cpp with an importance matrix run in the "
               "full run only") if quick else None
    if skipped:
        print(f"quant_quality: {skipped}", file=sys.stderr)
    write_result("quant_quality", {
        "quick": quick,
        "commit": commit(root),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)",
        "group_size": GROUP,
        "eval": {"text": "held-back wiki (second half of exllamav2 wiki.utf8)", "tokens": base_scores.tokens,
                 "ctx": 512, "baseline_ppl": round(base_scores.ppl, 3)},
        "calibration": {"text": "mlxq's default mix (wiki first half, c4, code, technical, multilingual)",
                        "tokens": CALIB_TOKENS, "seq_len": SEQ_LEN, "same_for": "every calibrated method"},
        "versions": versions,
        "fingerprint_inputs": inputs,
        **({"only": args.only} if args.only else {}),
        "reused": reused,
        "results": results,
        "not_run": {} if quick else NOT_RUN,
        **({"not_measured": list(not_measured)} if not_measured else {}),
        "skipped": skipped,
        "best_peer": best,
        "goal": f"mlxq's KL <= {GOAL} x the best peer's at equal bpw",
        "ratios": ratios,
    })


def compare(results: dict, calibrated_peers: bool, not_measured: dict | None = None) -> tuple[dict, dict]:
    """Ratios of mlxq's calibrated variants to each peer at equal bits per weight, and, when the calibrated peers
    ran (all of that width's: none left in `not_measured`, label -> bits, by an interrupted run or `--only`), to the
    best such peer."""
    ratios, best = {}, {}
    pairs = [(f"mlxq-gptq-{b}bit", b, f"{b}bit") for b in (2, 3, 4)]
    pairs += [(f"mlxq-gptq-{mix}", 0, mix) for mix in ("q3_k_m", "q2_k")]
    for ours_label, bits, tag in pairs:
        ours = results.get(ours_label)
        if ours is None:
            continue
        peers = {label: r for label, r in results.items()
                 if _peer_of(label, r["bits"], bits, tag) and abs(r["bpw"] - ours["bpw"]) <= BPW_TOLERANCE}
        waiting = [label for label, b in (not_measured or {}).items() if _peer_of(label, b, bits, tag)]
        for label, r in peers.items():
            tool, method = label.split("-")[:2]
            peer = f"{tool}_{method}" if tool == "mlx_lm" else f"{tool}_{method}_{label.split('-')[2].lower()}"
            ratios[f"kl_{tag}_vs_{peer}"] = round(ours["kl"] / r["kl"], 4)
        if peers and calibrated_peers and not waiting:
            name = min(peers, key=lambda k: peers[k]["kl"])
            ratio = ours["kl"] / peers[name]["kl"]
            ratios[f"kl_{tag}_vs_best_peer"] = round(ratio, 4)
            best[tag] = {"peer": name, "kl": peers[name]["kl"], "bpw": peers[name]["bpw"], "mlxq": ours_label,
                         "mlxq_kl": ours["kl"], "mlxq_bpw": ours["bpw"], "goal_met": ratio <= GOAL}
    return ratios, best


def _peer_of(label: str, label_bits: int, bits: int, tag: str) -> bool:
    """Whether a variant is a peer's at this width (`bits`, or for mixes, 0 bits and the mix's name as `tag`)."""
    return not label.startswith("mlxq-") and (label_bits == bits if bits else label.endswith(tag))


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    main()
