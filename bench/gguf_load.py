"""GGUF load: time to first token, peak memory and decode speed of mlxq against llama.cpp on the same K-quant files.

SmolLM2-135M-Instruct (the pinned Q4_1 file) re-quantized by llama.cpp's own quantizer to Q4_K_M, Q6_K and Q2_K.
Each (engine, file) runs in a fresh child process, interleaved across repetitions, and reports:
- load_s: opening the model until it can run (mlxq: `mlxq.load` with its tokenizer, cached after the first load;
  llama.cpp: `Llama(...)` with its vocabulary and a 512-token context), after the imports and, on both sides, after
  one full garbage collection (`settle_imports`): the imports leave the collector one full pass due, which costs
  what they allocated (mlxq's, with transformers and torch: ~217k objects, 0.12-0.2 s), not what the load does;
- load_cpu_s: the CPU seconds of that (all threads; less affected than load_s by other work on a shared machine);
- ttft_s: load_s plus the first token of a short chat prompt (prefill included; the same token ids for both);
- decode_tok_s: greedy tokens per second after the first;
- rss_import_mb: the process's RSS right after its imports, before the model (the baseline: for mlxq an empty
  Python + MLX + transformers interpreter, about 270 MB; for llama.cpp about 45 MB), reported as it is;
- rss_peak_mb (the child's VmHWM at the end, decoding included) and rss_model_mb = that peak minus the baseline;
  rss_load_mb = the VmHWM right after loading minus the baseline (the load alone: weights, tokenizer, transients);
  for mlxq also mlx_peak_mb, MLX's own peak of allocated arrays (the weights, the cache, the activations),
  mlx_load_peak_mb, that peak right after loading, mlx_weights_mb, the model's arrays, and mlx_cache_mb, the
  freed buffers MLX keeps for reuse at the end (in the RSS, not in its peak).

mlxq runs each file twice: with its quantized blocks kept (`keep_quantized=True`: the mode for models bigger than
memory) and dequantized to float32 (the CPU default for small models). Goals with blocks kept: load_s <= 2x
llama.cpp's, rss_model_mb <= 1.3x (file + KV cache). "load" is, on both sides, the call that returns a model
ready to run with its tokenizer (mlxq.load(path); llama_cpp.Llama(path)), timed in a child whose imports are done.

    python bench/gguf_load.py [--quick] [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import median, parse_args, stdout_to_stderr, write_result  # noqa: E402

TYPES = {"Q4_K_M": "MOSTLY_Q4_K_M", "Q6_K": "MOSTLY_Q6_K", "Q2_K": "MOSTLY_Q2_K"}
ENGINES = ("llama_cpp", "mlxq_blocks", "mlxq_float")
# llama.cpp's threads. Its thread pool spins while it waits: on a machine whose cores are busy with other work, two
# threads made its decode 50x slower here than one did; --threads changes it
THREADS = 1
# SmolLM2's chat template applied by hand, so both engines tokenize the very same text
PROMPT = ("<|im_start|>user\nWrite three sentences about the history of the printing press in Europe and why it "
          "mattered.<|im_end|>\n<|im_start|>assistant\n")


def prepare(kind: str) -> Path:
    """SmolLM2 re-quantized by llama.cpp to `kind`, cached; from the pinned Q4_1 file, which llama.cpp dequantizes
    exactly before quantizing (allow_requantize)."""
    import ctypes

    import llama_cpp

    from mlxq.formats.fetch import ALIASES, cache_dir, fetch

    out = cache_dir() / "bench" / f"smollm2-{kind}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{TYPES[kind]}")
    params.allow_requantize = True
    params.nthread = 2
    tmp = out.with_name(f".{out.name}.partial")
    with stdout_to_stderr():
        rc = llama_cpp.llama_model_quantize(str(fetch(ALIASES["smollm2"])).encode(), str(tmp).encode(),
                                            ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {kind} failed with {rc}")
    tmp.rename(out)
    return out


def settle_imports() -> None:
    """The full garbage collection the imports left due (Python runs one when enough survivors have piled up: right
    after big imports the next is imminent, and it walks every object they made), run before the clock starts on
    both sides, so that neither load is charged for its imports."""
    import gc

    gc.collect()


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


# ------------------------------------------------------------------------------------------------ children
def child_mlxq(path: str, keep: bool, gen: int) -> dict:
    # what loading imports, imported before the baseline: the code is not the model
    import mlx.core as mx
    import mlx.nn  # noqa: F401
    from mlx.utils import tree_flatten
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401

    import mlxq
    import mlxq.api  # noqa: F401  (`import mlxq` alone leaves the runtime to the first `mlxq.load`)
    from mlxq.formats.gguf import reader  # noqa: F401
    from mlxq.models import llama  # noqa: F401

    settle_imports()
    base = rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    model = mlxq.load(path, keep_quantized=keep)
    t1, c1 = time.perf_counter(), time.process_time()
    load_rss, load_mlx = rss_mb("VmHWM"), mx.get_peak_memory() / 2**20
    weights_mb = sum(v.nbytes for _, v in tree_flatten(model.net.parameters())) / 2**20
    ids = model.tokenizer.encode(PROMPT, add_special_tokens=False)
    first = None
    for _chunk in model.stream(ids, max_tokens=1, temperature=0.0):
        first = first or time.perf_counter()
    result = model.generate(ids, max_tokens=gen, temperature=0.0)
    layers = model.config["num_hidden_layers"]
    kv_dim = model.config["num_key_value_heads"] * model.config.get("head_dim", model.config["hidden_size"] //
                                                                       model.config["num_attention_heads"])
    return {"load_s": t1 - t0, "load_cpu_s": c1 - c0, "ttft_s": first - t0, "decode_tok_s": result.timings.decode_tps,
            "prompt_tokens": len(ids), "rss_import_mb": base, "rss_load_mb": load_rss - base,
            "mlx_load_peak_mb": load_mlx, "mlx_peak_mb": mx.get_peak_memory() / 2**20,
            "mlx_cache_mb": mx.get_cache_memory() / 2**20, "mlx_weights_mb": weights_mb,
            "kv_mb": layers * 2 * kv_dim * (len(ids) + gen) * 4 / 2**20}  # float32 K and V per token


def child_llama_cpp(path: str, gen: int, threads: int) -> dict:
    from llama_cpp import Llama

    settle_imports()
    base = rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    llm = Llama(path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    t1, c1 = time.perf_counter(), time.process_time()
    load_rss = rss_mb("VmHWM")
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    llm.eval(ids)
    first = time.perf_counter()
    t2 = time.perf_counter()
    made = 0
    for _ in range(gen - 1):
        llm.eval([int(llm.sample(temp=0.0))])
        made += 1
    t3 = time.perf_counter()
    n_layer = int(llm.metadata.get("llama.block_count", 0))
    kv = int(llm.metadata.get("llama.attention.head_count_kv", 0)) * int(llm.metadata.get(
        "llama.embedding_length", 0)) // max(int(llm.metadata.get("llama.attention.head_count", 1)), 1)
    return {"load_s": t1 - t0, "load_cpu_s": c1 - c0, "ttft_s": first - t0, "decode_tok_s": made / (t3 - t2),
            "prompt_tokens": len(ids),
            "rss_import_mb": base, "rss_load_mb": load_rss - base,
            "kv_mb": n_layer * 2 * kv * 512 * 2 / 2**20}  # F16 K and V, 512 slots


def child(engine: str, path: str, gen: int, threads: int) -> None:
    if engine == "llama_cpp":
        with stdout_to_stderr():
            out = child_llama_cpp(path, gen, threads)
    else:
        out = child_mlxq(path, engine == "mlxq_blocks", gen)
    out["rss_peak_mb"] = rss_mb("VmHWM")
    print(json.dumps(out))


def run_child(engine: str, path: Path, gen: int, threads: int = THREADS) -> dict:
    env = {**os.environ, "MLXQ_NO_REEXEC": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", engine, str(path), "--gen", str(gen), "--threads",
                           str(threads)],
                          capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{engine} on {path.name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--gen", type=int, default=None, help="decoded tokens per run")
    ap.add_argument("--threads", type=int, default=THREADS, help="llama.cpp's threads (default: %(default)s)")
    ap.add_argument("--child", nargs=2, metavar=("ENGINE", "FILE"), help=argparse.SUPPRESS)
    if "--child" in sys.argv:  # a measured child (given --gen): the BLAS check would load MLX into llama.cpp's process
        args = ap.parse_args()
        return child(args.child[0], args.child[1], args.gen, args.threads)
    args = parse_args(ap)  # --quick: one file (Q4_K_M), two runs
    gen = args.gen or (16 if args.quick else 48)
    kinds = ["Q4_K_M"] if args.quick else list(TYPES)
    runs = args.runs or (2 if args.quick else 3)
    files = {kind: prepare(kind) for kind in kinds}
    for path in files.values():  # warm: the tokenizer cache, the OS page cache
        run_child("mlxq_float", path, 2)
    raw: dict[str, dict[str, list[dict]]] = {k: {e: [] for e in ENGINES} for k in kinds}
    for _ in range(runs):
        for kind, path in files.items():
            for engine in ENGINES:
                raw[kind][engine].append(run_child(engine, path, gen, args.threads))
                print(f"{kind} {engine}: {raw[kind][engine][-1]}", file=sys.stderr)
    results, ratios = {}, {}
    for kind, path in files.items():
        file_mb = path.stat().st_size / 2**20
        entry = {"file_mb": round(file_mb, 1)}
        for engine in ENGINES:
            xs = raw[kind][engine]
            entry[engine] = {key: round(median([x[key] for x in xs]), 3) for key in xs[0]}
            entry[engine]["rss_model_mb"] = round(median([x["rss_peak_mb"] - x["rss_import_mb"] for x in xs]), 1)
        results[kind] = entry
        ours, theirs, flt = entry["mlxq_blocks"], entry["llama_cpp"], entry["mlxq_float"]
        ratios[f"load_s_blocks_vs_llama_cpp_{kind}"] = round(ours["load_s"] / theirs["load_s"], 3)
        ratios[f"load_cpu_s_blocks_vs_llama_cpp_{kind}"] = round(ours["load_cpu_s"] / theirs["load_cpu_s"], 3)
        ratios[f"ttft_s_blocks_vs_llama_cpp_{kind}"] = round(ours["ttft_s"] / theirs["ttft_s"], 3)
        ratios[f"ttft_s_float_vs_llama_cpp_{kind}"] = round(flt["ttft_s"] / theirs["ttft_s"], 3)
        ratios[f"decode_tok_s_blocks_vs_llama_cpp_{kind}"] = round(ours["decode_tok_s"] / theirs["decode_tok_s"], 3)
        ratios[f"decode_tok_s_float_vs_llama_cpp_{kind}"] = round(flt["decode_tok_s"] / theirs["decode_tok_s"], 3)
        ratios[f"rss_model_blocks_vs_file_plus_kv_{kind}"] = round(ours["rss_model_mb"] / (file_mb + ours["kv_mb"]), 3)
        ratios[f"rss_model_float_vs_file_plus_kv_{kind}"] = round(flt["rss_model_mb"] / (file_mb + flt["kv_mb"]), 3)
        ratios[f"mlx_peak_blocks_vs_file_plus_kv_{kind}"] = round(ours["mlx_peak_mb"] / (file_mb + ours["kv_mb"]), 3)
        ratios[f"rss_load_blocks_vs_file_plus_kv_{kind}"] = round(ours["rss_load_mb"] / (file_mb + ours["kv_mb"]), 3)
        ratios[f"mlx_load_peak_blocks_vs_file_{kind}"] = round(ours["mlx_load_peak_mb"] / file_mb, 3)
        theirs_ratio = theirs["rss_model_mb"] / (file_mb + theirs["kv_mb"])
        ratios[f"rss_model_llama_cpp_vs_file_plus_kv_{kind}"] = round(theirs_ratio, 3)
        ratios[f"rss_peak_blocks_vs_llama_cpp_{kind}"] = round(ours["rss_peak_mb"] / theirs["rss_peak_mb"], 3)
    write_result("gguf_load", {
        "model": "SmolLM2-135M-Instruct re-quantized by llama.cpp (llama_model_quantize)",
        "runs": runs, "decoded_tokens": gen, "quick": args.quick, "llama_cpp_threads": args.threads,
        "load_average": os.getloadavg(),  # other work on the machine: figures from a busy one are noisier
        "goals": {"load_s_blocks_vs_llama_cpp": "<= 2", "rss_model_blocks_vs_file_plus_kv": "<= 1.3"},
        "results": results, "ratios": ratios})


if __name__ == "__main__":
    main()
