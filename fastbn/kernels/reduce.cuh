// Shared reductions of the CUDA C kernels: Welford states merged with Chan's formula
// (never E[x^2] - E[x]^2), warp shuffles and 1-d block reductions.

#pragma once
#include "common.cuh"

// ------------------------------------------------------------------------------------
// Welford / Chan merges
// ------------------------------------------------------------------------------------

// The merged mean: mean + delta * fb, where delta = mean_b - mean and fb = n_b / (n + n_b).
// Where delta is not finite (an infinite mean, or finite means whose difference overflows)
// that would give inf - inf = NaN for an infinite `mean`; the weighted average gives +-inf,
// or NaN for opposite infinities, as a sum over all the values does (the CPU backend and
// torch agree). Equal means merge exactly, so a constant feature keeps its value.
template <typename F>
__device__ __forceinline__ F merged_mean(F mean, F mean_b, F delta, F fb) {
    return isfinite(delta) ? mean + delta * fb : mean * ((F)1 - fb) + mean_b * fb;
}

// Merge (mean_b, m2_b, n_b) into (mean, m2, n) with Chan et al.'s formula. Handles
// empty sides exactly: n == 0 gives (mean_b, m2_b), n_b == 0 leaves the state as is.
__device__ __forceinline__ void chan_merge(ACC& mean, ACC& m2, int& n, ACC mean_b, ACC m2_b,
                                           int n_b) {
    const int nn = n + n_b;
    if (nn == 0) return;
    const ACC delta = mean_b - mean;
    const ACC fb = (ACC)n_b / (ACC)nn;
    mean = merged_mean(mean, mean_b, delta, fb);
    m2 += m2_b + delta * delta * (ACC)n * fb;
    n = nn;
}

// Same merge with 64-bit counts and double arithmetic (finalize step, where counts can
// exceed 2^31 and there are few merges).
__device__ __forceinline__ void chan_merge_d(double& mean, double& m2, i64& n, double mean_b,
                                             double m2_b, i64 n_b) {
    const i64 nn = n + n_b;
    if (nn == 0) return;
    const double delta = mean_b - mean;
    const double fb = (double)n_b / (double)nn;
    mean = merged_mean(mean, mean_b, delta, fb);
    m2 += m2_b + delta * delta * (double)n * fb;
    n = nn;
}

// One new value (classic Welford update; infinities as in merged_mean).
__device__ __forceinline__ void welford_add(ACC& mean, ACC& m2, int& n, ACC v) {
    n += 1;
    const ACC d = v - mean;
    mean = isfinite(d) ? mean + d / (ACC)n : mean * ((ACC)(n - 1) / (ACC)n) + v / (ACC)n;
    m2 += d * (v - mean);
}

// Four new values at once: exact two-pass mean/M2 of the four in registers, then one
// Chan merge (one division per four values instead of four).
__device__ __forceinline__ void welford_add4(ACC& mean, ACC& m2, int& n, ACC a, ACC b, ACC c,
                                             ACC d) {
    const ACC m4 = ((a + b) + (c + d)) * (ACC)0.25;
    const ACC da = a - m4, db = b - m4, dc = c - m4, dd = d - m4;
    const ACC q4 = (da * da + db * db) + (dc * dc + dd * dd);
    chan_merge(mean, m2, n, m4, q4, 4);
}

// Butterfly over a warp: afterwards every lane holds the merge of all 32 states.
__device__ __forceinline__ void warp_merge(ACC& mean, ACC& m2, int& n) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const ACC mb = __shfl_xor_sync(FASTBN_FULL_MASK, mean, o);
        const ACC qb = __shfl_xor_sync(FASTBN_FULL_MASK, m2, o);
        const int nb = __shfl_xor_sync(FASTBN_FULL_MASK, n, o);
        chan_merge(mean, m2, n, mb, qb, nb);
    }
}

__device__ __forceinline__ ACC warp_sum(ACC v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FASTBN_FULL_MASK, v, o);
    return v;
}

// Merge the states of a 1-d block (blockDim.x a multiple of 32, <= 256). The result is
// valid in thread 0. Ends with __syncthreads() so the shared arrays can be reused.
__device__ __forceinline__ void block_merge(ACC& mean, ACC& m2, int& n) {
    __shared__ ACC s_mean[FASTBN_MAX_THREADS / 32];
    __shared__ ACC s_m2[FASTBN_MAX_THREADS / 32];
    __shared__ int s_n[FASTBN_MAX_THREADS / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    warp_merge(mean, m2, n);
    if (lane == 0) {
        s_mean[warp] = mean;
        s_m2[warp] = m2;
        s_n[warp] = n;
    }
    __syncthreads();
    if (warp == 0) {
        mean = lane < nwarps ? s_mean[lane] : (ACC)0;
        m2 = lane < nwarps ? s_m2[lane] : (ACC)0;
        n = lane < nwarps ? s_n[lane] : 0;
        warp_merge(mean, m2, n);
    }
    __syncthreads();
}

// Two sums over a 1-d block; the result is valid in thread 0.
__device__ __forceinline__ void block_sum2(ACC& u, ACC& v) {
    __shared__ ACC s_u[FASTBN_MAX_THREADS / 32];
    __shared__ ACC s_v[FASTBN_MAX_THREADS / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    u = warp_sum(u);
    v = warp_sum(v);
    if (lane == 0) {
        s_u[warp] = u;
        s_v[warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
        u = warp_sum(lane < nwarps ? s_u[lane] : (ACC)0);
        v = warp_sum(lane < nwarps ? s_v[lane] : (ACC)0);
    }
    __syncthreads();
}
