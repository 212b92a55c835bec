"""Every Metal kernel of mlxq (ternary, DeltaNet, K-quants) and the CUDA twins, proved on Linux: MLX's exact
source for its launches (a), a clean clang compile against the Metal subset (b), and emulated execution equal to
the pure-MLX reference (c) — bit-exact where the arithmetic is integer, within 1e-5 relative in float32 — under
several thread schedules, on ragged shapes (rows and columns that are not multiples of the tiles, one token and
many)."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from harness import SCHEDULES, clang_check, emulate, exported_source, mlx_source

from mlxq.kernels import deltanet, kquants, kquants_metal, ternary

RNG = np.random.default_rng(0)


def rel(a, b) -> float:
    b = np.asarray(b)
    return float(np.abs(np.asarray(a) - b).max() / max(np.abs(b).max(), 1e-30))


# ------------------------------------------------------------------------------------------------ ternary
def ternary_case(m, n, k, packing, integer, per_tensor, seed=0):
    rng = np.random.default_rng(seed)
    codes = mx.array(rng.integers(-1, 2, (n, k)).astype(np.int8))
    scales = mx.array(rng.uniform(0.5, 2.0, (1 if per_tensor else n,)).astype(np.float32))
    w = ternary.TernaryWeight(ternary.pack(codes, packing), scales, k, packing)
    x = mx.array(rng.normal(size=(m, k)).astype(np.float32))
    x_scale = None
    if integer:
        x, x_scale = ternary.quantize_activations(x)
    launch = ternary.launch(x, w, None if x_scale is None else x_scale.reshape(-1))
    return launch, ternary.reference_matmul(x, w, x_scale)


TERNARY_SHAPES = [(1, 37, 300), (5, 8, 256), (40, 33, 300)]  # GEMV one token, GEMV a few, GEMM ragged tiles


@pytest.mark.parametrize("packing", ["tq2", "tq1"])
@pytest.mark.parametrize("integer", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize("mnk", TERNARY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ternary_matches_reference(mnk, packing, integer):
    for per_tensor in (False, True):
        launch, want = ternary_case(*mnk, packing, integer, per_tensor)
        assert launch.kernel.name == ("ternary_gemv" if mnk[0] <= ternary.GEMV_MAX_TOKENS else "ternary_gemm")
        got = emulate(launch, SCHEDULES[2])[0]
        if integer:
            assert (got == np.asarray(want)).all()  # integer sums: bit-exact
        else:
            assert rel(got, want) <= 1e-5


@pytest.mark.parametrize("packing", ["tq2", "tq1"])
def test_ternary_cuda_twin_matches_reference(packing):
    """The CUDA twin of the GEMV (metal/ternary.cu), run by the same emulator (warps as simdgroups)."""
    for m, integer in ((1, True), (5, False)):
        launch, want = ternary_case(m, 37, 300, packing, integer, not integer)
        cuda = ternary.launch(launch.inputs[2], ternary.TernaryWeight(launch.inputs[0], launch.inputs[1], 300, packing),
                              launch.inputs[3] if integer else None, cuda=True)
        for schedule in SCHEDULES[:3]:
            got = emulate(cuda, schedule)[0]
            assert (got == np.asarray(want)).all() if integer else rel(got, want) <= 1e-5


@pytest.mark.parametrize("mnk", [TERNARY_SHAPES[0], TERNARY_SHAPES[2]], ids=["gemv", "gemm"])
def test_ternary_schedule_independent(mnk):
    launch, want = ternary_case(*mnk, "tq1", True, False, seed=1)
    for schedule in SCHEDULES:
        assert (emulate(launch, schedule)[0] == np.asarray(want)).all(), schedule


def test_ternary_gemm_without_its_barrier_fails():
    """The planted bug: drop the barrier that ends each half block; the next half's loads then overwrite
    activations other threads are still reading, and some schedule shows it."""
    launch, want = ternary_case(40, 33, 300, "tq2", True, False)
    source = launch.kernel.source
    last = source.rindex("threadgroup_barrier(mem_flags::mem_threadgroup);")
    broken = dataclasses.replace(launch, kernel=dataclasses.replace(
        launch.kernel, source=source[:last] + source[last:].replace("threadgroup_barrier(mem_flags::mem_threadgroup);",
                                                                     "", 1)))
    assert any((emulate(broken, s)[0] != np.asarray(want)).any() for s in SCHEDULES)


# ----------------------------------------------------------------------------------------------- deltanet
def deltanet_case(B, T, Hk, Hv, Dk, Dv, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: mx.array(rng.normal(size=s).astype(np.float32))  # noqa: E731
    q, k = f(B, T, Hk, Dk), f(B, T, Hk, Dk)
    q, k = (a / mx.linalg.norm(a, axis=-1, keepdims=True) for a in (q, k))
    v, g, beta, state = f(B, T, Hv, Dv), -mx.abs(f(B, T, Hv)), mx.sigmoid(f(B, T, Hv)), f(B, Hv, Dv, Dk)
    return deltanet.step_launch(q, k, v, g, beta, state), deltanet.recurrent_gated_delta_rule(q, k, v, g, beta, state)


@pytest.mark.parametrize("shape", [(1, 1, 2, 4, 16, 8), (2, 3, 1, 2, 40, 6), (1, 1, 1, 1, 128, 128)],
                         ids=["tiny-decode", "ragged-3tok", "qwen35-head"])
def test_deltanet_step_matches_reference(shape):
    launch, (y_ref, s_ref) = deltanet_case(*shape)
    for schedule in SCHEDULES[:2] if shape[4] == 128 else SCHEDULES:
        y, state = emulate(launch, schedule)
        assert rel(y, y_ref) <= 1e-5 and rel(state, s_ref) <= 1e-5, schedule


# ---------------------------------------------------------------------------------------------- K-quants
# where each block keeps its float16 scales
GGUF_D_BYTES = {"Q6_K": [208], "Q3_K": [108], "Q2_K": [80, 82], "IQ4_XS": [0], "IQ2_XXS": [0], "IQ2_XS": [0],
                "IQ2_S": [0]}


def kquant_blocks(kind: str, n: int, k: int, experts: int | None = None, seed: int = 0) -> mx.array:
    """Random blocks (every byte pattern is a valid block) with sane float16 super-block scales."""
    rng = np.random.default_rng(seed)
    size = kquants.BLOCK_SIZES[kind][1]
    shape = (*(() if experts is None else (experts,)), n, k // 256, size)
    b = rng.integers(0, 256, shape, dtype=np.uint8)
    for at in GGUF_D_BYTES[kind]:
        b[..., at : at + 2] = rng.uniform(0.001, 0.05, shape[:-1]).astype(np.float16).view(np.uint8).reshape(
            *shape[:-1], 2)
    return mx.array(b.reshape(*shape[:-2], -1))


@pytest.mark.parametrize("kind", sorted(kquants_metal.TYPES))
def test_kquant_dequantization_is_ggufs(kind):
    """Through the GEMM with x = I, y = W^T exactly (one product per sum): bit-exact with gguf-py."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    blocks = kquant_blocks(kind, 37, 256)
    got = emulate(kquants_metal.gemm_launch(mx.eye(256), blocks, kind))[0]
    assert (got.T == dequantize(np.asarray(blocks), GGMLQuantizationType[kind])).all()


@pytest.mark.parametrize("kind", sorted(kquants_metal.TYPES))
@pytest.mark.parametrize("m", [1, 5, 40])
def test_kquant_matmul_matches_reference(kind, m):
    blocks = kquant_blocks(kind, 37, 512, seed=m)
    x = mx.array(np.random.default_rng(m).normal(size=(m, 512)).astype(np.float32))
    want = kquants.matmul(x, blocks, kind, backend="reference")
    launch = (kquants_metal.gemv_launch(x, blocks, kind, mx.zeros((m,), mx.int32)) if m <= 8
              else kquants_metal.gemm_launch(x, blocks, kind))
    for schedule in SCHEDULES if m == 40 else SCHEDULES[1:3]:
        assert rel(emulate(launch, schedule)[0], want) <= 1e-5, schedule


@pytest.mark.parametrize("kind", sorted(kquants_metal.TYPES))
def test_kquant_cuda_twin_matches_reference(kind):
    blocks = kquant_blocks(kind, 37, 512, experts=2)
    x = mx.array(np.random.default_rng(2).normal(size=(3, 512)).astype(np.float32))
    experts = mx.array([1, 0, 1])
    want = kquants.gather_matmul(x[:, None], blocks, kind, experts, backend="reference")[:, 0]
    got = emulate(kquants_metal.gemv_launch(x, blocks, kind, experts, cuda=True), SCHEDULES[2])[0]
    assert rel(got, want) <= 1e-5


@pytest.mark.parametrize("kind", sorted(kquants_metal.TYPES))
def test_kquant_gathered_experts_match_reference(kind):
    """MoE: 3 tokens x top-2 of 5 stacked experts (one picked twice), as kquants.gather_matmul lays them out."""
    blocks = kquant_blocks(kind, 20, 256, experts=5)
    x = mx.array(np.random.default_rng(1).normal(size=(3, 1, 1, 256)).astype(np.float32))
    indices = mx.array([[0, 4], [2, 2], [1, 3]])
    want = kquants.gather_matmul(x, blocks, kind, indices, backend="reference")
    xb = mx.broadcast_to(x, (3, 2, 1, 256)).reshape(-1, 256)
    got = emulate(kquants_metal.gemv_launch(xb, blocks, kind, indices.reshape(-1)), SCHEDULES[2])[0]
    assert rel(got.reshape(want.shape), want) <= 1e-5


def moe_routing(tokens: int, top_k: int, experts: int, seed: int) -> mx.array:
    """Ragged routing: expert 0 in every token (over one 32-row tile when tokens > 32), the last expert never."""
    rng = np.random.default_rng(seed)
    others = np.stack([rng.permutation(np.arange(1, experts - 1))[: top_k - 1] for _ in range(tokens)])
    return mx.array(np.concatenate([np.zeros((tokens, 1), np.int64), others], axis=1))


@pytest.mark.parametrize("kind", sorted(kquants_metal.TYPES))
@pytest.mark.parametrize("sorted_indices", [False, True], ids=["unsorted", "sorted"])
def test_kquant_gathered_gemm_through_the_registry(kind, sorted_indices, monkeypatch):
    """Prefill MoE through `kquants.gather_matmul(..., backend="metal")` with Metal's launches run by the emulator:
    35 tokens x top-3 of 6 experts (expert 0: 35 rows, two tiles; expert 5: none; the rest ragged), 20 output
    rows (under one 32-column tile), K = 512; then mlx-lm's sorted form (pairs sorted by expert, one row each)."""
    from mlxq.kernels import metal

    blocks = kquant_blocks(kind, 20, 512, experts=6)
    x = mx.array(np.random.default_rng(3).normal(size=(35, 1, 1, 512)).astype(np.float32))
    indices = moe_routing(35, 3, 6, seed=3)
    if sorted_indices:
        order = mx.argsort(indices.reshape(-1))
        x, indices = mx.broadcast_to(x, (35, 3, 1, 512)).reshape(-1, 1, 512)[order], indices.reshape(-1)[order]
    want = kquants.gather_matmul(x, blocks, kind, indices, sorted_indices, backend="reference")
    monkeypatch.setattr(kquants, "_BACKENDS", {})
    kquants_metal.register()
    launches = []
    for schedule in SCHEDULES if kind == "Q3_K" else SCHEDULES[2:3]:
        def emulated(launch, schedule=schedule):
            launches.append(launch.kernel.name)
            return [mx.array(a) for a in emulate(launch, schedule)]

        monkeypatch.setattr(metal, "run", emulated)
        got = kquants.gather_matmul(x, blocks, kind, indices, sorted_indices, backend="metal")
        assert got.shape == want.shape and rel(got, want) <= 1e-5, schedule
    assert set(launches) == {"kquant_gemm"}


# ---------------------------------------------------------------------------------- source and clang
def all_launches():
    cases = {}
    for packing in ("tq2", "tq1"):
        for integer in (False, True):
            for mnk in (TERNARY_SHAPES[0], TERNARY_SHAPES[2]):
                for per_tensor in (False, True):
                    launch, _ = ternary_case(*mnk, packing, integer, per_tensor)
                    cases[f"ternary-{packing}-{'int8' if integer else 'float'}-{mnk[0]}-{int(per_tensor)}"] = launch
        launch, _ = ternary_case(1, 16, 256, packing, False, False)
        half = dataclasses.replace(launch, inputs=[*launch.inputs[:2], launch.inputs[2].astype(mx.float16),
                                                   *launch.inputs[3:]], output_dtypes=[mx.float16])
        cases[f"ternary-{packing}-half"] = half
    cases["deltanet"] = deltanet_case(1, 1, 2, 4, 16, 8)[0]
    for kind in kquants_metal.TYPES:
        blocks = kquant_blocks(kind, 8, 256)
        cases[f"kquant-{kind}-gemv"] = kquants_metal.gemv_launch(mx.ones((1, 256)), blocks, kind, mx.zeros((1,)))
        cases[f"kquant-{kind}-gemv-half"] = kquants_metal.gemv_launch(mx.ones((9, 256), mx.float16), blocks, kind,
                                                                      mx.zeros((9,)))
        cases[f"kquant-{kind}-gemm"] = kquants_metal.gemm_launch(mx.ones((40, 256)), blocks, kind)
        experts = kquant_blocks(kind, 8, 256, experts=9)
        cases[f"kquant-{kind}-gemm-experts"] = kquants_metal.gemm_launch(
            mx.ones((40, 256)), experts, kind, mx.array([0, 0, 5, 5, 33, 33, 33, 38, 40, 40]))
    return cases


LAUNCHES = all_launches()


@pytest.mark.parametrize("name", sorted(LAUNCHES))
def test_source_is_mlxs_and_compiles(name):
    launch = LAUNCHES[name]
    source = mlx_source(launch)
    assert exported_source(launch)[1] == source
    assert clang_check(source) == []


# ------------------------------------------------------------------------------- on Metal itself (a Mac)
@pytest.mark.needs_metal
@pytest.mark.skipif(not mx.metal.is_available(), reason="needs Metal")
def test_kernels_on_metal_match_reference():
    from mlxq.kernels.metal import run

    for mnk in TERNARY_SHAPES:
        for packing in ("tq2", "tq1"):
            launch, want = ternary_case(*mnk, packing, True, False)
            assert (np.asarray(run(launch)[0]) == np.asarray(want)).all()
            launch, want = ternary_case(*mnk, packing, False, True)
            assert rel(run(launch)[0], want) <= 1e-5
    launch, (y_ref, s_ref) = deltanet_case(2, 3, 1, 2, 40, 6)
    y, state = run(launch)
    assert rel(y, y_ref) <= 1e-5 and rel(state, s_ref) <= 1e-5
    for kind in kquants_metal.TYPES:  # through the registry, as the model runs them
        blocks, x = kquant_blocks(kind, 37, 512), mx.random.normal((40, 512))
        for rows in (x[:1], x):
            want = kquants.matmul(rows, blocks, kind, backend="reference")
            assert rel(kquants.matmul(rows, blocks, kind), want) <= 1e-5
        blocks, x, indices = kquant_blocks(kind, 20, 512, experts=6), mx.random.normal((35, 1, 1, 512)), moe_routing(
            35, 3, 6, seed=3)
        for pairs in (slice(0, 2), slice(None)):  # the gathered GEMV (2 pairs), the gathered GEMM (105)
            want = kquants.gather_matmul(x[pairs], blocks, kind, indices[pairs], backend="reference")
            assert rel(kquants.gather_matmul(x[pairs], blocks, kind, indices[pairs]), want) <= 1e-5
