"""Every writer of a large file (GGUF export, safetensors shards, expert packs) starts the file's write-out as it
goes (`mlxq.glibc.WriteBehind`), so that the fsync which completes the file waits for its last part only."""

from __future__ import annotations

import os
import re
import sys

import mlx.core as mx
import pytest
from test_quant import add_tokenizer
from tiny import make_tiny, save_tiny_tokenizer

from mlxq import glibc
from mlxq.formats.gguf.export import export
from mlxq.quant import pipeline
from mlxq.quant.recipes import RECIPES, gguf_recipe
from mlxq.quant.writer import OutTensor, ShardWriter

EVERY = 4 << 10  # the write-out started every this many bytes here
LINUX = sys.platform.startswith("linux")


@pytest.fixture
def started(monkeypatch):
    """The write-outs started, every EVERY bytes of a file: (its name where Linux tells it, whether it started)."""
    calls = []
    real = glibc.start_writeback

    def start(fd: int) -> bool:
        calls.append((os.readlink(f"/proc/self/fd/{fd}") if LINUX else "", real(fd)))
        return calls[-1][1]

    monkeypatch.setattr(glibc, "start_writeback", start)
    monkeypatch.setattr(glibc, "WRITE_BEHIND_BYTES", EVERY)
    return calls


def check(calls: list[tuple[str, bool]], written: int, named: str) -> None:
    """Several starts on the files whose names match `named`, at most one per EVERY bytes written, each a success
    where the call exists (Linux)."""
    ours = [ok for name, ok in calls if re.search(named, name) or not LINUX]
    assert 4 <= len(ours) <= written // EVERY, (len(ours), written)
    assert all(ours) if LINUX else not any(ours)


def test_gguf_export(started, tmp_path):
    make_tiny("llama", tmp_path / "src")
    save_tiny_tokenizer(tmp_path / "src", 160)
    out = tmp_path / "out.gguf"
    export(str(tmp_path / "src"), out, gguf_recipe("F32"), progress=False)
    check(started, out.stat().st_size, r"/\.out\.gguf\.partial-\d+$")  # (renamed once complete)


def test_safetensors_shards(started, tmp_path):
    tensors = [OutTensor(f"t{i}", (1024,), mx.float32) for i in range(64)]
    writer = ShardWriter(tmp_path, tensors)
    for i, t in enumerate(tensors):
        writer.write(t.name, mx.full(t.shape, float(i)))
    writer.close()
    check(started, sum(t.nbytes for t in tensors), r"/model\.safetensors$")


def test_expert_packs(started, tmp_path):
    make_tiny("qwen3_moe", tmp_path / "src")
    add_tokenizer(tmp_path / "src")
    pipeline.quantize(str(tmp_path / "src"), tmp_path / "packs", RECIPES["experts-2bit"], progress=False,
                      stream_experts=True)
    packs = sorted((tmp_path / "packs").rglob("*.pack"))
    assert packs
    check(started, sum(p.stat().st_size for p in packs), r"/layer-\d+\.pack$")
