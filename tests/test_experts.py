"""Expert streaming: packs written by `mlxq quantize --stream-experts`, streamed within a memory budget, give
logits bit-identical to the same quantized model with every expert resident (an mlx-lm directory, loaded by the
ordinary stacked-expert path); bad packs and budgets get one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from test_quant import TEXT, add_tokenizer
from tiny import make_tiny

import mlxq
from mlxq.errors import ConfigError, FormatError
from mlxq.experts import ExpertStats, parse_size
from mlxq.experts.pack import open_pack_dir, open_packs
from mlxq.quant import pipeline
from mlxq.quant.recipes import RECIPES

PROMPT = [(7 * i + 3) % 150 + 3 for i in range(40)]  # 40 tokens: the CPU's grouped prompt path
DECODE = [8, 19, 140, 2, 77, 45, 90, 13, 101, 66, 25, 38, 149, 4, 58, 71]  # 16 cached steps
MODELS = ["qwen3_moe", "qwen3_5_moe_text"]  # plain MoE (a dense layer among them) and the hybrid layout


def build(name: str, path: Path) -> Path:
    if name.startswith("qwen3_5"):
        from test_hybrid import make_tiny as make_hybrid

        make_hybrid(name, path)
    else:
        make_tiny(name, path)
    add_tokenizer(path)
    return path


def quantize(src: Path, out: Path, **kw) -> Path:
    pipeline.quantize(str(src), out, RECIPES["experts-2bit"], progress=False, **kw)
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """name -> (source, resident mlx-lm dir, pack dir), built once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            src = build(name, root / "src")
            cache[name] = (src, quantize(src, root / "resident"), quantize(src, root / "packs", stream_experts=True))
        return cache[name]

    return get


def run(model: mlxq.Model) -> np.ndarray:
    """Logits of the prompt, then of 16 cached decode steps: [40 + 16, vocab]."""
    cache = model.make_cache()
    outs = [model.net(mx.array([PROMPT]), cache)[0]]
    for t in DECODE:
        outs.append(model.net(mx.array([[t]]), cache)[0])
    return np.array(mx.concatenate(outs))


def minimum(path: Path, **kw) -> str:
    """The smallest budget the loader accepts, read from its own error."""
    with pytest.raises(ConfigError, match="below the minimum") as e:
        mlxq.load(str(path), expert_memory=1, **kw)
    return re.search(r"minimum ([\d.]+ [KMG]?B)", str(e.value)).group(1).replace(" ", "")


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("name", MODELS)
def test_streamed_logits_are_bit_identical_to_resident(name, made):
    _, resident, packs = made(name)
    want = run(mlxq.load(str(resident)))
    assert np.array_equal(run(mlxq.load(str(packs))), want)  # packs read whole: the ordinary resident path
    budgets = ["100%", "50%", "25%", minimum(packs)]
    for budget in budgets:
        model = mlxq.load(str(packs), expert_memory=budget)
        got = run(model)
        assert np.array_equal(got, want), f"{budget}: max |diff| {np.abs(got - want).max()}"
        stats = model.expert_stats()
        assert stats.tokens == len(PROMPT) + len(DECODE) and stats.misses > 0
        if budget == "100%":  # the prompt fits in one round per layer: it read the next layer ahead
            assert stats.prefetch_reads > 0 and stats.prefetch_hits > 0
    # at the minimum the prompt routes to more experts than fit: the rounds path was taken, and still exact
    pool = model.net.expert_pool
    assert pool.capacity(next(iter(pool.groups))) == model.config.get("num_experts_per_tok", 3)


def test_resident_experts_keep_scales_in_the_compute_dtype(made):
    """Off Metal a dense quantized layer keeps the file's float16 scales (its matmul promotes them exactly, for free),
    but stacked experts take the compute dtype: MLX's CPU `gather_qmm` converts all of a layer's expert scales on
    every call otherwise (a resident 2-bit MoE decoded 3x slower)."""
    from mlxq.loading import default_dtype
    from mlxq.models.moe import QuantizedSwitchLinear

    _, resident, _ = made("qwen3_moe")
    modules = dict(mlxq.load(str(resident)).net.named_modules())
    experts = {m.scales.dtype for m in modules.values() if isinstance(m, QuantizedSwitchLinear)}
    dense = {m.scales.dtype for m in modules.values() if isinstance(m, nn.QuantizedLinear)}
    assert experts == {default_dtype()}
    assert dense == ({mx.float16} if default_dtype() == mx.float32 else {default_dtype()})


@pytest.mark.parametrize("name", MODELS)
def test_reads_ahead_and_fewer_experts_per_token_stay_exact(name, made):
    """Decoding with the next 1 or 3 layers read ahead, at several budgets down to the minimum, gives the resident
    logits."""
    _, resident, packs = made(name)
    want = run(mlxq.load(str(resident)))
    least = minimum(packs)
    for budget in ["100%", "25%", 2 * parse_size(least), least]:
        for depth in (1, 3):
            model = mlxq.load(str(packs), expert_memory=budget, expert_options={"prefetch": depth, "threads": 2})
            got = run(model)
            assert np.array_equal(got, want), f"{budget}, {depth} ahead: max |diff| {np.abs(got - want).max()}"
            if budget == "25%":
                assert model.expert_stats().prefetch_hits > 0
    want = run(mlxq.load(str(resident), experts_per_tok=1))
    smallest = minimum(packs, experts_per_tok=1)  # one expert a token: the minimum is one expert's slot
    assert np.array_equal(run(mlxq.load(str(packs), expert_memory=smallest, experts_per_tok=1)), want)


def test_a_layer_waits_for_reads_ahead_that_hold_the_slots_it_needs(made):
    """Reads ahead not yet done hold their slots; a layer that needs those slots lets them land first (never two
    reads into one slot), then its own experts are there, byte for byte."""
    _, _, packs = made("qwen3_moe")
    model = mlxq.load(str(packs), expert_memory=minimum(packs), expert_options={"threads": 0})  # no readers
    pool = model.net.expert_pool
    first, second = sorted(pool.tables)[:2]
    cap = pool.capacity(first)
    ahead = pool.request(first, np.arange(cap), prefetch=True)  # every slot, queued, none run
    assert len(pool.groups[first].loading) == cap and not any(f.done() for f in ahead)
    pool.wait(second, pool.request(second, np.arange(1, cap + 1)))  # needs every slot
    assert all(f.done() for f in ahead) and (pool.tables[first] < 0).all()
    have = pool.experts(second).down_proj.weight
    whole = open_pack_dir(packs).read_layer(second)["down_proj.weight"]
    for e in range(1, cap + 1):
        assert np.array_equal(np.array(have[int(pool.tables[second][e])]), np.array(whole[e]))


@pytest.mark.parametrize("name", MODELS)
def test_coactivation_order_renumbers_experts_without_changing_the_output(name, made, tmp_path, monkeypatch):
    src, resident, packs = made(name)
    monkeypatch.setenv("MLXQ_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    ordered = quantize(src, tmp_path / "coact", stream_experts=True, order="coactivation", calibrate=str(text),
                       calib_tokens=512, method="rtn")
    cfg = json.loads((ordered / "config.json").read_text())
    layers = open_packs(ordered, cfg).layers
    perms = {lp.layer: lp.permutation for lp in layers.values()}
    assert all(sorted(p) == list(range(8)) for p in perms.values())
    assert any(p != list(range(8)) for p in perms.values())
    # the router's rows moved with the experts (same codes: RTN either way)
    plain, coact = mx.load(str(resident / "model.safetensors")), mx.load(str(ordered / "model.safetensors"))
    for layer, perm in perms.items():
        key = next(k for k in plain if k.endswith(f"layers.{layer}.mlp.gate.weight"))
        assert mx.array_equal(coact[key], plain[key][mx.array(perm)])
    # streamed at every budget == the same (renumbered) model resident, bit for bit
    want = run(mlxq.load(str(ordered)))
    for budget in ["50%", "25%", minimum(ordered)]:
        assert np.array_equal(run(mlxq.load(str(ordered), expert_memory=budget)), want), budget
    # and the renumbered model is the original one: same experts chosen, logits equal up to float summation order
    original = run(mlxq.load(str(resident)))
    assert np.abs(want - original).max() <= 1e-5 * np.abs(original).max()
    assert np.array_equal(want.argmax(-1), original.argmax(-1))


def test_statistics_add_up(made):
    _, _, packs = made("qwen3_moe")
    model = mlxq.load(str(packs), expert_memory="50%")
    run(model)
    stats, pool = model.expert_stats(), model.net.expert_pool
    stride = next(iter(pool.packs.layers.values())).stride
    assert stats.bytes_read == (stats.misses + stats.prefetch_reads) * stride  # each expert read once, whole
    # one read per missing expert at most, each whole blocks: the prompt's rounds read neighbouring experts together
    assert 0 < stats.reads < stats.misses
    assert stats.hits + stats.misses >= 2 * (len(DECODE) + 1)  # at least top-k... per MoE layer and step
    assert len(pool.steps) == len(DECODE)  # one entry per finished forward pass
    # reading ahead while decoding: the bytes read for experts never computed with are counted apart
    ahead = mlxq.load(str(packs), expert_memory="50%", expert_options={"prefetch": 2})
    run(ahead)
    stats = ahead.expert_stats()
    wasted = (stats.prefetch_reads - stats.prefetch_hits) * stride
    assert stats.prefetch_reads > stats.prefetch_hits > 0 and stats.as_dict()["bytes_wasted"] == wasted
    assert stats.as_dict()["used_read_gb_per_s"] * stats.bytes_read == pytest.approx(
        stats.as_dict()["read_gb_per_s"] * (stats.bytes_read - wasted))
    # a window whose reads ahead were made before it (the prompt's) and used in it: never more used than read
    assert ExpertStats(misses=2, prefetch_reads=1, prefetch_hits=3, bytes_read=300).as_dict()["bytes_wasted"] == 0
    assert sum(s["misses"] for s in pool.steps) <= stats.misses
    d = stats.as_dict()
    assert 0 < d["hit_rate"] < 1 and d["bytes_per_token"] == stats.bytes_read / stats.tokens


def test_api_timings_carry_the_run_s_expert_counters(made):
    _, resident, packs = made("qwen3_moe")
    model = mlxq.load(str(packs), expert_memory="50%")
    result = model.generate("the fox", max_tokens=5)
    experts = result.timings.experts
    assert experts["tokens"] >= len(model.encode_prompt("the fox")) + len(result.tokens) - 1  # prompt + decode steps
    assert experts["hits"] + experts["misses"] > 0 and experts["bytes_read"] == model.expert_stats().bytes_read
    assert mlxq.load(str(resident)).generate("the fox", max_tokens=2).timings.experts is None


def test_logits_on_the_caller_s_thread_then_generate_on_the_engine_s(made):
    """The pool's graph over its slots is built on the caller's thread; the engine runs on its own (MLX streams are
    per thread), so nothing lazy may be left for it to evaluate."""
    _, resident, packs = made("qwen3_moe")
    streamed, dense = mlxq.load(str(packs), expert_memory="30%"), mlxq.load(str(resident))
    prompt = [3, 4, 5, 6, 7]
    logits = streamed.logits(prompt)  # not read yet: generating comes first
    assert streamed.generate(prompt, max_tokens=4).tokens == dense.generate(prompt, max_tokens=4).tokens
    np.testing.assert_array_equal(np.array(logits), np.array(dense.logits(prompt)))


def test_a_rank_s_share_of_the_packs_reads_only_its_own_experts(made):
    """What a rank of an experts split opens (`Packs.share`): its experts, numbered from 0, read from their own
    blocks; errors still name the model's expert. A tensor split, which would need parts of every expert, says so."""
    from types import SimpleNamespace

    from mlxq.distributed.split import make_split
    from mlxq.errors import UnsupportedModel
    from mlxq.experts.pack import open_pack_dir
    from mlxq.formats import open_checkpoint
    from mlxq.models import text_config

    _, _, path = made("qwen3_moe")
    packs = open_pack_dir(path)
    layer = min(packs.layers)
    part = packs.share({layer: (3, 6)})
    assert list(part.layers) == [layer] and part.layers[layer].n_experts == 3
    whole, mine = packs.read_layer(layer), part.read_layer(layer)
    assert all(mx.array_equal(mine[name], arr[3:6]) for name, arr in whole.items())
    with pytest.raises(FormatError, match=f"layer {layer} expert 4: short read"):
        part.layers[layer].check_block(part.path(part.layers[layer]), 1, b"")
    ckpt = open_checkpoint(str(path))
    tensor = make_split("tensor", text_config(ckpt.config), ckpt.tensors.infos(), 0, 2)
    with pytest.raises(UnsupportedModel, match="expert packs stream under --parallel experts or pipeline"):
        tensor.stream_share([SimpleNamespace(layer=layer)], packs)


def test_parse_size():
    assert parse_size("8GB") == 8_000_000_000 and parse_size("512MiB") == 512 << 20 and parse_size(1234) == 1234
    assert parse_size("25%", 1000) == 250
    with pytest.raises(ConfigError, match="expected a size"):
        parse_size("lots")


# ------------------------------------------------------------------------------------------------ bad input
def test_budget_below_the_minimum_says_the_minimum(made):
    _, _, packs = made("qwen3_moe")
    with pytest.raises(ConfigError, match=r"expert memory 1\.0 KB is below the minimum [\d.]+ KB: one layer's step "
                                          r"routes to 3 experts"):
        mlxq.load(str(packs), expert_memory="1KB")


def test_expert_memory_needs_packs(made):
    _, resident, _ = made("qwen3_moe")
    with pytest.raises(ConfigError, match="needs expert packs"):
        mlxq.load(str(resident), expert_memory="1GB")


def copy_dir(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_flipped_byte_names_layer_and_expert(made, tmp_path):
    _, _, packs = made("qwen3_moe")
    bad = copy_dir(packs, tmp_path / "bad")
    lp = open_packs(bad, json.loads((bad / "config.json").read_text())).layers[2]
    f = bad / "experts" / lp.file
    data = bytearray(f.read_bytes())
    data[lp.experts[5].offset + 100] ^= 0x40
    f.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"layer-002\.pack: layer 2 expert 5: checksum mismatch") as e:
        run(mlxq.load(str(bad), expert_memory="100%"))  # every expert gets read
    assert "\n" not in str(e.value)
    with pytest.raises(FormatError, match=r"layer 2 expert 5: checksum mismatch"):
        mlxq.load(str(bad))  # all resident: checked as they are read


def test_truncated_pack_names_layer_and_expert(made, tmp_path):
    _, _, packs = made("qwen3_moe")
    bad = copy_dir(packs, tmp_path / "bad")
    f = bad / "experts" / "layer-000.pack"
    f.write_bytes(f.read_bytes()[: 16384 * 6 + 100])
    with pytest.raises(FormatError, match=r"layer-000\.pack: layer 0 expert 6: pack is \d+ bytes.*truncated"):
        mlxq.load(str(bad), expert_memory="50%")


def test_short_read_after_opening_names_layer_and_expert(made, tmp_path):
    _, _, packs = made("qwen3_moe")
    bad = copy_dir(packs, tmp_path / "bad")
    model = mlxq.load(str(bad), expert_memory="100%")
    f = bad / "experts" / "layer-002.pack"
    f.write_bytes(f.read_bytes()[:16384])  # cut while the model holds the file open
    with pytest.raises(FormatError, match=r"layer 2 expert [1-7]: short read"):
        run(model)


def test_manifest_of_another_model(made, tmp_path):
    _, _, packs = made("qwen3_moe")
    other = quantize(made("qwen3_moe")[0], tmp_path / "other", stream_experts=True)  # same shapes, another id
    bad = copy_dir(packs, tmp_path / "bad")
    (bad / "experts" / "manifest.json").write_bytes((other / "experts" / "manifest.json").read_bytes())
    with pytest.raises(FormatError, match="belong to another model"):
        mlxq.load(str(bad), expert_memory="50%")
    hybrid_packs = made("qwen3_5_moe_text")[2]
    cfg = json.loads((bad / "config.json").read_text())
    cfg["mlxq_experts"] = json.loads((hybrid_packs / "config.json").read_text())["mlxq_experts"]
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "experts").rename(tmp_path / "gone")
    copy_dir(hybrid_packs / "experts", bad / "experts")
    with pytest.raises(FormatError, match=r"layers\.1\.mlp.*not a MoE block in this model \(packs of another"):
        mlxq.load(str(bad), expert_memory="50%")


# ------------------------------------------------------------------------------------------------ reads
def test_macos_path_sets_f_nocache_on_every_pack_and_streams_exactly(made, monkeypatch):
    """The macOS path (no O_DIRECT; F_NOCACHE through fcntl) taken on Linux with fcntl mocked: it has never run on
    a Mac. Every pack's descriptor gets F_NOCACHE = 1 (Darwin's value 48 where the fcntl module lacks the name),
    the reader counts as bypassing the cache, and the streamed logits stay bit-identical."""
    from mlxq.experts import io

    _, resident, packs = made("qwen3_moe")
    calls = []
    fake = types.ModuleType("fcntl")
    fake.fcntl = lambda fd, cmd, arg: calls.append((fd, cmd, arg))
    monkeypatch.setitem(sys.modules, "fcntl", fake)
    monkeypatch.setattr(io, "MACOS", True)
    monkeypatch.delattr(io.os, "O_DIRECT", raising=False)
    model = mlxq.load(str(packs), expert_memory="25%")
    reader = model.net.expert_pool.reader
    assert sorted(calls) == sorted((fd, 48, 1) for fd in reader.fds.values()) and len(calls) == 2
    assert reader.direct
    assert np.array_equal(run(model), run(mlxq.load(str(resident))))


def test_burst_rate_reads_through_the_runtime_reader(made):
    """The decode-pattern probe: bursts of whole expert blocks (checked as the runtime checks them), counted."""
    from mlxq.experts.io import measure_burst_rate

    packs = open_pack_dir(made("qwen3_moe")[2])
    stride = next(iter(packs.layers.values())).stride
    got = measure_burst_rate(packs, batch=2.5, gap_s=0.001, threads=1, seconds=0.2)
    assert got["reads"] > 0 and got["bytes"] % stride == 0 and got["bytes"] >= got["reads"] * stride
    assert got["gb_per_s"] > 0 and (got["batch"], got["gap_s"]) == (2.5, 0.001)
    assert measure_burst_rate(packs, batch=0, gap_s=0.0, threads=1, seconds=0.05)["reads"] == 0


def test_read_rate_splits_into_size_reads_in_flight_and_time_a_read(monkeypatch):
    """rate = bytes a read x reads in flight / time a read: two overlapping reads on a fake clock."""
    from mlxq.experts import io

    clock = iter([0.0, 1.0, 2.0, 4.0])
    monkeypatch.setattr(io.time, "perf_counter", lambda: next(clock))
    c = io.IOCounters()
    a = c.start()  # t=0
    b = c.start()  # t=1
    c.done(a, 100)  # t=2: a took 2
    c.done(b, 100)  # t=4: b took 3; busy 0..4
    got = io._rate(c, threads=2, direct=True, read_bytes=100)
    assert (got["seconds"], got["ms_per_read"], got["reads_in_flight"]) == (4.0, 2500.0, 1.25)
    assert got["gb_per_s"] * 1e9 == pytest.approx(100 * got["reads_in_flight"] / (got["ms_per_read"] / 1e3))
    stats = ExpertStats(reads=2, bytes_read=200, read_s=4.0, read_sum_s=5.0).as_dict()
    assert (stats["ms_per_read"], stats["reads_in_flight"]) == (2500.0, 1.25)


def test_waiting_thread_does_the_reads_still_queued_behind_a_busy_reader(made):
    """finish: while the only reader thread is busy with one read, the thread waiting for both reads does the one
    still queued itself (the queued read is not left for the busy reader: one read more in flight)."""
    import threading

    from mlxq.experts.io import PackReader, finish

    packs = open_pack_dir(made("qwen3_moe")[2])
    reader = PackReader(packs, threads=1)
    started, release, ran_on = threading.Event(), threading.Event(), {}

    def first(p, payload):
        started.set()
        release.wait(5.0)  # held until the second read has run (or, with the bug, 5 s: then it runs here, after)

    def second(p, payload):
        ran_on["second"] = threading.current_thread().name
        release.set()

    try:
        one = reader.submit(0, 0, 1, first)
        assert started.wait(5.0)
        two = reader.submit(0, 1, 1, second)
        finish([one, two])
        assert ran_on["second"] == threading.current_thread().name and one.done() and two.done()
        assert reader.io.snapshot()[:2] == (2, 2 * packs.layers[0].stride)
    finally:
        release.set()
        reader.close()


def test_rate_probes_read_runs_of_adjacent_experts_as_one_larger_read(made):
    """span: each read is that many adjacent experts (the bench's probe at a larger model's expert size)."""
    from mlxq.experts.io import measure_burst_rate, measure_read_rate

    packs = open_pack_dir(made("qwen3_moe")[2])
    stride = next(iter(packs.layers.values())).stride
    for got in (measure_read_rate(packs, threads=1, seconds=0.1, span=3),
                measure_burst_rate(packs, batch=1.5, gap_s=0.0, threads=1, seconds=0.1, span=3)):
        assert got["read_bytes"] == 3 * stride and got["reads"] > 0 and got["bytes"] == got["reads"] * 3 * stride
        assert 0 < got["reads_in_flight"] <= got["threads"] + 1 + 1e-9  # (the burst: its waiting thread reads too)


def _smaps_entry(view: memoryview) -> dict[str, str]:
    """/proc/self/smaps' fields of the mapping that holds `view`'s first byte."""
    import ctypes

    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    entry: dict[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if entry is not None:
                break
            if lo <= address < hi:
                entry = {}
        elif entry is not None:
            key, _, value = line.partition(":")
            entry[key] = value.strip()
    assert entry is not None
    return entry


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge-page staging is Linux's (/proc/self/smaps)")
def test_staging_buffers_from_a_huge_page_up_are_private_memory_marked_for_huge_pages():
    """A read of a huge page or more lands in memory the kernel may back with huge pages, so that the block layer sends
    it as one request (not one per max_segments 4 KiB pages): private anonymous memory (a shared mapping is shmem,
    which huge pages for anonymous memory do not cover), huge-page aligned, marked for huge pages, and counted in
    whole huge pages; a smaller read keeps a 4 KiB-page buffer of its own size."""
    import ctypes

    from mlxq.experts.io import HUGE_PAGE, staging, staging_bytes

    big, small = staging(HUGE_PAGE + 16384), staging(65536)
    big[:] = b"\1" * len(big)
    small[:] = b"\1" * len(small)
    assert (len(big), len(small)) == (HUGE_PAGE + 16384, 65536)
    assert (staging_bytes(len(big)), staging_bytes(len(small))) == (2 * HUGE_PAGE, 65536)
    assert ctypes.addressof(ctypes.c_char.from_buffer(big)) % HUGE_PAGE == 0
    assert ctypes.addressof(ctypes.c_char.from_buffer(small)) % 4096 == 0
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()  # (a kernel built without: plain pages)
    flags = _smaps_entry(big)["VmFlags"].split()
    assert ("hg" in flags) == thp and "sh" not in flags
    assert int(_smaps_entry(big)["Anonymous"].split()[0]) > 0  # (shmem counts none)
    assert "hg" not in _smaps_entry(small)["VmFlags"].split()


def test_staging_held_between_reads_counts_whole_huge_pages(made):
    from mlxq.experts.io import HUGE_PAGE, PackReader, staging_bytes

    reader = PackReader(open_pack_dir(made("qwen3_moe")[2]), threads=2, keep=HUGE_PAGE + 1)
    try:
        assert reader.held_bound == 3 * staging_bytes(HUGE_PAGE + 1) >= 3 * (HUGE_PAGE + 1)
        if sys.platform.startswith("linux"):
            assert reader.held_bound == 3 * 2 * HUGE_PAGE
    finally:
        reader.close()


def test_the_ceiling_and_the_runtime_read_into_the_same_staging_buffers(made, monkeypatch):
    """The ceiling probe makes the device requests the runtime makes: both read into `staging` buffers (whose pages
    decide how many requests a read becomes)."""
    from mlxq.experts import io

    packs = open_pack_dir(made("qwen3_moe")[2])
    stride = next(iter(packs.layers.values())).stride
    sizes, real = [], io.staging
    monkeypatch.setattr(io, "staging", lambda size: sizes.append(size) or real(size))
    io.measure_read_rate(packs, threads=1, seconds=0.05, span=2)
    assert sizes == [2 * stride]
    sizes.clear()
    reader = io.PackReader(packs, threads=1)  # keeps up to one expert: a read of two is a buffer of its own
    try:
        io.finish([reader.submit(0, 0, 1, lambda p, payload: None)])
        io.finish([reader.submit(0, 2, 2, lambda p, payload: None)])
    finally:
        reader.close()
    assert sizes == [stride, 2 * stride]


# ------------------------------------------------------------------------------------------------ command line
def mlxq_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlxq.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_quantize_inspect_generate_bench(made, tmp_path):
    src, _, _ = made("qwen3_moe")
    out = tmp_path / "packs"
    done = mlxq_cli("quantize", str(src), "-o", str(out), "--recipe", "experts-2bit", "--stream-experts")
    assert done.returncode == 0, done.stderr
    shown = mlxq_cli("inspect", str(out)).stdout
    assert "expert packs  experts/: 2 layers (0..2) x 8 experts, order identity" in shown
    assert "block layout  gate_proj.weight uint32[32, 4] @0;" in shown
    gen = mlxq_cli("generate", "--raw", "-m", str(out), "--expert-memory", "40%", "-n", "6", "-v", "fox")
    assert gen.returncode == 0, gen.stderr
    assert re.search(r"\[experts: \d+ hits, \d+ misses \([\d.]+% hit\)", gen.stderr), gen.stderr
    io = mlxq_cli("bench", "--io", str(out), "--seconds", "0.3", "--json")
    assert io.returncode == 0, io.stderr
    figures = json.loads(io.stdout.splitlines()[-1])
    assert figures["reads"] > 0 and figures["gb_per_s"] > 0 and figures["read_bytes"] == 16384


class _Loaded(Exception):
    """Raised by a stand-in loader: the command got as far as loading, with these arguments."""


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "bench"])
def test_expert_prefetch_flag_reaches_the_loader(command, monkeypatch):
    from click.testing import CliRunner

    import mlxq.bench.runtime
    import mlxq.cli
    import server.command
    from mlxq.cli import cli

    seen = {}

    def load_for_cli(*args, **kw):
        seen.update(kw)
        raise _Loaded

    def bench_run(model, vs, prompt_tokens, gen_tokens, runs, load, **kw):
        seen.update(load)
        raise _Loaded

    monkeypatch.setattr(mlxq.cli, "load_for_cli", load_for_cli)
    monkeypatch.setattr(server.command, "load_for_cli", load_for_cli)
    monkeypatch.setattr(mlxq.bench.runtime, "run", bench_run)
    args = {"generate": ["generate", "fox", "-m", "M"], "chat": ["chat", "-m", "M"], "serve": ["serve", "M", "--port",
            "0"], "bench": ["bench", "M"]}[command]
    done = CliRunner().invoke(cli, [*args, "--expert-memory", "25%", "--expert-prefetch", "3"])
    assert isinstance(done.exception, _Loaded), done.output
    got = seen.get("expert_options") if command == "bench" else mlxq.cli.stream_options(seen.get("expert_prefetch"))
    assert got == {"prefetch": 3} and seen["expert_memory"] == "25%"


def test_load_for_cli_streams_with_the_prefetch_asked_for(made):
    from mlxq.cli import load_for_cli

    _, _, packs = made("qwen3_moe")
    model = load_for_cli(str(packs), False, None, None, 32323, 15.0, expert_memory="40%", expert_prefetch=2)
    assert model.net.expert_pool.prefetch == 2
    assert load_for_cli(str(packs), False, None, None, 32323, 15.0, expert_memory="40%").net.expert_pool.prefetch == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--raw", "-m", "{good}", "--expert-prefetch", "1", "fox"], "give --expert-memory too"),
        (["generate", "--raw", "-m", "{bad}", "--expert-memory", "100%", "fox"], "layer 0 expert 1: checksum mismatch"),
        (["generate", "--raw", "-m", "{good}", "--expert-memory", "2KB", "fox"], "below the minimum"),
        (["generate", "--raw", "-m", "{resident}", "--expert-memory", "1GB", "fox"], "needs expert packs"),
        (["quantize", "{src}", "-o", "{new}", "--order", "coactivation"], "needs --stream-experts"),
        (["bench", "--io", "{resident}"], "no expert packs"),
    ],
)
def test_cli_errors_are_one_line(args, message, made, tmp_path):
    src, resident, packs = made("qwen3_moe")
    bad = copy_dir(packs, tmp_path / "bad")
    f = bad / "experts" / "layer-000.pack"
    data = bytearray(f.read_bytes())
    data[16384 + 7] ^= 1
    f.write_bytes(bytes(data))
    paths = {"bad": bad, "good": packs, "resident": resident, "src": src, "new": tmp_path / "new"}
    done = mlxq_cli(*[a.format(**paths) for a in args])
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("mlxq: error:")]
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------------------ real weights
def write_checkpoint(path: Path, config: dict, tensors: dict) -> Path:
    """An HF directory of float16 tensors (name -> lazy array), written one tensor at a time."""
    from mlxq.quant.writer import OutTensor, ShardWriter

    path.mkdir()
    writer = ShardWriter(path, [OutTensor(n, tuple(a.shape), mx.float16) for n, a in tensors.items()])
    for name, a in tensors.items():
        writer.write(name, a.astype(mx.float16))
    writer.close()
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.slow
def test_smollm2_upcycled_to_moe_and_streamed_gives_the_dense_logits(smollm2_gguf, tmp_path):
    """SmolLM2-135M as a Mixtral whose 4 experts are copies of each layer's MLP, the router all zeros (uniform: the
    top 2 get weight 0.5 each). Quantized 8-bit and streamed from packs at a quarter of the experts' memory, it
    gives the 8-bit dense model's logits (up to float rounding: the dense MLP and the experts use different
    kernels; off Metal the dense prompt dequantizes and runs one BLAS matmul, the experts run gather_qmm, about
    1e-5 of the largest logit apart; a wrong byte, scale or expert in a slot is orders of magnitude more)."""
    from mlxq.formats import open_checkpoint
    from mlxq.loading import load_model
    from mlxq.quant.recipes import uniform

    ckpt = open_checkpoint(str(smollm2_gguf))
    config = {k: v for k, v in ckpt.config.items() if isinstance(v, int | float | str | bool)}
    dense = {n: ckpt.tensors[n] for n in ckpt.tensors}
    moe = {}
    for name, w in dense.items():
        if ".mlp." not in name:
            moe[name] = w
            continue
        prefix, proj = name.split(".mlp.")
        mixtral_name = {"gate_proj.weight": "w1", "down_proj.weight": "w2", "up_proj.weight": "w3"}[proj]
        for e in range(4):
            moe[f"{prefix}.block_sparse_moe.experts.{e}.{mixtral_name}.weight"] = w
        moe.setdefault(f"{prefix}.block_sparse_moe.gate.weight", mx.zeros((4, config["hidden_size"])))
    dense_src = write_checkpoint(tmp_path / "dense", config, dense)
    moe_src = write_checkpoint(tmp_path / "moe", {**config, "model_type": "mixtral", "num_local_experts": 4,
                                                  "num_experts_per_tok": 2}, moe)
    pipeline.quantize(str(dense_src), tmp_path / "dense-q8", uniform(8), progress=False)
    pipeline.quantize(str(moe_src), tmp_path / "moe-q8", uniform(8), progress=False, stream_experts=True)

    def logits(net) -> np.ndarray:
        cache = net.make_cache()
        outs = [net(mx.array([PROMPT]), cache)[0]] + [net(mx.array([[t]]), cache)[0] for t in DECODE]
        return np.array(mx.concatenate(outs))

    want = logits(load_model(open_checkpoint(str(tmp_path / "dense-q8"))))
    streamed = load_model(open_checkpoint(str(tmp_path / "moe-q8")), expert_memory="25%")
    got = logits(streamed)
    diff = np.abs(got - want).max() / np.abs(want).max()
    print(f"up-cycled MoE streamed vs dense 8-bit: max relative difference {diff:.2e}, "
          f"bit-identical: {np.array_equal(got, want)}; {streamed.expert_pool.snapshot().summary()}")
    assert diff < 1e-4
    assert np.array_equal(got.argmax(-1), want.argmax(-1))
    assert streamed.expert_pool.snapshot().misses > 0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["layers"]["0"].update(stride=1000), "is not a 16384-aligned layout"),
        (lambda m: m["layers"]["0"]["experts"][3].__setitem__(0, 7), "layer 0 expert 3: offset 7"),
        (lambda m: m["layers"]["0"]["tensors"][0].update(shape=[-1, 4]), "tensor 'gate_proj.weight'"),
        (lambda m: m["layers"]["0"]["quantization"]["up_proj"].update(bits=7), "up_proj quantization"),
        (lambda m: m.update(layers=[1, 2]), "malformed layer entry"),
        (lambda m: m.update(version=9), "not an mlxq expert pack manifest"),
    ],
)
def test_malformed_manifest_is_one_line(edit, message, made, tmp_path):
    _, _, packs = made("qwen3_moe")
    bad = copy_dir(packs, tmp_path / "bad")
    path = bad / "experts" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match=re.escape(message)) as e:
        mlxq.load(str(bad), expert_memory="50%")
    assert "\n" not in str(e.value)


def test_expert_prefetch_reaches_every_rank_of_a_group(monkeypatch):
    """--hosts: rank 0 loads with the options and hands them to the other ranks' workers, which load with the same."""
    import mlx.core
    from click.testing import CliRunner

    import mlxq.distributed.group
    import mlxq.distributed.launch as launch
    from mlxq.distributed import worker

    seen = {}

    class FakeLaunch:
        def __init__(self, hosts_path, worker_args, ring_port):
            seen["worker_args"] = worker_args

        def group(self):
            return None

    def load_group(name, group, **kw):
        seen["rank0"] = kw["expert_options"]
        raise _Loaded

    monkeypatch.setattr(launch, "Launch", FakeLaunch)
    monkeypatch.setattr(mlxq.distributed.group, "load_group", load_group)
    with pytest.raises(_Loaded):
        launch.load_on_hosts("M", "hosts.json", None, expert_memory="25%", expert_options={"prefetch": 2})
    assert seen["rank0"] == {"prefetch": 2}

    def load(name, **kw):
        seen["rank"] = kw["expert_options"]
        raise _Loaded

    monkeypatch.setattr(mlx.core.distributed, "init", lambda **kw: None)
    monkeypatch.setattr(mlxq, "load", load)
    done = CliRunner().invoke(worker.main, seen["worker_args"])
    assert isinstance(done.exception, _Loaded), done.output
    assert seen["rank"] == {"prefetch": 2}
