"""Streaming keeps memory bounded: a synthetic MoE whose expert packs are many times the budget decodes with peak
RSS at most its resident weights + the expert budget + a stated margin (measured in a fresh process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mlxq.bench.synthetic import QWEN35_397B, scaled, write_moe
from mlxq.experts.io import MAX_MERGE
from mlxq.quant import pipeline
from mlxq.quant.recipes import RECIPES

BUDGET = 8_000_000
THREADS = 2
# What the process may hold beyond weights and budget: the reader's staging buffers (a thread's is at most
# MAX_MERGE), MLX's working memory and buffer cache for a 64-token prompt (~31 MB), Python and allocator slack.
# Measured here: ~63 MB in all.
MARGIN = THREADS * MAX_MERGE + 64_000_000

# VmHWM, not ru_maxrss: ru_maxrss carries over the forked copy of this (large) pytest process from before exec.
RUN = """
import json, re, sys
import mlx.core as mx
from mlx.utils import tree_flatten
import mlxq

def rss(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

from pathlib import Path
from mlxq.engine.tokenizer import load_tokenizer

mx.eval(mx.zeros(4) + 1)  # MLX's start-up allocations and the tokenizer (transformers: ~190 MB) are the baseline
load_tokenizer(Path(sys.argv[1]), None, None)
base = rss("VmRSS")
model = mlxq.load(sys.argv[1], expert_memory=int(sys.argv[2]), expert_options={"threads": int(sys.argv[3])})
resident = sum(v.nbytes for _, v in tree_flatten(model.net.parameters()))
result = model.generate(list(range(3, 67)), max_tokens=24)
print(json.dumps({"base": base, "resident": resident, "pool": model.net.expert_pool.nbytes, "peak": rss("VmHWM"),
                  "packs": model.net.expert_pool.packs.nbytes, "tokens": len(result.tokens),
                  "stats": result.timings.experts}))
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
    print(f"packs {m['packs'] / 1e6:.0f} MB, budget {BUDGET / 1e6:.0f} MB (pool {m['pool'] / 1e6:.1f} MB), resident "
          f"{m['resident'] / 1e6:.1f} MB, baseline {m['base'] / 1e6:.0f} MB, peak {m['peak'] / 1e6:.0f} MB: "
          f"{over / 1e6:.1f} MB above baseline + resident + pool; {m['stats']['misses']} misses")
    assert m["packs"] > 25 * BUDGET and m["pool"] <= BUDGET
    assert m["stats"]["misses"] > 1000  # the experts really streamed through the budget
    assert over <= MARGIN, f"{over / 1e6:.1f} MB over resident + budget (margin {MARGIN / 1e6:.0f} MB)"
    assert m["packs"] > 3 * (m["pool"] + MARGIN)  # a leak of the experts read could not hide in the margin
