// Ternary matmul y[m, n] = sum_k x[m, k] t[n, k] * scale[n or 0] (* x_scale[m] for int8 activations), with the
// codes t packed as mlxq/kernels/ternary.py describes (GGUF TQ2_0 / TQ1_0 block payloads, 256 values a block).
// Template arguments: A the accumulator (float, or int32_t for int8 activations: exact sums), PACK (2: tq2,
// 1: tq1), PER_TENSOR (1: one scale). dims = {M, N, K, blocks per row}. K is padded to whole blocks with
// zero codes; reads of x past K are masked.
// @header
// Code c in {0, 1, 2} times x, in the accumulator's type (c - 1 is exact in both).
template <typename A, typename X>
METAL_FUNC A ternary_term(uint c, X x) {
  return A(int(c) - 1) * A(x);
}

// Value j (0..255) of a block's byte `b` in the tq1 packing: digit n of the base-3 fixed-point byte.
METAL_FUNC uint tq1_digit(uint b, uint n) {
  const uint pow3[5] = {1, 3, 9, 27, 81};
  return (((b * pow3[n]) & 255u) * 3u) >> 8;
}

// @kernel ternary_gemv(w, scales, x, x_scale, dims) -> (y)
// Decode (few tokens): a simdgroup computes 4 output rows of one token, one 256-value block per iteration,
// each lane decoding the bytes that hold 8 of the block's values (tq2: bytes l and 32 + l; tq1: byte l,
// byte 32 + l for lanes < 16, byte 48 + l for lanes < 4). The lanes' x reads are consecutive, and the x
// values a lane loads serve all 4 rows. Threadgroup: 2 simdgroups; grid (64, ceil(N / 8), M).
constexpr uint ROWS = 4;
const uint M = dims[0], N = dims[1], K = dims[2], NB = dims[3];
const uint lane = thread_index_in_simdgroup;
const uint m = threadgroup_position_in_grid.z;
const uint row0 = (threadgroup_position_in_grid.y * simdgroups_per_threadgroup + simdgroup_index_in_threadgroup) * ROWS;
const uint bytes = PACK == 2 ? 64 : 52;
const device auto* xm = x + (size_t)m * K;
A acc[ROWS] = {0, 0, 0, 0};
for (uint b = 0; b < NB; ++b) {
  const uint k0 = b * 256;
  if (PACK == 2) {
    A xs[8];
    for (uint h = 0; h < 2; ++h)
      for (uint j = 0; j < 4; ++j) {
        uint k = k0 + h * 128 + j * 32 + lane;
        xs[h * 4 + j] = k < K ? A(xm[k]) : A(0);
      }
    for (uint r = 0; r < ROWS; ++r) {
      uint n = min(row0 + r, N - 1);
      const device uint8_t* blk = w + (size_t)n * NB * bytes + b * bytes;
      for (uint h = 0; h < 2; ++h) {
        uint q = blk[h * 32 + lane];
        for (uint j = 0; j < 4; ++j) acc[r] += ternary_term<A>((q >> (2 * j)) & 3u, xs[h * 4 + j]);
      }
    }
  } else {
    A xs[14];
    for (uint i = 0; i < 5; ++i) {
      uint k = k0 + lane + 32 * i;
      xs[i] = k < K ? A(xm[k]) : A(0);
    }
    for (uint i = 0; i < 5; ++i) {
      uint k = k0 + 160 + (lane & 15) + 16 * i;
      xs[5 + i] = (lane < 16 && k < K) ? A(xm[k]) : A(0);
    }
    for (uint i = 0; i < 4; ++i) {
      uint k = k0 + 240 + (lane & 3) + 4 * i;
      xs[10 + i] = (lane < 4 && k < K) ? A(xm[k]) : A(0);
    }
    for (uint r = 0; r < ROWS; ++r) {
      uint n = min(row0 + r, N - 1);
      const device uint8_t* blk = w + (size_t)n * NB * bytes + b * bytes;
      uint q = blk[lane];
      for (uint i = 0; i < 5; ++i) acc[r] += ternary_term<A>(tq1_digit(q, i), xs[i]);
      if (lane < 16) {
        q = blk[32 + lane];
        for (uint i = 0; i < 5; ++i) acc[r] += ternary_term<A>(tq1_digit(q, i), xs[5 + i]);
      }
      if (lane < 4) {
        q = blk[48 + lane];
        for (uint i = 0; i < 4; ++i) acc[r] += ternary_term<A>(tq1_digit(q, i), xs[10 + i]);
      }
    }
  }
}
for (uint r = 0; r < ROWS; ++r) {
  A total = simd_sum(acc[r]);
  uint n = row0 + r;
  if (lane == 0 && n < N && m < M) {
    float s = float(total) * float(scales[PER_TENSOR ? 0 : n]);
    y[(size_t)m * N + n] = s * float(x_scale[m]);
  }
}

// @kernel ternary_gemm(w, scales, x, x_scale, dims) -> (y)
// Prefill (many tokens): a threadgroup of 256 threads computes a 32-token x 32-row tile. Per block it decodes
// the 32 rows' codes into threadgroup memory, then, per half block, stages 32 x 128 activations there and
// each thread accumulates a 2 x 2 sub-tile. Grid (256, ceil(N / 32), ceil(M / 32)).
constexpr uint BM = 32, BN = 32, HALF = 128;
threadgroup char codes[BN][256];
threadgroup A xt[BM][HALF];
const uint M = dims[0], N = dims[1], K = dims[2], NB = dims[3];
const uint tid = thread_index_in_threadgroup;
const uint n0 = threadgroup_position_in_grid.y * BN, m0 = threadgroup_position_in_grid.z * BM;
const uint tm = (tid / 16) * 2, tn = (tid % 16) * 2;
const uint bytes = PACK == 2 ? 64 : 52;
A acc[2][2] = {{0, 0}, {0, 0}};
for (uint b = 0; b < NB; ++b) {
  for (uint i = tid; i < BN * bytes; i += 256) {
    uint r = i / bytes, byte = i % bytes;
    uint n = min(n0 + r, N - 1);
    uint q = w[(size_t)n * NB * bytes + b * bytes + byte];
    if (PACK == 2) {
      uint base = (byte / 32) * 128 + byte % 32;
      for (uint j = 0; j < 4; ++j) codes[r][base + 32 * j] = char(int((q >> (2 * j)) & 3u) - 1);
    } else if (byte < 32) {
      for (uint j = 0; j < 5; ++j) codes[r][byte + 32 * j] = char(int(tq1_digit(q, j)) - 1);
    } else if (byte < 48) {
      for (uint j = 0; j < 5; ++j) codes[r][160 + byte - 32 + 16 * j] = char(int(tq1_digit(q, j)) - 1);
    } else {
      for (uint j = 0; j < 4; ++j) codes[r][240 + byte - 48 + 4 * j] = char(int(tq1_digit(q, j)) - 1);
    }
  }
  for (uint h = 0; h < 2; ++h) {
    for (uint i = tid; i < BM * HALF; i += 256) {
      uint r = i / HALF, c = i % HALF;
      uint m = m0 + r, k = b * 256 + h * HALF + c;
      xt[r][c] = (m < M && k < K) ? A(x[(size_t)m * K + k]) : A(0);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint c = 0; c < HALF; ++c) {
      for (uint i = 0; i < 2; ++i)
        for (uint j = 0; j < 2; ++j) acc[i][j] += xt[tm + i][c] * A(codes[tn + j][h * HALF + c]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}
for (uint i = 0; i < 2; ++i)
  for (uint j = 0; j < 2; ++j) {
    uint m = m0 + tm + i, n = n0 + tn + j;
    if (m < M && n < N) {
      float s = float(acc[i][j]) * float(scales[PER_TENSOR ? 0 : n]);
      y[(size_t)m * N + n] = s * float(x_scale[m]);
    }
  }
