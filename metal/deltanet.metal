// The gated delta rule for a few tokens (decode), fused: per value head h and state row i (a row of S [Dv, Dk]),
//   S_i <- exp(g) S_i + beta (v_i - exp(g) S_i . k) k,    y_i = S_i . q
// one simdgroup per row, each lane holding KP = ceil(Dk / 32) of the row's columns in registers for all T tokens:
// the state is read once and written once per call. Value head h reads key head h / (Hv / Hk).
// dims = {B, T, Hk, Hv, Dk, Dv}. Grid (32 * 4, ceil(Dv / 4), B * Hv), threadgroup (128, 1, 1).
// @kernel gated_delta_step(q, k, v, g, beta, state_in, dims) -> (y, state_out)
const int T = dims[1], Hk = dims[2], Hv = dims[3], Dk = dims[4], Dv = dims[5];
const uint lane = thread_index_in_simdgroup;
const int row = threadgroup_position_in_grid.y * simdgroups_per_threadgroup + simdgroup_index_in_threadgroup;
const int bh = threadgroup_position_in_grid.z, b = bh / Hv, h = bh % Hv, hk = h / (Hv / Hk);
if (row >= Dv) {
  return;  // a whole simdgroup past the last row: no simd op is left waiting for it
}
float s[KP];
const device float* s_in = state_in + ((size_t)bh * Dv + row) * Dk;
for (int j = 0; j < KP; ++j) {
  int c = lane + 32 * j;
  s[j] = c < Dk ? s_in[c] : 0.0f;
}
for (int t = 0; t < T; ++t) {
  const size_t qk_at = (((size_t)b * T + t) * Hk + hk) * Dk, gh = ((size_t)b * T + t) * Hv + h;
  float kk[KP], qq[KP];
  float sk = 0.0f;
  for (int j = 0; j < KP; ++j) {
    int c = lane + 32 * j;
    kk[j] = c < Dk ? float(k[qk_at + c]) : 0.0f;
    qq[j] = c < Dk ? float(q[qk_at + c]) : 0.0f;
    sk += s[j] * kk[j];
  }
  const float decay = metal::exp(float(g[gh]));
  sk = simd_sum(sk);
  const float delta = float(beta[gh]) * (float(v[gh * Dv + row]) - decay * sk);
  float yi = 0.0f;
  for (int j = 0; j < KP; ++j) {
    s[j] = decay * s[j] + delta * kk[j];
    yi += s[j] * qq[j];
  }
  yi = simd_sum(yi);
  if (lane == 0) {
    y[gh * Dv + row] = yi;
  }
}
device float* s_out = state_out + ((size_t)bh * Dv + row) * Dk;
for (int j = 0; j < KP; ++j) {
  int c = lane + 32 * j;
  if (c < Dk) {
    s_out[c] = s[j];
  }
}
