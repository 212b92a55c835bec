// A Metal Shading Language subset for a compile check with clang (libclang, C++17, -fsyntax-only): the source
// MLX would compile, with this header in place of MLX's metal utils header. Declarations only.
//
// device / constant / threadgroup stay real, distinct address spaces (clang's address_space attribute), so
// passing a device pointer where a threadgroup one is expected, dropping an address space, or writing through
// a constant pointer are errors, as the Metal compiler makes them. Vector types are clang ext_vector_types
// (.x/.y/.z and swizzles work as in MSL).
#pragma once
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define thread
#define METAL_FUNC inline

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef __SIZE_TYPE__ size_t;
typedef long int64_t;
typedef unsigned long uint64_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef _Float16 half;
typedef half float16_t;
typedef __bf16 bfloat16_t;
typedef __bf16 bfloat;

#define MLXQ_VEC(T, n) typedef T T##n __attribute__((ext_vector_type(n)));
MLXQ_VEC(float, 2) MLXQ_VEC(float, 3) MLXQ_VEC(float, 4)
MLXQ_VEC(half, 2) MLXQ_VEC(half, 4)
MLXQ_VEC(uint, 2) MLXQ_VEC(uint, 3) MLXQ_VEC(uint, 4)
MLXQ_VEC(int, 2) MLXQ_VEC(int, 3) MLXQ_VEC(int, 4)
MLXQ_VEC(uchar, 4) MLXQ_VEC(ushort, 2)
#undef MLXQ_VEC

namespace metal {
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
mem_flags operator|(mem_flags, mem_flags);
void threadgroup_barrier(mem_flags);
void simdgroup_barrier(mem_flags);
template <class T> T simd_sum(T);
template <class T> T simd_max(T);
template <class T> T simd_min(T);
template <class T> T simd_shuffle(T, ushort);
template <class T> T simd_broadcast(T, ushort);
template <class T> T simd_shuffle_xor(T, ushort);
template <class T> T simd_shuffle_down(T, ushort);
template <class T> T simd_shuffle_up(T, ushort);
template <class T> T min(T, T);
template <class T> T max(T, T);
template <class T> T clamp(T, T, T);
template <class T> T select(T, T, bool);
float fma(float, float, float);
float abs(float);
float exp(float);
float exp2(float);
float log(float);
float sqrt(float);
float rsqrt(float);
float precise_divide(float, float);
template <class T, class U> T as_type(U);
namespace fast {
float exp(float);
float exp2(float);
float rsqrt(float);
}  // namespace fast
namespace precise {
float exp(float);
float rsqrt(float);
}  // namespace precise
}  // namespace metal
using namespace metal;
