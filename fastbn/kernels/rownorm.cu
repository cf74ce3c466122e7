// Layer norm and RMS norm kernels for the "cupy" backend (fastbn.backends.cupy_raw).
//
// Compiled once per (device, dtype) like batchnorm.cu, from the same headers: the element
// type and its conversions (common.cuh), Welford states merged with Chan's formula and the
// block reductions (reduce.cuh).
//
// The data are R rows of N contiguous values (the backend contract's (R, N) view). A
// 1-d block of 32..256 threads (a power of two, chosen by the host so that each thread
// has a few vector loads of the row) handles one row at a time, grid-striding over the
// rows:
//
// * forward: per-thread Welford states over the row (layer norm) or sums of squares (RMS
//   norm), merged over the block; then the elementwise pass re-reads the row, which the
//   statistics pass has just brought into L1/L2 (rows of up to 48 KiB stay in L1 with the
//   number of blocks the launch bounds allow), so DRAM sees x once;
// * backward: per row sum(g) and sum(g * xhat) with g = dy * weight, merged over the
//   block, then dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (RMS norm: no mean(g)
//   term); dweight and dbias are column sums over the rows, done as apex does it: a
//   second kernel writes per-block partial column sums (blocks of 32 columns x 8 rows,
//   the grid splitting the rows), and a finalize kernel per output adds the partials in
//   double.
//
// All integer arguments are 64-bit and eps has the accumulation type (as in torch's
// kernels), so the same host code launches these kernels and the
// numba.cuda ones (fastbn.backends._gpu_rows); the host refuses N >= 2^31, so offsets
// inside a row are 32-bit.

#include "common.cuh"
#include "reduce.cuh"

// rstd = 1 / sqrt(v + eps), 0 where v + eps == 0 (the backend contract)
__device__ __forceinline__ ACC rstd_of(ACC v, ACC eps) {
    const ACC ve = v + eps;
    return ve == (ACC)0 ? (ACC)0 : (ACC)1 / sqrt(ve);
}

// Per-row statistics, then y. RMS: mean_out is unused (pass rstd_out) and b is unused.
template <bool RMS>
__device__ __forceinline__ void row_forward(const T* __restrict__ x, T* __restrict__ y, i64 R,
                                            i64 N64, i64 vec_ok, const ACC* __restrict__ w,
                                            const ACC* __restrict__ b, ACC eps,
                                            ACC* __restrict__ mean_out,
                                            ACC* __restrict__ rstd_out) {
    __shared__ ACC s_stat[2];
    const int N = (int)N64, tid = threadIdx.x, nt = blockDim.x;
    for (i64 r = blockIdx.x; r < R; r += gridDim.x) {
        const T* px = x + r * N64;
        T* py = y + r * N64;
        const int head = head_len(px, N, (int)vec_ok);
        const int nvec = (N - head) / FASTBN_VEC;
        const int tail0 = head + nvec * FASTBN_VEC;
        const V4* vx = reinterpret_cast<const V4*>(px + head);
        ACC mean = 0, m2 = 0, ss = 0;
        int n = 0;
        for (int i = tid; i < head; i += nt) {
            const ACC v = to_acc(px[i]);
            if (RMS) ss += v * v;
            else welford_add(mean, m2, n, v);
        }
        for (int k = tid; k < nvec; k += nt) {
            const V4 q = vx[k];
            const ACC a = to_acc(q.v[0]), bb = to_acc(q.v[1]), c = to_acc(q.v[2]),
                      d = to_acc(q.v[3]);
            if (RMS) ss += (a * a + bb * bb) + (c * c + d * d);
            else welford_add4(mean, m2, n, a, bb, c, d);
        }
        for (int i = tail0 + tid; i < N; i += nt) {
            const ACC v = to_acc(px[i]);
            if (RMS) ss += v * v;
            else welford_add(mean, m2, n, v);
        }
        if (RMS) {
            ACC unused = 0;
            block_sum2(ss, unused);
        } else {
            block_merge(mean, m2, n);
        }
        if (tid == 0) {
            const ACC rs = rstd_of(RMS ? ss / (ACC)N : (n > 0 ? m2 / (ACC)n : (ACC)0), eps);
            s_stat[0] = RMS ? (ACC)0 : mean;
            s_stat[1] = rs;
            if (!RMS) mean_out[r] = mean;
            rstd_out[r] = rs;
        }
        __syncthreads();
        const ACC m = s_stat[0], rs = s_stat[1];
        // y = (x - mean) * rstd * w + b (mean subtracted first; RMS: x * rstd * w)
        for (int i = tid; i < head; i += nt)
            py[i] = from_acc((to_acc(px[i]) - m) * rs * w[i] + (RMS ? (ACC)0 : b[i]));
        V4* vy = reinterpret_cast<V4*>(py + head);
        for (int k = tid; k < nvec; k += nt) {
            const V4 q = vx[k];
            V4 o;
            const int j0 = head + k * FASTBN_VEC;
#pragma unroll
            for (int j = 0; j < FASTBN_VEC; ++j)
                o.v[j] = from_acc((to_acc(q.v[j]) - m) * rs * w[j0 + j] +
                                  (RMS ? (ACC)0 : b[j0 + j]));
            vy[k] = o;
        }
        for (int i = tail0 + tid; i < N; i += nt)
            py[i] = from_acc((to_acc(px[i]) - m) * rs * w[i] + (RMS ? (ACC)0 : b[i]));
        __syncthreads();  // s_stat is rewritten for the next row
    }
}

extern "C" __global__ void FASTBN_BOUNDS
    ln_forward(const T* __restrict__ x, T* __restrict__ y, i64 R, i64 N, i64 vec_ok,
               const ACC* __restrict__ w, const ACC* __restrict__ b, ACC eps,
               ACC* __restrict__ mean_out, ACC* __restrict__ rstd_out) {
    row_forward<false>(x, y, R, N, vec_ok, w, b, eps, mean_out, rstd_out);
}

extern "C" __global__ void FASTBN_BOUNDS
    rms_forward(const T* __restrict__ x, T* __restrict__ y, i64 R, i64 N, i64 vec_ok,
                const ACC* __restrict__ w, ACC eps, ACC* __restrict__ rstd_out) {
    row_forward<true>(x, y, R, N, vec_ok, w, w, eps, rstd_out, rstd_out);
}

// dx of one row: g = dy * w, xhat = (x - mean) * rstd (RMS: x * rstd),
// dx = rstd * (g - s1 / N - xhat * s2 / N) with s1 = sum(g) (0 for RMS), s2 = sum(g xhat).
template <bool RMS>
__device__ __forceinline__ void row_backward(const T* __restrict__ dy, const T* __restrict__ x,
                                             T* __restrict__ dx, i64 R, i64 N64, i64 vec_ok,
                                             const ACC* __restrict__ mean,
                                             const ACC* __restrict__ rstd,
                                             const ACC* __restrict__ w) {
    __shared__ ACC s_sum[2];
    const int N = (int)N64, tid = threadIdx.x, nt = blockDim.x;
    for (i64 r = blockIdx.x; r < R; r += gridDim.x) {
        const i64 base = r * N64;
        const T* px = x + base;
        const T* pd = dy + base;
        T* po = dx + base;
        const ACC m = RMS ? (ACC)0 : mean[r], rs = rstd[r];
        const int head = head_len(px, N, (int)vec_ok);
        const int nvec = (N - head) / FASTBN_VEC;
        const int tail0 = head + nvec * FASTBN_VEC;
        const V4* vx = reinterpret_cast<const V4*>(px + head);
        const V4* vd = reinterpret_cast<const V4*>(pd + head);
        ACC s1 = 0, s2 = 0;
        for (int i = tid; i < head; i += nt) {
            const ACC g = to_acc(pd[i]) * w[i];
            s1 += g;
            s2 += g * ((to_acc(px[i]) - m) * rs);
        }
        for (int k = tid; k < nvec; k += nt) {
            const V4 qx = vx[k], qd = vd[k];
            const int j0 = head + k * FASTBN_VEC;
#pragma unroll
            for (int j = 0; j < FASTBN_VEC; ++j) {
                const ACC g = to_acc(qd.v[j]) * w[j0 + j];
                s1 += g;
                s2 += g * ((to_acc(qx.v[j]) - m) * rs);
            }
        }
        for (int i = tail0 + tid; i < N; i += nt) {
            const ACC g = to_acc(pd[i]) * w[i];
            s1 += g;
            s2 += g * ((to_acc(px[i]) - m) * rs);
        }
        block_sum2(s1, s2);
        if (tid == 0) {
            s_sum[0] = RMS ? (ACC)0 : s1 / (ACC)N;
            s_sum[1] = s2 / (ACC)N;
        }
        __syncthreads();
        const ACC c1 = s_sum[0], c2 = s_sum[1];
        for (int i = tid; i < head; i += nt) {
            const ACC xh = (to_acc(px[i]) - m) * rs;
            po[i] = from_acc(rs * ((to_acc(pd[i]) * w[i] - c1) - xh * c2));
        }
        V4* vo = reinterpret_cast<V4*>(po + head);
        for (int k = tid; k < nvec; k += nt) {
            const V4 qx = vx[k], qd = vd[k];
            const int j0 = head + k * FASTBN_VEC;
            V4 o;
#pragma unroll
            for (int j = 0; j < FASTBN_VEC; ++j) {
                const ACC xh = (to_acc(qx.v[j]) - m) * rs;
                o.v[j] = from_acc(rs * ((to_acc(qd.v[j]) * w[j0 + j] - c1) - xh * c2));
            }
            vo[k] = o;
        }
        for (int i = tail0 + tid; i < N; i += nt) {
            const ACC xh = (to_acc(px[i]) - m) * rs;
            po[i] = from_acc(rs * ((to_acc(pd[i]) * w[i] - c1) - xh * c2));
        }
        __syncthreads();  // s_sum is rewritten for the next row
    }
}

extern "C" __global__ void FASTBN_BOUNDS
    ln_backward(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, i64 R,
                i64 N, i64 vec_ok, const ACC* __restrict__ mean, const ACC* __restrict__ rstd,
                const ACC* __restrict__ w) {
    row_backward<false>(dy, x, dx, R, N, vec_ok, mean, rstd, w);
}

extern "C" __global__ void FASTBN_BOUNDS
    rms_backward(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, i64 R,
                 i64 N, i64 vec_ok, const ACC* __restrict__ rstd, const ACC* __restrict__ w) {
    row_backward<true>(dy, x, dx, R, N, vec_ok, rstd, rstd, w);
}

// Partial column sums for dweight = sum_r dy * xhat and dbias = sum_r dy. block =
// (BX, BY) with BX * BY <= 256 (BX = 32: a warp reads 32 consecutive columns of a row),
// grid = (ceil(N / BX), S): split s = blockIdx.y takes rows s * BY + ty, stride S * BY,
// and writes pw/pb[s * N + col]. RMS: mean and pb are unused (pass rstd and pw).
template <bool RMS>
__device__ __forceinline__ void row_cols(const T* __restrict__ dy, const T* __restrict__ x,
                                         i64 R, i64 N, const ACC* __restrict__ mean,
                                         const ACC* __restrict__ rstd, ACC* __restrict__ pw,
                                         ACC* __restrict__ pb) {
    __shared__ ACC s_w[FASTBN_MAX_THREADS];
    __shared__ ACC s_b[FASTBN_MAX_THREADS];
    const int tx = threadIdx.x, ty = threadIdx.y, BX = blockDim.x, BY = blockDim.y;
    const i64 col = (i64)blockIdx.x * BX + tx;
    const bool active = col < N;
    ACC aw = 0, ab = 0;
    if (active) {
        const i64 stride = (i64)gridDim.y * BY;
        for (i64 r = (i64)blockIdx.y * BY + ty; r < R; r += stride) {
            const i64 o = r * N + col;
            const ACC g = to_acc(dy[o]);
            const ACC xh = (to_acc(x[o]) - (RMS ? (ACC)0 : mean[r])) * rstd[r];
            aw += g * xh;
            if (!RMS) ab += g;
        }
    }
    const int slot = ty * BX + tx;
    s_w[slot] = aw;
    s_b[slot] = ab;
    __syncthreads();
    for (int h = BY >> 1; h > 0; h >>= 1) {
        if (ty < h) {
            aw += s_w[slot + h * BX];
            ab += s_b[slot + h * BX];
            s_w[slot] = aw;
            s_b[slot] = ab;
        }
        __syncthreads();
    }
    if (ty == 0 && active) {
        const i64 o = (i64)blockIdx.y * N + col;
        pw[o] = aw;
        if (!RMS) pb[o] = ab;
    }
}

extern "C" __global__ void FASTBN_BOUNDS
    ln_backward_cols(const T* __restrict__ dy, const T* __restrict__ x, i64 R, i64 N,
                     const ACC* __restrict__ mean, const ACC* __restrict__ rstd,
                     ACC* __restrict__ pw, ACC* __restrict__ pb) {
    row_cols<false>(dy, x, R, N, mean, rstd, pw, pb);
}

extern "C" __global__ void FASTBN_BOUNDS
    rms_backward_cols(const T* __restrict__ dy, const T* __restrict__ x, i64 R, i64 N,
                      const ACC* __restrict__ rstd, ACC* __restrict__ pw) {
    row_cols<true>(dy, x, R, N, rstd, rstd, pw, pw);
}

// out[col] = sum over s < S of p[s * N + col], in double. Thread per column.
extern "C" __global__ void row_cols_finalize(const ACC* __restrict__ p, i64 S, i64 N,
                                             ACC* __restrict__ out) {
    const i64 col = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= N) return;
    double a = 0;
    for (i64 s = 0; s < S; ++s) a += (double)p[s * N + col];
    out[col] = (ACC)a;
}
