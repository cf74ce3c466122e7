// Shared by every CUDA C kernel file of the package (batchnorm.cu, rownorm.cu): the
// element type chosen by one macro, conversions to and from the accumulation type, and
// vector loads. Each .cu file is compiled once per (device, dtype) with NVRTC through
// cupy.RawModule (fastbn.backends.cupy_raw inlines the #include "*.cuh" lines first, so
// NVRTC needs no include path), and by the test suite with nvcc:
//
//   FASTBN_DTYPE = 0 : float16 data, float32 accumulation and statistics
//   FASTBN_DTYPE = 1 : float32 data, float32 accumulation and statistics
//   FASTBN_DTYPE = 2 : float64 data, float64 accumulation and statistics
//   FASTBN_DTYPE = 3 : bfloat16 data (__nv_bfloat16), float32 accumulation and statistics
//
// The test suite also builds the kernels for the CPU (tests/cudasim/cuda_emulation.cpp,
// with FASTBN_HOST_EMULATION defined) to run them without a GPU.

#pragma once

#if !defined(FASTBN_DTYPE)
#define FASTBN_DTYPE 1
#endif

#if FASTBN_DTYPE == 0
typedef unsigned short T;  // IEEE binary16 bits; converted with cvt instructions
typedef float ACC;
#elif FASTBN_DTYPE == 1
typedef float T;
typedef float ACC;
#elif FASTBN_DTYPE == 2
typedef double T;
typedef double ACC;
#elif FASTBN_DTYPE == 3
// __nv_bfloat16 from cuda_bf16.h where the compiler finds it (nvcc; NVRTC with the CUDA
// headers on its include path). NVRTC has no include path of its own, and CuPy cannot
// bundle cuda_bf16.h, so without it (or with FASTBN_BF16_OWN defined) the same 2-byte type
// and conversions are defined below. The host emulation of the test suite defines
// __nv_bfloat16 and its conversions itself (tests/cudasim/cuda_emulation.cpp).
#if defined(FASTBN_HOST_EMULATION)
#define FASTBN_BF16_HEADER 1
#elif !defined(FASTBN_BF16_OWN) && __has_include(<cuda_bf16.h>)
#include <cuda_bf16.h>
#define FASTBN_BF16_HEADER 1
#endif
#if defined(FASTBN_BF16_HEADER)
typedef __nv_bfloat16 T;
#else
struct __align__(2) fastbn_bf16 {
    unsigned short bits;
};
typedef fastbn_bf16 T;
#endif
typedef float ACC;
#else
#error "FASTBN_DTYPE must be 0 (float16), 1 (float32), 2 (float64) or 3 (bfloat16)"
#endif

// Statistics, weight, bias, running stats and gradients of weight/bias are ACC
// (float16 and bfloat16 -> float32, the others unchanged), as the backend contract requires.

typedef long long i64;

#define FASTBN_FULL_MASK 0xffffffffu
#define FASTBN_MAX_THREADS 256
#define FASTBN_VEC 4
// Data kernels: at most 256 threads per block, and at least 4 such blocks (1024 threads)
// resident per SM for latency hiding, i.e. at most 64 registers per thread; float64
// needs twice the registers, so 2 blocks (128 registers). (Without a minimum, ptxas
// picked 32 registers for bn_apply_cf and spilled; the nvcc test rejects spills.)
#if FASTBN_DTYPE == 2
#define FASTBN_BOUNDS __launch_bounds__(FASTBN_MAX_THREADS, 2)
#else
#define FASTBN_BOUNDS __launch_bounds__(FASTBN_MAX_THREADS, 4)
#endif

// ------------------------------------------------------------------------------------
// element conversions and vector loads
// ------------------------------------------------------------------------------------

#if FASTBN_DTYPE == 0 && defined(FASTBN_HOST_EMULATION)
// Host build of the test suite's CPU emulation (tests/cudasim/cuda_emulation.cpp):
// the same round-to-nearest-even conversions through the compiler's _Float16.
__device__ __forceinline__ float to_acc(unsigned short h) {
    _Float16 v;
    __builtin_memcpy(&v, &h, 2);
    return (float)v;
}
__device__ __forceinline__ unsigned short from_acc(float f) {
    const _Float16 v = (_Float16)f;
    unsigned short h;
    __builtin_memcpy(&h, &v, 2);
    return h;
}
#elif FASTBN_DTYPE == 0
__device__ __forceinline__ float to_acc(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short from_acc(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#elif FASTBN_DTYPE == 3 && defined(FASTBN_BF16_HEADER)
// Exact widening (the bits shifted into the upper half of a float32) and rounding to
// nearest even (cvt.rn.bf16.f32 on sm_80 and later; a NaN becomes the canonical NaN 0x7FFF).
__device__ __forceinline__ float to_acc(T v) { return __bfloat162float(v); }
__device__ __forceinline__ T from_acc(float f) { return __float2bfloat16_rn(f); }
#elif FASTBN_DTYPE == 3
// The conversions of cuda_bf16.h: the same instructions, the same results.
__device__ __forceinline__ float to_acc(T v) { return __uint_as_float((unsigned)v.bits << 16); }
__device__ __forceinline__ T from_acc(float f) {
    T r;
#if __CUDA_ARCH__ >= 800
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(f));
#else
    // round to nearest even on the bits (carries into the exponent give infinity);
    // a NaN becomes the canonical NaN 0x7FFF
    const unsigned u = __float_as_uint(f);
    r.bits = (u & 0x7fffffffu) > 0x7f800000u
                 ? (unsigned short)0x7fffu
                 : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
    return r;
}
#else
__device__ __forceinline__ ACC to_acc(T v) { return (ACC)v; }
__device__ __forceinline__ T from_acc(ACC v) { return (T)v; }
#endif

// Four consecutive elements, loaded and stored with one instruction (16 bytes for
// float32, 8 for float16 and bfloat16, 2 x 16 for float64). Used only where the host has checked
// (or the kernel has arranged) that the address is a multiple of sizeof(V4).
struct alignas(FASTBN_VEC * sizeof(T)) V4 {
    T v[FASTBN_VEC];
};

__device__ __forceinline__ bool is_vec_aligned(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) % sizeof(V4)) == 0;
}

// Number of leading scalar elements before `p` reaches a V4 boundary (at most len).
__device__ __forceinline__ int head_len(const T* p, int len, int vec_ok) {
    if (!vec_ok) return len;  // no vector path at all: everything is "head"
    const int mis = (int)((reinterpret_cast<unsigned long long>(p) / sizeof(T)) % FASTBN_VEC);
    const int h = (FASTBN_VEC - mis) % FASTBN_VEC;
    return h < len ? h : len;
}
