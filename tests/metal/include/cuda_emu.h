// The CUDA subset of mlxq's .cu kernel twins, on top of the MSL emulator: a CUDA block is a threadgroup, a warp
// a simdgroup (32 lanes), so the same fiber scheduler runs them. MLX launches full blocks only (the driver is
// told so), and ceil(grid / block) of them.
#pragma once
#include "msl_emu.h"

#define __global__
#define __device__
#define __constant__
#define __forceinline__ inline
#define __grid_constant__
#define threadIdx (mlxq_emu::me().thread_position_in_threadgroup)
#define blockIdx (mlxq_emu::me().threadgroup_position_in_grid)
#define blockDim (mlxq_emu::me().dispatch_threads_per_threadgroup)
#define gridDim (mlxq_emu::me().threadgroups_per_grid)
#define __syncthreads() metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup)
typedef _Float16 __half;

template <class T> inline T __shfl_xor_sync(unsigned, T v, int mask) { return metal::simd_shuffle_xor(v, (ushort)mask); }
template <class T> inline T __shfl_down_sync(unsigned, T v, int delta) { return metal::simd_shuffle_down(v, (ushort)delta); }
template <class T> inline T __shfl_sync(unsigned, T v, int lane) { return metal::simd_shuffle(v, (ushort)lane); }

inline __half __ushort_as_half(unsigned short u) { return metal::as_type<__half>(u); }
inline float __half2float(__half h) { return (float)h; }
