"""Streaming keeps memory bounded: a synthetic MoE whose expert packs are many times the budget decodes with peak
RSS at most its resident weights + the expert budget + a stated margin (measured in a fresh process), over the whole
run and over the prompt alone, and while decoding within resident + budget + the pool's stated overhead (MLX's buffer
cache held to 1/16 of the budget, the readers' staging) + the forward pass's working memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mlxq.bench.synthetic import QWEN35_397B, scaled, write_moe
from mlxq.experts.io import MAX_MERGE
from mlxq.experts.pool import CACHE_SHARE
from mlxq.quant import pipeline
from mlxq.quant.recipes import RECIPES

BUDGET = 8_000_000
THREADS = 2
TOP_K = 10
# The forward pass's working memory (activations, KV cache), code pages first touched by the prompt, Python and
# allocator slack: measured 29-35 MB while decoding.
WORKING = 40_000_000
# While decoding: MLX's buffer cache at most 1/16 of the budget, a staging buffer of at most one decode step's merged
# read (top-k experts) per reader thread and for the forward pass's thread. Before the cache was held, it alone took
# 26-33 MB here (decoding measured ~67 MB over resident + pool).
DECODE_MARGIN = BUDGET // 16 + (THREADS + 1) * TOP_K * 65536 + WORKING
# During the prompt (measured on its own, VmHWM reset after loading), and so over the whole run, the prompt's merged
# reads too: up to MAX_MERGE each, on every thread at once (whole run measured ~44 MB; before, ~76 MB).
MARGIN = DECODE_MARGIN + (THREADS + 1) * MAX_MERGE

# VmHWM, not ru_maxrss: ru_maxrss carries over the forked copy of this (large) pytest process from before exec.
RUN = """
import json, re, sys
import mlx.core as mx
from mlx.utils import tree_flatten
import mlxq
import mlxq.api  # the runtime's code is the baseline too (`import mlxq` leaves it to the first `mlxq.load`)

def rss(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

def reset_peak():  # VmHWM back to the current RSS (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

from pathlib import Path
from mlxq.engine.tokenizer import load_tokenizer

mx.eval(mx.zeros(4) + 1)  # MLX's start-up allocations and the tokenizer (transformers: ~190 MB) are the baseline
load_tokenizer(Path(sys.argv[1]), None, None)
base = rss("VmRSS")
model = mlxq.load(sys.argv[1], expert_memory=int(sys.argv[2]), expert_options={"threads": int(sys.argv[3])})
resident = sum(v.nbytes for _, v in tree_flatten(model.net.parameters()))
pool = model.net.expert_pool
peaks = [rss("VmHWM")]  # loading
reset_peak()
for chunk in model.stream(list(range(3, 67)), max_tokens=24):  # the first chunk comes after the prompt
    peaks.append(rss("VmHWM"))
    if len(peaks) == 2:
        reset_peak()
peaks.append(rss("VmHWM"))
print(json.dumps({"base": base, "resident": resident, "pool": pool.nbytes, "peak": max(peaks),
                  "prompt_peak": peaks[1], "decode_peak": peaks[-1], "packs": pool.packs.nbytes,
                  "chunks": len(peaks) - 2,
                  "overhead": pool.overhead, "cache_limit": pool.cache_limit,
                  "stride": max(lp.stride for lp in pool.packs.layers.values()),
                  "stats": model.expert_stats().as_dict()}))
"""


@pytest.mark.slow
def test_peak_rss_stays_within_resident_plus_budget(tmp_path):
    shape = scaled(QWEN35_397B, width=8, layers=10, experts=512)  # 10 x 512 experts of 61 KB: 315 MB of packs
    src = write_moe(tmp_path / "src", shape)
    packs = tmp_path / "packs"
    pipeline.quantize(str(src), packs, RECIPES["experts-2bit"], progress=False, stream_experts=True)
    done = subprocess.run([sys.executable, "-c", RUN, str(packs), str(BUDGET), str(THREADS)], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    m = json.loads(done.stdout.splitlines()[-1])
    over = m["peak"] - m["base"] - m["resident"] - m["pool"]
    prompt_over = m["prompt_peak"] - m["base"] - m["resident"] - m["pool"]
    decode_over = m["decode_peak"] - m["base"] - m["resident"] - m["pool"]
    print(f"packs {m['packs'] / 1e6:.0f} MB, budget {BUDGET / 1e6:.0f} MB (pool {m['pool'] / 1e6:.1f} MB), resident "
          f"{m['resident'] / 1e6:.1f} MB, baseline {m['base'] / 1e6:.0f} MB, peak {m['peak'] / 1e6:.0f} MB: "
          f"{over / 1e6:.1f} MB above baseline + resident + pool, {prompt_over / 1e6:.1f} MB during the prompt "
          f"(first token included), {decode_over / 1e6:.1f} MB while decoding "
          f"(margins {MARGIN / 1e6:.1f}, {DECODE_MARGIN / 1e6:.1f} MB); {m['stats']['misses']} misses")
    assert m["packs"] > 25 * BUDGET and m["pool"] <= BUDGET and m["chunks"] >= 12
    assert m["stats"]["misses"] > 1000  # the experts really streamed through the budget
    # the pool states the overhead the margin allows for
    assert m["stride"] <= 65536 and m["cache_limit"] == int(BUDGET * CACHE_SHARE) <= BUDGET // 16
    assert m["overhead"] == m["cache_limit"] + (THREADS + 1) * TOP_K * m["stride"]
    assert prompt_over <= MARGIN, f"{prompt_over / 1e6:.1f} MB over resident + budget during the prompt"
    assert decode_over <= DECODE_MARGIN, f"{decode_over / 1e6:.1f} MB over resident + budget while decoding"
    assert over <= MARGIN, f"{over / 1e6:.1f} MB over resident + budget (margin {MARGIN / 1e6:.0f} MB)"
    assert m["packs"] > 3 * (m["pool"] + MARGIN)  # a leak of the experts read could not hide in the margin
