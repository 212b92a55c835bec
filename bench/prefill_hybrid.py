"""Prefill and decode speed of hybrid Gated DeltaNet + gated-attention models: mlxq against mlx-lm and llama.cpp.

Both MLX models are built from their own classes with the same random fp32 weights (mlx-lm's from
`mlx_lm.models.qwen3_5`, which covers the dense and the MoE text models; mlxq's put through the same
`inference_layout` its loader applies). llama.cpp (llama-cpp-python, CPU, float32 KV cache) runs the same weights:
mlx-lm's model saved as an mlx-lm directory and written by mlxq's GGUF exporter as F32 (`mlxq export --type F32`;
the file is llama.cpp's qwen35 / qwen35moe). All three are checked to give the same logits, then timed in the same
process, alternating, and the medians of the repeats reported (the machine is shared):

- prefill: one call on the whole prompt, until every layer's cache is evaluated (as both generate loops do
  for prompt chunks; the logits are not needed there; llama.cpp computes the last token's, as it always does);
- decode: greedy single-token steps on top of that cache, one evaluation per token. Decode reads every
  fp32 weight once per token; `decode_floor_tps` is the weights' bytes at the one-row matmul bandwidth
  measured in the same run.

Configs keep the proportions of the real models (3 DeltaNet layers per attention layer, 128-wide DeltaNet
heads with twice as many value heads as key heads, 256-wide attention heads with 2 KV heads, value width
twice the hidden size; the MoE one Qwen3-Next's 10 routed experts of hidden/4 plus a shared one), scaled
down to hidden 1024 and 8 layers to fit this machine.

The models must agree before anything is timed: a run whose logits (mlxq's or llama.cpp's) differ from mlx-lm's
by more than `TOLERANCE` (max abs difference relative to the largest logit) fails. `X_vs_llama_cpp` ratios are
mlxq's tokens/s over llama.cpp's, with llama.cpp on as many threads as the machine has cores.

    python bench/prefill_hybrid.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from common import parse_args, write_result  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

TOLERANCE = 1e-4  # float32 on every side: what is left is summation order
WARM = 80  # tokens of the untimed warm-up prompt

COMMON = dict(
    hidden_size=1024,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=256,
    linear_num_key_heads=8,
    linear_num_value_heads=16,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    linear_conv_kernel_dim=4,
    vocab_size=32000,
    full_attention_interval=4,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    max_position_embeddings=32768,
    rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
)
CONFIGS = {
    "dense": dict(COMMON, model_type="qwen3_5_text", intermediate_size=3072),
    "moe": dict(
        COMMON,
        model_type="qwen3_5_moe_text",
        intermediate_size=3072,
        num_experts=64,
        num_experts_per_tok=10,
        moe_intermediate_size=256,
        shared_expert_intermediate_size=256,
    ),
}


def build_pair(config: dict, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """mlxq's model and mlx-lm's, with the same random weights."""
    from mlx_lm.models import qwen3_5 as mlx_lm_qwen3_5

    from mlxq.loading import inference_layout
    from mlxq.models import build_model

    ours = build_model(config)
    mx.random.seed(seed)
    weights = {}
    for name, p in tree_flatten(ours.parameters()):
        if name.endswith("A_log"):
            w = mx.log(mx.random.uniform(1.0, 16.0, p.shape))
        elif name.endswith(("norm.weight", "dt_bias")):
            w = 1.0 + 0.1 * mx.random.normal(p.shape)
        else:  # linears, experts, conv, embedding: unit-variance outputs
            w = mx.random.normal(p.shape) * (p.shape[-1] if "conv1d" not in name else 4) ** -0.5
        weights[name] = w
    ours.update(tree_unflatten(list(weights.items())))
    # mlx-lm's args rewrite rope_parameters in place: give them a copy
    theirs = mlx_lm_qwen3_5.TextModel(mlx_lm_qwen3_5.TextModelArgs.from_dict(copy.deepcopy(config)))
    theirs.load_weights([(k.replace(".mlp.experts.", ".mlp.switch_mlp."), v) for k, v in weights.items()])
    inference_layout(ours)  # what mlxq's loader does after binding the weights
    mx.eval(ours.parameters(), theirs.parameters())
    return ours.eval(), theirs.eval()


def export_gguf(model: nn.Module, config: dict, work: Path) -> Path:
    """mlx-lm's `model` as an mlx-lm directory (its weights, `config` and a small byte-level tokenizer: llama.cpp
    loads no file without a vocabulary) written by mlxq's GGUF exporter as F32: the same weights for llama.cpp."""
    from rich.console import Console

    from mlxq.bench.synthetic import bpe_tokenizer
    from mlxq.formats.gguf.export import export
    from mlxq.quant.recipes import gguf_recipe

    src = work / "mlx-lm"
    src.mkdir(parents=True)
    mx.save_safetensors(str(src / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (src / "config.json").write_text(json.dumps(config))
    bpe_tokenizer(src, 160)
    out = work / "model-f32.gguf"
    export(str(src), out, gguf_recipe("F32"), console=Console(stderr=True), progress=False)
    shutil.rmtree(src)
    return out


def llama_cpp(path: Path, context: int, logits_all: bool = False):
    """llama.cpp on the CPU with a float32 KV cache (as the MLX models keep theirs), on every core."""
    from llama_cpp import GGML_TYPE_F32, Llama

    threads = os.cpu_count()
    return Llama(model_path=str(path), n_ctx=context, n_batch=context, n_threads=threads, n_threads_batch=threads,
                 n_gpu_layers=0, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, logits_all=logits_all, seed=0,
                 verbose=False)


def llama_cpp_logits(path: Path, tokens: list[int]) -> mx.array:
    """llama.cpp's logits at every position of `tokens` (one forward pass)."""
    llm = llama_cpp(path, len(tokens) + 8, logits_all=True)
    llm.eval(tokens)
    logits = mx.array(np.array(llm.scores[: len(tokens)], dtype=np.float32))[None]
    llm.close()
    return logits


def llama_cpp_prefill_s(llm, tokens: list[int]) -> float:
    llm.reset()  # clears the recurrent and attention caches: every run prefills the whole prompt
    t0 = time.perf_counter()
    llm.eval(tokens)
    return time.perf_counter() - t0


def llama_cpp_decode_tps(llm, first: int, steps: int) -> float:
    """Greedy single-token steps on top of the prefilled cache, reading each step's logits as the MLX loops do."""
    import llama_cpp as lib

    token = first
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.eval([token])
        token = int(np.argmax(np.ctypeslib.as_array(lib.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))))
    return steps / (time.perf_counter() - t0)


def prefill_s(model: nn.Module, tokens: mx.array, ours: bool) -> tuple[float, list]:
    cache = model.make_cache()
    t0 = time.perf_counter()
    if ours:
        model(tokens, cache)
    else:
        model(tokens, cache=cache)
    mx.eval([c.state for c in cache])
    return time.perf_counter() - t0, cache


def decode_tps(model: nn.Module, cache: list, first: int, steps: int, ours: bool) -> float:
    token = mx.array([[first]])
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = model(token, cache) if ours else model(token, cache=cache)
        token = mx.argmax(logits[:, -1:], axis=-1)
        mx.eval(token)
    return steps / (time.perf_counter() - t0)


def weight_bandwidth() -> float:
    """Bytes/s of a one-row product with a 128 MB fp32 weight stored [in, out] (the layout mlxq decodes with,
    the fastest here): what bounds decode on this machine."""
    w, x = mx.random.normal((1024, 32000)), mx.random.normal((1, 1024))
    mx.eval(w, x)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        mx.eval(x @ w)
        times.append(time.perf_counter() - t0)
    return w.nbytes / statistics.median(times)


def decode_floor_tps(model: nn.Module, config: dict, bandwidth: float) -> float:
    """Tokens/s if a step did nothing but read each weight it uses once: not the embedding table (one row),
    and of the routed experts only the top-k of each layer."""
    active = config.get("num_experts_per_tok", 1) / config.get("num_experts", 1)
    total = sum(
        p.nbytes * (active if ".experts." in name else 1)
        for name, p in tree_flatten(model.parameters())
        if "embed_tokens" not in name
    )
    return bandwidth / total


def run(name: str, config: dict, prompt_len: int, decode_steps: int, repeats: int, work: Path) -> dict:
    ours, theirs = build_pair(config)
    gguf = export_gguf(theirs, config, work / name)
    rng = np.random.default_rng(0)
    check = mx.array(rng.integers(0, config["vocab_size"], (1, 96)))
    want = theirs(check, cache=theirs.make_cache())
    agreement = {"mlxq": ours(check, ours.make_cache()), "llama_cpp": llama_cpp_logits(gguf, check[0].tolist())}
    agreement = {k: float(mx.abs(v - want).max() / mx.abs(want).max()) for k, v in agreement.items()}
    for side, diff in agreement.items():
        if not diff <= TOLERANCE:
            sys.exit(f"prefill_hybrid: {name}: {side}'s logits differ from mlx-lm's by {diff:.3g} (relative), "
                     f"above the tolerance {TOLERANCE:g}: nothing timed")
    llm = llama_cpp(gguf, max(prompt_len, WARM) + decode_steps + 8)
    # compile / warm every model's kernels on a short prompt first (not timed)
    for model, is_ours in ((ours, True), (theirs, False)):
        _, cache = prefill_s(model, mx.zeros((1, WARM), mx.int32), is_ours)
        decode_tps(model, cache, 0, 2, is_ours)
    llama_cpp_prefill_s(llm, [0] * WARM)
    llama_cpp_decode_tps(llm, 0, 2)
    tokens = mx.array(rng.integers(0, config["vocab_size"], (1, prompt_len)))
    prefill = {"mlxq": [], "mlx_lm": [], "llama_cpp": []}
    decode = {"mlxq": [], "mlx_lm": [], "llama_cpp": []}
    for _ in range(repeats):  # alternate, so all see the same background load
        for key, model, is_ours in (("mlxq", ours, True), ("mlx_lm", theirs, False)):
            seconds, cache = prefill_s(model, tokens, is_ours)
            prefill[key].append(seconds)
            decode[key].append(decode_tps(model, cache, int(tokens[0, -1]), decode_steps, is_ours))
            del cache
        prefill["llama_cpp"].append(llama_cpp_prefill_s(llm, tokens[0].tolist()))
        decode["llama_cpp"].append(llama_cpp_decode_tps(llm, int(tokens[0, -1]), decode_steps))
    llm.close()
    return {
        "config": {k: v for k, v in config.items() if k != "rope_parameters"},
        "rope_parameters": config.get("rope_parameters"),
        "prompt_tokens": prompt_len,
        "decode_steps": decode_steps,
        "repeats": repeats,
        "max_rel_logit_diff_vs_mlx_lm": agreement["mlxq"],
        "llama_cpp_max_rel_logit_diff_vs_mlx_lm": agreement["llama_cpp"],
        "llama_cpp_threads": os.cpu_count(),
        "prefill_s": prefill,
        "prefill_tps": {k: prompt_len / statistics.median(v) for k, v in prefill.items()},  # medians
        "decode_tps": {k: statistics.median(v) for k, v in decode.items()},
        "decode_tps_all": decode,
        "decode_floor_tps": decode_floor_tps(ours, config, weight_bandwidth()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args = parse_args(parser)  # --quick: the dense config only, a shorter prompt, 2 repeats
    if args.quick:
        plan = [("dense", 256, 8, 2)]
    else:
        plan = [("dense", 2048, 32, 3), ("moe", 2048, 32, 3)]
    from mlxq.formats.fetch import cache_dir

    work = cache_dir() / "bench" / "prefill_hybrid" / f"out-{os.getpid()}"  # this run's own: GGUF files
    try:
        results = {name: run(name, CONFIGS[name], n, steps, reps, work) for name, n, steps, reps in plan}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = {}
    for name, r in results.items():
        tag = "" if name == "dense" else f"{name}_"
        for peer in ("mlx_lm", "llama_cpp"):
            ratios[f"{tag}prefill_vs_{peer}"] = r["prefill_tps"]["mlxq"] / r["prefill_tps"][peer]
            ratios[f"{tag}decode_vs_{peer}"] = r["decode_tps"]["mlxq"] / r["decode_tps"][peer]
    import llama_cpp as llama_cpp_python
    import mlx_lm

    write_result("prefill_hybrid", {
        "quick": args.quick,
        "mlx_lm": mlx_lm.__version__,
        "llama_cpp_python": llama_cpp_python.__version__,
        "logit_tolerance": TOLERANCE,
        "results": results,
        "ratios": ratios,
    })


if __name__ == "__main__":
    main()
