// A CPU emulation of the CUDA execution model, just large enough to run the kernel files
// of fastbn/kernels (batchnorm.cu, rownorm.cu) unchanged on a machine without a GPU (test
// use only).
//
// Blocks run one after the other; the threads of a block run concurrently as
// std::threads, so __syncthreads() is a std::barrier over the block and __shared__
// variables (function-local statics here) are shared by the block, as on a GPU. Warp
// shuffles exchange values through a per-warp buffer between two warp barriers. A thread
// that returns drops out of its barriers, like an exited CUDA thread.
//
// bfloat16 (FASTBN_DTYPE=3): __nv_bfloat16 and the two conversions the kernels use, with
// the results of cuda_bf16.h (exact widening; rounding to nearest even, a NaN becoming the
// canonical NaN 0x7FFF, as cvt.rn.bf16.f32 does).
//
// Built by tests/cudasim/test_cuda_c_emulated.py as a shared library per (kernel file,
// dtype), from a directory holding the source as the backend hands it to NVRTC (headers
// inlined) as kernels.cu, and kernel_table.inc, one FASTBN_EMU_KERNEL(name) line per
// extern "C" kernel of that source:
//   g++ -std=c++20 -O1 -pthread -shared -fPIC -DFASTBN_DTYPE=<0|1|2|3> -DFASTBN_HOST_EMULATION
//       -I <that directory> cuda_emulation.cpp
// and driven like the CUDA driver API: fastbn_emu_launch(name, grid, block, args, sizes)
// with `args` an array of pointers to the argument values and `sizes` their byte sizes,
// checked against the kernel's parameter types.

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

using std::isfinite;  // CUDA device code has isfinite for float and double

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace emu {
thread_local dim3 thread_idx;
thread_local unsigned linear_tid = 0;
dim3 block_idx, block_dim, grid_dim;
std::unique_ptr<std::barrier<>> block_barrier;
std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
alignas(8) unsigned char warp_buf[32][32][8];  // [warp][lane][bytes]
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

using std::sqrt;

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

template <class V>
inline V __shfl_xor_sync(unsigned /*mask*/, V v, int lane_mask) {
    static_assert(sizeof(V) <= 8, "shuffle of a value wider than 8 bytes");
    const unsigned warp = emu::linear_tid / 32, lane = emu::linear_tid % 32;
    std::memcpy(emu::warp_buf[warp][lane], &v, sizeof(V));
    emu::warp_barriers[warp]->arrive_and_wait();
    V out;
    std::memcpy(&out, emu::warp_buf[warp][lane ^ (unsigned)lane_mask], sizeof(V));
    emu::warp_barriers[warp]->arrive_and_wait();
    return out;
}

#if FASTBN_DTYPE == 3
struct alignas(2) __nv_bfloat16 {
    unsigned short __x;
};
inline float __bfloat162float(__nv_bfloat16 v) {
    const std::uint32_t u = (std::uint32_t)v.__x << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, 4);
    __nv_bfloat16 r;
    r.__x = (u & 0x7fffffffu) > 0x7f800000u
                ? (unsigned short)0x7fffu
                : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return r;
}
#endif

#include "kernels.cu"

namespace emu {

using Thunk = std::function<int(void**, const int*, int)>;

template <class... P, std::size_t... I>
void call_with(void (*k)(P...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(args[I])...);
}

template <class... P>
Thunk thunk(void (*k)(P...)) {
    return [k](void** args, const int* sizes, int nargs) -> int {
        if (nargs != (int)sizeof...(P)) return 1;  // wrong number of arguments
        const int expected[] = {(int)sizeof(P)...};
        for (int i = 0; i < nargs; ++i)
            if (sizes[i] != expected[i]) return 2 + i;  // wrong size of argument i
        unsigned total = block_dim.x * block_dim.y * block_dim.z;
        for (unsigned bz = 0; bz < grid_dim.z; ++bz)
            for (unsigned by = 0; by < grid_dim.y; ++by)
                for (unsigned bx = 0; bx < grid_dim.x; ++bx) {
                    block_idx = dim3{bx, by, bz};
                    block_barrier = std::make_unique<std::barrier<>>(total);
                    warp_barriers.clear();
                    for (unsigned w = 0; w < (total + 31) / 32; ++w) {
                        const unsigned in_warp = (w + 1) * 32 <= total ? 32 : total - w * 32;
                        warp_barriers.push_back(std::make_unique<std::barrier<>>(in_warp));
                    }
                    std::vector<std::thread> threads;
                    threads.reserve(total);
                    for (unsigned t = 0; t < total; ++t)
                        threads.emplace_back([=] {
                            linear_tid = t;
                            thread_idx = dim3{t % block_dim.x, (t / block_dim.x) % block_dim.y,
                                              t / (block_dim.x * block_dim.y)};
                            call_with(k, args, std::index_sequence_for<P...>{});
                            warp_barriers[t / 32]->arrive_and_drop();
                            block_barrier->arrive_and_drop();
                        });
                    for (auto& th : threads) th.join();
                }
        return 0;
    };
}

#define FASTBN_EMU_KERNEL(name) {#name, thunk(name)}

const std::map<std::string, Thunk>& kernels() {
    static const std::map<std::string, Thunk> table = {
#include "kernel_table.inc"
    };
    return table;
}

}  // namespace emu

// Returns 0 on success, -1 for an unknown kernel, -2 for a bad launch shape, 1 for a
// wrong number of arguments, 2 + i for a wrong size of argument i.
extern "C" int fastbn_emu_launch(const char* name, const unsigned* grid, const unsigned* block,
                                 void** args, const int* sizes, int nargs) {
    const auto& table = emu::kernels();
    const auto it = table.find(name);
    if (it == table.end()) return -1;
    emu::grid_dim = dim3{grid[0], grid[1], grid[2]};
    emu::block_dim = dim3{block[0], block[1], block[2]};
    const unsigned total = block[0] * block[1] * block[2];
    if (total == 0 || total > 1024 || grid[1] > 65535 || grid[2] > 65535 || grid[0] == 0 ||
        total > 32 * 32)
        return -2;
    return it->second(args, sizes, nargs);
}
