"""The harness itself: the source it reproduces is MLX's, the clang check rejects address-space errors, the
emulator catches a missing barrier (under some schedule), barrier divergence and out-of-bounds reads."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from harness import SCHEDULES, EmulatorError, clang_check, emulate, exported_source, kernel_name, mlx_source

from mlxq.kernels.metal import Kernel, Launch

ROWSUM = """
  threadgroup float partial[64];
  uint t = thread_index_in_threadgroup;
  uint row = threadgroup_position_in_grid.x;
  float acc = 0;
  for (uint j = t; j < n; j += threads_per_threadgroup.x) acc += T(x[row * n + j]);
  partial[t] = acc;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (simdgroup_index_in_threadgroup == 0) {
    float s = partial[t] + partial[t + 32];
    s = simd_sum(s);
    if (t == 0) y[row] = s;
  }
"""


def rowsum(source: str = ROWSUM, n: int = 100, rows: int = 5) -> Launch:
    x = mx.random.normal((rows, n), key=mx.random.key(0))
    kernel = Kernel("rowsum", ("x", "n"), ("y",), source, header="// helpers would go here\n")
    return Launch(kernel, [x, mx.array(n, mx.uint32)], [(rows,)], [mx.float32], (64 * rows, 1, 1), (64, 1, 1),
                  [("T", mx.float32), ("UNUSED", 3)])


def test_source_is_mlxs_own():
    launch = rowsum()
    name, source = exported_source(launch)
    assert name == kernel_name(launch)
    assert source == mlx_source(launch)
    small = dataclasses.replace(launch, inputs=[mx.ones((2, 3)), launch.inputs[1]], template=[])  # constant space
    assert exported_source(small) == (kernel_name(small), mlx_source(small))
    assert "const constant float* x" in mlx_source(small)


def test_clang_accepts_the_kernel_and_rejects_address_space_errors():
    assert clang_check(mlx_source(rowsum())) == []
    # the same pointer type but in the wrong address space: device memory used as threadgroup memory
    bad = ROWSUM.replace("partial[t] = acc;", "threadgroup float* p = y; p[t] = acc;")
    errors = clang_check(mlx_source(rowsum(bad)))
    assert any("'threadgroup float *'" in e and "'device float *'" in e for e in errors), errors


def test_emulator_matches_and_a_missing_barrier_is_caught():
    launch = rowsum()
    want = np.asarray(launch.inputs[0].sum(axis=1))
    for schedule in SCHEDULES:
        np.testing.assert_allclose(emulate(launch, schedule)[0], want, rtol=1e-5)
    broken = rowsum(ROWSUM.replace("threadgroup_barrier(mem_flags::mem_threadgroup);", ""))
    results = [emulate(broken, schedule)[0] for schedule in SCHEDULES]
    assert not all(np.allclose(r, want, rtol=1e-5) for r in results)


def test_divergent_barrier_and_out_of_bounds_are_errors():
    early = ROWSUM.replace("  threadgroup float partial[64];", "  threadgroup float partial[64];\n"
                           "  if (thread_index_in_threadgroup == 7) return;")
    with pytest.raises(EmulatorError, match="returned before"):
        emulate(rowsum(early))
    overrun = ROWSUM.replace("x[row * n + j]", "x[row * n + j + n]")  # the last row reads past the end
    with pytest.raises(EmulatorError, match="out-of-bounds"):
        emulate(rowsum(overrun))
