"""GGUF export on real weights: SmolLM2-135M-Instruct, mlxq export against llama.cpp's own quantizer.

The float model: the default model's GGUF weights dequantized once and exported as F32 GGUF; both tools start from
exactly that file. Two parts, both run in this one process, mlxq and llama.cpp interleaved:

- Speed: `mlxq export F32.gguf --type T` (the export function, in process: read, convert, encode, write, its worker
  processes' start and end included) against `llama-quantize F32.gguf OUT T 2` (llama_model_quantize, 2 threads)
  per type, each side's best of 4 interleaved runs; wall and CPU seconds, the workers' CPU included (this machine
  is shared, so wall times carry other people's load; CPU seconds do not). Whether the two files hold the same
  tensors byte for byte is recorded too (mlxq's encoders follow ggml's arithmetic: they should).
- Quality: mlxq's calibrated export (`--calibrate`) with each method, `--method allocate` (the default: imatrix's
  fits, tensor types moved within the mix by measured KL), `--method imatrix` (ggml's importance-weighted fits with
  mlxq's importance matrix) and `--method gptq` (codes and block scales chosen against each layer's Hessian),
  against llama.cpp's quantizer with its own importance matrix (llama-imatrix), all calibrated on the same text
  file (the default mix), at Q4_K_M / Q3_K_M / Q2_K. All files are scored by llama.cpp itself: llama-perplexity's
  KL-divergence mode against the float model's logits on held-back Wikipedia text.

    python bench/gguf_export.py [--quick] [--part all|speed|quality] [--methods allocate,imatrix,gptq] [--types T,..]

`--types` limits both parts to those mixes (written to gguf_export[_PART]-TYPES.json, beside the full run's).

Ratios: `export_time_T_vs_llama_cpp` (wall) and `export_cpu_T_vs_llama_cpp` = mlxq / llama.cpp (goal <= 1);
`kl_T_vs_llama_cpp` = the mean KL of mlxq's default method / llama.cpp's (goal <= 0.8), `kl_T_M_vs_llama_cpp` per
method M. Quick: Q4_K_M timed once, Q3_K_M's quality on 512 calibration and 1024 scored tokens. One part alone
writes bench/results/gguf_export_PART.json.
"""

from __future__ import annotations

import argparse
import atexit
import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import parse_args, write_result  # noqa: E402
from llama_cpp_peer import imatrix, kl, kl_base, quantize  # noqa: E402

from mlxq.formats.gguf.export import CALIBRATION_METHODS  # noqa: E402

CTX = 512


def tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    import gguf
    import numpy as np

    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def bpw(path: Path) -> float:
    """Bits per weight over every tensor of the file (norms included), as llama.cpp's loader counts them."""
    import gguf

    ts = gguf.GGUFReader(path).tensors
    return round(8 * sum(int(t.n_bytes) for t in ts) / sum(int(t.n_elements) for t in ts), 4)


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended: the export's worker processes, which it
    reaps before returning (the llama.cpp tools, timed the same way in llama_cpp_peer, end before mlxq runs)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def ours(src: Path, out: Path, kind: str, calibrate: Path | None = None, calib_tokens: int = 0,
         method: str = "imatrix") -> dict:
    from mlxq.formats.gguf.export import export
    from mlxq.quant.recipes import gguf_recipe

    out.unlink(missing_ok=True)
    wall, cpu = time.perf_counter(), cpu_seconds()
    export(str(src), out, gguf_recipe(kind), calibrate=None if calibrate is None else str(calibrate),
           method=method, calib_tokens=calib_tokens, progress=False)
    return {"wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(cpu_seconds() - cpu, 3),
            "size_mb": round(out.stat().st_size / 1e6, 2), "bpw": bpw(out)}


def theirs(src: Path, out: Path, kind: str, imatrix_file: Path | None = None) -> dict:
    out.unlink(missing_ok=True)
    t = quantize(src, out, kind, imatrix_file)
    return {"wall_s": round(t.wall, 3), "cpu_s": round(t.cpu, 3), "size_mb": round(out.stat().st_size / 1e6, 2),
            "bpw": bpw(out)}


def texts(work: Path, calib_tokens: int, eval_tokens: int) -> tuple[Path, Path]:
    """The calibration file (the default mix's sequences, as mlxq takes them, decoded) and the held-back text."""
    from mlxq.engine.tokenizer import load_tokenizer
    from mlxq.formats import open_checkpoint
    from mlxq.formats.texts import calibration_texts, heldout_text
    from mlxq.quant.calibrate import token_batches

    ckpt = open_checkpoint("smollm2")
    tok = load_tokenizer(None, ckpt.gguf_file, ckpt.chat_template)
    calib, held = work / f"calib-{calib_tokens}.txt", work / f"eval-{eval_tokens}.txt"
    if not calib.exists():
        seqs = token_batches(tok, calibration_texts(), calib_tokens + CTX, CTX)
        calib.write_text("".join(tok.decode(s) for s in seqs))
    if not held.exists():
        held.write_text(heldout_text()[: eval_tokens * 8])  # more than enough characters; the tools take chunks
    return calib, held


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=["all", "speed", "quality"], default="all")
    p.add_argument("--methods", default=",".join(CALIBRATION_METHODS), help="mlxq's calibration methods to score")
    p.add_argument("--types", default=None, help="the mixes to time and score (default: the speed part's 7, the "
                                                  "quality part's Q4_K_M,Q3_K_M,Q2_K)")
    args = parse_args(p)  # --quick, and the reference-BLAS refusal
    quick = args.quick
    from mlxq.formats.fetch import cache_dir
    from mlxq.formats.gguf.export import DEFAULT_METHOD, export
    from mlxq.quant.recipes import gguf_recipe

    chosen = args.types.split(",") if args.types else None
    speed_types = [] if args.part == "quality" else chosen or (["Q4_K_M"] if quick else [
        "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"])
    quality_types = [] if args.part == "speed" else chosen or (["Q3_K_M"] if quick else [
        "Q4_K_M", "Q3_K_M", "Q2_K"])
    calib_tokens, eval_tokens = (512, 1024) if quick else (8192, 8192)
    # each side's best of `reps` interleaved runs: an export of SmolLM2 takes about half a second, and on this shared
    # machine one run in two or three is slowed by other work (two runs left a ratio to a single unlucky pair)
    reps = 1 if quick else 4

    work = cache_dir() / "bench" / "gguf_export"
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "smollm2-f32.gguf"
    if not f32.exists():
        export("smollm2", f32, gguf_recipe("F32"), progress=False)
    out = work / f"out-{os.getpid()}"  # this run's own: another run may be using the cache at the same time
    out.mkdir()
    atexit.register(shutil.rmtree, out, True)

    speed, ratios = {}, {}
    for kind in speed_types:
        runs = {"mlxq": [], "llama_cpp": []}
        for _ in range(reps):  # interleaved, so both see the same load
            runs["llama_cpp"].append(theirs(f32, out / f"{kind}.llama.gguf", kind))
            runs["mlxq"].append(ours(f32, out / f"{kind}.mlxq.gguf", kind))
        best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items()}
        same = tensors(out / f"{kind}.mlxq.gguf") == tensors(out / f"{kind}.llama.gguf")
        speed[kind] = {**{k: {**b, "runs": [r["wall_s"] for r in runs[k]], "cpu_runs": [r["cpu_s"] for r in runs[k]]}
                          for k, b in best.items()},
                       "identical_tensors": same}
        ratios[f"export_time_{kind}_vs_llama_cpp"] = round(best["mlxq"]["wall_s"] / best["llama_cpp"]["wall_s"], 3)
        cpu = {k: min(r["cpu_s"] for r in v) for k, v in runs.items()}  # each side's least, as for wall time
        ratios[f"export_cpu_{kind}_vs_llama_cpp"] = round(cpu["mlxq"] / cpu["llama_cpp"], 3)
        print(f"{kind}: {speed[kind]}", file=sys.stderr)

    calib, held = texts(work, calib_tokens, eval_tokens)
    imat = work / f"imatrix-{calib_tokens}.gguf"
    if quality_types and not imat.exists():
        imatrix(f32, calib, imat, CTX, calib_tokens // CTX)
    base = work / f"base-{eval_tokens}.kld"  # the float model's logits on the scored text (kept, like the imatrix)
    if quality_types and not base.exists():
        kl_base(f32, held, out / base.name, CTX, eval_tokens // CTX)
        (out / base.name).replace(base)
    quality = {}
    for kind in quality_types:
        cal_theirs = theirs(f32, out / f"{kind}.llama-imatrix.gguf", kind, imat)
        row = {"llama_cpp_imatrix": {**cal_theirs, "kl": kl(out / f"{kind}.llama-imatrix.gguf", base, CTX)}}
        for method in args.methods.split(","):
            path = out / f"{kind}.mlxq-{method}.gguf"
            row[f"mlxq_{method}"] = {**ours(f32, path, kind, calib, calib_tokens, method), "kl": kl(path, base, CTX)}
            path.unlink()
            ratios[f"kl_{kind}_{method}_vs_llama_cpp"] = round(
                row[f"mlxq_{method}"]["kl"] / row["llama_cpp_imatrix"]["kl"], 3)
        if not quick:  # the uncalibrated pair, for context (when the speed part wrote them)
            for name, path in (("mlxq", f"{kind}.mlxq.gguf"), ("llama_cpp", f"{kind}.llama.gguf")):
                if (out / path).exists():
                    row[name] = {"kl": kl(out / path, base, CTX)}
        quality[kind] = row
        if f"kl_{kind}_{DEFAULT_METHOD}_vs_llama_cpp" in ratios:
            ratios[f"kl_{kind}_vs_llama_cpp"] = ratios[f"kl_{kind}_{DEFAULT_METHOD}_vs_llama_cpp"]
        print(f"{kind}: {row}", file=sys.stderr)

    name = "gguf_export" if args.part == "all" else f"gguf_export_{args.part}"
    if chosen:  # a run of some mixes never replaces the recorded run of all of them
        name += "-" + "-".join(kind.lower() for kind in chosen)
    write_result(name, {
        "quick": quick,
        "part": args.part,
        "default_method": DEFAULT_METHOD,
        "load_average": os.getloadavg(),
        "model": "SmolLM2-135M-Instruct (the default model's Q4_1 GGUF dequantized to F32: both tools start from it)",
        "peer": "llama.cpp 0.3.36 (llama-cpp-python's vendored copy): llama-quantize, llama-imatrix, "
                "llama-perplexity --kl-divergence, 2 threads",
        "speed": speed,
        "quality": {"calibration_tokens": calib_tokens, "scored_tokens": eval_tokens, "ctx": CTX,
                    "calibration_text": "mlxq's default mix (wiki first half, c4, code, technical, multilingual)",
                    "scored_text": "held-back Wikipedia (second half of exllamav2's wiki.utf8)",
                    "kl": "mean KL(float || quantized) by llama-perplexity",
                    "bpw": "bits per weight over every tensor; mlxq's allocate moves types within the mix at no more "
                           "than the mix's quantized bits", **quality},
        "ratios": ratios,
    })


if __name__ == "__main__":
    main()
