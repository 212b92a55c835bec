"""Kernel speed: mlxq's ternary and K-quant matmul paths against dequantize-then-matmul, same shapes, one process.

CPU (any machine): the pure-MLX path that runs off Metal (`ternary_matmul(..., backend="mlx")`: the codes as 2-bit
words -- tq2's bytes as they are, tq1 re-packed per call in one integer pass -- then MLX's 2-bit affine matmul on
them for few tokens, a fused decode + BLAS matmul otherwise) against two ways of dequantizing per call and then
multiplying, holding the same packed weights:
  - `dequant_mlx`: the oracle (`reference_matmul`: unpack the codes to float in MLX, matmul),
  - `dequant_gguf`: gguf-py's TQ2_0 / TQ1_0 dequantizer (numpy) on the same bytes as GGUF blocks, matmul.
A float32 matmul on weights dequantized once (`float_resident`, 16x the memory of tq2) is reported for context,
not as a peer; so is `lut_mlx`, the lookup-table formulation (one-token tq2 rows), tried and measured against the
kept path. The types with Metal kernels (K-quants Q2_K, Q3_K, Q6_K; IQ2_XXS, IQ2_XS, IQ2_S, IQ4_XS):
`kquants.matmul` (the pure-MLX path on raw blocks) against gguf-py's dequantizer + matmul. Ratios `mlx_vs_PEER`
are speeds (ours / theirs: above 1 is faster).

GPU (`--gpu`, with MLX's CUDA build, e.g. on a lent H100/H200 after ../shared/tools/gpu-wheels.sh): the CUDA twins
of the ternary and K-quant GEMVs (metal/ternary.cu, metal/kquants.cu: tq2, tq1 and every type of
kquants_metal.KINDS) on decode shapes, their GB/s (packed weights + activations + outputs over the time) as % of
`--peak-gbs`, and against MLX's own 2-bit and 4-bit affine quantized_matmul (group 64) on the same shapes. Every
result is checked against the reference before it is timed. `--gpu --dry-run` builds the GPU part's weights and
launches on any machine and runs none of them.

    python bench/kernels.py [--quick] [--gpu [--peak-gbs 4800] [--no-cpu] [--dry-run]]

On a lent GPU machine (no registry there): `../shared/tools/gpu-wheels.sh gguf==0.19.0` (gguf-py is pure Python
and mlxq imports it), the two device calls it describes, then
`PYTHONPATH=$HOME/mlx-site:$PWD python3 bench/kernels.py --gpu --no-cpu` (writes bench/results/kernels_gpu.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, parse_args, write_result  # noqa: E402

from mlxq.kernels import kquants, kquants_metal, metal, ternary  # noqa: E402

GGUF_TYPE = {"tq2": "TQ2_0", "tq1": "TQ1_0"}


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, the functions interleaved (the machine is shared)."""
    for f in fns.values():
        mx.eval(f())
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            start = time.perf_counter()
            mx.eval(f())
            times[name].append(time.perf_counter() - start)
    return {k: median(v) for k, v in times.items()}


def samples(quick: bool, tokens: int) -> int:
    """Timed calls per function: more for one-token calls (short, so a loaded machine's noise weighs more)."""
    return (5 if quick else 15) if tokens == 1 else (3 if quick else 7)


def make_weight(n: int, k: int, packing: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(-1, 2, (n, k)).astype(np.int8)
    scales = mx.array(rng.uniform(0.5, 2.0, n).astype(np.float32))
    w = ternary.TernaryWeight(ternary.pack(mx.array(codes), packing), scales, k, packing)
    mx.eval(w.packed, w.scales)
    return w, codes


def gguf_blocks(w: ternary.TernaryWeight) -> np.ndarray:
    """The weight as GGUF blocks: our payload + a float16 d = 1 per block (scales applied after the matmul)."""
    n = w.n
    payload = np.asarray(w.packed).reshape(n, -1, ternary.PACKINGS[w.packing])
    d = np.broadcast_to(np.frombuffer(np.float16(1).tobytes(), np.uint8), (*payload.shape[:2], 2))
    return np.concatenate([payload, d], axis=-1).reshape(n, -1)


_BYTE_CODES = mx.array(np.stack([((np.arange(256) >> (2 * j)) & 3) - 1 for j in range(4)], 1).astype(np.float32))


def lut_tq2(x: mx.array, w: ternary.TernaryWeight) -> mx.array:
    """The lookup-table formulation (bitnet.cpp's idea), tried for the record: per group of the 4 activations a tq2
    byte covers, a table of all 256 byte values' partial sums (x_g @ codes^T), then one lookup per weight byte."""
    order = mx.array(ternary.storage_order("tq2"))
    nb = w.packed.shape[1] // 64
    xs = mx.take(x.reshape(-1, nb, 256), order, axis=-1).reshape(x.shape[0], -1, 4)  # [M, K / 4, 4]
    table = xs @ _BYTE_CODES.T  # [M, K / 4, 256]
    groups = mx.arange(w.packed.shape[1])[None, :]
    return mx.stack([t[groups, w.packed.astype(mx.uint32)].sum(-1) for t in table]) * w.scales


def cpu_part(quick: bool) -> list[dict]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    shapes = [("attn_2560x2560", 1, 2560, 2560), ("ffn_up_6912x2560", 1, 6912, 2560),
              ("ffn_up_6912x2560", 32, 6912, 2560)]
    if not quick:
        shapes += [("ffn_down_2560x6912", 1, 2560, 6912), ("ffn_up_6912x2560", 128, 6912, 2560)]
    rows = []
    for name, m, n, k in shapes:
        for packing in ("tq2", "tq1"):
            w, codes = make_weight(n, k, packing)
            x = mx.random.normal((m, k), key=mx.random.key(1))
            w_float = mx.array(codes.astype(np.float32)) * w.scales[:, None]
            blocks, qtype = gguf_blocks(w), GGMLQuantizationType[GGUF_TYPE[packing]]
            want = ternary.reference_matmul(x, w)
            got = ternary.ternary_matmul(x, w, backend="mlx")
            err = float(mx.abs(got - want).max() / mx.abs(want).max())
            assert err < 1e-5, (name, packing, err)
            fns = {}
            if packing == "tq2" and m == 1:
                assert float(mx.abs(lut_tq2(x, w) - want).max() / mx.abs(want).max()) < 1e-5
                fns["lut_mlx"] = lambda x=x, w=w: lut_tq2(x, w)
            t = timed({
                **fns,
                "mlx": lambda x=x, w=w: ternary.ternary_matmul(x, w, backend="mlx"),
                "dequant_mlx": lambda x=x, w=w: ternary.reference_matmul(x, w),
                "dequant_gguf": lambda x=x, w=w, b=blocks, q=qtype: (x @ mx.array(dequantize(b, q)).T) * w.scales,
                "float_resident": lambda x=x, wf=w_float: x @ wf.T,
            }, samples(quick, m))
            row = {"shape": name, "tokens": m, "n": n, "k": k, "packing": packing, "max_rel_err": err,
                   "ms": {key: round(v * 1e3, 3) for key, v in t.items()},
                   "packed_bytes": int(w.packed.nbytes), "float_bytes": n * k * 4}
            row["ratios"] = {f"mlx_vs_{p}": round(t[p] / t["mlx"], 3) for p in ("dequant_mlx", "dequant_gguf")}
            row["ratios"]["mlx_vs_float_resident"] = round(t["float_resident"] / t["mlx"], 3)
            if "lut_mlx" in t:
                row["ratios"]["mlx_vs_lut_mlx"] = round(t["lut_mlx"] / t["mlx"], 3)
            print(f"{name} M={m} {packing}: " + ", ".join(f"{key} {v * 1e3:.1f} ms" for key, v in t.items()),
                  flush=True)
            rows.append(row)
    return rows


def random_kquant_blocks(kind: str, n: int, k: int, seed: int = 0) -> mx.array:
    """Random K-quant blocks (any byte pattern is a block) with small float16 super-block scales."""
    rng = np.random.default_rng(seed)
    size = kquants.BLOCK_SIZES[kind][1]
    b = rng.integers(0, 256, (n, k // 256, size), dtype=np.uint8)
    for at in {"Q6_K": [208], "Q3_K": [108], "Q2_K": [80, 82]}.get(kind, [0]):  # IQ types: d first
        b[..., at : at + 2] = rng.uniform(0.001, 0.05, (n, k // 256)).astype(np.float16).view(np.uint8).reshape(
            n, k // 256, 2)
    return mx.array(b.reshape(n, -1))


def kquant_cpu_part(quick: bool) -> list[dict]:
    """kquants' pure-MLX path (the reference on CPU) against gguf-py's dequantizer + matmul, same blocks."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rows = []
    for kind in kquants_metal.KINDS:
        for m in (1, 32):
            n, k = 2560, 2560
            blocks, x = random_kquant_blocks(kind, n, k), mx.random.normal((m, k), key=mx.random.key(4))
            qtype, raw = GGMLQuantizationType[kind], np.asarray(blocks)
            t = timed({"mlx": lambda x=x, b=blocks, kind=kind: kquants.matmul(x, b, kind),
                       "dequant_gguf": lambda x=x, raw=raw, q=qtype: x @ mx.array(dequantize(raw, q)).T},
                      samples(quick, m))
            rows.append({"kind": kind, "tokens": m, "n": n, "k": k,
                         "ms": {key: round(v * 1e3, 3) for key, v in t.items()},
                         "ratios": {"mlx_vs_dequant_gguf": round(t["dequant_gguf"] / t["mlx"], 3)}})
            print(f"{kind} M={m}: " + ", ".join(f"{key} {v * 1e3:.1f} ms" for key, v in t.items()), flush=True)
    return rows


def gpu_part(quick: bool, peak_gbs: float, dry_run: bool = False) -> list[dict]:
    """The CUDA twins of the ternary and K-quant GEMVs against MLX 2-bit / 4-bit affine, decode shapes (one token).
    `dry_run`: build every weight and launch (shapes, grids, bytes moved) and run nothing: what can be checked
    without a GPU."""
    shapes = [(4096, 4096), (8192, 8192), (16384, 4096)] if not quick else [(8192, 8192)]
    rows = []
    for n, k in shapes:
        x = mx.random.normal((1, k), key=mx.random.key(2)).astype(mx.float16)
        w_float = mx.random.normal((n, k), key=mx.random.key(3)).astype(mx.float16)
        launches, wants, moved = {}, {}, {}
        for packing in ("tq2", "tq1"):
            w, _ = make_weight(n, k, packing)
            launches[packing] = ternary.launch(x, w, None, cuda=True)
            wants[packing] = lambda x=x, w=w: ternary.reference_matmul(x.astype(mx.float32), w)
            moved[packing] = w.packed.nbytes + w.scales.nbytes + x.nbytes + n * 2
        for kind in kquants_metal.KINDS:
            blocks = random_kquant_blocks(kind, n, k)
            launches[kind] = kquants_metal.gemv_launch(x, blocks, kind, mx.zeros((1,), mx.int32), cuda=True)
            wants[kind] = lambda x=x, b=blocks, kind=kind: kquants.matmul(x.astype(mx.float32), b, kind,
                                                                          backend="reference")
            moved[kind] = blocks.nbytes + x.nbytes + n * 4
        affine = {bits: mx.quantize(w_float, group_size=64, bits=bits) for bits in (2, 4)}
        fns = {}
        for bits, (wq, s, b) in affine.items():
            fns[f"mlx_{bits}bit"] = lambda x=x, wq=wq, s=s, b=b, bits=bits: mx.quantized_matmul(
                x, wq, s, b, transpose=True, group_size=64, bits=bits)
            moved[f"mlx_{bits}bit"] = wq.nbytes + s.nbytes + b.nbytes + x.nbytes + n * 2
        if dry_run:
            rows.append({"n": n, "k": k, "tokens": 1, "bytes_moved": moved, "launches": {
                key: {"kernel": v.kernel.file + ":" + v.kernel.name, "grid": v.grid, "threadgroup": v.threadgroup,
                      "template": [(a, str(b)) for a, b in v.template]} for key, v in launches.items()}})
            print(f"GPU {n}x{k} (dry run): " + ", ".join(f"{key} {v / 1e6:.1f} MB" for key, v in moved.items()))
            continue
        for key, launch in launches.items():
            want = wants[key]()
            err = float(mx.abs(metal.run(launch)[0].astype(mx.float32) - want).max() / mx.abs(want).max())
            assert err < 1e-2, (key, err)  # float16 activations (and output, for the ternary GEMV)
            fns[key] = lambda launch=launch: metal.run(launch)[0]
        t = timed(fns, 20)
        gbs = {key: moved[key] / t[key] / 1e9 for key in t}
        row = {"n": n, "k": k, "tokens": 1, "us": {key: round(v * 1e6, 2) for key, v in t.items()},
               "gb_per_s": {key: round(v, 1) for key, v in gbs.items()},
               "pct_of_peak": {key: round(100 * v / peak_gbs, 1) for key, v in gbs.items()},
               "ratios": {f"{p}_vs_mlx_{b}bit": round(t[f"mlx_{b}bit"] / t[p], 3) for p in launches for b in (2, 4)}}
        print(f"GPU {n}x{k}: " + ", ".join(f"{key} {v * 1e6:.1f} us ({gbs[key]:.0f} GB/s)" for key, v in t.items()),
              flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="also time the CUDA twins (MLX's CUDA build only)")
    ap.add_argument("--peak-gbs", type=float, default=4800.0, help="the GPU's peak memory bandwidth (H200: 4800)")
    ap.add_argument("--no-cpu", action="store_true", help="only the GPU part (writes bench/results/kernels_gpu.json)")
    ap.add_argument("--dry-run", action="store_true",
                    help="with --gpu: build the GPU part's weights and launches, run nothing (no GPU needed)")
    args = parse_args(ap)  # adds --quick
    if args.gpu and not args.dry_run and not mx.cuda.is_available():
        raise SystemExit("--gpu needs MLX's CUDA build (mx.cuda.is_available() is False here); --dry-run checks the "
                         "GPU part's setup without one")
    if args.no_cpu and not args.gpu:
        raise SystemExit("--no-cpu leaves nothing to run without --gpu")
    result: dict = {"quick": args.quick}
    if not args.no_cpu:
        result.update(cpu=cpu_part(args.quick), cpu_kquants=kquant_cpu_part(args.quick))
        cpu = result["cpu"]
        result["ratios"] = {
            "mlx_vs_dequant_mlx_min": min(r["ratios"]["mlx_vs_dequant_mlx"] for r in cpu),
            "mlx_vs_dequant_gguf_min": min(r["ratios"]["mlx_vs_dequant_gguf"] for r in cpu),
            "kquants_mlx_vs_dequant_gguf_min": min(r["ratios"]["mlx_vs_dequant_gguf"] for r in result["cpu_kquants"]),
        }
    if not args.gpu:
        result["gpu"] = "not run (no GPU lent; run with --gpu)"
    elif args.dry_run:
        result["gpu_dry_run"] = gpu_part(args.quick, args.peak_gbs, dry_run=True)
    else:
        result["gpu"] = gpu_part(args.quick, args.peak_gbs)
        result.setdefault("ratios", {}).update({f"gpu_{key}_min": min(r["ratios"][key] for r in result["gpu"])
                                                for key in result["gpu"][0]["ratios"]})
    write_result("kernels" + ("_gpu" if args.no_cpu else "") + ("_dry_run" if args.dry_run else ""), result)


if __name__ == "__main__":
    main()
