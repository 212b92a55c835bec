"""Streaming: calibrating a synthetic 1 B-parameter model holds one layer at a time; quantizing a multi-GB
checkpoint keeps peak memory near one tensor, and a run that is killed or terminated midway leaves no OUT (and no
temporary files once a later run has cleaned up). Disk: at most ~7 GB at once."""

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

pytestmark = pytest.mark.slow  # writes a 3.2 GB checkpoint and kills runs midway


def write_random(src: Path, shapes: dict[str, tuple[int, ...]], config: dict) -> int:
    """A checkpoint of random float16 matrices (ones for vectors), written tensor by tensor; its size."""
    src.mkdir()
    tensors = [OutTensor(n, shape, mx.float16) for n, shape in sorted(shapes.items())]
    writer = ShardWriter(src, tensors, shard_bytes=1 << 30)
    bases = {}
    for i, t in enumerate(tensors):  # one random draw per shape, shifted per tensor: writing, not sampling, is the cost
        if len(t.shape) == 2 and t.shape not in bases:
            bases[t.shape] = mx.random.normal(t.shape, key=mx.random.key(len(bases))) * 0.02
        w = bases[t.shape] + 1e-3 * i if len(t.shape) == 2 else mx.ones(t.shape)
        writer.write(t.name, w.astype(mx.float16))
    writer.close()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "rms_norm_eps": 1e-5, **config}))
    return sum(t.nbytes for t in tensors)


# ---------------------------------------------------------------------------------------------- calibration
CAL_LAYERS, HIDDEN, INTER = 16, 2048, 8192  # 1.07 B parameters: 2.1 GB on disk, 4.3 GB as float32
CAL_PEAK_LIMIT = 1.5e9  # Hessians alone come to 5.1 GB for the whole model
CALIBRATE = """
import re, sys
from pathlib import Path
from mlxq.formats import open_checkpoint
from mlxq.quant.calibrate import collect, load
out = Path(sys.argv[2])
stats = collect(open_checkpoint(sys.argv[1]), [[(7 * i) % 250 + 3 for i in range(256)]] * 2, True, out)
status = open("/proc/self/status").read()
print("PEAK", int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024)
print("HESSIANS", len(stats.hessian_files), len(load(out).hessian_files))
"""


def write_whole_model(src: Path) -> int:
    per_layer = {
        "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
        "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER),
        "input_layernorm": (HIDDEN,), "post_attention_layernorm": (HIDDEN,),
    }
    shapes = {f"model.layers.{i}.{k}.weight": v for i in range(CAL_LAYERS) for k, v in per_layer.items()}
    shapes.update({"model.embed_tokens.weight": (256, HIDDEN), "model.norm.weight": (HIDDEN,)})
    config = {"hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": CAL_LAYERS,
              "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 256, "tie_word_embeddings": True}
    return write_random(src, shapes, config)


# First in the module, and in its own tmp_path (gone when it passes): its 2.1 GB model and 5.1 GB of Hessians never
# share the disk with the 3.2 GB checkpoint below.
def test_calibration_holds_one_layer_at_a_time(tmp_path):
    src = tmp_path / "src"
    size = write_whole_model(src)
    assert size > 2e9
    proc = subprocess.run(
        [sys.executable, "-c", CALIBRATE, str(src), str(tmp_path / "stats")], capture_output=True, text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stdout.split("PEAK")[-1].split()[0])
    print(f"peak RSS {peak / 1e9:.2f} GB calibrating a model of {2 * size / 1e9:.1f} GB in float32")
    assert peak < CAL_PEAK_LIMIT, f"peak RSS {peak / 1e9:.2f} GB for a {2 * size / 1e9:.1f} GB float32 model"
    # q, o, gate, down of every layer, and the head's input
    assert proc.stdout.split("HESSIANS")[-1].split() == [str(4 * CAL_LAYERS + 1)] * 2


# ---------------------------------------------------------------------------------------------- streaming
@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """A llama-shaped set of large float16 tensors (not a whole model: quantizing needs none of the rest)."""
    root = tmp_path_factory.mktemp("big")
    shapes = {f"model.layers.{i}.{p}.weight": (ROWS, COLS) for i in range(LAYERS)
              for p in ("mlp.gate_proj", "mlp.up_proj", "self_attn.q_proj", "self_attn.o_proj")}
    shapes.update({f"model.layers.{i}.input_layernorm.weight": (COLS,) for i in range(LAYERS)})
    config = {"hidden_size": COLS, "intermediate_size": ROWS, "num_hidden_layers": LAYERS,
              "num_attention_heads": 64, "num_key_value_heads": 64, "vocab_size": 32}
    yield root / "src", write_random(root / "src", shapes, config)
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
