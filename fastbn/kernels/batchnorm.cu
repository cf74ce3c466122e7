// Batch normalization kernels for the "cupy" backend (fastbn.backends.cupy_raw).
//
// Compiled once per (device, dtype); the element type and its conversions are in
// common.cuh, the Welford/Chan merges and block reductions in reduce.cuh.
//
// Every kernel works on the canonical (A, C, B) view of a C-contiguous array (see
// fastbn/backends/__init__.py). Two families cover all layouts:
//
// * channels-first ("cf", used when B is large): channel c is A rows of B contiguous
//   values. The reduced range of each channel is cut into tiles of at most `bch` values
//   of one row; a 2-d grid (x: splits, y: channels) gives every block a strided set of
//   tiles, so all SMs are busy even when C is small.
// * channels-last ("cl", used when B == 1, and when B is small): the data is A rows of
//   `cols = C * G` contiguous columns, column j belonging to channel j / G (G = B). A
//   2-d block puts threads along the columns (coalesced, VEC columns per thread with
//   one vector load) and along the rows; the grid splits the rows. Per-column partial
//   results are merged vertically in shared memory.
//
// Both families write per-block partial results to a small workspace of shape
// (S, cols); a finalize kernel (one warp per channel) merges the S * G partials of
// each channel and writes the per-channel outputs and the coefficients of the
// elementwise pass. Statistics are per-thread Welford states (updated a whole vector
// load or a pair of rows at a time) merged with Chan's formula through warp shuffles,
// shared memory and the finalize step: no E[x^2] - E[x]^2 anywhere.
//
// Offsets into the data are 64-bit; offsets inside one tile (at most `bch` values), tile
// counters (the host refuses A * C * nbc >= 2^31) and column indices are 32-bit. The
// host keeps gridDim.y <= 65535 and the kernels loop over the rest. The elementwise
// passes walk the data from its end, where the reduction pass finished, so part of what
// they read again is still in L2.
//
// The test suite also builds this file for the CPU (tests/cudasim/cuda_emulation.cpp,
// with FASTBN_HOST_EMULATION defined) to run the kernels without a GPU.

#include "common.cuh"
#include "reduce.cuh"

// ------------------------------------------------------------------------------------
// forward: statistics
// ------------------------------------------------------------------------------------

// Channels-first partial statistics. grid = (S, min(C, 65535)), block = (nthreads,).
// Writes pmean/pm2/pn[s * C + c] for split s = blockIdx.x.
extern "C" __global__ void FASTBN_BOUNDS
    bn_stats_cf(const T* __restrict__ x, i64 A, int C, i64 B, int bch, i64 nbc, int vec_ok,
                ACC* __restrict__ pmean, ACC* __restrict__ pm2, int* __restrict__ pn) {
    // tile indices fit in 32 bits (the host checks A * C * nbc < 2^31): cheap divisions
    const unsigned ntiles = (unsigned)(A * nbc), nb = (unsigned)nbc;
    const int tid = threadIdx.x, nt = blockDim.x;
    for (int c = blockIdx.y; c < C; c += gridDim.y) {
        ACC mean = 0, m2 = 0;
        int n = 0;
        for (unsigned t = blockIdx.x; t < ntiles; t += gridDim.x) {
            const unsigned a = t / nb;
            const i64 b0 = (i64)(t - a * nb) * bch;
            const i64 rem = B - b0;
            const int len = rem < (i64)bch ? (int)rem : bch;
            const T* p = x + (((i64)a * C + c) * B + b0);
            const int head = head_len(p, len, vec_ok);
            for (int i = tid; i < head; i += nt) welford_add(mean, m2, n, to_acc(p[i]));
            const V4* pv = reinterpret_cast<const V4*>(p + head);
            const int nvec = (len - head) / FASTBN_VEC;
            // two independent vector loads in flight per iteration
            int v = tid;
            for (; v + nt < nvec; v += 2 * nt) {
                const V4 q0 = pv[v];
                const V4 q1 = pv[v + nt];
                welford_add4(mean, m2, n, to_acc(q0.v[0]), to_acc(q0.v[1]), to_acc(q0.v[2]),
                             to_acc(q0.v[3]));
                welford_add4(mean, m2, n, to_acc(q1.v[0]), to_acc(q1.v[1]), to_acc(q1.v[2]),
                             to_acc(q1.v[3]));
            }
            if (v < nvec) {
                const V4 q0 = pv[v];
                welford_add4(mean, m2, n, to_acc(q0.v[0]), to_acc(q0.v[1]), to_acc(q0.v[2]),
                             to_acc(q0.v[3]));
            }
            for (int i = head + nvec * FASTBN_VEC + tid; i < len; i += nt)
                welford_add(mean, m2, n, to_acc(p[i]));
        }
        block_merge(mean, m2, n);
        if (tid == 0) {
            const i64 o = (i64)blockIdx.x * C + c;
            pmean[o] = mean;
            pm2[o] = m2;
            pn[o] = n;
        }
    }
}

// Channels-last partial statistics over A rows of `cols` columns. block = (BX, BY) with
// BX * BY <= 256 and BY a power of two; grid = (ceil(cols / (BX * VEC)), S), S <= 65535.
// Writes pmean/pm2/pn[s * cols + j] for split s = blockIdx.y.
template <int VEC>
__device__ __forceinline__ void stats_cl(const T* __restrict__ x, i64 A, int cols,
                                         ACC* __restrict__ pmean, ACC* __restrict__ pm2,
                                         int* __restrict__ pn) {
    __shared__ ACC s_mean[FASTBN_MAX_THREADS * VEC];
    __shared__ ACC s_m2[FASTBN_MAX_THREADS * VEC];
    __shared__ int s_n[FASTBN_MAX_THREADS];
    const int tx = threadIdx.x, ty = threadIdx.y, BX = blockDim.x, BY = blockDim.y;
    const int col0 = (blockIdx.x * BX + tx) * VEC;
    const bool active = col0 < cols;  // with VEC == 4 the host ensures cols % 4 == 0
    ACC mean[VEC], m2[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) mean[j] = m2[j] = 0;
    int n = 0;  // every column of this thread sees the same rows
    const i64 stride = (i64)gridDim.y * BY;
    i64 a = (i64)blockIdx.y * BY + ty;
    if (active) {
        // pairs of rows: both loads issued before any arithmetic, then one merge of the
        // pair's exact (mean, M2) per column
        for (; a + stride < A; a += 2 * stride) {
            ACC r0[VEC], r1[VEC];
            if (VEC == FASTBN_VEC) {
                const V4 q0 = *reinterpret_cast<const V4*>(x + (a * cols + col0));
                const V4 q1 = *reinterpret_cast<const V4*>(x + ((a + stride) * cols + col0));
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    r0[j] = to_acc(q0.v[j]);
                    r1[j] = to_acc(q1.v[j]);
                }
            } else {
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    r0[j] = to_acc(x[a * cols + col0 + j]);
                    r1[j] = to_acc(x[(a + stride) * cols + col0 + j]);
                }
            }
            const int nn = n + 2;
            const ACC fb = (ACC)2 / (ACC)nn;
            const ACC fa = (ACC)n * fb;
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                // the pair's mean r0 + h and M2 2 h^2; with an infinity in the pair h is not
                // finite: its mean is then (r0 + r1) / 2 (+-inf, or NaN for opposite
                // infinities) and its M2 NaN (inf - inf), as for welford_add
                const ACC h = (r1[j] - r0[j]) * (ACC)0.5;
                const bool fin = isfinite(h);
                const ACC pm = fin ? r0[j] + h : (r0[j] + r1[j]) * (ACC)0.5;
                const ACC q = fin ? (ACC)2 * h * h : h * (ACC)0;
                const ACC delta = pm - mean[j];
                mean[j] = merged_mean(mean[j], pm, delta, fb);
                m2[j] += q + delta * delta * fa;
            }
            n = nn;
        }
        if (a < A) {
            n += 1;
            const ACC r = (ACC)1 / (ACC)n;
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const ACC v = to_acc(x[a * cols + col0 + j]);
                const ACC d = v - mean[j];
                mean[j] = merged_mean(mean[j], v, d, r);
                m2[j] += d * (v - mean[j]);
            }
        }
    }
    // vertical merge over ty in shared memory
    const int slot = ty * BX + tx;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        s_mean[slot * VEC + j] = mean[j];
        s_m2[slot * VEC + j] = m2[j];
    }
    s_n[slot] = n;
    __syncthreads();
    for (int h = BY >> 1; h > 0; h >>= 1) {
        if (ty < h) {
            const int other = (ty + h) * BX + tx;
            const int nb = s_n[other];
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                int nj = n;
                chan_merge(mean[j], m2[j], nj, s_mean[other * VEC + j], s_m2[other * VEC + j],
                           nb);
                s_mean[slot * VEC + j] = mean[j];
                s_m2[slot * VEC + j] = m2[j];
            }
            n += nb;
            s_n[slot] = n;
        }
        __syncthreads();
    }
    if (ty == 0 && active) {
        const i64 o = (i64)blockIdx.y * cols + col0;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            pmean[o + j] = mean[j];
            pm2[o + j] = m2[j];
            pn[o + j] = n;
        }
    }
}

extern "C" __global__ void FASTBN_BOUNDS
    bn_stats_cl4(const T* __restrict__ x, i64 A, int cols, ACC* __restrict__ pmean,
                 ACC* __restrict__ pm2, int* __restrict__ pn) {
    stats_cl<FASTBN_VEC>(x, A, cols, pmean, pm2, pn);
}

extern "C" __global__ void FASTBN_BOUNDS
    bn_stats_cl1(const T* __restrict__ x, i64 A, int cols, ACC* __restrict__ pmean,
                 ACC* __restrict__ pm2, int* __restrict__ pn) {
    stats_cl<1>(x, A, cols, pmean, pm2, pn);
}

// Finalize: one warp per channel merges the S * G partials of channel c (columns
// c*G .. c*G+G-1 of every split) in double, then writes mean, biased var, invstd
// (0 where var + eps == 0) and alpha = weight * invstd. block = (32, k), grid =
// (ceil(C / k),).
extern "C" __global__ void bn_stats_finalize(const ACC* __restrict__ pmean,
                                             const ACC* __restrict__ pm2,
                                             const int* __restrict__ pn, int S, int C, int G,
                                             double eps, const ACC* __restrict__ weight,
                                             ACC* __restrict__ mean_out,
                                             ACC* __restrict__ var_out,
                                             ACC* __restrict__ invstd_out,
                                             ACC* __restrict__ alpha_out) {
    const int c = blockIdx.x * blockDim.y + threadIdx.y;
    if (c >= C) return;  // whole warps leave together: c is uniform across a warp
    const int lane = threadIdx.x;
    const i64 cols = (i64)C * G;
    const i64 total = (i64)S * G;
    double mean = 0, m2 = 0;
    i64 n = 0;
    for (i64 k = lane; k < total; k += 32) {
        const i64 s = k / G;
        const i64 o = s * cols + (i64)c * G + (k - s * G);
        chan_merge_d(mean, m2, n, (double)pmean[o], (double)pm2[o], (i64)pn[o]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const double mb = __shfl_xor_sync(FASTBN_FULL_MASK, mean, o);
        const double qb = __shfl_xor_sync(FASTBN_FULL_MASK, m2, o);
        const i64 nb = __shfl_xor_sync(FASTBN_FULL_MASK, n, o);
        chan_merge_d(mean, m2, n, mb, qb, nb);
    }
    if (lane == 0) {
        const double var = n > 0 ? m2 / (double)n : 0.0;
        const double ve = var + eps;
        const double invstd = ve == 0.0 ? 0.0 : 1.0 / sqrt(ve);
        mean_out[c] = (ACC)mean;
        var_out[c] = (ACC)var;
        invstd_out[c] = (ACC)invstd;
        alpha_out[c] = (ACC)((double)weight[c] * invstd);
    }
}

// Evaluation: alpha = weight / sqrt(var + eps) (0 where var + eps == 0). Thread per
// channel.
extern "C" __global__ void bn_eval_prep(const ACC* __restrict__ var,
                                        const ACC* __restrict__ weight, int C, double eps,
                                        ACC* __restrict__ alpha_out) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const double ve = (double)var[c] + eps;
    const double invstd = ve == 0.0 ? 0.0 : 1.0 / sqrt(ve);
    alpha_out[c] = (ACC)((double)weight[c] * invstd);
}

// ------------------------------------------------------------------------------------
// elementwise passes
//   forward : out = (x - mean) * alpha + beta
//   backward: out = dy * k1 + (x - mean) * k2 + k3
// (mean subtracted first: no cancellation when |mean| >> std.)
// ------------------------------------------------------------------------------------

template <bool BWD>
__device__ __forceinline__ ACC ew(ACC xv, ACC dyv, ACC m, ACC k1, ACC k2, ACC k3) {
    if (BWD) return dyv * k1 + ((xv - m) * k2 + k3);
    return (xv - m) * k2 + k3;
}

// Channels-first elementwise. grid = (G1,) (grid-stride over A * C * nbc tiles, walked
// from the end of the tensor), block = (nthreads,). For the forward pass dy is unused
// (pass x) and k1 is unused.
template <bool BWD>
__device__ __forceinline__ void ew_cf(const T* __restrict__ x, const T* __restrict__ dy,
                                      T* __restrict__ out, i64 A, int C, i64 B, int bch,
                                      i64 nbc, int vec_ok, const ACC* __restrict__ mean,
                                      const ACC* __restrict__ k1, const ACC* __restrict__ k2,
                                      const ACC* __restrict__ k3) {
    // 32-bit tile indices: the host checks A * C * nbc < 2^31
    const unsigned ntiles = (unsigned)(A * C * nbc), nb = (unsigned)nbc;
    const int tid = threadIdx.x, nt = blockDim.x;
    for (unsigned tf = blockIdx.x; tf < ntiles; tf += gridDim.x) {
        // last tiles first: the reduction pass has just read them, so part of them is
        // still in L2 (the tensors are larger than L2; this saves part of the re-read)
        const unsigned t = ntiles - 1 - tf;
        const unsigned row = t / nb;
        const int c = (int)(row % (unsigned)C);
        const i64 b0 = (i64)(t - row * nb) * bch;
        const i64 rem = B - b0;
        const int len = rem < (i64)bch ? (int)rem : bch;
        const i64 base = (i64)row * B + b0;
        const T* px = x + base;
        const T* pd = dy + base;
        T* po = out + base;
        const ACC m = mean[c], c2 = k2[c], c3 = k3[c];
        const ACC c1 = BWD ? k1[c] : (ACC)0;
        const int head = head_len(px, len, vec_ok);
        for (int i = tid; i < head; i += nt)
            po[i] = from_acc(ew<BWD>(to_acc(px[i]), BWD ? to_acc(pd[i]) : (ACC)0, m, c1, c2, c3));
        const int nvec = (len - head) / FASTBN_VEC;
        const V4* vx = reinterpret_cast<const V4*>(px + head);
        const V4* vd = reinterpret_cast<const V4*>(pd + head);
        V4* vo = reinterpret_cast<V4*>(po + head);
        for (int v = tid; v < nvec; v += nt) {
            const V4 qx = vx[v];
            V4 qd;
            if (BWD) qd = vd[v];
            V4 r;
#pragma unroll
            for (int j = 0; j < FASTBN_VEC; ++j)
                r.v[j] = from_acc(
                    ew<BWD>(to_acc(qx.v[j]), BWD ? to_acc(qd.v[j]) : (ACC)0, m, c1, c2, c3));
            vo[v] = r;
        }
        for (int i = head + nvec * FASTBN_VEC + tid; i < len; i += nt)
            po[i] = from_acc(ew<BWD>(to_acc(px[i]), BWD ? to_acc(pd[i]) : (ACC)0, m, c1, c2, c3));
    }
}

// Channels-last elementwise over A rows of `cols` columns (column j in channel j / G).
// block = (BX, BY), grid = (ceil(cols / (BX * VEC)), R) with R <= 65535; each thread
// keeps the coefficients of its VEC columns in registers and walks the rows.
template <bool BWD, int VEC>
__device__ __forceinline__ void ew_cl(const T* __restrict__ x, const T* __restrict__ dy,
                                      T* __restrict__ out, i64 A, int cols, int G,
                                      const ACC* __restrict__ mean, const ACC* __restrict__ k1,
                                      const ACC* __restrict__ k2, const ACC* __restrict__ k3) {
    const int col0 = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (col0 >= cols) return;
    ACC m[VEC], c1[VEC], c2[VEC], c3[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        const int c = (col0 + j) / G;
        m[j] = mean[c];
        c1[j] = BWD ? k1[c] : (ACC)0;
        c2[j] = k2[c];
        c3[j] = k3[c];
    }
    const i64 stride = (i64)gridDim.y * blockDim.y;
    for (i64 af = (i64)blockIdx.y * blockDim.y + threadIdx.y; af < A; af += stride) {
        const i64 a = A - 1 - af;  // last rows first: still partly in L2 after the reduction
        const i64 o = a * cols + col0;
        if (VEC == FASTBN_VEC) {
            const V4 qx = *reinterpret_cast<const V4*>(x + o);
            V4 qd;
            if (BWD) qd = *reinterpret_cast<const V4*>(dy + o);
            V4 r;
#pragma unroll
            for (int j = 0; j < VEC; ++j)
                r.v[j] = from_acc(ew<BWD>(to_acc(qx.v[j]), BWD ? to_acc(qd.v[j]) : (ACC)0, m[j],
                                          c1[j], c2[j], c3[j]));
            *reinterpret_cast<V4*>(out + o) = r;
        } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j)
                out[o + j] = from_acc(ew<BWD>(to_acc(x[o + j]), BWD ? to_acc(dy[o + j]) : (ACC)0,
                                              m[j], c1[j], c2[j], c3[j]));
        }
    }
}

extern "C" __global__ void FASTBN_BOUNDS
    bn_apply_cf(const T* __restrict__ x, T* __restrict__ y, i64 A, int C, i64 B, int bch,
                i64 nbc, int vec_ok, const ACC* __restrict__ mean,
                const ACC* __restrict__ alpha, const ACC* __restrict__ beta) {
    ew_cf<false>(x, x, y, A, C, B, bch, nbc, vec_ok, mean, alpha, alpha, beta);
}

extern "C" __global__ void FASTBN_BOUNDS
    bn_apply_cl4(const T* __restrict__ x, T* __restrict__ y, i64 A, int cols, int G,
                 const ACC* __restrict__ mean, const ACC* __restrict__ alpha,
                 const ACC* __restrict__ beta) {
    ew_cl<false, FASTBN_VEC>(x, x, y, A, cols, G, mean, alpha, alpha, beta);
}

extern "C" __global__ void FASTBN_BOUNDS
    bn_apply_cl1(const T* __restrict__ x, T* __restrict__ y, i64 A, int cols, int G,
                 const ACC* __restrict__ mean, const ACC* __restrict__ alpha,
                 const ACC* __restrict__ beta) {
    ew_cl<false, 1>(x, x, y, A, cols, G, mean, alpha, alpha, beta);
}

// ------------------------------------------------------------------------------------
// backward: the two reductions sum(dy) and sum(dy * (x - mean)) in one pass
// ------------------------------------------------------------------------------------

extern "C" __global__ void FASTBN_BOUNDS
    bn_bwd_reduce_cf(const T* __restrict__ dy, const T* __restrict__ x, i64 A, int C, i64 B,
                     int bch, i64 nbc, int vec_ok, const ACC* __restrict__ mean,
                     ACC* __restrict__ psum_dy, ACC* __restrict__ psum_dyxm) {
    const unsigned ntiles = (unsigned)(A * nbc), nb = (unsigned)nbc;  // see bn_stats_cf
    const int tid = threadIdx.x, nt = blockDim.x;
    for (int c = blockIdx.y; c < C; c += gridDim.y) {
        const ACC m = mean[c];
        ACC s1 = 0, s2 = 0;
        for (unsigned t = blockIdx.x; t < ntiles; t += gridDim.x) {
            const unsigned a = t / nb;
            const i64 b0 = (i64)(t - a * nb) * bch;
            const i64 rem = B - b0;
            const int len = rem < (i64)bch ? (int)rem : bch;
            const i64 base = ((i64)a * C + c) * B + b0;
            const T* px = x + base;
            const T* pd = dy + base;
            const int head = head_len(px, len, vec_ok);
            for (int i = tid; i < head; i += nt) {
                const ACC g = to_acc(pd[i]);
                s1 += g;
                s2 += g * (to_acc(px[i]) - m);
            }
            const int nvec = (len - head) / FASTBN_VEC;
            const V4* vx = reinterpret_cast<const V4*>(px + head);
            const V4* vd = reinterpret_cast<const V4*>(pd + head);
            for (int v = tid; v < nvec; v += nt) {
                const V4 qx = vx[v];
                const V4 qd = vd[v];
#pragma unroll
                for (int j = 0; j < FASTBN_VEC; ++j) {
                    const ACC g = to_acc(qd.v[j]);
                    s1 += g;
                    s2 += g * (to_acc(qx.v[j]) - m);
                }
            }
            for (int i = head + nvec * FASTBN_VEC + tid; i < len; i += nt) {
                const ACC g = to_acc(pd[i]);
                s1 += g;
                s2 += g * (to_acc(px[i]) - m);
            }
        }
        block_sum2(s1, s2);
        if (tid == 0) {
            const i64 o = (i64)blockIdx.x * C + c;
            psum_dy[o] = s1;
            psum_dyxm[o] = s2;
        }
    }
}

template <int VEC>
__device__ __forceinline__ void bwd_reduce_cl(const T* __restrict__ dy, const T* __restrict__ x,
                                              i64 A, int cols, int G,
                                              const ACC* __restrict__ mean,
                                              ACC* __restrict__ psum_dy,
                                              ACC* __restrict__ psum_dyxm) {
    __shared__ ACC s_1[FASTBN_MAX_THREADS * VEC];
    __shared__ ACC s_2[FASTBN_MAX_THREADS * VEC];
    const int tx = threadIdx.x, ty = threadIdx.y, BX = blockDim.x, BY = blockDim.y;
    const int col0 = (blockIdx.x * BX + tx) * VEC;
    const bool active = col0 < cols;
    ACC m[VEC], s1[VEC], s2[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        m[j] = active ? mean[(col0 + j) / G] : (ACC)0;
        s1[j] = s2[j] = 0;
    }
    if (active) {
        const i64 stride = (i64)gridDim.y * BY;
        for (i64 a = (i64)blockIdx.y * BY + ty; a < A; a += stride) {
            const i64 o = a * cols + col0;
            if (VEC == FASTBN_VEC) {
                const V4 qx = *reinterpret_cast<const V4*>(x + o);
                const V4 qd = *reinterpret_cast<const V4*>(dy + o);
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    const ACC g = to_acc(qd.v[j]);
                    s1[j] += g;
                    s2[j] += g * (to_acc(qx.v[j]) - m[j]);
                }
            } else {
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    const ACC g = to_acc(dy[o + j]);
                    s1[j] += g;
                    s2[j] += g * (to_acc(x[o + j]) - m[j]);
                }
            }
        }
    }
    const int slot = ty * BX + tx;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        s_1[slot * VEC + j] = s1[j];
        s_2[slot * VEC + j] = s2[j];
    }
    __syncthreads();
    for (int h = BY >> 1; h > 0; h >>= 1) {
        if (ty < h) {
            const int other = (ty + h) * BX + tx;
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                s1[j] += s_1[other * VEC + j];
                s2[j] += s_2[other * VEC + j];
                s_1[slot * VEC + j] = s1[j];
                s_2[slot * VEC + j] = s2[j];
            }
        }
        __syncthreads();
    }
    if (ty == 0 && active) {
        const i64 o = (i64)blockIdx.y * cols + col0;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            psum_dy[o + j] = s1[j];
            psum_dyxm[o + j] = s2[j];
        }
    }
}

extern "C" __global__ void FASTBN_BOUNDS
    bn_bwd_reduce_cl4(const T* __restrict__ dy, const T* __restrict__ x, i64 A, int cols,
                      int G, const ACC* __restrict__ mean, ACC* __restrict__ psum_dy,
                      ACC* __restrict__ psum_dyxm) {
    bwd_reduce_cl<FASTBN_VEC>(dy, x, A, cols, G, mean, psum_dy, psum_dyxm);
}

extern "C" __global__ void FASTBN_BOUNDS
    bn_bwd_reduce_cl1(const T* __restrict__ dy, const T* __restrict__ x, i64 A, int cols,
                      int G, const ACC* __restrict__ mean, ACC* __restrict__ psum_dy,
                      ACC* __restrict__ psum_dyxm) {
    bwd_reduce_cl<1>(dy, x, A, cols, G, mean, psum_dy, psum_dyxm);
}

// One warp per channel: db = sum(dy), s2 = sum(dy * (x - mean)) over the S * G
// partials (in double); dweight = s2 * invstd, dbias = db, and the coefficients of
// dx = dy * k1 + (x - mean) * k2 + k3:
//   k1 = w * invstd, k2 = -w * invstd^3 * s2 / M, k3 = -w * invstd * db / M.
extern "C" __global__ void bn_bwd_finalize(const ACC* __restrict__ psum_dy,
                                           const ACC* __restrict__ psum_dyxm, int S, int C,
                                           int G, double M, const ACC* __restrict__ invstd,
                                           const ACC* __restrict__ weight,
                                           ACC* __restrict__ dweight, ACC* __restrict__ dbias,
                                           ACC* __restrict__ k1, ACC* __restrict__ k2,
                                           ACC* __restrict__ k3) {
    const int c = blockIdx.x * blockDim.y + threadIdx.y;
    if (c >= C) return;
    const int lane = threadIdx.x;
    const i64 cols = (i64)C * G;
    const i64 total = (i64)S * G;
    double s1 = 0, s2 = 0;
    for (i64 k = lane; k < total; k += 32) {
        const i64 s = k / G;
        const i64 o = s * cols + (i64)c * G + (k - s * G);
        s1 += (double)psum_dy[o];
        s2 += (double)psum_dyxm[o];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        s1 += __shfl_xor_sync(FASTBN_FULL_MASK, s1, o);
        s2 += __shfl_xor_sync(FASTBN_FULL_MASK, s2, o);
    }
    if (lane == 0) {
        const double is = (double)invstd[c];
        const double w = (double)weight[c];
        dweight[c] = (ACC)(s2 * is);
        dbias[c] = (ACC)s1;
        k1[c] = (ACC)(w * is);
        k2[c] = (ACC)(-w * is * is * is * s2 / M);
        k3[c] = (ACC)(-w * is * s1 / M);
    }
}

extern "C" __global__ void FASTBN_BOUNDS
    bn_bwd_apply_cf(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, i64 A,
                    int C, i64 B, int bch, i64 nbc, int vec_ok, const ACC* __restrict__ mean,
                    const ACC* __restrict__ k1, const ACC* __restrict__ k2,
                    const ACC* __restrict__ k3) {
    ew_cf<true>(x, dy, dx, A, C, B, bch, nbc, vec_ok, mean, k1, k2, k3);
}

extern "C" __global__ void FASTBN_BOUNDS
    bn_bwd_apply_cl4(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                     i64 A, int cols, int G, const ACC* __restrict__ mean,
                     const ACC* __restrict__ k1, const ACC* __restrict__ k2,
                     const ACC* __restrict__ k3) {
    ew_cl<true, FASTBN_VEC>(x, dy, dx, A, cols, G, mean, k1, k2, k3);
}

extern "C" __global__ void FASTBN_BOUNDS
    bn_bwd_apply_cl1(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                     i64 A, int cols, int G, const ACC* __restrict__ mean,
                     const ACC* __restrict__ k1, const ACC* __restrict__ k2,
                     const ACC* __restrict__ k3) {
    ew_cl<true, 1>(x, dy, dx, A, cols, G, mean, k1, k2, k3);
}
