// GGUF K-quant matmuls on the raw blocks, as mlxq/kernels/kquants.py stores them: a weight W [N, K] is uint8
// [N, K / 256 * BYTES], each row its 256-value blocks back to back as in the GGUF file (experts stacked in
// front: [E, N, ...]). Template arguments TYPE: 6 (Q6_K), 3 (Q3_K), 2 (Q2_K), 4 (IQ4_XS), 1 (IQ2_XXS); BYTES:
// its block size (210, 110, 84, 136, 66). Each value is dequantized as gguf-py / llama.cpp do (same float32 operations: d times the
// sub-block scale, times the code).
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

// IQ4_XS's codes index ggml's non-linear 4-bit values (kvalues_iq4nl)
constant int8_t kq_iq4_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

template <>
struct KQuant<4> {
  // d, scales_h (16 bits: 2 high bits per sub-block), scales_l[4] (a nibble per sub-block), qs[128]: sub-block j of
  // 32 values takes bytes 16 j .. 16 j + 15, low nibbles first; scale 6 bits, minus 32
  static float value(const device uint8_t* b, uint v) {
    uint j = v / 32, p = v % 32;
    uint low = (b[4 + j / 2] >> (4 * (j % 2))) & 0xF;
    uint high = ((uint(b[2]) | (uint(b[3]) << 8)) >> (2 * j)) & 3;
    uint q = (b[8 + 16 * j + p % 16] >> (4 * (p / 16))) & 0xF;
    return (kq_half(b) * float(int(low | (high << 4)) - 32)) * float(kq_iq4_values[q]);
  }
};

// IQ2_XXS's codebook: ggml's iq2xxs_grid, each entry's 8 values as 2-bit indices into its levels 8, 25, 43
// (gguf-py's packing), and ksigns_iq2xs: 7 sign bits and their parity
constant ushort kq_iq2xxs_grid[256] = {
  0x0000, 0x0002, 0x0005, 0x0008, 0x000a, 0x0011, 0x0014, 0x0020, 0x0022, 0x0028, 0x002a, 0x0041,
  0x0044, 0x0050, 0x0058, 0x0061, 0x0064, 0x0080, 0x0082, 0x008a, 0x00a2, 0x0101, 0x0104, 0x0110,
  0x0115, 0x0140, 0x0184, 0x0198, 0x0200, 0x0202, 0x0222, 0x0282, 0x0401, 0x0404, 0x0410, 0x0421,
  0x0424, 0x0440, 0x0442, 0x0448, 0x0460, 0x0481, 0x0484, 0x0490, 0x04a4, 0x0500, 0x0502, 0x0508,
  0x0520, 0x0546, 0x0569, 0x0580, 0x0591, 0x0609, 0x0610, 0x0640, 0x0684, 0x06a4, 0x0800, 0x0805,
  0x0808, 0x0814, 0x0828, 0x0841, 0x0844, 0x0850, 0x0852, 0x0888, 0x0904, 0x0940, 0x0a02, 0x0a14,
  0x1001, 0x1004, 0x1010, 0x1021, 0x1040, 0x1060, 0x1084, 0x1090, 0x1095, 0x1100, 0x1108, 0x1120,
  0x1150, 0x115a, 0x1180, 0x1224, 0x1245, 0x1400, 0x1408, 0x1420, 0x1425, 0x1449, 0x1480, 0x1518,
  0x1562, 0x1600, 0x1616, 0x1801, 0x1804, 0x1810, 0x1840, 0x1881, 0x1900, 0x1905, 0x19a0, 0x1a51,
  0x2000, 0x2002, 0x200a, 0x2044, 0x2061, 0x2080, 0x2082, 0x2129, 0x2148, 0x2200, 0x2202, 0x2401,
  0x2404, 0x2410, 0x2440, 0x2456, 0x2500, 0x2541, 0x2564, 0x2690, 0x2808, 0x2820, 0x2894, 0x2a44,
  0x4001, 0x4004, 0x4010, 0x4018, 0x4021, 0x4024, 0x4040, 0x4048, 0x4056, 0x4060, 0x4081, 0x4084,
  0x4090, 0x4100, 0x4120, 0x4161, 0x4180, 0x4185, 0x4201, 0x4210, 0x4248, 0x4256, 0x4268, 0x4400,
  0x4408, 0x4420, 0x4480, 0x4499, 0x4512, 0x4524, 0x4600, 0x4801, 0x4804, 0x4810, 0x4840, 0x4845,
  0x4900, 0x4958, 0x4961, 0x4982, 0x4a45, 0x4a90, 0x5000, 0x5008, 0x5011, 0x5019, 0x5020, 0x5080,
  0x5088, 0x5104, 0x5142, 0x51a4, 0x5291, 0x5490, 0x5492, 0x550a, 0x5601, 0x5654, 0x5800, 0x5811,
  0x5819, 0x5864, 0x5940, 0x5a08, 0x6004, 0x6010, 0x6040, 0x6068, 0x6100, 0x6155, 0x6218, 0x6260,
  0x6400, 0x6405, 0x6510, 0x6512, 0x6584, 0x6842, 0x8000, 0x8002, 0x800a, 0x8041, 0x8082, 0x8104,
  0x8118, 0x8140, 0x8211, 0x8401, 0x8404, 0x8410, 0x8415, 0x8440, 0x8460, 0x8500, 0x8546, 0x8594,
  0x8609, 0x8640, 0x8660, 0x8802, 0x8904, 0x8a11, 0x9004, 0x9010, 0x9024, 0x9040, 0x90a1, 0x9116,
  0x9180, 0x9245, 0x9400, 0x9422, 0x9444, 0x9551, 0x9881, 0x9920, 0xa002, 0xa050, 0xa085, 0xa109,
  0xa200, 0xa418, 0xa850, 0xa904,
};
constant float kq_iq2xxs_levels[4] = {8, 25, 43, 0};
constant uint8_t kq_iq2_ksigns[128] = {
  0x00, 0x81, 0x82, 0x03, 0x84, 0x05, 0x06, 0x87, 0x88, 0x09, 0x0a, 0x8b, 0x0c, 0x8d, 0x8e, 0x0f,
  0x90, 0x11, 0x12, 0x93, 0x14, 0x95, 0x96, 0x17, 0x18, 0x99, 0x9a, 0x1b, 0x9c, 0x1d, 0x1e, 0x9f,
  0xa0, 0x21, 0x22, 0xa3, 0x24, 0xa5, 0xa6, 0x27, 0x28, 0xa9, 0xaa, 0x2b, 0xac, 0x2d, 0x2e, 0xaf,
  0x30, 0xb1, 0xb2, 0x33, 0xb4, 0x35, 0x36, 0xb7, 0xb8, 0x39, 0x3a, 0xbb, 0x3c, 0xbd, 0xbe, 0x3f,
  0xc0, 0x41, 0x42, 0xc3, 0x44, 0xc5, 0xc6, 0x47, 0x48, 0xc9, 0xca, 0x4b, 0xcc, 0x4d, 0x4e, 0xcf,
  0x50, 0xd1, 0xd2, 0x53, 0xd4, 0x55, 0x56, 0xd7, 0xd8, 0x59, 0x5a, 0xdb, 0x5c, 0xdd, 0xde, 0x5f,
  0x60, 0xe1, 0xe2, 0x63, 0xe4, 0x65, 0x66, 0xe7, 0xe8, 0x69, 0x6a, 0xeb, 0x6c, 0xed, 0xee, 0x6f,
  0xf0, 0x71, 0x72, 0xf3, 0x74, 0xf5, 0xf6, 0x77, 0x78, 0xf9, 0xfa, 0x7b, 0xfc, 0x7d, 0x7e, 0xff,
};

template <>
struct KQuant<1> {
  // d, then per 32 values two 32-bit words: 4 grid indices (a byte each, 8 values each), and 4 x 7 sign bits
  // (ksigns indices) under a 4-bit scale
  static float value(const device uint8_t* b, uint v) {
    uint ib = v / 32, l = (v % 32) / 8, j = v % 8;
    const device uint8_t* q = b + 2 + 8 * ib;
    uint aux = uint(q[4]) | (uint(q[5]) << 8) | (uint(q[6]) << 16) | (uint(q[7]) << 24);
    float db = (kq_half(b) * (0.5f + float(aux >> 28))) * 0.25f;
    float g = kq_iq2xxs_levels[(kq_iq2xxs_grid[q[l]] >> (2 * j)) & 3];
    return (db * g) * (((kq_iq2_ksigns[(aux >> (7 * l)) & 127] >> j) & 1) ? -1.0f : 1.0f);
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

// @kernel kquant_gemm(w, x, offsets, dims) -> (y)
// Prefill, dense or MoE experts (the gathered GEMM): the rows of x sorted by expert, expert e's rows offsets[e] up
// to offsets[e + 1] (a dense layer is one expert, offsets {0, M}); y[z, n] = x[z] . W_e[n]. A threadgroup of 256
// threads computes a 32-row x 32-column tile of one expert, 64 values of K at a time: the 32 weight rows' values
// dequantized into threadgroup memory once, the rows' activations staged beside them, each thread a 2 x 2
// sub-tile. The grid's z counts tiles, expert by expert (each expert ceil(rows / 32) of them); a group finds its
// expert by one scan over offsets, the same in every thread, and a group past the last tile returns at once.
// dims = {Z, N, K, blocks per row, E}. Grid (256, ceil(N / 32), at least the tile count).
constexpr uint BM = 32, BN = 32, BK = 64;
typedef KQuant<TYPE> Q;
threadgroup float wt[BN][BK + 1];
threadgroup float xt[BM][BK + 1];
const uint N = dims[1], K = dims[2], NB = dims[3], E = dims[4];
const uint tid = thread_index_in_threadgroup;
uint tile = threadgroup_position_in_grid.z, e = 0;
for (; e < E; ++e) {
  const uint tiles = (uint(offsets[e + 1] - offsets[e]) + BM - 1) / BM;
  if (tile < tiles) {
    break;
  }
  tile -= tiles;
}
if (e == E) {
  return;
}
const uint n0 = threadgroup_position_in_grid.y * BN, m0 = uint(offsets[e]) + tile * BM, M = uint(offsets[e + 1]);
const device uint8_t* we = w + (size_t)e * N * NB * BYTES;
const uint tm = (tid / 16) * 2, tn = (tid % 16) * 2;
float acc[2][2] = {{0, 0}, {0, 0}};
for (uint k0 = 0; k0 < K; k0 += BK) {
  for (uint i = tid; i < BN * BK; i += 256) {
    uint r = i / BK, c = i % BK, k = k0 + c;
    const device uint8_t* blk = we + ((size_t)min(n0 + r, N - 1) * NB + k / 256) * BYTES;
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
