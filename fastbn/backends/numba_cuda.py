"""The ``"numba-cuda"`` backend: batch normalization kernels written with ``numba.cuda``.

The kernels follow the same plan as the CUDA C kernels of the ``"cupy"`` backend
(``fastbn/kernels/batchnorm.cu``; the launch plan is :func:`fastbn.backends._cuda_shim.plan`):
partial statistics on a 2-d grid (channels x splits of the reduced axis) with per-thread
Welford states, merged with Chan's formula in shared memory and in a finalize kernel;
a channels-last family with threads along the columns; the backward pass as one
two-sum reduction and one elementwise pass. Two differences, both so that the kernels
run unchanged under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), which is how
they are tested on machines without a GPU: block reductions use shared-memory trees
instead of warp shuffles (the simulator has no shuffles), and loads are scalar.

Arrays in and out are CuPy arrays (``xp`` is cupy); they are handed to the kernels
zero-copy through ``__cuda_array_interface__`` and every launch goes to CuPy's current
stream. The ``_forward_train``/``_forward_eval``/``_backward`` functions take an
allocator and a stream, so the same code runs on NumPy arrays under the simulator.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math

import numpy as np

# stats_dtype: the shared rule, re-exported as this backend's
from fastbn.backends import _cuda_shim, _gpu_batchnorm, _gpu_rows, is_bfloat16, stats_dtype

__all__ = ["name", "dtypes", "available", "stats_dtype", "forward_train", "forward_eval",
           "backward", "layer_norm_forward", "layer_norm_backward", "rms_norm_forward",
           "rms_norm_backward"]

name = "numba-cuda"
#: also ml_dtypes.bfloat16 (not listed: see the contract in :mod:`fastbn.backends`)
dtypes = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

#: size of the shared-memory arrays of the block reductions = the most threads per block
_MAXT = _cuda_shim.MAX_THREADS

#: the numba.cuda module, set by :func:`kernels` on first use (never imported eagerly)
cuda = None


def __getattr__(attr):
    # ``xp`` is the cupy module, imported only when asked for.
    if attr == "xp":
        import cupy

        return cupy
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def available() -> tuple[bool, str]:
    """Whether numba-cuda, CuPy and a CUDA device are usable here.

    The cheap checks come first, so that on a machine without CuPy or numba-cuda
    nothing heavy is imported just to report that.

    Returns
    -------
    (bool, str)
        ``(True, "ok")`` or ``(False, reason)``.
    """
    if _cuda_shim.simulator_enabled():
        return False, "the CUDA simulator is enabled (NUMBA_ENABLE_CUDASIM=1): no real device"
    if importlib.util.find_spec("cupy") is None:
        return False, "cupy is not installed (the numba-cuda backend takes and returns CuPy arrays)"
    if importlib.util.find_spec("numba_cuda") is None:
        return False, "numba-cuda is not installed"
    from fastbn.backends import cupy_raw

    ok, why = cupy_raw.available()
    if not ok:
        return False, why
    why = _cuda_shim.numba_cuda_unavailable_reason()
    if why is not None:
        return False, why
    return True, "ok"


# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------


def _bfloat16_conversions(device):
    """Device functions ``(ld, st)``: float32 value of bfloat16 bits (a ``uint16``) and the
    bfloat16 bits of a float32, as the CPU kernels convert (``fastbn.backends.cpu._half``):
    the load shifts the bits into the upper half of a float32 (exact), the store rounds to
    nearest even on the float32 bits, ``(bits + 0x7FFF + ((bits >> 16) & 1)) >> 16``, and
    quiets a NaN (``(bits >> 16) | 0x40``: sign and leading payload kept) instead of rounding
    it (a payload only in the low bits would round to infinity).

    The bit reinterpretation is libdevice's ``int_as_float``/``float_as_int`` on a GPU and
    NumPy's ``view`` under the simulator (which runs device functions as Python); the
    rounding around it is the same code in both.
    """
    if _cuda_shim.simulator_enabled():
        def bits_to_f32(b):
            return np.uint32(b).view(np.float32)

        def f32_to_bits(f):
            return np.int64(np.float32(f).view(np.uint32))
    else:
        from numba.cuda import libdevice

        int_as_float = libdevice.int_as_float
        float_as_int = libdevice.float_as_int

        @device
        def bits_to_f32(b):
            return int_as_float(np.int32(b))  # the low 32 bits (wraps above 2**31)

        @device
        def f32_to_bits(f):
            return np.int64(float_as_int(f)) & 0xFFFFFFFF

    @device
    def ld(u):
        return bits_to_f32(np.int64(u) << 16)

    @device
    def st(v):
        b = f32_to_bits(np.float32(v))
        if (b & 0x7FFFFFFF) > 0x7F800000:
            return np.uint16((b >> 16) | 0x40)
        return np.uint16((b + 0x7FFF + ((b >> 16) & 1)) >> 16)

    return ld, st


@functools.cache
def _device_functions(acc_name: str, data: str = "float") -> dict:
    """The device helpers shared by the batch-norm and row-norm kernels (cached).

    Parameters are those of :func:`kernels`. Returns ``{name: function}`` for ``acc``
    (the accumulation type), ``ld``/``st`` (loads and stores of the data), ``merge``,
    ``merge_d`` (Chan's formula in ``acc`` and in float64), ``welford`` (one value) and
    the shared-memory trees ``tree_merge`` and ``tree_sum2``.
    """
    # `cuda` must be a module global: the simulator swaps the globals of kernels (and the
    # helpers, plain functions under the simulator, must see the same module global, which
    # is why every numba.cuda kernel of the package lives in this module)
    global cuda
    cuda = _cuda_shim.numba_cuda_module()
    device = _cuda_shim.device_function_decorator()
    acc = np.float32 if acc_name == "float32" else np.float64
    if data == "bfloat16":
        ld, st = _bfloat16_conversions(device)
    else:
        # loads convert to the accumulation type, stores of acc values need nothing
        # (the assignment converts): the kernels are those written without ld/st
        ld = st = acc

    @device
    def merge(mean, m2, n, mean_b, m2_b, n_b):
        # Chan et al.: returns the merged (mean, m2, n); exact for empty sides and for
        # equal means. Where the difference of the means is not finite (an infinite
        # mean), mean + delta * fb would be inf - inf = NaN: the weighted average gives
        # +-inf (NaN for opposite infinities), as a sum does.
        nn = n + n_b
        if nn == 0:
            return mean, m2, n
        delta = mean_b - mean
        fb = acc(n_b) / acc(nn)
        if math.isfinite(delta):
            mm = mean + delta * fb
        else:
            mm = mean * (acc(1) - fb) + mean_b * fb
        return mm, m2 + m2_b + delta * delta * acc(n) * fb, nn

    @device
    def merge_d(mean, m2, n, mean_b, m2_b, n_b):
        nn = n + n_b
        if nn == 0:
            return mean, m2, n
        delta = mean_b - mean
        fb = np.float64(n_b) / np.float64(nn)
        if math.isfinite(delta):
            mm = mean + delta * fb
        else:
            mm = mean * (1.0 - fb) + mean_b * fb
        return mm, m2 + m2_b + delta * delta * np.float64(n) * fb, nn

    @device
    def welford(mean, m2, n, v):
        # One value into a Welford state; infinities as in merge.
        n += 1
        d = v - mean
        if math.isfinite(d):
            mean += d / acc(n)
        else:
            mean = mean * (acc(n - 1) / acc(n)) + v / acc(n)
        m2 += d * (v - mean)
        return mean, m2, n

    @device
    def tree_merge(s_mean, s_m2, s_n, slot, stride, h0, mean, m2, n, lead):
        # Merge states s[slot + k * stride], k < 2 * h0, into k == 0. `lead` is this
        # thread's k; every thread of the block must call this (it synchronizes).
        s_mean[slot] = mean
        s_m2[slot] = m2
        s_n[slot] = n
        cuda.syncthreads()
        h = h0
        while h > 0:
            if lead < h:
                other = slot + h * stride
                mean, m2, n = merge(mean, m2, n, s_mean[other], s_m2[other], s_n[other])
                s_mean[slot] = mean
                s_m2[slot] = m2
                s_n[slot] = n
            cuda.syncthreads()
            h //= 2
        return mean, m2, n

    @device
    def tree_sum2(s_1, s_2, slot, stride, h0, u, v, lead):
        s_1[slot] = u
        s_2[slot] = v
        cuda.syncthreads()
        h = h0
        while h > 0:
            if lead < h:
                other = slot + h * stride
                u += s_1[other]
                v += s_2[other]
                s_1[slot] = u
                s_2[slot] = v
            cuda.syncthreads()
            h //= 2
        return u, v

    return dict(acc=acc, ld=ld, st=st, merge=merge, merge_d=merge_d, welford=welford,
                tree_merge=tree_merge, tree_sum2=tree_sum2)


@functools.cache
def kernels(acc_name: str, data: str = "float") -> dict:
    """Build (lazily compiled) kernels accumulating in ``acc_name`` ("float32"/"float64").

    Parameters
    ----------
    acc_name : str
        ``"float32"`` (float16, bfloat16 and float32 data) or ``"float64"``.
    data : str, optional
        ``"float"``: data arrays of a float dtype (float16, float32, float64), converted
        by the loads and stores themselves. ``"bfloat16"``: bfloat16 data as ``uint16``
        bits, converted by the device functions of :func:`_bfloat16_conversions`
        (``acc_name`` must be ``"float32"``).

    Returns
    -------
    dict
        Kernel name -> ``numba.cuda`` dispatcher. All data arrays are 1-d (flattened
        ``(A, C, B)`` views).
    """
    f = _device_functions(acc_name, data)
    acc, ld, st = f["acc"], f["ld"], f["st"]
    merge_d, welford = f["merge_d"], f["welford"]
    tree_merge, tree_sum2 = f["tree_merge"], f["tree_sum2"]
    MAXT = _MAXT

    @cuda.jit
    def stats_cf(x, A, C, B, bch, nbc, vec_ok, pmean, pm2, pn):
        s_mean = cuda.shared.array(MAXT, acc)
        s_m2 = cuda.shared.array(MAXT, acc)
        s_n = cuda.shared.array(MAXT, np.int64)
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        ntiles = A * nbc
        c = cuda.blockIdx.y
        while c < C:
            mean = acc(0)
            m2 = acc(0)
            n = 0
            t = cuda.blockIdx.x
            while t < ntiles:
                a = t // nbc
                b0 = (t - a * nbc) * bch
                ln = min(bch, B - b0)
                base = (a * C + c) * B + b0
                i = tid
                while i < ln:
                    mean, m2, n = welford(mean, m2, n, ld(x[base + i]))
                    i += nt
                t += cuda.gridDim.x
            mean, m2, n = tree_merge(s_mean, s_m2, s_n, tid, 1, nt // 2, mean, m2, n, tid)
            if tid == 0:
                o = cuda.blockIdx.x * C + c
                pmean[o] = mean
                pm2[o] = m2
                pn[o] = n
            cuda.syncthreads()
            c += cuda.gridDim.y

    @cuda.jit
    def stats_cl(x, A, cols, pmean, pm2, pn):
        s_mean = cuda.shared.array(MAXT, acc)
        s_m2 = cuda.shared.array(MAXT, acc)
        s_n = cuda.shared.array(MAXT, np.int64)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        bx = cuda.blockDim.x
        by = cuda.blockDim.y
        col = cuda.blockIdx.x * bx + tx
        mean = acc(0)
        m2 = acc(0)
        n = 0
        if col < cols:
            stride = cuda.gridDim.y * by
            a = cuda.blockIdx.y * by + ty
            while a < A:
                mean, m2, n = welford(mean, m2, n, ld(x[a * cols + col]))
                a += stride
        mean, m2, n = tree_merge(s_mean, s_m2, s_n, ty * bx + tx, bx, by // 2, mean, m2, n, ty)
        if ty == 0 and col < cols:
            o = cuda.blockIdx.y * cols + col
            pmean[o] = mean
            pm2[o] = m2
            pn[o] = n

    @cuda.jit
    def stats_finalize(pmean, pm2, pn, S, C, G, eps, weight, mean_out, var_out, invstd_out,
                       alpha_out):
        # block = (32, k): a group of 32 threads per channel merges S * G partials.
        s_mean = cuda.shared.array(MAXT, np.float64)
        s_m2 = cuda.shared.array(MAXT, np.float64)
        s_n = cuda.shared.array(MAXT, np.int64)
        lane = cuda.threadIdx.x
        c = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
        mean = np.float64(0)
        m2 = np.float64(0)
        n = np.int64(0)
        if c < C:
            cols = C * G
            total = S * G
            k = lane
            while k < total:
                s = k // G
                o = s * cols + c * G + (k - s * G)
                mean, m2, n = merge_d(mean, m2, n, np.float64(pmean[o]), np.float64(pm2[o]),
                                      np.int64(pn[o]))
                k += 32
        slot = cuda.threadIdx.y * 32 + lane
        # tree over the 32 lanes of this channel's group
        s_mean[slot] = mean
        s_m2[slot] = m2
        s_n[slot] = n
        cuda.syncthreads()
        h = 16
        while h > 0:
            if lane < h:
                other = slot + h
                mean, m2, n = merge_d(mean, m2, n, s_mean[other], s_m2[other], s_n[other])
                s_mean[slot] = mean
                s_m2[slot] = m2
                s_n[slot] = n
            cuda.syncthreads()
            h //= 2
        if lane == 0 and c < C:
            var = m2 / np.float64(n) if n > 0 else np.float64(0)
            ve = var + eps
            invstd = np.float64(0) if ve == 0 else np.float64(1) / math.sqrt(ve)
            mean_out[c] = mean
            var_out[c] = var
            invstd_out[c] = invstd
            alpha_out[c] = np.float64(weight[c]) * invstd

    @cuda.jit
    def eval_prep(var, weight, C, eps, alpha_out):
        c = cuda.grid(1)
        if c < C:
            ve = np.float64(var[c]) + eps
            invstd = np.float64(0) if ve == 0 else np.float64(1) / math.sqrt(ve)
            alpha_out[c] = np.float64(weight[c]) * invstd

    @cuda.jit
    def apply_cf(x, y, A, C, B, bch, nbc, vec_ok, mean, alpha, beta):
        # y = (x - mean) * alpha + beta, grid-stride over A * C * nbc tiles
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        ntiles = A * C * nbc
        tf = cuda.blockIdx.x
        while tf < ntiles:
            t = ntiles - 1 - tf  # last tiles first, as in batchnorm.cu (L2 reuse)
            row = t // nbc
            c = row % C
            b0 = (t - row * nbc) * bch
            ln = min(bch, B - b0)
            base = row * B + b0
            m = acc(mean[c])
            al = acc(alpha[c])
            be = acc(beta[c])
            i = tid
            while i < ln:
                y[base + i] = st((ld(x[base + i]) - m) * al + be)
                i += nt
            tf += cuda.gridDim.x

    @cuda.jit
    def apply_cl(x, y, A, cols, G, mean, alpha, beta):
        col = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if col < cols:
            c = col // G
            m = acc(mean[c])
            al = acc(alpha[c])
            be = acc(beta[c])
            stride = cuda.gridDim.y * cuda.blockDim.y
            af = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
            while af < A:
                o = (A - 1 - af) * cols + col  # last rows first (L2 reuse)
                y[o] = st((ld(x[o]) - m) * al + be)
                af += stride

    @cuda.jit
    def bwd_reduce_cf(dy, x, A, C, B, bch, nbc, vec_ok, mean, ps1, ps2):
        s_1 = cuda.shared.array(MAXT, acc)
        s_2 = cuda.shared.array(MAXT, acc)
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        ntiles = A * nbc
        c = cuda.blockIdx.y
        while c < C:
            m = acc(mean[c])
            u = acc(0)
            v = acc(0)
            t = cuda.blockIdx.x
            while t < ntiles:
                a = t // nbc
                b0 = (t - a * nbc) * bch
                ln = min(bch, B - b0)
                base = (a * C + c) * B + b0
                i = tid
                while i < ln:
                    g = ld(dy[base + i])
                    u += g
                    v += g * (ld(x[base + i]) - m)
                    i += nt
                t += cuda.gridDim.x
            u, v = tree_sum2(s_1, s_2, tid, 1, nt // 2, u, v, tid)
            if tid == 0:
                o = cuda.blockIdx.x * C + c
                ps1[o] = u
                ps2[o] = v
            cuda.syncthreads()
            c += cuda.gridDim.y

    @cuda.jit
    def bwd_reduce_cl(dy, x, A, cols, G, mean, ps1, ps2):
        s_1 = cuda.shared.array(MAXT, acc)
        s_2 = cuda.shared.array(MAXT, acc)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        bx = cuda.blockDim.x
        by = cuda.blockDim.y
        col = cuda.blockIdx.x * bx + tx
        u = acc(0)
        v = acc(0)
        if col < cols:
            m = acc(mean[col // G])
            stride = cuda.gridDim.y * by
            a = cuda.blockIdx.y * by + ty
            while a < A:
                o = a * cols + col
                g = ld(dy[o])
                u += g
                v += g * (ld(x[o]) - m)
                a += stride
        u, v = tree_sum2(s_1, s_2, ty * bx + tx, bx, by // 2, u, v, ty)
        if ty == 0 and col < cols:
            o = cuda.blockIdx.y * cols + col
            ps1[o] = u
            ps2[o] = v

    @cuda.jit
    def bwd_finalize(ps1, ps2, S, C, G, M, invstd, weight, dweight, dbias, k1, k2, k3):
        s_1 = cuda.shared.array(MAXT, np.float64)
        s_2 = cuda.shared.array(MAXT, np.float64)
        lane = cuda.threadIdx.x
        c = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
        u = np.float64(0)
        v = np.float64(0)
        if c < C:
            cols = C * G
            total = S * G
            k = lane
            while k < total:
                s = k // G
                o = s * cols + c * G + (k - s * G)
                u += np.float64(ps1[o])
                v += np.float64(ps2[o])
                k += 32
        u, v = tree_sum2(s_1, s_2, cuda.threadIdx.y * 32 + lane, 1, 16, u, v, lane)
        if lane == 0 and c < C:
            isd = np.float64(invstd[c])
            w = np.float64(weight[c])
            dweight[c] = v * isd
            dbias[c] = u
            k1[c] = w * isd
            k2[c] = -w * isd * isd * isd * v / M
            k3[c] = -w * isd * u / M

    @cuda.jit
    def bwd_apply_cf(dy, x, dx, A, C, B, bch, nbc, vec_ok, mean, k1, k2, k3):
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        ntiles = A * C * nbc
        tf = cuda.blockIdx.x
        while tf < ntiles:
            t = ntiles - 1 - tf  # last tiles first, as in batchnorm.cu (L2 reuse)
            row = t // nbc
            c = row % C
            b0 = (t - row * nbc) * bch
            ln = min(bch, B - b0)
            base = row * B + b0
            m = acc(mean[c])
            c1 = acc(k1[c])
            c2 = acc(k2[c])
            c3 = acc(k3[c])
            i = tid
            while i < ln:
                dx[base + i] = st(ld(dy[base + i]) * c1 + ((ld(x[base + i]) - m) * c2 + c3))
                i += nt
            tf += cuda.gridDim.x

    @cuda.jit
    def bwd_apply_cl(dy, x, dx, A, cols, G, mean, k1, k2, k3):
        col = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if col < cols:
            c = col // G
            m = acc(mean[c])
            c1 = acc(k1[c])
            c2 = acc(k2[c])
            c3 = acc(k3[c])
            stride = cuda.gridDim.y * cuda.blockDim.y
            af = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
            while af < A:
                o = (A - 1 - af) * cols + col  # last rows first (L2 reuse)
                dx[o] = st(ld(dy[o]) * c1 + ((ld(x[o]) - m) * c2 + c3))
                af += stride

    # the names of the CUDA C kernels (batchnorm.cu), so that one host code launches both
    # (fastbn.backends._gpu_batchnorm); the channels-last kernels are the "..._cl1" ones
    return {
        "bn_stats_cf": stats_cf, "bn_stats_cl1": stats_cl, "bn_stats_finalize": stats_finalize,
        "bn_eval_prep": eval_prep, "bn_apply_cf": apply_cf, "bn_apply_cl1": apply_cl,
        "bn_bwd_reduce_cf": bwd_reduce_cf, "bn_bwd_reduce_cl1": bwd_reduce_cl,
        "bn_bwd_finalize": bwd_finalize, "bn_bwd_apply_cf": bwd_apply_cf,
        "bn_bwd_apply_cl1": bwd_apply_cl,
    }


@functools.cache
def row_kernels(acc_name: str, data: str = "float") -> dict:
    """Build (lazily compiled) layer-norm and RMS-norm kernels; parameters as :func:`kernels`.

    The plan and the argument lists are those of ``fastbn/kernels/rownorm.cu`` (one host
    code, :mod:`fastbn.backends._gpu_rows`, launches both): a 1-d block per row, grid-striding
    over the rows, with shared-memory trees for the block reductions and scalar loads
    (``vec_ok`` is accepted and ignored); a column-partials kernel on a 2-d grid and a
    finalize kernel for dweight and dbias.

    Returns
    -------
    dict
        Kernel name -> ``numba.cuda`` dispatcher (names as in rownorm.cu). Data arrays
        are the flattened ``(R, N)`` views.
    """
    f = _device_functions(acc_name, data)
    acc, ld, st = f["acc"], f["ld"], f["st"]
    welford, tree_merge, tree_sum2 = f["welford"], f["tree_merge"], f["tree_sum2"]
    MAXT = _MAXT
    device = _cuda_shim.device_function_decorator()

    @cuda.jit
    def ln_forward(x, y, R, N, vec_ok, w, b, eps, mean_out, rstd_out):
        s_mean = cuda.shared.array(MAXT, acc)
        s_m2 = cuda.shared.array(MAXT, acc)
        s_n = cuda.shared.array(MAXT, np.int64)
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        e = acc(eps)  # a stats-dtype scalar already
        r = cuda.blockIdx.x
        while r < R:
            base = r * N
            mean = acc(0)
            m2 = acc(0)
            n = 0
            i = tid
            while i < N:
                mean, m2, n = welford(mean, m2, n, ld(x[base + i]))
                i += nt
            tree_merge(s_mean, s_m2, s_n, tid, 1, nt // 2, mean, m2, n, tid)
            m = s_mean[0]  # the merged state of the row, in slot 0 for every thread
            ve = s_m2[0] / acc(s_n[0]) + e
            rs = acc(0) if ve == 0 else acc(1) / math.sqrt(ve)
            cuda.syncthreads()  # slot 0 is rewritten for the next row
            if tid == 0:
                mean_out[r] = m
                rstd_out[r] = rs
            i = tid
            while i < N:
                y[base + i] = st((ld(x[base + i]) - m) * rs * acc(w[i]) + acc(b[i]))
                i += nt
            r += cuda.gridDim.x

    @cuda.jit
    def rms_forward(x, y, R, N, vec_ok, w, eps, rstd_out):
        s_1 = cuda.shared.array(MAXT, acc)
        s_2 = cuda.shared.array(MAXT, acc)
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        e = acc(eps)  # a stats-dtype scalar already
        r = cuda.blockIdx.x
        while r < R:
            base = r * N
            ss = acc(0)
            i = tid
            while i < N:
                v = ld(x[base + i])
                ss += v * v
                i += nt
            tree_sum2(s_1, s_2, tid, 1, nt // 2, ss, acc(0), tid)
            ve = s_1[0] / acc(N) + e
            rs = acc(0) if ve == 0 else acc(1) / math.sqrt(ve)
            cuda.syncthreads()
            if tid == 0:
                rstd_out[r] = rs
            i = tid
            while i < N:
                y[base + i] = st(ld(x[base + i]) * rs * acc(w[i]))
                i += nt
            r += cuda.gridDim.x

    @device
    def row_backward(dy, x, dx, R, N, mean, rstd, w, rms, s_1, s_2):
        # (the shared arrays are allocated by the kernels, not in device functions)
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        r = cuda.blockIdx.x
        while r < R:
            base = r * N
            m = acc(0) if rms else acc(mean[r])
            rs = acc(rstd[r])
            u = acc(0)
            v = acc(0)
            i = tid
            while i < N:
                g = ld(dy[base + i]) * acc(w[i])
                u += g
                v += g * ((ld(x[base + i]) - m) * rs)
                i += nt
            tree_sum2(s_1, s_2, tid, 1, nt // 2, u, v, tid)
            c1 = acc(0) if rms else s_1[0] / acc(N)
            c2 = s_2[0] / acc(N)
            cuda.syncthreads()
            i = tid
            while i < N:
                xh = (ld(x[base + i]) - m) * rs
                dx[base + i] = st(rs * ((ld(dy[base + i]) * acc(w[i]) - c1) - xh * c2))
                i += nt
            r += cuda.gridDim.x

    @cuda.jit
    def ln_backward(dy, x, dx, R, N, vec_ok, mean, rstd, w):
        # two statements: the simulator tells shared arrays apart by their source line
        s_1 = cuda.shared.array(MAXT, acc)
        s_2 = cuda.shared.array(MAXT, acc)
        row_backward(dy, x, dx, R, N, mean, rstd, w, False, s_1, s_2)

    @cuda.jit
    def rms_backward(dy, x, dx, R, N, vec_ok, rstd, w):
        # two statements: the simulator tells shared arrays apart by their source line
        s_1 = cuda.shared.array(MAXT, acc)
        s_2 = cuda.shared.array(MAXT, acc)
        row_backward(dy, x, dx, R, N, rstd, rstd, w, True, s_1, s_2)

    @device
    def row_cols(dy, x, R, N, mean, rstd, pw, pb, rms, s_1, s_2):
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        bx = cuda.blockDim.x
        by = cuda.blockDim.y
        col = cuda.blockIdx.x * bx + tx
        aw = acc(0)
        ab = acc(0)
        if col < N:
            stride = cuda.gridDim.y * by
            r = cuda.blockIdx.y * by + ty
            while r < R:
                o = r * N + col
                g = ld(dy[o])
                m = acc(0) if rms else acc(mean[r])
                aw += g * ((ld(x[o]) - m) * acc(rstd[r]))
                ab += g
                r += stride
        aw, ab = tree_sum2(s_1, s_2, ty * bx + tx, bx, by // 2, aw, ab, ty)
        if ty == 0 and col < N:
            o = cuda.blockIdx.y * N + col
            pw[o] = aw
            if not rms:
                pb[o] = ab

    @cuda.jit
    def ln_backward_cols(dy, x, R, N, mean, rstd, pw, pb):
        # two statements: the simulator tells shared arrays apart by their source line
        s_1 = cuda.shared.array(MAXT, acc)
        s_2 = cuda.shared.array(MAXT, acc)
        row_cols(dy, x, R, N, mean, rstd, pw, pb, False, s_1, s_2)

    @cuda.jit
    def rms_backward_cols(dy, x, R, N, rstd, pw):
        # two statements: the simulator tells shared arrays apart by their source line
        s_1 = cuda.shared.array(MAXT, acc)
        s_2 = cuda.shared.array(MAXT, acc)
        row_cols(dy, x, R, N, rstd, rstd, pw, pw, True, s_1, s_2)

    @cuda.jit
    def row_cols_finalize(p, S, N, out):
        col = cuda.grid(1)
        if col < N:
            a = np.float64(0)
            for s in range(S):
                a += np.float64(p[s * N + col])
            out[col] = a

    return {
        "ln_forward": ln_forward, "rms_forward": rms_forward, "ln_backward": ln_backward,
        "rms_backward": rms_backward, "ln_backward_cols": ln_backward_cols,
        "rms_backward_cols": rms_backward_cols, "row_cols_finalize": row_cols_finalize,
    }


#: Argument types of every kernel, per data dtype (used by the compile_ptx test and to
#: document the signatures): "x" data array, "s" stats-dtype array, "i" int32 array,
#: "I" int64 scalar, "F" float64 scalar, "E" stats-dtype scalar.
KERNEL_SIGNATURES = {
    # batch norm (kernels())
    "bn_stats_cf": "xIIIIIIssi",
    "bn_stats_cl1": "xIIssi",
    "bn_stats_finalize": "ssiIIIFsssss",
    "bn_eval_prep": "ssIFs",
    "bn_apply_cf": "xxIIIIIIsss",
    "bn_apply_cl1": "xxIIIsss",
    "bn_bwd_reduce_cf": "xxIIIIIIsss",
    "bn_bwd_reduce_cl1": "xxIIIsss",
    "bn_bwd_finalize": "ssIIIFsssssss",
    "bn_bwd_apply_cf": "xxxIIIIIIssss",
    "bn_bwd_apply_cl1": "xxxIIIssss",
}
#: the same for the row kernels (row_kernels())
ROW_KERNEL_SIGNATURES = {
    "ln_forward": "xxIIIssEss",
    "rms_forward": "xxIIIsEs",
    "ln_backward": "xxxIIIsss",
    "rms_backward": "xxxIIIss",
    "ln_backward_cols": "xxIIssss",
    "rms_backward_cols": "xxIIss",
    "row_cols_finalize": "sIIs",
}


# ----------------------------------------------------------------------------------------
# host side, generic over the array library (CuPy on a GPU, NumPy under the simulator)
# ----------------------------------------------------------------------------------------


def _acc_name(dtype) -> str:
    return "float64" if np.dtype(dtype) == np.float64 else "float32"


def _kernels_for(dtype, kernel_table=None):
    """``(kernels, kernel dtype of the data)`` of `kernel_table` (:func:`kernels` when None,
    or :func:`row_kernels`) for data of `dtype`: bfloat16 data go to the kernels as their
    ``uint16`` bits."""
    kernel_table = kernels if kernel_table is None else kernel_table
    if is_bfloat16(np.dtype(dtype)):
        return kernel_table("float32", "bfloat16"), np.dtype(np.uint16)
    return kernel_table(_acc_name(dtype)), np.dtype(dtype)


def _as_kernel_data(a, kdt):
    """A 1-d view of data array `a` with the kernels' element type `kdt`."""
    a = a.reshape(-1)
    return a if a.dtype == kdt else a.view(kdt)


def launcher(dtype, kernel_table, *, empty, wrap, stream, num_sms, plan_kw, pointers=()):
    """The :class:`fastbn.backends._cuda_shim.Launcher` of this backend's kernels.

    Parameters
    ----------
    dtype : numpy.dtype
        The data dtype of the call.
    kernel_table : callable
        :func:`kernels` or :func:`row_kernels`.
    empty, wrap, stream, num_sms, plan_kw
        Allocation ``empty(shape, dtype)``, ``wrap(array)`` into a kernel argument, the
        launch stream (``0`` for the default one), and the plan's device size and keywords
        (:func:`_gpu_context` on a GPU; NumPy arrays and a tiny plan under the simulator).
    pointers : tuple, optional
        Unused (the kernels have no vector path).
    """
    k, kdt = _kernels_for(dtype, kernel_table)

    def kernel(name):
        def launch(grid, block, args):
            k[name][grid, block, stream](*args)

        return launch

    return _cuda_shim.Launcher(
        empty=empty, empty_like=lambda a: empty(a.shape, a.dtype),
        data=lambda a: wrap(_as_kernel_data(a, kdt)), arr=wrap, kernel=kernel, i32=np.int64,
        num_sms=num_sms, plan_kw=plan_kw, vectorize=False, ptr=lambda a: 0)


def _forward_train(x3, weight, bias, eps, **ctx):
    """Training forward on any arrays the kernels accept; `ctx` as :func:`launcher` takes
    it. See :func:`forward_train`."""
    return _gpu_batchnorm.forward_train(launcher(x3.dtype, kernels, **ctx), x3, weight, bias,
                                        eps)


def _forward_eval(x3, mean, var, weight, bias, eps, **ctx):
    """Evaluation forward on any arrays the kernels accept; see :func:`forward_eval`."""
    return _gpu_batchnorm.forward_eval(launcher(x3.dtype, kernels, **ctx), x3, mean, var,
                                       weight, bias, eps)


def _backward(dy3, x3, mean, invstd, weight, **ctx):
    """Backward pass on any arrays the kernels accept; see :func:`backward`."""
    return _gpu_batchnorm.backward(launcher(x3.dtype, kernels, **ctx), dy3, x3, mean, invstd,
                                   weight)


# ----------------------------------------------------------------------------------------
# the backend contract, on CuPy arrays
# ----------------------------------------------------------------------------------------


@functools.cache
def _num_sms(device_id: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


@contextlib.contextmanager
def _on_device(x3):
    """Make the device holding `x3` current for CuPy and numba.cuda; quiet the small-grid
    warning of the finalize kernels."""
    cuda = _cuda_shim.numba_cuda_module()
    with x3.device, cuda.gpus[x3.device.id], _cuda_shim.quiet_low_occupancy_warnings():
        yield


def _gpu_context(*arrays):
    """Allocator, wrapper, stream and plan inputs for CuPy arrays on the current device."""
    import cupy

    cuda = _cuda_shim.numba_cuda_module()
    ptr = cupy.cuda.get_current_stream().ptr
    stream = cuda.external_stream(ptr) if ptr else cuda.default_stream()

    def wrap(a):
        # zero-copy, and without the host synchronization numba would otherwise do on
        # the array's stream: the launch is ordered on the same (current) stream anyway
        return cuda.as_cuda_array(a, sync=False)

    def empty(shape, dtype):
        return cupy.empty(shape, dtype)

    return dict(empty=empty, wrap=wrap, stream=stream,
                num_sms=_num_sms(arrays[0].device.id),
                plan_kw={"max_threads": _cuda_shim.MAX_THREADS})


def forward_train(x3, weight, bias, eps):
    """Training-mode forward pass; see :mod:`fastbn.backends` for the contract.

    Parameters
    ----------
    x3 : cupy.ndarray
        C-contiguous ``(A, C, B)`` input (float16, bfloat16, float32 or float64).
    weight, bias : cupy.ndarray
        Length-``C`` parameters of dtype ``stats_dtype(x3.dtype)``.
    eps : float
        Added to the variance.

    Returns
    -------
    y3, mean, var, invstd : cupy.ndarray
        Output like `x3`; per-channel mean, biased variance and ``1/sqrt(var + eps)``
        (0 where ``var + eps == 0``).
    """
    with _on_device(x3):
        return _forward_train(x3, weight, bias, eps, **_gpu_context(x3))


def forward_eval(x3, mean, var, weight, bias, eps):
    """Evaluation-mode forward pass with given statistics.

    Parameters
    ----------
    x3 : cupy.ndarray
        C-contiguous ``(A, C, B)`` input.
    mean, var, weight, bias : cupy.ndarray
        Length-``C`` arrays of dtype ``stats_dtype(x3.dtype)``.
    eps : float
        Added to the variance.

    Returns
    -------
    y3 : cupy.ndarray
    """
    with _on_device(x3):
        return _forward_eval(x3, mean, var, weight, bias, eps, **_gpu_context(x3))


def backward(dy3, x3, mean, invstd, weight):
    """Gradient of the training-mode forward pass.

    Parameters
    ----------
    dy3, x3 : cupy.ndarray
        C-contiguous ``(A, C, B)`` upstream gradient and forward input.
    mean, invstd : cupy.ndarray
        Statistics saved by :func:`forward_train`.
    weight : cupy.ndarray
        Length-``C`` weight.

    Returns
    -------
    dx3, dweight, dbias : cupy.ndarray
    """
    with _on_device(x3):
        return _backward(dy3, x3, mean, invstd, weight, **_gpu_context(x3))


# ----------------------------------------------------------------------------------------
# layer norm and RMS norm
# ----------------------------------------------------------------------------------------


def _run_rows(op, x2, *args):
    with _on_device(x2):
        return op(launcher(x2.dtype, row_kernels, **_gpu_context(x2)), *args)


layer_norm_forward, layer_norm_backward, rms_norm_forward, rms_norm_backward = (
    _gpu_rows.entry_points(_run_rows))
