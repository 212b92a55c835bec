"""An export's tensors encoded by worker processes (formats/gguf/parallel.py): the same bytes as one process, slices
read from the source file or copied, importance included; a worker's failure or death is one line naming the
tensor; an interrupted export leaves no file and no process; workers end when the export is gone; and how many
workers an export gets (none on one core or for a small model). Workers are forked on Linux and spawned elsewhere
(macOS: no fork after Metal has started); the spawned kind runs here too (`spawned`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from tiny import WIDE, make_tiny, save_tiny_tokenizer

import mlxq.formats.gguf.parallel as parallel
from mlxq.formats.gguf import names
from mlxq.formats.gguf.codecs import CODECS, encode
from mlxq.formats.gguf.export import export
from mlxq.quant.recipes import gguf_recipe

SMALL_SLICES = 4 * 256  # weights: every tensor of the tiny models splits into many slices


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Wide tiny models as HF safetensors (float32, mapped: workers read most tensors from the file): a llama (q/k
    permuted, so copied), a qwen3_moe_norm (stacked experts, 3-d, copied), and a qwen3 as an F32 GGUF."""
    root = tmp_path_factory.mktemp("parallel")
    made = {}
    for family in ("llama", "qwen3_moe_norm", "qwen3"):
        make_tiny(family, root / family, **WIDE)
        save_tiny_tokenizer(root / family, 160)
        made[family] = root / family
    made["qwen3-gguf"] = root / "qwen3-f32.gguf"
    export(str(made["qwen3"]), made["qwen3-gguf"], gguf_recipe("F32"), progress=False)
    return made


@pytest.fixture
def spawned(monkeypatch):
    """Workers spawned, as on macOS. A spawned worker is a fresh interpreter: nothing patched here reaches it."""
    monkeypatch.setattr(parallel, "start_method", lambda: "spawn")


def _export(src, out, kind, workers):
    export(str(src), out, gguf_recipe(kind), progress=False, workers=workers)
    return out.read_bytes()


# (source, type, how workers got the slices: read from the source file (True), copied (False))
SAME_CASES = [("llama", "Q4_K_M", {True, False}), ("qwen3-gguf", "Q3_K_M", {True}), ("qwen3-gguf", "Q2_K", {True}),
              ("qwen3_moe_norm", "Q4_K_M", {True, False})]


@pytest.mark.parametrize(("source", "kind", "read"), SAME_CASES)
def test_workers_write_the_same_file_as_one_process(source, kind, read, sources, tmp_path, monkeypatch):
    handed = []
    hand_out = parallel.Encoders._hand_out
    monkeypatch.setattr(parallel.Encoders, "_hand_out",
                        lambda self, *a: handed.append(a[-1] is not None) or hand_out(self, *a))
    one = _export(sources[source], tmp_path / "one.gguf", kind, 0)
    assert handed == []
    monkeypatch.setattr(parallel, "SLICE_WEIGHTS", SMALL_SLICES)
    assert _export(sources[source], tmp_path / "many.gguf", kind, 3) == one
    assert len(handed) > 50 and set(handed) == read


def test_spawned_workers_write_the_same_file_as_one_process(spawned, sources, tmp_path, monkeypatch):
    one = _export(sources["llama"], tmp_path / "one.gguf", "Q4_K_M", 0)
    monkeypatch.setattr(parallel, "SLICE_WEIGHTS", SMALL_SLICES)
    enter, pids = parallel.Encoders.__enter__, []

    def spawned_seen(self):
        out = enter(self)
        pids.extend(w.pid for w in self.workers if w.process is not None)
        return out

    monkeypatch.setattr(parallel.Encoders, "__enter__", spawned_seen)
    fds = sorted(os.listdir("/proc/self/fd"))
    assert _export(sources["llama"], tmp_path / "many.gguf", "Q4_K_M", 2) == one
    assert len(pids) == 2 and all(map(_gone, pids))
    assert sorted(os.listdir("/proc/self/fd")) == fds  # the pipes and the slots' file closed


def test_a_spawned_worker_starts_without_the_runtime():
    """What a spawned worker imports (`_serve_spawned`'s module) leaves out mlxq's runtime (its API, transformers):
    ~0.2 s to start instead of ~0.8 s here."""
    code = "import sys; from mlxq.formats.gguf.parallel import _serve_spawned; print(sorted({'mlxq.api', " \
           "'transformers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(("kind", "start"), [("Q4_K", "fork"), ("Q4_0", "fork"), ("IQ4_NL", "fork"), ("Q4_K", "spawn")])
def test_workers_weigh_slices_by_their_importance(kind, start, tmp_path, monkeypatch):
    """Importance per input column, and per expert ([experts, 1, cols] broadcast over the rows)."""
    monkeypatch.setattr(parallel, "SLICE_WEIGHTS", SMALL_SLICES)
    monkeypatch.setattr(parallel, "start_method", lambda: start)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 40, 512)).astype(np.float32)
    for importance in (rng.random(512).astype(np.float32), rng.random((3, 1, 512)).astype(np.float32)):
        want = encode(w, kind, importance).tobytes()
        assert want != encode(w, kind).tobytes()
        path = tmp_path / "t.bin"
        path.write_bytes(b"")
        with parallel.Encoders(path, 2, 512, path) as encoders:
            encoders.encode("blk.0.ffn_up_exps.weight", 7, w, kind, importance)
            encoders.finish()
        assert path.read_bytes()[7:] == want


def test_workers_read_a_mapped_view_from_where_it_starts(tmp_path, monkeypatch):
    """Rows of a tensor mapped from a file, not from the mapping's start: workers map the file at the view's own
    byte offset."""
    monkeypatch.setattr(parallel, "SLICE_WEIGHTS", SMALL_SLICES)
    rng = np.random.default_rng(2)
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(96) + rng.standard_normal((30, 256)).astype(np.float32).tobytes())
    w = np.asarray(np.memmap(src, np.float32, "c", 96, (30, 256)))[7:]
    handed = []
    hand_out = parallel.Encoders._hand_out
    monkeypatch.setattr(parallel.Encoders, "_hand_out",
                        lambda self, *a: handed.append(a[-1] is not None) or hand_out(self, *a))
    path = tmp_path / "t.bin"
    path.write_bytes(b"")
    with parallel.Encoders(path, 2, 256, path) as encoders:
        encoders.encode("blk.0.ffn_up.weight", 0, w, "Q4_K", None)
        encoders.finish()
    assert set(handed) == {True} and path.read_bytes() == encode(w, "Q4_K").tobytes()


def _fail_in_workers(monkeypatch, how, here: bool = False):
    """Q8_0's encoding fails on the llama's blk.1 q projection, in a worker (or, `here`, in this process)."""
    me, codec = os.getpid(), CODECS["Q8_0"]
    encode_blocks = type(codec).encode_blocks

    def broken(self, x, *rest):
        if (os.getpid() == me) == here and np.any(x == np.float32(0.625)):
            how()
        return encode_blocks(self, x, *rest)

    monkeypatch.setattr(type(codec), "encode_blocks", broken)
    to_gguf = names.to_gguf

    def marked(arch, hf, w, config):  # one weight of one tensor made recognisable
        w = to_gguf(arch, hf, w, config)
        if hf == "model.layers.1.self_attn.q_proj.weight":
            w = np.array(w)
            w[5, 3] = 0.625
        return w

    monkeypatch.setattr(names, "to_gguf", marked)


def _workers_seen(monkeypatch) -> list[int]:
    pids = []
    enter = parallel.Encoders.__enter__

    def seen(self):
        out = enter(self)
        pids.extend(w.pid for w in self.workers)
        return out

    monkeypatch.setattr(parallel.Encoders, "__enter__", seen)
    return pids


def _gone(pid: int) -> bool:
    """Reaped: no longer this process's child (a zombie would still be one)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


@pytest.mark.parametrize("workers", [2, 0])
def test_an_encoding_error_is_one_line_naming_the_tensor(workers, sources, tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "SLICE_WEIGHTS", SMALL_SLICES)
    pids = _workers_seen(monkeypatch)

    def fail():
        raise ValueError("planted")

    _fail_in_workers(monkeypatch, fail, here=not workers)
    out = tmp_path / "x.gguf"
    with pytest.raises(parallel.EncodeError) as e:
        export(str(sources["llama"]), out, gguf_recipe("Q8_0"), progress=False, workers=workers)
    where = " (in a worker process)" if workers else ""
    assert str(e.value) == f"{out}: encoding tensor 'blk.1.attn_q.weight' as Q8_0 failed: ValueError: planted{where}"
    assert list(tmp_path.iterdir()) == []
    assert len(pids) == workers and all(map(_gone, pids))


def test_a_dead_worker_fails_the_export_naming_the_tensor(sources, tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "SLICE_WEIGHTS", SMALL_SLICES)
    pids = _workers_seen(monkeypatch)
    _fail_in_workers(monkeypatch, lambda: os._exit(9))
    with pytest.raises(parallel.EncodeError, match=r"encoding tensor 'blk.1.attn_q.weight' as Q8_0 failed: its "
                                                   r"worker process \(pid \d+\) died$"):
        export(str(sources["llama"]), tmp_path / "x.gguf", gguf_recipe("Q8_0"), progress=False, workers=2)
    assert list(tmp_path.iterdir()) == []
    assert len(pids) == 2 and all(map(_gone, pids))


def test_a_spawned_worker_dead_before_its_first_slice_fails_the_export_naming_the_tensor(spawned, sources, tmp_path,
                                                                                       monkeypatch):
    """Its pipe is broken when a slice is handed to it: one line naming that tensor, as when it dies encoding."""
    monkeypatch.setattr(parallel, "SLICE_WEIGHTS", SMALL_SLICES)
    enter, pids = parallel.Encoders.__enter__, []

    def one_killed(self):
        out = enter(self)
        pids.extend(w.pid for w in self.workers)
        self.workers[0].process.kill()
        self.workers[0].process.wait()
        return out

    monkeypatch.setattr(parallel.Encoders, "__enter__", one_killed)
    with pytest.raises(parallel.EncodeError, match=r"encoding tensor '[\w.]+' as Q8_0 failed: its worker process "
                                                   r"\(pid \d+\) died$") as e:
        export(str(sources["llama"]), tmp_path / "x.gguf", gguf_recipe("Q8_0"), progress=False, workers=2)
    assert f"(pid {pids[0]})" in str(e.value)
    assert list(tmp_path.iterdir()) == []
    assert len(pids) == 2 and all(map(_gone, pids))


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_an_interrupted_export_leaves_no_file_and_no_worker(start, sources, tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "start_method", lambda: start)
    monkeypatch.setattr(parallel, "SLICE_WEIGHTS", SMALL_SLICES)
    pids = _workers_seen(monkeypatch)
    to_gguf, seen = names.to_gguf, []

    def interrupted(arch, hf, w, config):
        seen.append(hf)
        if len(seen) == 12:  # workers have slices of earlier tensors queued
            raise KeyboardInterrupt
        return to_gguf(arch, hf, w, config)

    monkeypatch.setattr(names, "to_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(str(sources["llama"]), tmp_path / "x.gguf", gguf_recipe("Q4_K_M"), progress=False, workers=2)
    assert list(tmp_path.iterdir()) == []
    assert len(pids) == 2 and all(map(_gone, pids))


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_workers_end_when_the_export_is_gone(start, tmp_path, monkeypatch):
    """A worker whose pipe closes (the exporting process died) exits by itself."""
    monkeypatch.setattr(parallel, "start_method", lambda: start)
    path = tmp_path / "t.bin"
    encoders = parallel.Encoders(path, 3, 256, path).__enter__()
    ended = (lambda w: os.waitpid(w.pid, os.WNOHANG) != (0, 0)) if start == "fork" else (
        lambda w: w.process.poll() is not None)  # (a spawned one is reaped through its handle)
    try:
        for w in encoders.workers:
            w.conn.close()
        deadline = time.monotonic() + 30  # (a spawned worker first imports mlxq)
        left = list(encoders.workers)
        while left and time.monotonic() < deadline:
            left = [w for w in left if not ended(w)]
            time.sleep(0.01)
        assert left == []
    finally:
        encoders._end(kill=True)


def test_workers_one_per_core_but_none_for_a_small_model_or_one_core(monkeypatch):
    big = parallel.MIN_PARALLEL_WEIGHTS
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert (parallel.worker_count(big), parallel.worker_count(big - 1)) == (2, 0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert parallel.worker_count(10 * big) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert parallel.worker_count(10 * big) == parallel.MAX_WORKERS
    monkeypatch.setattr(parallel.sys, "platform", "darwin")  # no fork after Metal has started: spawned workers,
    assert parallel.start_method() == "spawn"  # which cost a fresh interpreter each: only for a big export
    spawned = parallel.MIN_SPAWNED_WEIGHTS
    assert (parallel.worker_count(spawned), parallel.worker_count(spawned - 1)) == (parallel.MAX_WORKERS, 0)


def test_leaving_without_finish_is_an_error_and_reaps_the_workers(tmp_path):
    """finish() is what waits for the workers' last slices: a file closed without it could miss them."""
    path = tmp_path / "t.bin"
    path.write_bytes(b"")
    with pytest.raises(RuntimeError, match="finish"), parallel.Encoders(path, 2, 256, path) as encoders:
        pids = [w.pid for w in encoders.workers]
        encoders.encode("blk.0.ffn_up.weight", 0, np.ones((8, 256), np.float32), "Q8_0", None)
    assert len(pids) == 2 and all(map(_gone, pids))
