"""Metal kernels for GGUF K-quant weights (metal/kquants.metal), behind `mlxq.kernels.kquants`' backend registry:
`matmul` (GEMV for up to 8 tokens, tiled GEMM beyond) and `gather_matmul` (MoE experts: one GEMV row set per
(token, expert) pair) for Q6_K, Q3_K and Q2_K; other types return NotImplemented and the reference runs."""

from __future__ import annotations

import mlx.core as mx

from mlxq.kernels import kquants, metal

TYPES = {"Q6_K": 6, "Q3_K": 3, "Q2_K": 2}
GEMV_MAX_TOKENS = 8


def _template(kind: str) -> list:
    return [("TYPE", TYPES[kind]), ("BYTES", kquants.BLOCK_SIZES[kind][1])]


def gemv_launch(x: mx.array, blocks: mx.array, kind: str, experts: mx.array, cuda: bool = False) -> metal.Launch:
    """x [Z, K] through W_{experts[z]} -> y [Z, N]; blocks [E, N, row bytes] (or [N, row bytes], one expert).
    `cuda`: the CUDA twin (metal/kquants.cu), same arguments."""
    z, k = x.shape
    n = blocks.shape[-2]
    nb = k // kquants.QK_K
    dims = mx.array([z, n, k, nb], mx.int32)
    return metal.Launch(metal.kernels("kquants.cu" if cuda else "kquants.metal")["kquant_gemv"],
                        [blocks, x, experts.astype(mx.int32).reshape(-1), dims], [(z, n)], [mx.float32],
                        (64, -(-n // 8), z), (64, 1, 1), _template(kind))


def gemm_launch(x: mx.array, blocks: mx.array, kind: str) -> metal.Launch:
    m, k = x.shape
    n = blocks.shape[0]
    dims = mx.array([m, n, k, k // kquants.QK_K], mx.int32)
    return metal.Launch(metal.kernels("kquants.metal")["kquant_gemm"], [blocks, x, dims], [(m, n)], [mx.float32],
                        (256, -(-n // 32), -(-m // 32)), (256, 1, 1), _template(kind))


def matmul(x: mx.array, blocks: mx.array, kind: str):
    if kind not in TYPES:
        return NotImplemented
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] <= GEMV_MAX_TOKENS:
        launch = gemv_launch(x2, blocks, kind, mx.zeros((x2.shape[0],), mx.int32))
    else:
        launch = gemm_launch(x2, blocks, kind)
    (y,) = metal.run(launch)
    return y.reshape(*lead, -1).astype(x.dtype)


def gather_matmul(x: mx.array, blocks: mx.array, kind: str, indices: mx.array, sorted_indices: bool = False):
    """As mx.gather_mm(x, W^T, rhs_indices=indices): x [..., rows, in], indices [...] -> [..., rows, out]."""
    if kind not in TYPES:
        return NotImplemented
    rows, k = x.shape[-2:]
    batch = mx.broadcast_shapes(x.shape[:-2], indices.shape)
    xb = mx.broadcast_to(x, (*batch, rows, k)).reshape(-1, k)
    experts = mx.repeat(mx.broadcast_to(indices, batch).reshape(-1), rows)
    (y,) = metal.run(gemv_launch(xb, blocks, kind, experts))
    return y.reshape(*batch, rows, -1).astype(x.dtype)


def register() -> None:
    kquants.register_backend("metal", matmul=matmul, gather_matmul=gather_matmul)
