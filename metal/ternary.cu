// CUDA twin of ternary.metal's GEMV (mx.fast.cuda_kernel: MLX writes `__global__ void name(const T* in, ...,
// T* out)` around the body and turns template arguments into constexprs / type aliases). Same layout and
// arguments as the Metal kernel: A the accumulator (float, or int32_t for int8 activations), PACK (2: tq2,
// 1: tq1), PER_TENSOR; dims = {M, N, K, blocks per row}. A warp computes 4 rows of one token, one 256-value
// block per iteration, each lane decoding the bytes holding 8 of the block's values. Block 64 threads; grid
// (64, ceil(N / 8), M) threads.
// @kernel ternary_gemv(w, scales, x, x_scale, dims) -> (y)
constexpr int ROWS = 4;
const int M = dims[0], N = dims[1], K = dims[2], NB = dims[3];
const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
const int m = blockIdx.z;
const int row0 = (blockIdx.y * (blockDim.x / 32) + warp) * ROWS;
const int bytes = PACK == 2 ? 64 : 52;
const auto* xm = x + (size_t)m * K;
A acc[ROWS] = {0, 0, 0, 0};
auto term = [](unsigned c, A v) { return A(int(c) - 1) * v; };
auto digit = [](unsigned b, int n) {
  const unsigned pow3[5] = {1, 3, 9, 27, 81};
  return (((b * pow3[n]) & 255u) * 3u) >> 8;
};
for (int b = 0; b < NB; ++b) {
  const int k0 = b * 256;
  if (PACK == 2) {
    A xs[8];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        int k = k0 + h * 128 + j * 32 + lane;
        xs[h * 4 + j] = k < K ? A(xm[k]) : A(0);
      }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      int n = min(row0 + r, N - 1);
      const uint8_t* blk = w + (size_t)n * NB * bytes + b * bytes;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        unsigned q = blk[h * 32 + lane];
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[r] += term((q >> (2 * j)) & 3u, xs[h * 4 + j]);
      }
    }
  } else {
    A xs[14];
    for (int i = 0; i < 5; ++i) {
      int k = k0 + lane + 32 * i;
      xs[i] = k < K ? A(xm[k]) : A(0);
    }
    for (int i = 0; i < 5; ++i) {
      int k = k0 + 160 + (lane & 15) + 16 * i;
      xs[5 + i] = (lane < 16 && k < K) ? A(xm[k]) : A(0);
    }
    for (int i = 0; i < 4; ++i) {
      int k = k0 + 240 + (lane & 3) + 4 * i;
      xs[10 + i] = (lane < 4 && k < K) ? A(xm[k]) : A(0);
    }
    for (int r = 0; r < ROWS; ++r) {
      int n = min(row0 + r, N - 1);
      const uint8_t* blk = w + (size_t)n * NB * bytes + b * bytes;
      unsigned q = blk[lane];
      for (int i = 0; i < 5; ++i) acc[r] += term(digit(q, i), xs[i]);
      if (lane < 16) {
        q = blk[32 + lane];
        for (int i = 0; i < 5; ++i) acc[r] += term(digit(q, i), xs[5 + i]);
      }
      if (lane < 4) {
        q = blk[48 + lane];
        for (int i = 0; i < 4; ++i) acc[r] += term(digit(q, i), xs[10 + i]);
      }
    }
  }
}
#pragma unroll
for (int r = 0; r < ROWS; ++r) {
  A total = acc[r];
  for (int o = 16; o > 0; o /= 2) total += __shfl_xor_sync(0xffffffffu, total, o);
  int n = row0 + r;
  if (lane == 0 && n < N && m < M) {
    float s = float(total) * float(scales[PER_TENSOR ? 0 : n]);
    y[(size_t)m * N + n] = s * float(x_scale[m]);
  }
}
