// GGUF K-quant matmuls on the raw blocks, as mlxq/kernels/kquants.py stores them: a weight W [N, K] is uint8
// [N, K / 256 * BYTES], each row its 256-value blocks back to back as in the GGUF file (experts stacked in
// front: [E, N, ...]). Template arguments TYPE: 6 (Q6_K), 3 (Q3_K), 2 (Q2_K); BYTES: its block size (210, 110, 84). Each value is dequantized as
// gguf-py / llama.cpp do (same float32 operations: d times the sub-block scale, times the code).
// @header
template <int TYPE>
struct KQuant;

METAL_FUNC float kq_half(const device uint8_t* p) {
  return float(as_type<half>(ushort(p[0] | (ushort(p[1]) << 8))));
}

template <>
struct KQuant<6> {
  // ql[128] low nibbles, qh[64] high 2 bits, scales[16] int8, d: value v = half n, quarter g, position l
  static float value(const device uint8_t* b, uint v) {
    uint n = v / 128, r = v % 128, g = r / 32, l = r % 32;
    uint ql = b[n * 64 + l + (g & 1) * 32];
    uint lo = g < 2 ? (ql & 0xF) : (ql >> 4);
    uint hi = (b[128 + n * 32 + l] >> (2 * g)) & 3;
    int sc = int(as_type<char>(b[192 + n * 8 + l / 16 + 2 * g]));
    return (kq_half(b + 208) * float(sc)) * float(int(lo | (hi << 4)) - 32);
  }
};

template <>
struct KQuant<2> {
  // scales[16] (scale low nibble, min high nibble), qs[64] 2-bit codes, d, dmin
  static float value(const device uint8_t* b, uint v) {
    uint n = v / 128, j = (v % 128) / 32, p = v % 32;
    uint sc = b[n * 8 + j * 2 + p / 16];
    uint q = (b[16 + n * 32 + p] >> (2 * j)) & 3;
    return (kq_half(b + 80) * float(sc & 0xF)) * float(q) - kq_half(b + 82) * float(sc >> 4);
  }
};

template <>
struct KQuant<3> {
  // hmask[32] (a clear bit subtracts 4), qs[64] 2-bit codes, scales[12] (16 6-bit scales), d
  static float value(const device uint8_t* b, uint v) {
    uint n = v / 128, j = (v % 128) / 32, p = v % 32, s = n * 8 + j * 2 + p / 16;
    int q = int((b[32 + n * 32 + p] >> (2 * j)) & 3) - (((b[p] >> (v / 32)) & 1) ? 0 : 4);
    uint low = s < 8 ? (b[96 + s] & 0xF) : (b[96 + s - 8] >> 4);
    uint high = (b[104 + s % 4] >> (2 * (s / 4))) & 3;
    return (kq_half(b + 108) * float(int(low | (high << 4)) - 32)) * float(q);
  }
};

// @kernel kquant_gemv(w, x, experts, dims) -> (y)
// Decode and MoE experts: y[z, n] = x[z] . W_{experts[z]}[n] (a dense layer is one expert, experts all 0).
// A simdgroup computes 4 rows of one z, one block per iteration, lane l taking values l + 32 i (i < 8): the
// lanes' x reads are consecutive and each x value serves the 4 rows. dims = {Z, N, K, blocks per row}.
// Threadgroup 2 simdgroups; grid (64, ceil(N / 8), Z).
constexpr uint ROWS = 4;
typedef KQuant<TYPE> Q;
const uint Z = dims[0], N = dims[1], K = dims[2], NB = dims[3];
const uint lane = thread_index_in_simdgroup;
const uint z = threadgroup_position_in_grid.z;
const uint row0 = (threadgroup_position_in_grid.y * simdgroups_per_threadgroup + simdgroup_index_in_threadgroup) * ROWS;
const device auto* xz = x + (size_t)z * K;
const device uint8_t* we = w + (size_t)experts[z] * N * NB * BYTES;
float acc[ROWS] = {0, 0, 0, 0};
for (uint b = 0; b < NB; ++b) {
  float xs[8];
  for (uint i = 0; i < 8; ++i) {
    xs[i] = float(xz[b * 256 + lane + 32 * i]);
  }
  for (uint r = 0; r < ROWS; ++r) {
    const device uint8_t* blk = we + ((size_t)min(row0 + r, N - 1) * NB + b) * BYTES;
    for (uint i = 0; i < 8; ++i) {
      acc[r] += xs[i] * Q::value(blk, lane + 32 * i);
    }
  }
}
for (uint r = 0; r < ROWS; ++r) {
  float total = simd_sum(acc[r]);
  if (lane == 0 && row0 + r < N && z < Z) {
    y[(size_t)z * N + row0 + r] = total;
  }
}

// @kernel kquant_gemm(w, x, dims) -> (y)
// Prefill: a threadgroup of 256 threads computes a 32-token x 32-row tile, 64 values of K at a time: the 32 rows'
// values dequantized into threadgroup memory once, the tokens' activations staged beside them, each thread a
// 2 x 2 sub-tile. dims = {M, N, K, blocks per row}. Grid (256, ceil(N / 32), ceil(M / 32)).
constexpr uint BM = 32, BN = 32, BK = 64;
typedef KQuant<TYPE> Q;
threadgroup float wt[BN][BK + 1];
threadgroup float xt[BM][BK + 1];
const uint M = dims[0], N = dims[1], K = dims[2], NB = dims[3];
const uint tid = thread_index_in_threadgroup;
const uint n0 = threadgroup_position_in_grid.y * BN, m0 = threadgroup_position_in_grid.z * BM;
const uint tm = (tid / 16) * 2, tn = (tid % 16) * 2;
float acc[2][2] = {{0, 0}, {0, 0}};
for (uint k0 = 0; k0 < K; k0 += BK) {
  for (uint i = tid; i < BN * BK; i += 256) {
    uint r = i / BK, c = i % BK, k = k0 + c;
    const device uint8_t* blk = w + ((size_t)min(n0 + r, N - 1) * NB + k / 256) * BYTES;
    wt[r][c] = Q::value(blk, k % 256);
  }
  for (uint i = tid; i < BM * BK; i += 256) {
    uint r = i / BK, c = i % BK;
    xt[r][c] = m0 + r < M ? float(x[(size_t)(m0 + r) * K + k0 + c]) : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint c = 0; c < BK; ++c) {
    for (uint i = 0; i < 2; ++i)
      for (uint j = 0; j < 2; ++j) acc[i][j] += xt[tm + i][c] * wt[tn + j][c];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
for (uint i = 0; i < 2; ++i)
  for (uint j = 0; j < 2; ++j) {
    uint m = m0 + tm + i, n = n0 + tn + j;
    if (m < M && n < N) {
      y[(size_t)m * N + n] = acc[i][j];
    }
  }
