"""Metal kernels for GGUF K-quant weights (metal/kquants.metal), behind `mlxq.kernels.kquants`' backend registry:
`matmul` (GEMV for up to 8 tokens, tiled GEMM beyond) and `gather_matmul` (MoE experts: the GEMV on each
(token, expert) pair for up to 8 pairs, beyond that the gathered GEMM on the pairs sorted by expert) for Q6_K,
Q3_K, Q2_K, IQ4_XS, IQ2_XXS, IQ2_XS and IQ2_S; other types return NotImplemented and the reference runs."""

from __future__ import annotations

import mlx.core as mx
from gguf.constants import GGMLQuantizationType

from mlxq.kernels import kquants, metal

KINDS = ("Q2_K", "Q3_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ4_XS")
TYPES = {kind: GGMLQuantizationType[kind].value for kind in KINDS}  # the kernels' TYPE: ggml's type number
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


def gemm_launch(x: mx.array, blocks: mx.array, kind: str, offsets: mx.array | None = None) -> metal.Launch:
    """x [Z, K] -> y [Z, N]: dense with blocks [N, row bytes]; experts with blocks [E, N, row bytes], the rows of x
    sorted by expert and expert e's rows offsets[e] .. offsets[e + 1] (int32 [E + 1])."""
    z, k = x.shape
    n = blocks.shape[-2]
    experts = blocks.shape[0] if blocks.ndim == 3 else 1
    if offsets is None:
        offsets = mx.array([0, z], mx.int32)
    dims = mx.array([z, n, k, k // kquants.QK_K, experts], mx.int32)
    tiles = (z + 31 * min(experts, z)) // 32  # sum over experts of ceil(rows / 32), at most
    return metal.Launch(metal.kernels("kquants.metal")["kquant_gemm"], [blocks, x, offsets.astype(mx.int32), dims],
                        [(z, n)], [mx.float32], (256, -(-n // 32), tiles), (256, 1, 1), _template(kind))


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
    experts = mx.repeat(mx.broadcast_to(indices, batch).reshape(-1), rows).astype(mx.int32)
    if xb.shape[0] <= GEMV_MAX_TOKENS:
        (y,) = metal.run(gemv_launch(xb, blocks, kind, experts))
    else:
        y = _sorted_gemm(xb, blocks, kind, experts, sorted_indices)
    return y.reshape(*batch, rows, -1).astype(x.dtype)


def _sorted_gemm(x: mx.array, blocks: mx.array, kind: str, experts: mx.array, is_sorted: bool) -> mx.array:
    """The gathered GEMM: rows grouped by expert (sorted unless they come sorted), each expert's rows in
    tiles, and the results put back in the callers' order."""
    order = None if is_sorted else mx.argsort(experts)
    if order is not None:
        x, experts = x[order], experts[order]
    counts = mx.zeros((blocks.shape[0],), mx.int32).at[experts].add(1)
    offsets = mx.concatenate([mx.zeros((1,), mx.int32), mx.cumsum(counts)])
    (y,) = metal.run(gemm_launch(x, blocks, kind, offsets))
    return y if order is None else y[mx.argsort(order)]


def register() -> None:
    kquants.register_backend("metal", matmul=matmul, gather_matmul=gather_matmul)
