// CUDA twin of kquants.metal's GEMV (gathered form included): same arguments and layout, TYPE 6 / 3 / 2 (Q6_K,
// Q3_K, Q2_K) and BYTES its block size; dims = {Z, N, K, blocks per row}. A warp computes 4 rows of one z.
// Block 64 threads; grid (64, ceil(N / 8), Z) threads.
// @header
__device__ __forceinline__ float kq_half(const uint8_t* p) {
  return __half2float(__ushort_as_half((unsigned short)(p[0] | (p[1] << 8))));
}

template <int TYPE>
__device__ __forceinline__ float kq_value(const uint8_t* b, unsigned v) {
  if (TYPE == 6) {
    unsigned n = v / 128, r = v % 128, g = r / 32, l = r % 32;
    unsigned ql = b[n * 64 + l + (g & 1) * 32];
    unsigned lo = g < 2 ? (ql & 0xF) : (ql >> 4);
    unsigned hi = (b[128 + n * 32 + l] >> (2 * g)) & 3;
    int sc = (int)(signed char)b[192 + n * 8 + l / 16 + 2 * g];
    return (kq_half(b + 208) * float(sc)) * float(int(lo | (hi << 4)) - 32);
  } else if (TYPE == 2) {
    unsigned n = v / 128, j = (v % 128) / 32, p = v % 32;
    unsigned sc = b[n * 8 + j * 2 + p / 16];
    unsigned q = (b[16 + n * 32 + p] >> (2 * j)) & 3;
    return (kq_half(b + 80) * float(sc & 0xF)) * float(q) - kq_half(b + 82) * float(sc >> 4);
  } else {
    unsigned n = v / 128, j = (v % 128) / 32, p = v % 32, s = n * 8 + j * 2 + p / 16;
    int q = int((b[32 + n * 32 + p] >> (2 * j)) & 3) - (((b[p] >> (v / 32)) & 1) ? 0 : 4);
    unsigned low = s < 8 ? (b[96 + s] & 0xF) : (b[96 + s - 8] >> 4);
    unsigned high = (b[104 + s % 4] >> (2 * (s / 4))) & 3;
    return (kq_half(b + 108) * float(int(low | (high << 4)) - 32)) * float(q);
  }
}

// @kernel kquant_gemv(w, x, experts, dims) -> (y)
constexpr int ROWS = 4;
const int Z = dims[0], N = dims[1], K = dims[2], NB = dims[3];
const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
const int z = blockIdx.z;
const int row0 = (blockIdx.y * (blockDim.x / 32) + warp) * ROWS;
const auto* xz = x + (size_t)z * K;
const uint8_t* we = w + (size_t)experts[z] * N * NB * BYTES;
float acc[ROWS] = {0, 0, 0, 0};
for (int b = 0; b < NB; ++b) {
  float xs[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) xs[i] = float(xz[b * 256 + lane + 32 * i]);
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const uint8_t* blk = we + ((size_t)min(row0 + r, N - 1) * NB + b) * BYTES;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[r] += xs[i] * kq_value<TYPE>(blk, lane + 32 * i);
  }
}
#pragma unroll
for (int r = 0; r < ROWS; ++r) {
  float total = acc[r];
  for (int o = 16; o > 0; o /= 2) total += __shfl_xor_sync(0xffffffffu, total, o);
  if (lane == 0 && row0 + r < N && z < Z) y[(size_t)z * N + row0 + r] = total;
}
