"""Streaming: quantizing a synthetic multi-GB checkpoint keeps peak memory near one tensor, and a run that is
killed or terminated midway leaves no OUT (and no temporary files once a later run has cleaned up)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from mlxq.quant.writer import OutTensor, ShardWriter

LAYERS, ROWS, COLS = 12, 4096, 8192  # 4 float16 [4096, 8192] tensors a layer: 3.2 GB in 48 tensors
PEAK_LIMIT = 1.0e9  # measured here: 0.42 GB for 3.2 GB


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """A llama-shaped checkpoint of random float16 weights, written tensor by tensor (removed afterwards)."""
    root = tmp_path_factory.mktemp("big")
    src = root / "src"
    src.mkdir()
    names = [f"model.layers.{i}.mlp.{p}.weight" for i in range(LAYERS) for p in ("gate_proj", "up_proj")]
    names += [f"model.layers.{i}.self_attn.{p}.weight" for i in range(LAYERS) for p in ("q_proj", "o_proj")]
    tensors = [OutTensor(n, (ROWS, COLS), mx.float16) for n in sorted(names)]
    tensors += [OutTensor(f"model.layers.{i}.input_layernorm.weight", (COLS,), mx.float16) for i in range(LAYERS)]
    writer = ShardWriter(src, tensors, shard_bytes=1 << 30)
    base = mx.random.normal((ROWS, COLS), key=mx.random.key(0)) * 0.02
    for i, t in enumerate(tensors):  # one random draw, shifted per tensor: writing, not sampling, is the cost
        w = base + 1e-3 * i if len(t.shape) == 2 else mx.ones(t.shape)
        writer.write(t.name, w.astype(mx.float16))
    writer.close()
    config = {
        "model_type": "llama",
        "hidden_size": COLS,
        "intermediate_size": ROWS,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 64,
        "num_key_value_heads": 64,
        "vocab_size": 32,
        "rms_norm_eps": 1e-5,
    }
    (src / "config.json").write_text(json.dumps(config))
    yield src, sum(t.nbytes for t in tensors)
    shutil.rmtree(root, ignore_errors=True)


# VmHWM, not ru_maxrss: ru_maxrss carries over the forked copy of this (large) pytest process from before exec.
RUN = """
import re, sys
from mlxq.quant.pipeline import quantize
from mlxq.quant.recipes import uniform
quantize(sys.argv[1], sys.argv[2], uniform(4), progress=False)
status = open("/proc/self/status").read()
print("PEAK", int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024)
"""


def start(src: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUN, str(src), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_peak_memory_stays_near_one_tensor(big_checkpoint, tmp_path):
    src, size = big_checkpoint
    assert size > 3e9
    out = tmp_path / "q4"
    try:
        proc = start(src, out)
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        peak = int(stdout.split("PEAK")[-1])
        print(f"peak RSS {peak / 1e9:.2f} GB quantizing a {size / 1e9:.2f} GB checkpoint")
        assert peak < PEAK_LIMIT, f"peak RSS {peak / 1e9:.2f} GB for a {size / 1e9:.1f} GB checkpoint"
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["quantization"]["bits"] == 4 and (out / "model.safetensors").exists()
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] < size / 3
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _wait_for_partial(out: Path, proc: subprocess.Popen, min_bytes: int = 200_000_000) -> Path:
    deadline = time.time() + 300
    while time.time() < deadline:
        for partial in out.parent.glob(f".{out.name}.partial-*"):
            if sum(f.stat().st_size for f in partial.iterdir()) > min_bytes:
                return partial
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    raise AssertionError("no partial output appeared")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_midway_leaves_no_out(sig, big_checkpoint, tmp_path):
    src, _ = big_checkpoint
    out = tmp_path / "q4"
    proc = start(src, out)
    try:
        partial = _wait_for_partial(out, proc)
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    if sig == signal.SIGTERM:  # a terminated run removes its temporary directory on the way out
        assert not partial.exists()
    else:  # a killed one cannot; the next run into the same OUT clears it (its process is gone)
        assert partial.exists()
        from mlxq.quant.pipeline import _clear_stale

        _clear_stale(out)
        assert not partial.exists()
