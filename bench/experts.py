"""MoE experts streamed from SSD: mlxq vs mlx-lm on the same quantized weights under the same memory cap.

A synthetic Qwen3.5-MoE with Qwen3.5-397B-A17B's proportions, scaled down (widths / 4, 512 experts a layer; the
quick run: widths / 8, fewer layers and experts), its routed experts 2-bit, so that the expert packs are at least
4x the budget. One run measures:

1. the device's read rate at the expert size with O_DIRECT: random one-expert reads back to back, as many in flight
   as the runtime can have (its reader threads plus the forward pass's own thread, which takes queued reads while
   it waits): the ceiling; and the same reads in the decode's pattern (bursts of the measured misses per layer step,
   through the runtime's reader, separated by idle gaps as long as the measured time between two layers' reads):
   what the device gives reads made that way with the CPU idle between bursts (not a strict ceiling: on a VM an
   idle CPU can notice completions later than a busy one);
2. mlxq's read rate while decoding (bytes over the time at least one read was in flight), as a share of both;
3. decode tok/s of mlxq streaming at 25 % of the experts' memory vs mlx-lm loading the directory `mlxq quantize`
   writes without --stream-experts, both in one memory cgroup (v1 `memory.limit_in_bytes`, which counts the page
   cache; v2 `memory.max`) capped at what mlxq needs (resident weights + budget + margin); where mlx-lm cannot run
   at the cap that is recorded, and it is also measured without a cap;
4. hit rate and tok/s at 25 / 50 / 100 % of the experts, identity vs co-activation order, prefetch off vs on (the
   next layer read ahead while decoding; at 25 % also 3 layers ahead), on
   random tokens (routing follows the token, so it is close to uniform: the budget decides the hits), and on text
   at 25 % (skewed routing), after a long prompt (--warm tokens) has filled the pool: the steady state, in which
   a budget that holds every expert the tokens touch stops missing and a smaller one keeps evicting;

5. mlx-lm, mlxq resident and mlxq streaming at 25 % in ONE process, a token of each in turn (uncapped): the
   decode ratios without the drift of a shared machine's load between separate runs;

6. what holding MLX's buffer cache to 1/16 of the budget (the runtime's memory bound) costs in decode tok/s against
   MLX's own limit;

and projects the measured bytes per token and hit rates to Qwen3.5-397B-A17B on a 5.5 GB/s Mac SSD, beside
flash-moe's 5.5-5.7 tok/s (2-bit experts, 4 per token, M3 Max).

--quick (about 2 minutes on a busy 2-core machine): the smaller model; in 4. only random tokens at 25 %, prefetch
off and one layer ahead, the first of them also setting the cap; 3. without the separate uncapped runs (mlx-lm and
mlxq resident run uncapped in 5.); no 6.

Every model runs in its own process (cold: pack reads bypass the page cache; the mlx-lm directory's pages are
dropped before each run) through the same loop: model(tokens, cache), one token at a time, float32 compute on the
CPU for both (mlx-lm's float16 is many times slower on x86 and would flatter us). Decode steps are teacher-forced:
each step's input is the next token of a fixed text, not the model's own choice, because a random model's greedy
output repeats one token and would route to the same experts every step (flattering every cache). The memory cap
is what mlxq's own 25 % run was charged at most (a measuring cgroup's peak, page cache included), plus 10 %.

--real-experts (about 3 minutes once built; building takes ~2-6 more and 2 GB on the way, 1 GB kept with --keep):
only 1. and 2., on a model with Qwen3.5-397B's own widths and so its own expert size (3.93 MB; 4 layers x 64
experts): the read rate at the size the projection is for, where a read's fixed costs no longer dominate
(bench/results/experts-real-experts.json).

The goal's figure (ratios.read_rate_vs_ceiling_interleaved): in one process, the ceiling and mlxq's decode in turn
(ceiling, mlxq reading 0 / 1 layers ahead / 1 ahead with only 30 % of the guesses right, the raw device in the
decode's pattern, ceiling, ...), each block divided by the ceilings either side of it; the median over blocks, its
spread, and whether leaving out any one block keeps the verdict.

    python bench/experts.py [--quick | --real-experts] [--top-k 4] [--warm 160] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, median, rounds_verdict, write_result  # noqa: E402
from mlxq.bench.synthetic import QWEN35_397B, scaled  # noqa: E402
from mlxq.experts.io import DEFAULT_THREADS  # noqa: E402

SHAPES = {
    # 12 layers x 512 experts of 240 KiB (Qwen3.5-397B's 3.75 MiB / 16): 1.5 GB of packs
    "full": scaled(QWEN35_397B, width=4, layers=12, experts=512),
    # 8 layers x 256 experts of 60 KiB: 126 MB of packs
    "quick": scaled(QWEN35_397B, width=8, layers=8, experts=256),
    # --real-experts: Qwen3.5-397B's own widths, so its own expert size (3.75 MiB), 4 layers x 64 experts: 1 GB
    "real-experts": scaled(QWEN35_397B, width=1, layers=4, experts=64),
}
MAC_SSD = 5.5e9  # bytes/s: the projection's device
# one Qwen3.5-397B expert at 2 bits, group 64 (float16 scale and bias a group): gate, up and down
QWEN397B_EXPERT_BYTES = 3 * QWEN35_397B.hidden * QWEN35_397B.moe_hidden * (2 + 32 / 64) / 8
FLASH_MOE = {"tok_s": [5.5, 5.7], "bits": 2, "top_k": 4, "machine": "MacBook Pro M3 Max, 48 GB",
             "non_io_ms_per_layer": 1.22 + 0.55 + 0.04 + 0.01,  # its README's per-layer pipeline, minus the pread
             "page_cache_hit_rate": 0.71}
READ_RATE = (
    "read rate = bytes read / wall time with at least one read in flight (from the call into preadv until the reading "
    "thread has it back), for mlxq while decoding (experts.read_gb_per_s) and for the ceiling alike; the ceiling "
    "(raw_read) = random one-expert O_DIRECT reads back to back at the runtime's depth (its reader threads plus the "
    "waiting forward pass; raw_read_one_in_flight: one at a time), measured before the runs and after the capped run, "
    "the higher kept (raw_read_gb_per_s_runs: both); raw_read_decode_pattern = the same reads through the runtime's "
    "reader in the capped run's pattern (bursts of its misses per layer step, idle gaps of its time between reads), "
    "without the model (not a strict ceiling: its gaps are idle, the decode's are compute). A decode step's few "
    "misses are a short burst: its reads are in flight only briefly, and a burst's first read and its wake-up on a "
    "busy CPU are counted in full. Each rate is also split as read size x reads_in_flight (summed read time / busy "
    "time) / ms_per_read. raw_read_397b_expert_size: the back-to-back and decode-pattern probes again with each read "
    "a run of adjacent experts as large as one Qwen3.5-397B expert (3.9 MB): the share the decode's pattern keeps at "
    "the size the projection is for. Every probe reads into the runtime's staging buffers (io.staging: from 2 MiB up "
    "huge-page backed on Linux, so that a read is one device request), so the ceiling is the device's rate for the "
    "requests the runtime makes. raw_reads_after_idle: one read at a time, a few in a row after an idle gap, the "
    "median time of the first, second, ... read after the gap (gap 0: back to back): what a burst pays for starting "
    "after the device and CPU idled")
CAP_SLACK = 1.10  # the cap: what mlxq's 25 % run was charged (its cgroup's peak, page cache included), plus 10 %


# ------------------------------------------------------------------------------------------------ one run
# A child process: load, prefill, greedy decode; prints one JSON line. Same loop for mlxq and mlx-lm. With "side"
# (a list of runs), it loads them all, prefills each, then decodes a token of each in turn (interleaved timing).
CHILD = r"""
import json, re, sys, time
import mlx.core as mx
a = json.loads(sys.argv[1])

def rss(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

def load(a):
    # -> step(tokens) -> logits, stats() -> expert counters or None, extra fields
    if a["peer"] == "mlx_lm":
        import mlx_lm
        from mlx_lm.models.cache import make_prompt_cache
        model, _ = mlx_lm.load(a["path"])
        model.set_dtype(mx.float32)  # the same float32 compute mlxq does on the CPU
        if a["top_k"]:
            for _, m in model.named_modules():
                if hasattr(m, "switch_mlp") and hasattr(m, "top_k"):
                    m.top_k = a["top_k"]
        cache = make_prompt_cache(model)
        return lambda toks: model(mx.array([toks]), cache=cache), lambda: None, {}
    if a["peer"] == "llama_cpp":  # llama.cpp's own loop: the GGUF mmapped, its pages left to the kernel
        import os
        import numpy as np
        from llama_cpp import Llama, llama_get_logits_ith
        llm = Llama(model_path=a["path"], n_ctx=len(a["prompt"]) + len(a["forced"]) + 8, n_batch=512,
                    n_threads=os.cpu_count(), use_mmap=True, verbose=False,
                    kv_overrides={f"{a['arch']}.expert_used_count": a["top_k"]} if a["top_k"] else None)
        def step(toks):  # (Llama.eval keeps no logits unless logits_all: the last row is read from the context)
            llm.eval(toks)
            last = np.ctypeslib.as_array(llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
            return mx.array(last)[None, None]
        return step, lambda: None, {}
    import mlxq
    mlx_limit = mx.set_cache_limit(0)
    mx.set_cache_limit(mlx_limit)  # MLX's own buffer cache limit, before a slot pool holds it
    m = mlxq.load(a["path"], expert_memory=a.get("budget"), experts_per_tok=a["top_k"] or None,
                  expert_options=a.get("options"))
    if a.get("mlx_cache") == "default":  # what holding the cache costs: the run with MLX's own limit
        mx.set_cache_limit(mlx_limit)
    cache = m.make_cache()
    global POOL
    POOL = pool = getattr(m.net, "expert_pool", None)
    return lambda toks: m.net(mx.array([toks]), cache), m.expert_stats, {"pool_bytes": pool.nbytes if pool else 0}

WARMUP = 2
GUESSES_KEPT = 1.0

def unpredictable_routing():
    # reads ahead with all but GUESSES_KEPT of their guesses swapped for other experts (the synthetic model's routing
    # is predictable from layer to layer, 98 % of guesses right; flash-moe saw ~30 % on the real Qwen3.5-397B)
    import random
    import numpy as np
    from mlxq.experts.pool import SlotPool
    request, rng = SlotPool.request, random.Random(0)
    def guessing(self, layer, wanted, prefetch=False):
        if prefetch and GUESSES_KEPT < 1:
            others = sorted(set(range(self.packs.layers[layer].n_experts)) - set(wanted.tolist()))
            rng.shuffle(others)
            wanted = np.array(sorted(e if rng.random() < GUESSES_KEPT else others.pop() for e in wanted.tolist()),
                              wanted.dtype)
        return request(self, layer, wanted, prefetch)
    SlotPool.request = guessing

def blocks(step, stats, spec, forced):
    # the ceiling and mlxq's decode in turn: ceiling, then each arm (`tokens` steps reading `prefetch` layers ahead,
    # with only `kept` of the guesses right; or "pattern": the raw device through the runtime's reader in the pattern
    # of the last block named prefetch_0, without the model), arms rotating from block to block, ..., a ceiling last,
    # so every block lies between two ceilings
    global GUESSES_KEPT
    from mlxq.experts.io import measure_burst_rate, measure_read_rate
    unpredictable_routing()
    rows, tokens, arms = [], iter(forced), spec["arms"]
    for _ in range(WARMUP):  # the first decode steps build MLX's kernels for one-token shapes
        mx.eval(step([next(tokens)]))
    def ceiling():
        r = measure_read_rate(POOL.packs, threads=spec["depth"], seconds=spec["ceiling_s"], seed=len(rows))
        rows.append({"arm": "ceiling", **{k: r[k] for k in ("gb_per_s", "reads", "reads_in_flight", "ms_per_read")}})
    ceiling()
    for b in range(spec["n"]):
        for arm in arms[b % len(arms):] + arms[:b % len(arms)]:
            if arm.get("pattern"):
                ref = [r for r in rows if r["arm"] == "prefetch_0"][-1]
                steps = spec["tokens"] * len(POOL.packs.layers)
                r = measure_burst_rate(POOL.packs, batch=ref["misses"] / steps, threads=POOL.reader.threads,
                                       gap_s=max(0.0, ref["decode_s"] - ref["read_s"]) / steps,
                                       seconds=spec["ceiling_s"], seed=len(rows))
                rows.append({"arm": arm["name"], "block": b, "used_gb_per_s": r["gb_per_s"],
                             **{k: r[k] for k in ("gb_per_s", "reads", "reads_in_flight", "ms_per_read", "batch",
                                                  "gap_s")}})
                continue
            POOL.prefetch, GUESSES_KEPT = arm["prefetch"], arm.get("kept", 1.0)
            t0, before = time.perf_counter(), stats()
            for _ in range(spec["tokens"]):
                mx.eval(step([next(tokens)]))
            e = (stats() - before).as_dict()
            took = time.perf_counter() - t0
            rows.append({"arm": arm["name"], "block": b, "decode_tps": spec["tokens"] / took, "decode_s": took,
                         "gb_per_s": e["read_gb_per_s"], "used_gb_per_s": e["used_read_gb_per_s"],
                         **{k: e[k] for k in ("reads", "misses", "hit_rate", "prefetch_reads", "prefetch_hits",
                                              "read_s", "reads_in_flight", "ms_per_read", "stall_s")}})
        ceiling()
    return rows

def prefill(step, stats, a, out):
    t0, before = time.perf_counter(), stats()
    token = int(mx.argmax(step(a["prompt"])[0, -1]))
    out["prefill_s"] = time.perf_counter() - t0
    if before is not None:
        out["prefill_experts"] = (stats() - before).as_dict()
    return token

runs = a.get("side") or [a]
models, outs = [], []
for r in runs:
    t0 = time.perf_counter()
    step, stats, out = load(r)
    out["load_s"] = time.perf_counter() - t0
    out["rss_loaded"] = rss("VmRSS")
    out["tokens"] = [prefill(step, stats, r, out)]
    out["step_s"] = []
    models.append((step, stats, stats(), out))
    outs.append(out)
if a.get("blocks"):
    print(json.dumps({**outs[0], "blocks": blocks(*models[0][:2], a["blocks"], a["forced"])}))
    sys.exit()
for forced in a["forced"]:  # one token a step, the next one taken from a text (see the docstring)
    for step, _, _, out in models:
        t0 = time.perf_counter()
        out["tokens"].append(int(mx.argmax(step([forced])[0, -1])))
        out["step_s"].append(time.perf_counter() - t0)
for _, stats, before, out in models:
    out["decode_s"] = sum(out["step_s"])
    out["decode_tps"] = len(a["forced"]) / out["decode_s"]
    if before is not None:
        out["experts"] = (stats() - before).as_dict()
    out["peak_rss"] = rss("VmHWM")  # (side by side: the process's, all models together)
print(json.dumps(outs if a.get("side") else outs[0]))
"""


class Cgroup:
    """A memory cgroup for child processes (v1 here: memory.limit_in_bytes, page cache included; v2: memory.max).
    With no limit it only measures: `peak()` is what its processes were charged at most (RSS overstates that:
    shared libraries already in the page cache are charged to whoever loaded them first)."""

    def __init__(self, limit: int | None, name: str = "capped"):
        self.limit, self.path, self.v2 = limit, None, False
        v1 = Path("/sys/fs/cgroup/memory")
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        try:
            if v1.is_dir():
                self.path = v1 / f"mlxq-bench-experts-{os.getpid()}-{name}"
                self.path.mkdir()
                if limit is not None:
                    (self.path / "memory.limit_in_bytes").write_text(str(limit))
            elif v2.exists() and "memory" in v2.read_text():
                self.v2 = True
                self.path = Path("/sys/fs/cgroup") / f"mlxq-bench-experts-{os.getpid()}-{name}"
                self.path.mkdir()
                if limit is not None:
                    (self.path / "memory.max").write_text(str(limit))
        except OSError as e:
            print(f"bench: no memory cgroup ({e}); capped runs will not be capped", file=sys.stderr)
            self.path = None

    def peak(self) -> int | None:
        if self.path is None:
            return None
        return int((self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")).read_text())

    def enter(self) -> None:  # in the child, before exec
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def oom_kills(self) -> int:
        if self.path is None:
            return 0
        f = self.path / ("memory.events" if self.v2 else "memory.oom_control")
        for line in f.read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def close(self) -> None:
        if self.path is not None:
            for _ in range(50):
                try:
                    self.path.rmdir()
                    return
                except OSError:
                    time.sleep(0.1)


REPEAT = 1  # runs per configuration (set by --repeat); the fastest is kept: the machine is shared and busy


def run(args: dict, cgroup: Cgroup | None = None, repeat: int | None = None) -> dict:
    """The configuration run `repeat` (REPEAT) times; the fastest run, with every run's tok/s."""
    runs = [run_once(args, cgroup) for _ in range(repeat or REPEAT)]
    ok = [r for r in runs if r["ok"]]
    if not ok:
        return runs[-1]
    best = max(ok, key=lambda r: r["decode_tps"])
    return {**best, "decode_tps_runs": [round(r["decode_tps"], 3) for r in ok]}


def run_once(args: dict, cgroup: Cgroup | None = None, timeout: float = 1800) -> dict:
    from mlxq.experts.io import drop_cached

    for one in args.get("side") or [args]:  # cold start: nothing of these models in the page cache
        for f in Path(one["path"]).rglob("*"):
            if f.is_file():
                drop_cached(f)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    kills = cgroup.oom_kills() if cgroup else 0
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True,
                          timeout=timeout, env=env, preexec_fn=cgroup.enter if cgroup else None)
    if done.returncode != 0:
        oom = cgroup is not None and cgroup.oom_kills() > kills
        why = (f"killed by the memory cgroup (OOM) at {cgroup.limit / 1e9:.2f} GB" if oom
               else f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
        return {"ok": False, "error": why}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {"ok": True, **out} if isinstance(out, dict) else {"ok": True, "side": out}


def interleaved(paths: dict[str, Path], base: dict, opts: dict) -> dict:
    """mlx-lm, mlxq resident and mlxq streaming at 25 % in one process (uncapped), a decode token of each in turn:
    their ratios see the same load, which separate runs minutes apart on a shared machine do not."""
    runs = {"mlx_lm": {"peer": "mlx_lm", "path": str(paths["mlx"])},
            "mlxq_resident": {"peer": "mlxq", "path": str(paths["mlx"])},
            "mlxq_25pct": {"peer": "mlxq", "path": str(paths["packs"]), "budget": "25%", "options": opts}}
    r = run_once({**base, "side": [{**base, **v} for v in runs.values()]})
    if not r["ok"]:
        print(f"interleaved: {r['error']}", file=sys.stderr)
        return r
    out = {"ok": True, **{name: {k: v for k, v in one.items() if k != "step_s"} | {
        "median_step_ms": round(1e3 * sorted(one["step_s"])[len(one["step_s"]) // 2], 1)}
        for name, one in zip(runs, r["side"], strict=True)}}
    tps = {name: out[name]["decode_tps"] for name in runs}
    out["ratios"] = {"mlxq_25pct_vs_mlx_lm": _ratio(tps["mlxq_25pct"], tps["mlx_lm"]),
                     "mlxq_25pct_vs_mlxq_resident": _ratio(tps["mlxq_25pct"], tps["mlxq_resident"]),
                     "mlxq_resident_vs_mlx_lm": _ratio(tps["mlxq_resident"], tps["mlx_lm"])}
    print("interleaved: " + ", ".join(f"{name} {t:.2f} tok/s" for name, t in tps.items()), file=sys.stderr)
    return out


def cache_cost(args: dict) -> dict:
    """mlxq at 25 % with its buffer cache held (the runtime's default: 1/16 of the budget while a pool lives) and with
    MLX's own limit (every freed buffer kept), alternated REPEAT times: what the memory bound costs in tok/s, and what
    the held cache saves in peak RSS."""
    runs = {"held": [], "mlx_default": []}
    for _ in range(REPEAT):
        runs["held"].append(run_once(args))
        runs["mlx_default"].append(run_once({**args, "mlx_cache": "default"}))
    out = {}
    for name, rs in runs.items():
        ok = [r for r in rs if r["ok"]]
        if not ok:
            out[name] = rs[-1]
            continue
        out[name] = {"ok": True, "decode_tps": max(r["decode_tps"] for r in ok),
                     "decode_tps_runs": [round(r["decode_tps"], 3) for r in ok],
                     "peak_rss": min(r["peak_rss"] for r in ok), "peak_rss_runs": [r["peak_rss"] for r in ok]}
    held, free = out["held"], out["mlx_default"]
    if held["ok"] and free["ok"]:
        out["decode_held_vs_mlx_default"] = _ratio(held["decode_tps"], free["decode_tps"])
        out["peak_rss_saved_bytes"] = free["peak_rss"] - held["peak_rss"]
        print(f"buffer cache held: {held['decode_tps']:.2f} tok/s, peak RSS {held['peak_rss'] / 1e9:.3f} GB; MLX's "
              f"default: {free['decode_tps']:.2f} tok/s, {free['peak_rss'] / 1e9:.3f} GB", file=sys.stderr)
    return out


# ------------------------------------------------------------------------------------------------ models
def llama_cpp_gguf(work: Path, src: Path) -> tuple[Path, dict]:
    """The same weights as a GGUF for llama.cpp's mmap: `mlxq export -t F16` of the source, then llama.cpp's own
    llama-quantize to Q2_K (rows that are not whole 256-value blocks take llama.cpp's own fallback type). The
    source's character tokenizer (WordLevel) is handed to the exporter as a byte-level BPE with the same ids: tokens
    go in as ids, so llama.cpp never tokenizes text here."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llama_cpp_tools import bits_per_weight, quantize

    out = work / "llama.cpp-Q2_K.gguf"
    timings = {}
    if not out.exists():
        view = work / "gguf-src"
        shutil.rmtree(view, ignore_errors=True)
        view.mkdir()
        for f in src.iterdir():
            if f.name != "tokenizer.json":
                (view / f.name).symlink_to(f.resolve())
        spec = json.loads((src / "tokenizer.json").read_text())
        spec["model"] = {"type": "BPE", "vocab": spec["model"]["vocab"], "merges": ["a b"], "byte_fallback": False,
                         "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                         "end_of_word_suffix": None, "fuse_unk": False}
        spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                 "use_regex": False}
        (view / "tokenizer.json").write_text(json.dumps(spec))
        f16 = work / "llama.cpp-F16.gguf"
        f16.unlink(missing_ok=True)
        t0 = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        done = subprocess.run([sys.executable, "-m", "mlxq.cli", "export", str(view), "-o", str(f16), "-t", "F16"],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"mlxq export failed: {done.stderr.strip()[-500:]}")
        timings["export_f16_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        quantize(f16, out, "Q2_K")
        timings["llama_quantize_s"] = time.perf_counter() - t0
        f16.unlink()
        shutil.rmtree(view)
    from mlxq.formats.gguf.names import gguf_arch

    arch = gguf_arch(json.loads((src / "config.json").read_text())["model_type"])
    return out, {**timings, **bits_per_weight(out), "bytes": out.stat().st_size, "arch": arch}


def prepare(work: Path, shape, coactivation: bool, mlx_lm: bool = True) -> dict[str, Path]:
    """Source, the mlx-lm directory, the packs (and the co-activation-ordered packs), reused when present."""
    from mlxq.bench.synthetic import write_moe
    from mlxq.quant.pipeline import quantize
    from mlxq.quant.recipes import RECIPES

    stamp = work / "shape.json"
    if stamp.exists() and json.loads(stamp.read_text()) != shape.__dict__:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(shape.__dict__))
    paths = {"src": work / "src", "packs": work / "packs"} | ({"mlx": work / "mlx-lm"} if mlx_lm else {})
    if coactivation:
        paths["packs_coact"] = work / "packs-coactivation"
    recipe = RECIPES["experts-2bit"]
    timings = {}
    if not paths["src"].exists() and not all(path.exists() for key, path in paths.items() if key != "src"):
        t0 = time.perf_counter()
        write_moe(paths["src"], shape)
        timings["synthesize_s"] = time.perf_counter() - t0
    for key, kw in (("mlx", {}), ("packs", {"stream_experts": True}),
                    ("packs_coact", {"stream_experts": True, "order": "coactivation", "calib_tokens": 4096})):
        if key in paths and not paths[key].exists():
            t0 = time.perf_counter()
            quantize(str(paths["src"]), paths[key], recipe, progress=False, **kw)
            timings[f"quantize_{key}_s"] = time.perf_counter() - t0
    return paths, timings


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller model, fewer configurations (about 2 minutes)")
    p.add_argument("--top-k", type=int, default=4, help="experts per token (flash-moe's 2-bit run used 4)")
    p.add_argument("--tokens", type=int, default=None, help="decode tokens per run")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help="reader threads (the raw rate has one more in flight: the forward pass's) (the runtime's "
                        f"default, {DEFAULT_THREADS})")
    p.add_argument("--warm", type=int, default=None,
                   help="prompt tokens before the decode in the budget matrix (fills the pool; quick 64, else 160)")
    p.add_argument("--repeat", type=int, default=None, help="runs per configuration, fastest kept (quick 1, else 2)")
    p.add_argument("--llama-cpp", action="store_true",
                   help="also run llama.cpp (mmap) on a Q2_K GGUF of the same weights under the cap (the export "
                        "takes minutes: about 1.5 for --quick)")
    p.add_argument("--arms", default=None,
                   help=f"the interleaved blocks' arms, comma-separated: prefetch_N[/K], pattern (default "
                        f"{','.join(ARMS)}; --real-experts adds prefetch_3)")
    p.add_argument("--blocks", type=int, default=None,
                   help="blocks of the interleaved read-rate figure (ceiling, decode, ceiling, ...) (quick 5, else 7)")
    p.add_argument("--keep", action="store_true", help="keep the generated models (cache dir) for another run")
    p.add_argument("--real-experts", action="store_true",
                   help="only the read rates (1. and 2.), on a model with Qwen3.5-397B's own widths and so its expert "
                        "size (4 layers x 64 experts of 3.9 MB), at 25 %% with prefetch 0, 1 and 3")
    args = p.parse_args()
    global REPEAT
    REPEAT = args.repeat or (1 if args.quick else 2)
    if args.real_experts:
        return real_experts(args)

    from mlxq.experts.io import measure_burst_rate, measure_read_rate
    from mlxq.experts.pack import open_pack_dir
    from mlxq.formats.fetch import cache_dir

    mode = "quick" if args.quick else "full"
    shape = SHAPES[mode]
    work = cache_dir() / "bench" / f"experts-{mode}"
    t_start, load_start = time.perf_counter(), os.getloadavg()
    paths, prep = prepare(work, shape, coactivation=not args.quick)
    packs = open_pack_dir(paths["packs"])
    n_tokens = args.tokens or (24 if args.quick else 40)
    rng = random.Random(0)
    warm = args.warm or (64 if args.quick else 160)
    noise = [rng.randrange(3, shape.vocab) for _ in range(warm + n_tokens)]
    text = text_ids(paths["packs"], warm + n_tokens)
    # the matrix's prompts fill the pool (steady-state hits); the peer runs' prompts are the last 32 of them
    workloads = {"random": {"prompt": noise[:warm], "forced": noise[warm:]},
                 "text": {"prompt": text[:warm], "forced": text[warm:]}}
    short = {"prompt": noise[warm - 32 : warm], "forced": noise[warm:]}
    base = {"top_k": args.top_k, **short}
    opts = {"threads": args.threads}

    # 1. the ceiling: back to back, as many in flight as the runtime can have (its threads + the waiting thread)
    # (measured again after the capped run, and the higher of the two kept: a busy moment does not lower the bar)
    depth = args.threads + 1

    def ceiling() -> tuple[dict, dict]:
        raw = measure_read_rate(packs, threads=depth, seconds=2.0 if args.quick else 5.0)
        raw_1 = measure_read_rate(packs, threads=1, seconds=1.0 if args.quick else 3.0)
        print(f"raw device: {raw['gb_per_s']:.3f} GB/s at {raw['read_bytes'] / 1e3:.0f} KB reads, {depth} in "
              f"flight ({_shape(raw)}; {raw_1['gb_per_s']:.3f} GB/s one at a time), O_DIRECT {raw['direct']}",
              file=sys.stderr)
        return raw, raw_1

    raw_runs = [ceiling()]

    # 4. budgets x order x prefetch on random tokens (near-uniform routing: the budget decides the hits), and text
    # (skewed routing) at 25 %, each after a prompt that fills the pool.
    # (prefetch: layers read ahead while decoding)
    # (quick: prefetch off and one layer ahead, random tokens; its first run also measures the memory cap)
    configs = [("random", "identity", 25, depth) for depth in (0, 1)]
    if not args.quick:
        configs = [("random", order, budget, prefetch) for order in ("identity", "coactivation")
                   for budget in (25, 50, 100) for prefetch in (0, 1)]
        configs.insert(2, ("random", "identity", 25, 3))
        configs += [("text", order, 25, 0) for order in ("identity", "coactivation")]
    matrix = []
    probe = Cgroup(None, "probe")
    for workload, order, budget, prefetch in configs:
        path = paths["packs" if order == "identity" else "packs_coact"]
        measuring = args.quick and not matrix
        r = run({**base, **workloads[workload], "peer": "mlxq", "path": str(path), "budget": f"{budget}%",
                 "options": {**opts, "prefetch": prefetch}}, probe if measuring else None, repeat=1)
        r.update(workload=workload, budget_pct=budget, order=order, prefetch=prefetch)
        matrix.append(show(f"mlxq {workload} {order} {budget}% prefetch {prefetch}" + (
            " (measuring the cap)" if measuring else ""), r))

    # 2. the goal's figure: mlxq's read rate against ceilings measured in turn with its decode blocks
    blocks = interleaved_read_rates(paths["packs"], noise[:warm], shape.vocab, args,
                                    args.blocks or (5 if args.quick else 7), tokens=6 if args.quick else 8,
                                    ceiling_s=1.0 if args.quick else 2.0, arms=_arms(args, ARMS))

    # 3. the same memory cap for mlxq (25 %) and mlx-lm: what mlxq's 25 % run is charged (in a measuring cgroup),
    # plus 10 % (quick: the matrix's first run, whose prompt is longer, sets it)
    quick_only = {"ok": False, "error": "not run (--quick)"}
    headline = matrix[0] if args.quick else show("mlxq 25% (measuring the cap)", run(
        {**base, "peer": "mlxq", "path": str(paths["packs"]), "budget": "25%", "options": opts}, probe, repeat=1))
    need = probe.peak() or headline["peak_rss"]
    probe.close()
    cap = int(need * CAP_SLACK)
    cgroup = Cgroup(cap)
    try:
        ours_capped = show("mlxq 25% capped", run({**base, "peer": "mlxq", "path": str(paths["packs"]),
                                                   "budget": "25%", "options": opts}, cgroup))
        theirs_capped = show("mlx-lm capped", run({**base, "peer": "mlx_lm", "path": str(paths["mlx"])}, cgroup))
        llama = {"ok": False, "error": "not run (no --llama-cpp)"}
        if args.llama_cpp:
            gguf, gguf_info = llama_cpp_gguf(work, paths["src"])
            peer = {**base, "peer": "llama_cpp", "path": str(gguf), "arch": gguf_info["arch"]}
            llama = show("llama.cpp mmap capped", run(peer, cgroup))
            llama_free = show("llama.cpp mmap uncapped", run(peer))
            llama = {**llama, "gguf": gguf_info, "uncapped": llama_free}
    finally:
        cgroup.close()
    # (quick: mlx-lm and mlxq resident uncapped only in the interleaved run)
    theirs = quick_only if args.quick else show("mlx-lm uncapped", run({**base, "peer": "mlx_lm",
                                                                         "path": str(paths["mlx"])}))
    resident = quick_only if args.quick else show(
        "mlxq resident", run({**base, "peer": "mlxq", "path": str(paths["mlx"])}))
    side_by_side = interleaved(paths, base, opts)
    cache = quick_only if args.quick else cache_cost({**base, "peer": "mlxq", "path": str(paths["packs"]),
                                                      "budget": "25%", "options": opts})

    # the headline figures, from the capped 25 % run; 2. its reads' pattern replayed without the model
    e = ours_capped.get("experts", {}) if ours_capped["ok"] else {}
    raw_burst = raw_big = None
    if e:
        raw_burst = decode_pattern(packs, ours_capped, args.threads, seconds=2.0 if args.quick else 5.0)
        # the same two patterns with reads of Qwen3.5-397B's expert size (runs of adjacent experts): how much of the
        # gap between them is a fixed cost per burst, which a 16x larger read pays once for 16x the bytes
        span = max(1, round(QWEN397B_EXPERT_BYTES / _stride(packs)))
        big = {"span_experts": span,
               "back_to_back": measure_read_rate(packs, threads=depth, seconds=1.0 if args.quick else 3.0, span=span),
               "decode_pattern": measure_burst_rate(packs, batch=raw_burst["batch"], gap_s=raw_burst["gap_s"],
                                                    threads=args.threads, seconds=2.0 if args.quick else 5.0,
                                                    span=span)}
        big["decode_pattern_vs_back_to_back"] = _ratio(big["decode_pattern"]["gb_per_s"],
                                                       big["back_to_back"]["gb_per_s"])
        raw_big = big
        print(f"raw device at 397B's expert size ({span} adjacent experts, {span * _stride(packs) / 1e6:.2f} MB a "
              f"read): back to back {big['back_to_back']['gb_per_s']:.3f} GB/s, decode's pattern "
              f"{big['decode_pattern']['gb_per_s']:.3f} GB/s ({big['decode_pattern_vs_back_to_back']})",
              file=sys.stderr)
    after_idle = reads_after_idle(packs, bursts=10 if args.quick else 20)
    raw_runs.append(ceiling())
    raw = max((r for r, _ in raw_runs), key=lambda r: r["gb_per_s"])
    raw_1 = max((r for _, r in raw_runs), key=lambda r: r["gb_per_s"])
    projection = project(matrix, raw, args.top_k)
    result = {
        "mode": mode,
        "quick": args.quick,
        "model": {**shape.__dict__, "expert_bytes": next(iter(packs.layers.values())).payload,
                  "packs_bytes": sum(lp.stride * lp.n_experts for lp in packs.layers.values()),
                  "scaled_from": f"Qwen3.5-397B-A17B (widths and head counts / {QWEN35_397B.hidden // shape.hidden})"},
        "top_k": args.top_k,
        "decode_tokens": n_tokens,
        "decode": "teacher-forced: each step's input is the next token of the workload (random: uniformly drawn "
                  "token ids; text: held-back Wikipedia), not the model's own choice",
        "read_rate_definition": READ_RATE,
        "raw_read": raw,
        "raw_read_one_in_flight": raw_1,
        "raw_read_gb_per_s_runs": [[round(r["gb_per_s"], 3), round(r1["gb_per_s"], 3)] for r, r1 in raw_runs],
        "raw_read_decode_pattern": raw_burst,
        "raw_read_397b_expert_size": raw_big,
        "raw_reads_after_idle": after_idle,
        "read_rate_interleaved": blocks,
        "warm_prompt_tokens": warm,
        "memory_cap_bytes": cap,
        "memory_cap_from": "mlxq 25 % run's cgroup peak (memory.max_usage_in_bytes) x 1.1" + (
            " (quick: the matrix's first run, after its 64-token prompt)" if args.quick else ""),
        "capped": {"mlxq_25pct": ours_capped, "mlx_lm": theirs_capped, "llama_cpp_mmap": llama},
        "uncapped": {"mlx_lm": theirs, "mlxq_resident": resident,
                     "mlxq_25pct": quick_only if args.quick else headline},
        "interleaved": side_by_side,
        "mlx_buffer_cache": cache,
        "matrix": matrix,
        "prepare": prep,
        "projection_397b": projection,
        "seconds": time.perf_counter() - t_start,
        "load_average": [load_start, os.getloadavg()],  # other work on the machine: busy runs are noisier
        "ratios": {
            "read_rate_vs_ceiling_interleaved": _verdicts(blocks),
            "read_rate_vs_raw": _ratio(e.get("read_gb_per_s"), raw["gb_per_s"]),
            "read_rate_vs_raw_one_in_flight": _ratio(e.get("read_gb_per_s"), raw_1["gb_per_s"]),
            "read_rate_vs_raw_decode_pattern": _ratio(e.get("read_gb_per_s"), (raw_burst or {}).get("gb_per_s")),
            # with reads ahead (the random 25 % rows): all bytes read, and only those computed with, against the ceiling
            "read_rate_vs_raw_by_prefetch": {
                r["prefetch"]: {"read": _ratio(r["experts"]["read_gb_per_s"], raw["gb_per_s"]),
                                "used": _ratio(r["experts"]["used_read_gb_per_s"], raw["gb_per_s"]),
                                "reads_in_flight": round(r["experts"]["reads_in_flight"], 2),
                                "ms_per_read": round(r["experts"]["ms_per_read"], 2),
                                "decode_tps": round(r["decode_tps"], 3)}
                for r in matrix if r["ok"] and r["workload"] == "random" and r["order"] == "identity"
                and r["budget_pct"] == 25},
            "raw_decode_pattern_vs_back_to_back": _ratio((raw_burst or {}).get("gb_per_s"), raw["gb_per_s"]),
            "raw_decode_pattern_vs_back_to_back_397b_expert_size": (
                (raw_big or {}).get("decode_pattern_vs_back_to_back")),
            "decode_vs_mlx_lm_at_cap": (_ratio(ours_capped.get("decode_tps"), theirs_capped.get("decode_tps"))
                                        if theirs_capped["ok"] else None),
            "decode_vs_mlx_lm_uncapped": _ratio(headline.get("decode_tps"), theirs.get("decode_tps")),
            "decode_capped_vs_mlx_lm_uncapped": _ratio(ours_capped.get("decode_tps"), theirs.get("decode_tps")),
            "decode_vs_mlx_lm_interleaved": side_by_side.get("ratios", {}).get("mlxq_25pct_vs_mlx_lm"),
            "decode_vs_mlxq_resident_interleaved": side_by_side.get("ratios", {}).get("mlxq_25pct_vs_mlxq_resident"),
            "decode_buffer_cache_held_vs_mlx_default": cache.get("decode_held_vs_mlx_default"),
            "decode_vs_llama_cpp_mmap_at_cap": _ratio(ours_capped.get("decode_tps"), llama.get("decode_tps")),
            "decode_vs_mlxq_resident": _ratio(ours_capped.get("decode_tps"), resident.get("decode_tps")),
            "bytes_per_token_vs_all_miss": _ratio(e.get("bytes_per_token"),
                                                  len(packs.layers) * args.top_k * _stride(packs)),
        },
        "notes": [
            f"mlx-lm at the cap ({cap / 1e9:.2f} GB, memory cgroup): " + (
                "ran" if theirs_capped["ok"] else theirs_capped["error"]),
            "llama.cpp: its own loop (llama_cpp.Llama.eval, one token a step, use_mmap, as many threads as cores) on a "
            "Q2_K GGUF of the same weights (mlxq export F16 -> llama-quantize Q2_K; capped.llama_cpp_mmap.gguf has its "
            "bits per weight: Q2_K's experts are 2.625 bpw against MLX's 2-bit group-64 2.5) in the same cgroup; "
            "its page cache counts against the cap, so a GGUF larger than the cap pages in and out rather than "
            "being killed; its greedy tokens differ (another 2-bit code)",
            "synthetic routing follows the token: on random tokens it is close to uniform (the pessimistic case); on "
            "text it is skewed, but a character vocabulary gives a small working set (real models: flash-moe saw 71 % "
            "page-cache hits on Qwen3.5-397B)",
            f"hit rates count over the decode steps only, after a {warm}-token prompt of the same workload filled the "
            "pool (the capped and peer runs: after the last 32 of those tokens)",
            "prefetch N: while decoding, the next N layers' experts predicted by their routers on the current layer's "
            "input are read while it computes; an expert read ahead and then routed to counts as a hit "
            "(prefetch_hits); it moves reads off the critical path (stall_s) rather than saving bytes. Every run's "
            "prompt reads the next layer ahead (prefill_experts: prefetch_reads, stall_s). Its read rate counts every "
            "byte read; bytes_used / used_read_gb_per_s count only experts computed with (demand reads and reads ahead "
            "that were then routed to), bytes_wasted the rest (ratios.read_rate_vs_raw_by_prefetch: both against "
            "the ceiling)",
            READ_RATE,
            "interleaved: the three models in one process, a decode step of each in turn, after the same prompt: "
            "the fairest decode ratios on a shared machine; peak_rss there is the process's (all three)",
            "mlx_buffer_cache: mlxq at 25 % with MLX's buffer cache held to 1/16 of the budget (the runtime's default "
            "while a slot pool lives, so that memory stays within resident + budget + a stated margin) against MLX's "
            "own limit, alternated; each its fastest run and lowest peak RSS",
            f"the machine may be shared (load_average: at the start and at the end): the capped, uncapped and "
            f"resident runs ran {REPEAT}x, the matrix once; the fastest is kept (decode_tps_runs lists them)",
        ],
    }
    for case in projection["cases"]:
        print(f"397B projection, {case['label']}: {case.get('arithmetic_full_rate')}", file=sys.stderr)
    plot(result, RESULTS / "experts.png")
    result["plot"] = str(RESULTS / "experts.png")
    if not args.keep and not args.quick:
        shutil.rmtree(work, ignore_errors=True)
    write_result("experts", result)


def decode_pattern(packs, r: dict, threads: int, seconds: float) -> dict:
    """The raw device in run r's read pattern: bursts of its misses per layer step, idle gaps of its time between."""
    from mlxq.experts.io import measure_burst_rate

    e = r["experts"]
    steps = e["tokens"] * len(packs.layers)  # layer steps while decoding
    burst = measure_burst_rate(packs, batch=e["misses"] / steps, threads=threads, seconds=seconds,
                               gap_s=max(0.0, r["decode_s"] - e["read_s"]) / steps)
    print(f"raw device in the decode's pattern: {burst['gb_per_s']:.3f} GB/s ({burst['batch']:.2f} experts a burst, "
          f"{1e3 * burst['gap_s']:.1f} ms idle between; {_shape(burst)})", file=sys.stderr)
    return burst


READ_GOAL = 0.8  # issue 11: mlxq's read rate while decoding >= 80 % of the ceiling
ARMS = ("prefetch_0", "prefetch_1", "prefetch_1/0.3", "pattern")


def arm_spec(name: str) -> dict:
    """An interleaved arm by name: prefetch_N[/K] (N layers read ahead, only K of the guesses right) or pattern (the
    raw device in the decode's pattern)."""
    if name == "pattern":
        return {"name": name, "pattern": True}
    ahead, _, kept = name.removeprefix("prefetch_").partition("/")
    return {"name": name, "prefetch": int(ahead), "kept": float(kept or 1)}


def block_ratios(rows: list[dict], key: str = "gb_per_s") -> dict[str, list[float]]:
    """arm -> each of its decode blocks' rate (`key`) over the mean of the two ceilings measured either side of the
    block (`rows` as `blocks` in the child records them: ceiling, arms, ceiling, arms, ..., ceiling)."""
    out: dict[str, list[float]] = {}
    before, between = None, []
    for row in rows:
        if row["arm"] != "ceiling":
            between.append(row)
            continue
        for r in between:
            out.setdefault(r["arm"], []).append(round(r[key] / ((before + row["gb_per_s"]) / 2), 3))
        before, between = row["gb_per_s"], []
    return out


def interleaved_read_rates(path: Path, prompt: list[int], vocab: int, args, n_blocks: int, tokens: int,
                           ceiling_s: float, arms: tuple[str, ...] = ARMS) -> dict:
    """The goal's figure, robust to a noisy disk: in one process, the ceiling (back to back, as many in flight as the
    runtime can have) and mlxq at 25 % decoding `tokens` steps with each arm (`arm_spec`), in turn, so
    that every block's ratio divides by the ceilings measured just before and just after it; the median over blocks
    and its spread (`rounds_verdict`: robust when at least 3 blocks and leaving any one out keeps the verdict). The
    arm "pattern" is the raw device without the model in the reads' pattern of the last block read 0 layers ahead
    (bursts of its misses per layer step, idle gaps of its time between reads): what the goal can be at this size."""
    rng = random.Random(1)
    forced = [rng.randrange(3, vocab) for _ in range(2 + n_blocks * len(arms) * tokens)]  # (2: warm-up steps)
    r = run_once({"top_k": args.top_k, "prompt": prompt, "forced": forced, "peer": "mlxq", "path": str(path),
                  "budget": "25%", "options": {"threads": args.threads},
                  "blocks": {"n": n_blocks, "tokens": tokens, "arms": [arm_spec(a) for a in arms],
                             "depth": args.threads + 1, "ceiling_s": ceiling_s}})
    if not r["ok"]:
        print(f"interleaved read rates: {r['error']}", file=sys.stderr)
        return r
    rows = r["blocks"]
    for row in rows:
        print("  " + (f"ceiling {row['gb_per_s']:.3f} GB/s" if row["arm"] == "ceiling" else
                      f"block {row['block']} {row['arm']}: {row['gb_per_s']:.3f} GB/s ({_shape(row)}" + (
                          f"; used {row['used_gb_per_s']:.3f}, {row['misses']} misses), {row['decode_tps']:.2f} tok/s"
                          if "misses" in row else f"; {row['batch']:.2f} a burst, {1e3 * row['gap_s']:.1f} ms gaps)")),
              file=sys.stderr)
    meets = lambda x: x >= READ_GOAL  # noqa: E731
    read, used = block_ratios(rows), block_ratios(rows, "used_gb_per_s")
    ceilings = [row["gb_per_s"] for row in rows if row["arm"] == "ceiling"]
    out = {"ok": True, "blocks": n_blocks, "tokens_per_block": tokens, "ceiling_s": ceiling_s,
           "ceiling_gb_per_s": {"min": min(ceilings), "max": max(ceilings), "each": [round(c, 3) for c in ceilings]},
           "read_vs_ceiling": {arm: rounds_verdict(v, meets) for arm, v in read.items()},
           "used_read_vs_ceiling": {arm: rounds_verdict(v, meets) for arm, v in used.items()},
           "decode_tps": {arm: median([row["decode_tps"] for row in rows if row["arm"] == arm]) for arm in read
                          if not arm.startswith("pattern")},
           "rows": rows, "load_s": r["load_s"], "prefill_s": r["prefill_s"]}
    print("interleaved read rate / ceiling, median over blocks (spread; used bytes): " + ", ".join(
        f"{arm} {v['median']} ({v['min']}-{v['max']}, robust {v['robust']}; {used[arm]['median']})"
        for arm, v in out["read_vs_ceiling"].items() if (used := out["used_read_vs_ceiling"])), file=sys.stderr)
    return out


def _arms(args, default: tuple[str, ...]) -> tuple[str, ...]:
    arms = tuple(args.arms.split(",")) if args.arms else default
    for name in arms:
        try:
            arm_spec(name)
        except ValueError:
            sys.exit(f"experts.py: --arms: '{name}' is neither prefetch_N[/K] nor pattern")
    if "pattern" in arms and "prefetch_0" not in arms[: arms.index("pattern")]:
        sys.exit("experts.py: --arms: pattern replays a prefetch_0 block's reads: name prefetch_0 before it")
    return arms


def _verdicts(blocks: dict) -> dict:
    """The interleaved figure's verdicts per arm (the median, spread and robustness; all bytes and used bytes)."""
    if not blocks.get("ok"):
        return {"error": blocks.get("error")}
    return {arm: {**{k: v[k] for k in ("median", "min", "max", "goal_met", "robust")},
                  "used_median": blocks["used_read_vs_ceiling"][arm]["median"]}
            for arm, v in blocks["read_vs_ceiling"].items()}


def real_experts(args) -> None:
    """The read rates at Qwen3.5-397B's own expert size: its real widths (so the rest of a layer costs what it costs
    there too, on this CPU), few layers and experts; mlxq at 25 % on random tokens, reading 0, 1 and 3 layers ahead,
    against the ceiling (back to back, measured before and after) and the device in the decode's own pattern."""
    from mlxq.experts.io import measure_read_rate
    from mlxq.experts.pack import open_pack_dir
    from mlxq.formats.fetch import cache_dir

    shape = SHAPES["real-experts"]
    work = cache_dir() / "bench" / "experts-real-experts"
    t_start, load_start = time.perf_counter(), os.getloadavg()
    paths, prep = prepare(work, shape, coactivation=False, mlx_lm=False)
    shutil.rmtree(paths["src"], ignore_errors=True)  # (2 GB, not needed once packed)
    packs = open_pack_dir(paths["packs"])
    rng = random.Random(0)
    warm, n_tokens = args.warm or 16, args.tokens or 12
    noise = [rng.randrange(3, shape.vocab) for _ in range(warm + n_tokens)]
    depth = args.threads + 1

    def ceiling() -> dict:
        raw = measure_read_rate(packs, threads=depth, seconds=5.0)
        print(f"raw device: {raw['gb_per_s']:.3f} GB/s at {raw['read_bytes'] / 1e6:.2f} MB reads, {depth} in flight "
              f"({_shape(raw)})", file=sys.stderr)
        return raw

    raws = [ceiling()]
    blocks = interleaved_read_rates(paths["packs"], noise[:warm], shape.vocab, args, args.blocks or 5, tokens=3,
                                    ceiling_s=2.0, arms=_arms(args, ARMS[:2] + ("prefetch_3",) + ARMS[2:]))
    runs = {}
    for prefetch in (0,):  # (for the decode's pattern; reads ahead: the interleaved blocks)
        runs[prefetch] = show(f"mlxq 25% prefetch {prefetch}", run(
            {"top_k": args.top_k, "prompt": noise[:warm], "forced": noise[warm:], "peer": "mlxq",
             "path": str(paths["packs"]), "budget": "25%", "options": {"threads": args.threads, "prefetch": prefetch}},
            repeat=1))
    burst = decode_pattern(packs, runs[0], args.threads, seconds=5.0) if runs[0]["ok"] else None
    after_idle = reads_after_idle(packs)
    raws.append(ceiling())
    raw = max(raws, key=lambda r: r["gb_per_s"])
    rates = {}
    for prefetch, r in runs.items():
        if r["ok"]:
            x = r["experts"]
            rates[prefetch] = {"read_vs_raw": _ratio(x["read_gb_per_s"], raw["gb_per_s"]),
                               "used_read_vs_raw": _ratio(x["used_read_gb_per_s"], raw["gb_per_s"]),
                               "read_vs_raw_decode_pattern": _ratio(x["read_gb_per_s"], (burst or {}).get("gb_per_s")),
                               "reads_in_flight": round(x["reads_in_flight"], 2),
                               "ms_per_read": round(x["ms_per_read"], 2), "decode_tps": round(r["decode_tps"], 3)}
    write_result("experts-real-experts", {
        "mode": "real-experts",
        "model": {**shape.__dict__, "expert_bytes": next(iter(packs.layers.values())).payload,
                  "packs_bytes": sum(lp.stride * lp.n_experts for lp in packs.layers.values()),
                  "scaled_from": "Qwen3.5-397B-A17B (its own widths; 4 layers, 64 experts)"},
        "top_k": args.top_k, "warm_prompt_tokens": warm, "decode_tokens": n_tokens,
        "read_rate_definition": READ_RATE,
        "raw_read": raw, "raw_read_gb_per_s_runs": [round(r["gb_per_s"], 3) for r in raws],
        "raw_read_decode_pattern": burst, "raw_reads_after_idle": after_idle,
        "mlxq_25pct": {f"prefetch_{k}": v for k, v in runs.items()},
        "read_rate_interleaved": blocks,
        "ratios": {"read_rate_vs_ceiling_interleaved": _verdicts(blocks), "read_rate_vs_raw_by_prefetch": rates,
                   "raw_decode_pattern_vs_back_to_back": _ratio((burst or {}).get("gb_per_s"), raw["gb_per_s"])},
        "prepare": prep, "seconds": time.perf_counter() - t_start, "load_average": [load_start, os.getloadavg()],
    })
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def reads_after_idle(packs, gaps_s: tuple[float, ...] = (0.0, 0.01, 0.05, 0.15), bursts: int = 20, reads: int = 4,
                     seed: int = 0) -> dict:
    """Why a decode step's burst gets less of the device than reads back to back: one-expert reads one at a time,
    `reads` in a row after an idle gap (as a layer's reads follow the compute since the last layer's), `bursts` times a
    gap; the median time of the first, second, ... read after the gap, in ms (gap 0: back to back)."""
    from mlxq.experts.io import open_uncached, staging

    layers = list(packs.layers.values())
    rng = random.Random(seed)
    fds = {lp.layer: open_uncached(packs.path(lp)) for lp in layers}
    buf = staging(max(lp.stride for lp in layers))
    out = {}
    try:
        for gap in gaps_s:
            took = [[] for _ in range(reads)]
            for _ in range(bursts):
                time.sleep(gap)
                for row in took:
                    lp = rng.choice(layers)
                    t0 = time.perf_counter()
                    os.preadv(fds[lp.layer][0], [buf[: lp.stride]], lp.experts[rng.randrange(lp.n_experts)].offset)
                    row.append(time.perf_counter() - t0)
            out[f"{1e3 * gap:g}"] = [round(1e3 * median(row), 3) for row in took]
    finally:
        for fd, _ in fds.values():
            os.close(fd)
    print("raw device, ms a read after an idle gap (1st, 2nd, ... read): " + ", ".join(
        f"{gap} ms gap {ms}" for gap, ms in out.items()), file=sys.stderr)
    return {"ms_per_read_after_gap_ms": out, "bursts": bursts, "read_bytes": max(lp.stride for lp in layers),
            "direct": all(ok for _, ok in fds.values())}


def show(name: str, r: dict) -> dict:
    if not r["ok"]:
        print(f"{name}: {r['error']}", file=sys.stderr)
        return r
    e = r.get("experts")
    print(f"{name}: {r['decode_tps']:.2f} tok/s, peak RSS {r['peak_rss'] / 1e9:.2f} GB" + (
        f"; hit {100 * e['hit_rate']:.1f}% ({e['prefetch_hits']} prefetched), {e['bytes_per_token'] / 1e6:.2f} "
        f"MB/token, read {e['read_gb_per_s']:.3f} GB/s ({_shape(e)}), {e['experts_per_read']:.2f} experts/read, stall "
        f"{e['stall_s']:.2f} s" + (f"; read ahead {e['prefetch_hits']}/{e['prefetch_reads']} used, used bytes "
                                   f"{e['used_read_gb_per_s']:.3f} GB/s" if e["prefetch_reads"] else "")
        if e else ""), file=sys.stderr)
    return r


def text_ids(model_dir: Path, n: int) -> list[int]:
    """n token ids of held-back Wikipedia text (pinned, cached), in the synthetic model's character vocabulary."""
    from mlxq.engine.tokenizer import load_tokenizer
    from mlxq.formats.texts import heldout_text

    ids = load_tokenizer(model_dir, None, None).encode(heldout_text()[20000:30000])
    return ids[:n]


def _shape(r: dict) -> str:
    return f"{r['reads_in_flight']:.2f} reads in flight, {r['ms_per_read']:.2f} ms each"


def _stride(packs) -> int:
    return next(iter(packs.layers.values())).stride


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def project(matrix: list[dict], raw: dict, top_k: int) -> dict:
    """Qwen3.5-397B-A17B on a 5.5 GB/s Mac SSD: its experts (3.93 MB at 2 bits) missed at the measured rates, read
    at the measured share of the device's rate (and at the full rate: a 3.9 MB read keeps an SSD busier than the
    small reads measured here), after flash-moe's measured per-token compute (its M3 Max GPU time, I/O excluded),
    serially as flash-moe found best on unified memory."""
    from mlxq.bench.synthetic import QWEN35_397B as q

    expert = QWEN397B_EXPERT_BYTES
    compute = q.layers * FLASH_MOE["non_io_ms_per_layer"] / 1e3
    out = {"expert_bytes": expert, "layers": q.layers, "top_k": top_k, "ssd_bytes_per_s": MAC_SSD,
           "compute_s_per_token": compute, "flash_moe": FLASH_MOE, "cases": []}
    cases = [(f"{r['workload']} tokens, {r['budget_pct']} %", r["experts"]["hit_rate"], r["experts"]["read_gb_per_s"])
             for r in matrix if r["ok"] and r["order"] == "identity" and not r["prefetch"]]
    cases.append(("flash-moe's page-cache hit rate on Qwen3.5-397B", FLASH_MOE["page_cache_hit_rate"], None))
    for label, hit, rate in cases:
        read = q.layers * top_k * (1 - hit) * expert
        share = min(rate / raw["gb_per_s"], 1.0) if rate and raw["gb_per_s"] else None
        case = {"label": label, "hit_rate": round(hit, 4), "bytes_per_token": read, "read_share_measured": share}
        for key, eff in (("full_rate", 1.0), ("measured_share", share)):
            if eff:
                io_s = read / (MAC_SSD * eff)
                case[f"tok_s_{key}"] = round(1 / (io_s + compute), 2)
                case[f"arithmetic_{key}"] = (
                    f"{q.layers} layers x {top_k} experts x (1 - {hit:.3f}) x {expert / 1e6:.2f} MB = "
                    f"{read / 1e6:.0f} MB/token; / ({MAC_SSD / 1e9:.1f} GB/s x {eff:.2f}) = {io_s * 1e3:.0f} ms; "
                    f"+ {compute * 1e3:.0f} ms compute = {(io_s + compute) * 1e3:.0f} ms -> {1 / (io_s + compute):.2f} "
                    "tok/s")
        out["cases"].append(case)
    return out


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib not installed (pip install mlxq[bench]); no plot", file=sys.stderr)
        return
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    for order in ("identity", "coactivation"):
        for prefetch in (0, 1, 3):
            rows = [r for r in result["matrix"] if r["ok"] and r["workload"] == "random" and r["order"] == order
                    and r["prefetch"] == prefetch]
            rows.sort(key=lambda r: r["budget_pct"])
            if not rows:
                continue
            label = f"{order}{f', {prefetch} ahead' if prefetch else ''}"
            x = [r["budget_pct"] for r in rows]
            a.plot(x, [r["decode_tps"] for r in rows], "o-", label=label)
            b.plot(x, [100 * r["experts"]["hit_rate"] for r in rows], "o-", label=label)
    for name, r, style in (("mlx-lm, all in memory (no cap)", result["uncapped"]["mlx_lm"], "--"),
                           ("mlxq, all in memory", result["uncapped"]["mlxq_resident"], ":")):
        if r["ok"]:
            a.axhline(r["decode_tps"], linestyle=style, color="gray", label=name)
    a.set(xlabel="expert memory, % of all experts", ylabel="decode tok/s", title="decode speed (random tokens)")
    b.set(xlabel="expert memory, % of all experts", ylabel="hit rate, %", title="expert hits (random tokens)")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    capped = result["capped"]
    names = ["raw, back to back\n(O_DIRECT)", "raw, decode's\npattern", "mlxq while\ndecoding"]
    e = capped["mlxq_25pct"].get("experts", {})
    c.bar(names, [result["raw_read"]["gb_per_s"], (result["raw_read_decode_pattern"] or {}).get("gb_per_s", 0),
                  e.get("read_gb_per_s", 0)], color=["gray", "silver", "tab:blue"])
    c.set(ylabel="GB/s", title=f"read rate ({result['raw_read']['read_bytes'] // 1024} KiB experts)")
    mlx_lm = capped["mlx_lm"]
    fig.suptitle(f"{result['model']['scaled_from']}, top-{result['top_k']}; cap "
                 f"{result['memory_cap_bytes'] / 1e9:.2f} GB: mlxq {capped['mlxq_25pct'].get('decode_tps', 0):.2f} "
                 f"tok/s, mlx-lm " + (f"{mlx_lm['decode_tps']:.2f} tok/s" if mlx_lm["ok"] else "could not run"),
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
