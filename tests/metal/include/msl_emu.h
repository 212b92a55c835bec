// The MSL subset mlxq's kernels use, as C++ that runs on the CPU (compiled with g++ by tests/metal/harness.py).
//
// Each threadgroup's threads run as cooperative fibers (ucontext) on one OS thread. A fiber runs until it
// reaches a synchronisation point (threadgroup_barrier, simdgroup_barrier, a simd_* reduction or shuffle) or
// returns; then the scheduler resumes the others in the order the schedule gives (forward, reverse, or a
// seeded shuffle each round). So between two barriers each thread's work happens all at once, in a different
// thread order per schedule: a read of threadgroup memory that a missing barrier leaves unordered sees poison
// (0xFF bytes, a NaN in float) or another thread's later write, and the result changes with the schedule.
//
// Strict where Metal leaves things undefined: every live thread of the group must reach each barrier (a
// thread that returned while others wait is an error), and a simd op must be reached by every live lane of
// its simdgroup (lanes that returned are inactive, as on the GPU). Errors print one line and exit 3.
#pragma once
#include <algorithm>
#include <csignal>
#include <fstream>
#include <string>
#include <sys/mman.h>
#include <unistd.h>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <type_traits>
#include <ucontext.h>
#include <vector>

// Address spaces carry no meaning on the CPU; `threadgroup` declarations are rewritten by the harness into
// MLXQ_THREADGROUP (shared by the group's fibers, poisoned before each group).
#define device
#define constant
#define threadgroup
#define thread
#define METAL_FUNC inline

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef _Float16 half;
typedef half float16_t;

struct uint2 { uint x, y; };
struct uint3 { uint x, y, z; };

namespace mlxq_emu {

constexpr int SIMD = 32;
enum State { RUNNABLE, AT_BARRIER, AT_SIMD, DONE };

struct ThreadInfo {  // the values of the kernel attributes, per thread
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threads_per_grid, threads_per_threadgroup, threadgroups_per_grid, grid_origin, grid_size;
  uint3 dispatch_threads_per_threadgroup;
  uint thread_index_in_threadgroup, simdgroup_index_in_threadgroup, thread_index_in_simdgroup;
  uint simdgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup, threads_per_simdgroup, thread_execution_width;
  uint quadgroup_index_in_threadgroup, thread_index_in_quadgroup, quadgroups_per_threadgroup;
  uint dispatch_quadgroups_per_threadgroup;
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  State state = RUNNABLE;
  ThreadInfo info;
  uint simd_ops = 0;  // simd ops this lane has done (double-buffered slots by parity)
  int simd_kind = 0;
};

struct TgBuffer { void* ptr; size_t size; };

inline std::vector<Fiber> fibers;
inline ucontext_t scheduler;
inline int current = -1;
inline std::vector<TgBuffer> tg_buffers;
// simd exchange slots: [parity][simdgroup][lane] raw bytes, and the lanes taking part in each exchange
inline std::vector<unsigned char> slots;
inline std::vector<uint32_t> active_lanes;  // [parity][simdgroup]
inline int n_simd = 0;
constexpr int SLOT = 16;

[[noreturn]] inline void fail(const char* what) {
  const ThreadInfo& t = fibers[current < 0 ? 0 : current].info;
  std::fprintf(stderr, "metal-emu: %s (threadgroup %u,%u,%u thread %u)\n", what, t.threadgroup_position_in_grid.x,
               t.threadgroup_position_in_grid.y, t.threadgroup_position_in_grid.z, t.thread_index_in_threadgroup);
  std::exit(3);
}

inline const ThreadInfo& me() { return fibers[current].info; }

inline void yield(State s) {
  Fiber& f = fibers[current];
  f.state = s;
  swapcontext(&f.ctx, &scheduler);
}

inline void poison(void* p, size_t n) { std::memset(p, 0xFF, n); }

inline bool tg_register(void* p, size_t n) {
  tg_buffers.push_back({p, n});
  poison(p, n);
  return true;
}

// One simd exchange: deposit this lane's value, wait for every live lane of the simdgroup, then read.
template <class T>
inline const unsigned char* simd_exchange(T v, int kind) {
  static_assert(sizeof(T) <= SLOT, "simd value too large");
  Fiber& f = fibers[current];
  const ThreadInfo& t = f.info;
  int parity = f.simd_ops++ & 1;
  f.simd_kind = kind;
  unsigned char* base = &slots[((size_t)parity * n_simd + t.simdgroup_index_in_threadgroup) * SIMD * SLOT];
  std::memcpy(base + t.thread_index_in_simdgroup * SLOT, &v, sizeof(T));
  yield(AT_SIMD);
  return base;
}

inline uint32_t lanes_of_last_exchange() {
  const Fiber& f = fibers[current];
  return active_lanes[((f.simd_ops - 1) & 1) * n_simd + f.info.simdgroup_index_in_threadgroup];
}

template <class T> inline T slot_value(const unsigned char* base, uint lane) {
  T v;
  std::memcpy(&v, base + lane * SLOT, sizeof(T));
  return v;
}

template <class T, class Op> inline T simd_reduce(T v, int kind, Op op) {
  const unsigned char* base = simd_exchange(v, kind);
  uint32_t lanes = lanes_of_last_exchange();
  bool first = true;
  T acc{};
  for (uint l = 0; l < SIMD; ++l) {
    if (!(lanes >> l & 1)) continue;
    T x = slot_value<T>(base, l);
    acc = first ? x : op(acc, x);
    first = false;
  }
  return acc;
}

template <class T> inline T simd_read(T v, int kind, int lane) {
  const unsigned char* base = simd_exchange(v, kind);
  uint32_t lanes = lanes_of_last_exchange();
  if (lane < 0 || lane >= SIMD || !(lanes >> lane & 1)) return v;  // reading an inactive or absent lane: undefined
  return slot_value<T>(base, (uint)lane);
}

}  // namespace mlxq_emu

#define MLXQ_THREADGROUP(T, name, dims) \
  static T name dims;                   \
  static bool name##_registered = mlxq_emu::tg_register((void*)&name, sizeof(name)); \
  (void)name##_registered

namespace metal {
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

inline void threadgroup_barrier(mem_flags) { mlxq_emu::yield(mlxq_emu::AT_BARRIER); }
inline void simdgroup_barrier(mem_flags) { mlxq_emu::simd_exchange(0, 1); }

template <class T> inline T simd_sum(T v) { return mlxq_emu::simd_reduce(v, 2, [](T a, T b) { return T(a + b); }); }
template <class T> inline T simd_max(T v) { return mlxq_emu::simd_reduce(v, 3, [](T a, T b) { return a > b ? a : b; }); }
template <class T> inline T simd_min(T v) { return mlxq_emu::simd_reduce(v, 4, [](T a, T b) { return a < b ? a : b; }); }
template <class T> inline T simd_shuffle(T v, ushort lane) { return mlxq_emu::simd_read(v, 5, lane); }
template <class T> inline T simd_broadcast(T v, ushort lane) { return mlxq_emu::simd_read(v, 6, lane); }
template <class T> inline T simd_shuffle_xor(T v, ushort mask) {
  return mlxq_emu::simd_read(v, 7, int(mlxq_emu::me().thread_index_in_simdgroup ^ mask));
}
template <class T> inline T simd_shuffle_down(T v, ushort delta) {
  return mlxq_emu::simd_read(v, 8, int(mlxq_emu::me().thread_index_in_simdgroup + delta));
}
template <class T> inline T simd_shuffle_up(T v, ushort delta) {
  return mlxq_emu::simd_read(v, 9, int(mlxq_emu::me().thread_index_in_simdgroup) - int(delta));
}

template <class T> inline T min(T a, T b) { return a < b ? a : b; }
template <class T> inline T max(T a, T b) { return a > b ? a : b; }
template <class T> inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T> inline T select(T a, T b, bool c) { return c ? b : a; }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline float abs(float x) { return std::fabs(x); }
inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
inline float log(float x) { return std::log(x); }
inline float sqrt(float x) { return std::sqrt(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float precise_divide(float a, float b) { return a / b; }
template <class T, class U> inline T as_type(U u) {
  static_assert(sizeof(T) == sizeof(U), "as_type: sizes differ");
  T t;
  std::memcpy(&t, &u, sizeof(T));
  return t;
}
namespace fast {
inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
}  // namespace fast
namespace precise {
inline float exp(float x) { return std::exp(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
}  // namespace precise
}  // namespace metal
using namespace metal;
