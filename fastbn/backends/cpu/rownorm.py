"""Layer norm and RMS norm on the CPU: normalization of each row of a C-contiguous
``(R, N)`` array (``N`` the product of the normalized trailing dimensions).

A row is usually cache-resident, so each kernel reads it from memory once: the row's
statistics, then the elementwise pass over the same row while it is in cache. Some forward
loops are software-pipelined (the statistics of row r + 1 summed in the same loop as a
pass over row r, so that the next row's reads overlap this row's arithmetic): layer
norm's two-pass statistics, and its one-pass statistics on rows of fewer than
``_PIPELINE_MAX_N`` values (measured: see there). Parallel over ranges of rows; calls of
at most ``SERIAL_MAX`` values run serially. The backward accumulates ``dweight``/``dbias``
as float64 partial column sums per range of rows, merged once at the end (no shared
accumulator).

Statistics, all in float64:

* Layer norm of float32, float16 and bfloat16 data: **one pass** over each block of at
  most ``_BLOCK`` values, summing ``d = x - k`` and ``d**2`` with ``k`` the block's first
  value (0 if that is not finite); the block's mean is ``k + sum(d) / m`` and its M2
  ``sum(d**2) - sum(d)**2 / m`` (negative rounding clamped to 0); blocks merge with
  Chan's formula. This is not ``E[x**2] - E[x]**2`` in the data's precision:
  the cancellation grows with ``((mean - k) / std)**2``, which is at most ``m - 1`` for a
  value k of the block (no value of a sample lies further than ``sqrt(m - 1)`` standard
  deviations from its mean), and the sums are float64, so the relative error of the
  variance is at most about ``3 m**2 u64`` (5.6e-9 for m = 4096, whatever the mean; u64 =
  2**-53), well below float32's 6e-8 (docs/numerics.md). A constant row has d = 0
  exactly: its variance is exactly 0.
* Layer norm of float64 data: the two-pass algorithm over the cached row (the shifted sum
  of :mod:`._moments` for the mean, then the squared deviations from it): float64 data
  would not keep float64 accuracy through the one-pass sums.
* RMS norm sums squares, which cannot cancel.

Arithmetic: the elementwise passes compute in float64 for float32 and float64 data and in
float32 for float16 and bfloat16 data (as batch norm's, see
:func:`fastbn.backends.cpu._half.cf`), one rounding per output value.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.extending import overload

from ... import _buffers, _threading
from .. import _jitcache
from ._half import cf, ld, st
from ._moments import _chan, _finite_or_zero, _float64_data, _invstd, _k, _shift, _sqdev, _sum
from ._plan import (
    _BLOCK,
    _EW,
    _F32,
    _HALF_TYPES,
    _OPTS,
    _RED,
    SERIAL_MAX,
    _bits,
    _nthreads,
    _split,
)

__all__ = ["layer_norm_backward", "layer_norm_forward", "rms_norm_backward",
           "rms_norm_forward"]


#: Layer norm's one-pass forward pipelines rows of fewer than this many values: their sums
#: are taken in the loop normalizing the previous row. Longer rows are summed, then
#: normalized, row by row (the row stays in cache between the two loops); RMS norm is
#: never pipelined. Measured (float32, 2 cores, AMD EPYC, ``bench/row_kernels_ab.py``, time
#: relative to the two-pass pipelined kernel, two runs): one-pass unfused 0.80-0.85 on
#: (16384, 1024), 0.76-0.87 on (8192, 2048), 0.84-0.87 on (2048, 12288), against pipelined
#: 0.83-0.86, 0.88-0.89, 0.84-0.85; equal within 0.08 on (4096, 4096) and (32768, 512); on
#: (65536, 128) pipelined 1.00-1.02 against unfused 1.05-1.06. RMS norm unfused: 0.49-0.76
#: against pipelined 0.63-0.81 on the first three shapes; slower by 0.01-0.03 on
#: (2048, 12288) and (65536, 128), and by 0.07 then 0.05 better on (32768, 512). A loop that
#: stores row r while it loads row r + 1 is also sensitive to where the output lies in a
#: page relative to the input (4K aliasing; the script's last check), the unfused loops
#: are not. (On an Intel Xeon an earlier measurement had found pipelined RMS norm faster
#: on rows of >= 512 values: bench/results/rows-2026-12-08-notes.md.)
_PIPELINE_MAX_N = 512


# --------------------------------------------------------------------------------------
# One row
# --------------------------------------------------------------------------------------
@njit(**_OPTS)
def _ln_mean(xf, o, n):
    """The mean of the row xf[o:o + n]: the first of its two statistics passes."""
    k = _shift(xf, ld(xf[o]))
    return k + _sum(xf, o, o + n, k) / n


@njit(fastmath=_RED, **_OPTS)
def _sqdev_and_next_sum(xf, o, n, mu, k):
    """``(sum((x[o:o+n] - mu)**2), sum(x[o+n:o+2n] - k))``: the second statistics pass of a
    row fused with the first of the next row, so that the next row's reads from memory
    overlap this row's arithmetic (the same sums as :func:`._moments._sqdev` and
    :func:`._moments._sum`, in one loop)."""
    k = _k(xf, k)
    q = 0.0
    s = 0.0
    u = np.uint64(o)
    v = np.uint64(o + n)
    for j in range(np.uint64(n)):
        d = ld(xf[u + j]) - mu
        q += d * d
        s += ld(xf[v + j]) - k
    return q, s


@njit(fastmath=_EW, **_OPTS)
def _ln_apply(xf, yf, o, n, mu, rs, w, b):
    """y = (x - mean) * rstd * w + b over one row."""
    m = cf(mu, yf)
    r = cf(rs, yf)
    u = np.uint64(o)
    for j in range(np.uint64(n)):
        yf[u + j] = st((ld(xf[u + j]) - m) * r * w[j] + b[j], yf)


@njit(fastmath=_RED, **_OPTS)
def _shifted_sums(xf, i0, i1, k):
    """``(sum(x - k), sum((x - k)**2))`` over xf[i0:i1], in one pass."""
    s1 = 0.0
    s2 = 0.0
    for i in range(np.uint64(i0), np.uint64(i1)):
        d = np.float64(ld(xf[i])) - k
        s1 += d
        s2 += d * d
    return s1, s2


@njit(**_OPTS)
def _block_moments(k, s1, s2, m):
    """``(mean, M2)`` of m values from their shifted sums (see the module docstring)."""
    m2 = s2 - s1 * (s1 / m)
    if m2 < 0.0:  # rounding; NaN stays NaN
        m2 = 0.0
    return k + s1 / m, m2


@njit(**_OPTS)
def _one_pass_moments(xf, o, n):
    """``(mean, M2)`` of the row xf[o:o + n]: blocks of at most _BLOCK values, one pass
    each, merged with Chan's formula."""
    cnt = 0.0
    mean = 0.0
    m2 = 0.0
    for b0 in range(o, o + n, _BLOCK):
        b1 = min(b0 + _BLOCK, o + n)
        k = _finite_or_zero(ld(xf[b0]))
        s1, s2 = _shifted_sums(xf, b0, b1, k)
        mb, m2b = _block_moments(k, s1, s2, b1 - b0)
        cnt, mean, m2 = _chan(cnt, mean, m2, np.float64(b1 - b0), mb, m2b)
    return mean, m2


@njit(fastmath=_RED, **_OPTS)
def _ln_apply_and_next_sums(xf, yf, o, n, mu, rs, w, b, k):
    """:func:`_ln_apply` over row xf[o:o + n], fused with the shifted sums of the next row
    (returned, see :func:`_shifted_sums`). The output is ``(x - mean) * rstd * w + b``:
    reassociation may regroup the product (a rounding's difference), never the
    subtraction, which LLVM does not distribute over."""
    m = cf(mu, yf)
    r = cf(rs, yf)
    u = np.uint64(o)
    v = np.uint64(o + n)
    s1 = 0.0
    s2 = 0.0
    for j in range(np.uint64(n)):
        yf[u + j] = st((ld(xf[u + j]) - m) * r * w[j] + b[j], yf)
        d = np.float64(ld(xf[v + j])) - k
        s1 += d
        s2 += d * d
    return s1, s2


@njit(fastmath=_RED, **_OPTS)
def _sumsq(xf, i0, i1):
    q = 0.0
    for i in range(np.uint64(i0), np.uint64(i1)):
        v = np.float64(ld(xf[i]))
        q += v * v
    return q


@njit(fastmath=_EW, **_OPTS)
def _rms_apply(xf, yf, o, n, rs, w):
    """y = x * rstd * w over one row."""
    r = cf(rs, yf)
    u = np.uint64(o)
    for j in range(np.uint64(n)):
        yf[u + j] = st(ld(xf[u + j]) * r * w[j], yf)


@njit(fastmath=_RED, **_OPTS)
def _ln_bsums(dyf, xf, o, n, mu, rs, w):
    """(sum(g), sum(g * xhat)) of a row, g = dy * w, xhat = (x - mean) * rstd."""
    s1 = 0.0
    s2 = 0.0
    u = np.uint64(o)
    for j in range(np.uint64(n)):
        g = np.float64(ld(dyf[u + j])) * w[j]
        s1 += g
        s2 += g * ((ld(xf[u + j]) - mu) * rs)
    return s1, s2


@njit(fastmath=_EW, **_OPTS)
def _ln_bapply(dyf, xf, dxf, o, n, mu, rs, w, c1, c2, dwp, dbp):
    """dx = rstd * (g - c1 - xhat * c2) over a row; dweight, dbias partials += dy * xhat, dy."""
    u = np.uint64(o)
    for j in range(np.uint64(n)):
        d = np.float64(ld(dyf[u + j]))
        xh = (ld(xf[u + j]) - mu) * rs
        dxf[u + j] = st(rs * (d * w[j] - c1 - xh * c2), dxf)
        dwp[j] += d * xh
        dbp[j] += d


@njit(fastmath=_RED, **_OPTS)
def _rms_bsum(dyf, xf, o, n, w):
    """sum(dy * w * x) of a row."""
    s = 0.0
    u = np.uint64(o)
    for j in range(np.uint64(n)):
        s += np.float64(ld(dyf[u + j])) * w[j] * ld(xf[u + j])
    return s


@njit(fastmath=_EW, **_OPTS)
def _rms_bapply(dyf, xf, dxf, o, n, rs, w, c, dwp):
    """dx = rstd * dy * w - x * c over a row; dweight partials += dy * x * rstd."""
    u = np.uint64(o)
    for j in range(np.uint64(n)):
        d = np.float64(ld(dyf[u + j]))
        xv = np.float64(ld(xf[u + j]))
        dxf[u + j] = st(rs * d * w[j] - xv * c, dxf)
        dwp[j] += d * xv * rs


# --------------------------------------------------------------------------------------
# Ranges of rows (a serial call is the range of all rows)
# --------------------------------------------------------------------------------------
def _ln_fwd_rows(xf, yf, r0, r1, n, w, b, eps, mean, rstd):
    """Layer norm's forward over rows r0..r1-1: :func:`_ln_fwd_rows_two_pass` for float64
    data, :func:`_ln_fwd_rows_one_pass` otherwise. (``@njit`` only.)"""
    raise NotImplementedError("_ln_fwd_rows is only usable inside Numba-compiled code")


@overload(_ln_fwd_rows)
def _ln_fwd_rows_impl(xf, yf, r0, r1, n, w, b, eps, mean, rstd):
    if _float64_data(xf):
        return lambda xf, yf, r0, r1, n, w, b, eps, mean, rstd: _ln_fwd_rows_two_pass(
            xf, yf, r0, r1, n, w, b, eps, mean, rstd)
    return lambda xf, yf, r0, r1, n, w, b, eps, mean, rstd: _ln_fwd_rows_one_pass(
        xf, yf, r0, r1, n, w, b, eps, mean, rstd)


@njit(**_OPTS)
def _ln_fwd_rows_one_pass(xf, yf, r0, r1, n, w, b, eps, mean, rstd):
    """Rows r0..r1-1 with one-pass statistics (see the module docstring): rows of fewer
    than _PIPELINE_MAX_N values pipelined (row r + 1's sums taken in the loop normalizing
    row r), longer rows summed block by block, then normalized."""
    if n >= _PIPELINE_MAX_N:
        for r in range(r0, r1):
            o = r * n
            mu, m2 = _one_pass_moments(xf, o, n)
            rs = _invstd(m2 / n, eps)
            mean[r] = mu
            rstd[r] = rs
            _ln_apply(xf, yf, o, n, mu, rs, w, b)
        return
    if r1 <= r0:
        return
    k = _finite_or_zero(ld(xf[r0 * n]))
    s1, s2 = _shifted_sums(xf, r0 * n, r0 * n + n, k)
    for r in range(r0, r1):
        o = r * n
        mu, m2 = _block_moments(k, s1, s2, n)
        rs = _invstd(m2 / n, eps)
        mean[r] = mu
        rstd[r] = rs
        if r + 1 < r1:
            k = _finite_or_zero(ld(xf[o + n]))
            s1, s2 = _ln_apply_and_next_sums(xf, yf, o, n, mu, rs, w, b, k)
        else:
            _ln_apply(xf, yf, o, n, mu, rs, w, b)


@njit(**_OPTS)
def _ln_fwd_rows_two_pass(xf, yf, r0, r1, n, w, b, eps, mean, rstd):
    """Rows r0..r1-1, two-pass statistics, software-pipelined: the squared deviations of
    row r are summed in the same loop as the values of row r + 1."""
    if r1 <= r0:
        return
    mu = _ln_mean(xf, r0 * n, n)
    for r in range(r0, r1):
        o = r * n
        if r + 1 < r1:
            k = _shift(xf, ld(xf[o + n]))
            q, s = _sqdev_and_next_sum(xf, o, n, mu, k)
            mu_next = k + s / n
        else:
            q = _sqdev(xf, o, o + n, mu)
            mu_next = 0.0
        rs = _invstd(q / n, eps)
        mean[r] = mu
        rstd[r] = rs
        _ln_apply(xf, yf, o, n, mu, rs, w, b)
        mu = mu_next


@njit(**_OPTS)
def _rms_fwd_rows(xf, yf, r0, r1, n, w, eps, rstd):
    """Rows r0..r1-1: each row's sum of squares, then its normalization (the row in cache)."""
    for r in range(r0, r1):
        o = r * n
        rs = _invstd(_sumsq(xf, o, o + n) / n, eps)
        rstd[r] = rs
        _rms_apply(xf, yf, o, n, rs, w)


@njit(**_OPTS)
def _ln_bwd_rows(dyf, xf, dxf, r0, r1, n, mean, rstd, w, dwp, dbp):
    for r in range(r0, r1):
        o = r * n
        mu = np.float64(mean[r])
        rs = np.float64(rstd[r])
        s1, s2 = _ln_bsums(dyf, xf, o, n, mu, rs, w)
        _ln_bapply(dyf, xf, dxf, o, n, mu, rs, w, s1 / n, s2 / n, dwp, dbp)


@njit(**_OPTS)
def _rms_bwd_rows(dyf, xf, dxf, r0, r1, n, rstd, w, dwp):
    for r in range(r0, r1):
        o = r * n
        rs = np.float64(rstd[r])
        s = _rms_bsum(dyf, xf, o, n, w)
        _rms_bapply(dyf, xf, dxf, o, n, rs, w, rs * rs * rs * s / n, dwp)


# --------------------------------------------------------------------------------------
# Whole calls
# --------------------------------------------------------------------------------------
@njit(**_OPTS)
def _ln_fwd_serial(x, w, b, eps, y, mean, rstd):
    R, n = x.shape
    _ln_fwd_rows(x.reshape(x.size), y.reshape(y.size), 0, R, n, w, b, eps, mean, rstd)


@njit(parallel=True, **_OPTS)
def _ln_fwd_parallel(T, x, w, b, eps, y, mean, rstd):
    R, n = x.shape
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    rows = _split(R, 4 * T)
    for p in prange(rows.shape[0] - 1):
        _ln_fwd_rows(xf, yf, rows[p], rows[p + 1], n, w, b, eps, mean, rstd)


@njit(**_OPTS)
def _rms_fwd_serial(x, w, eps, y, rstd):
    R, n = x.shape
    _rms_fwd_rows(x.reshape(x.size), y.reshape(y.size), 0, R, n, w, eps, rstd)


@njit(parallel=True, **_OPTS)
def _rms_fwd_parallel(T, x, w, eps, y, rstd):
    R, n = x.shape
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    rows = _split(R, 4 * T)
    for p in prange(rows.shape[0] - 1):
        _rms_fwd_rows(xf, yf, rows[p], rows[p + 1], n, w, eps, rstd)


@njit(**_OPTS)
def _merge_columns(parts, out):
    """out[j] = sum over ranges of parts[p, j] (in range order)."""
    for j in range(out.shape[0]):
        s = 0.0
        for p in range(parts.shape[0]):
            s += parts[p, j]
        out[j] = s


@njit(**_OPTS)
def _ln_bwd_serial(dy, x, mean, rstd, w, dx, dw, db):
    R, n = x.shape
    dwp = np.zeros((1, n))
    dbp = np.zeros((1, n))
    _ln_bwd_rows(dy.reshape(dy.size), x.reshape(x.size), dx.reshape(dx.size), 0, R, n, mean,
                 rstd, w, dwp[0], dbp[0])
    _merge_columns(dwp, dw)
    _merge_columns(dbp, db)


@njit(parallel=True, **_OPTS)
def _ln_bwd_parallel(T, dy, x, mean, rstd, w, dx, dw, db):
    """Ranges of rows, each with its own float64 partial column sums, merged once."""
    R, n = x.shape
    dyf = dy.reshape(dy.size)
    xf = x.reshape(x.size)
    dxf = dx.reshape(dx.size)
    rows = _split(R, 2 * T)
    Q = rows.shape[0] - 1
    dwp = np.zeros((Q, n))
    dbp = np.zeros((Q, n))
    for p in prange(Q):
        _ln_bwd_rows(dyf, xf, dxf, rows[p], rows[p + 1], n, mean, rstd, w, dwp[p], dbp[p])
    _merge_columns(dwp, dw)
    _merge_columns(dbp, db)


@njit(**_OPTS)
def _rms_bwd_serial(dy, x, rstd, w, dx, dw):
    R, n = x.shape
    dwp = np.zeros((1, n))
    _rms_bwd_rows(dy.reshape(dy.size), x.reshape(x.size), dx.reshape(dx.size), 0, R, n, rstd,
                  w, dwp[0])
    _merge_columns(dwp, dw)


@njit(parallel=True, **_OPTS)
def _rms_bwd_parallel(T, dy, x, rstd, w, dx, dw):
    R, n = x.shape
    dyf = dy.reshape(dy.size)
    xf = x.reshape(x.size)
    dxf = dx.reshape(dx.size)
    rows = _split(R, 2 * T)
    Q = rows.shape[0] - 1
    dwp = np.zeros((Q, n))
    for p in prange(Q):
        _rms_bwd_rows(dyf, xf, dxf, rows[p], rows[p + 1], n, rstd, w, dwp[p])
    _merge_columns(dwp, dw)


# --------------------------------------------------------------------------------------
# The backend contract's functions
# --------------------------------------------------------------------------------------
def _kernel_view(a):
    """`a` as the kernels read it: 16-bit floats as their integer bits (or None where the
    conversions are unusable here)."""
    ch = a.dtype.char
    if ch not in _HALF_TYPES:
        return a
    bits = _bits(ch)
    return None if bits is None else a.view(bits)


def _out(shape, dtype, nvalues):
    return np.empty(shape, dtype) if nvalues <= SERIAL_MAX else _buffers.empty(shape, dtype)


def _call(nvalues, serial, parallel, *args):
    """Run `serial(*args)` for small calls (and where the threading layer must not be used,
    a forked child), else `parallel(threads, *args)`."""
    if nvalues <= SERIAL_MAX or not _threading.begin():
        serial(*args)
        return
    try:
        parallel(_nthreads(), *args)
    finally:
        _threading.end()


def layer_norm_forward(x2, weight, bias, eps):
    """Layer norm of each row of `x2`.

    Parameters
    ----------
    x2 : numpy.ndarray
        C-contiguous ``(R, N)`` input, ``N >= 1``.
    weight, bias : numpy.ndarray
        Length-``N`` arrays of dtype ``stats_dtype(x2.dtype)``.
    eps : float
        Added to the variance before the square root.

    Returns
    -------
    y2 : numpy.ndarray
        ``(x - mean) * rstd * weight + bias`` in ``x2.dtype``.
    mean, rstd : numpy.ndarray
        Length-``R`` row mean and ``1 / sqrt(var + eps)`` (biased variance; 0 where
        ``var + eps == 0``), in ``stats_dtype(x2.dtype)``.
    """
    R, n = x2.shape
    sd = weight.dtype
    xk = _kernel_view(x2)
    if xk is None:  # 16-bit data without usable conversions: through float32
        y, mean, rstd = layer_norm_forward(x2.astype(_F32), weight, bias, eps)
        return y.astype(x2.dtype), mean, rstd
    y = _out(x2.shape, xk.dtype, x2.size)
    mean, rstd = np.empty(R, sd), np.empty(R, sd)
    _call(x2.size, _ln_fwd_serial, _ln_fwd_parallel, xk, weight, bias, eps, y, mean, rstd)
    return y.view(x2.dtype), mean, rstd


def layer_norm_backward(dy2, x2, mean, rstd, weight):
    """Gradients of :func:`layer_norm_forward`.

    With ``xhat = (x - mean) * rstd``, ``g = dy * weight`` and ``N`` values per row:
    ``dx = rstd * (g - mean_row(g) - xhat * mean_row(g * xhat))``,
    ``dweight = sum_rows(dy * xhat)``, ``dbias = sum_rows(dy)``.

    Parameters
    ----------
    dy2, x2 : numpy.ndarray
        C-contiguous ``(R, N)`` gradient of the output and forward input, same dtype.
    mean, rstd : numpy.ndarray
        The statistics returned by :func:`layer_norm_forward`.
    weight : numpy.ndarray
        Length-``N`` weight of dtype ``stats_dtype(x2.dtype)``.

    Returns
    -------
    dx2 : numpy.ndarray
        In ``x2.dtype``.
    dweight, dbias : numpy.ndarray
        Length ``N``, in ``stats_dtype(x2.dtype)``.
    """
    R, n = x2.shape
    sd = weight.dtype
    xk, dyk = _kernel_view(x2), _kernel_view(dy2)
    if xk is None:
        dx, dw, db = layer_norm_backward(dy2.astype(_F32), x2.astype(_F32), mean, rstd, weight)
        return dx.astype(x2.dtype), dw, db
    dx = _out(x2.shape, xk.dtype, x2.size)
    dw, db = np.empty(n, sd), np.empty(n, sd)
    _call(x2.size, _ln_bwd_serial, _ln_bwd_parallel, dyk, xk, mean, rstd, weight, dx, dw, db)
    return dx.view(x2.dtype), dw, db


def rms_norm_forward(x2, weight, eps):
    """RMS norm of each row of `x2`.

    Parameters
    ----------
    x2 : numpy.ndarray
        C-contiguous ``(R, N)`` input, ``N >= 1``.
    weight : numpy.ndarray
        Length-``N`` array of dtype ``stats_dtype(x2.dtype)``.
    eps : float
        Added to the mean square before the square root.

    Returns
    -------
    y2 : numpy.ndarray
        ``x * rstd * weight`` in ``x2.dtype``.
    rstd : numpy.ndarray
        Length-``R`` ``1 / sqrt(mean(x**2) + eps)`` (0 where that sum is 0), in
        ``stats_dtype(x2.dtype)``.
    """
    R, n = x2.shape
    xk = _kernel_view(x2)
    if xk is None:
        y, rstd = rms_norm_forward(x2.astype(_F32), weight, eps)
        return y.astype(x2.dtype), rstd
    y = _out(x2.shape, xk.dtype, x2.size)
    rstd = np.empty(R, weight.dtype)
    _call(x2.size, _rms_fwd_serial, _rms_fwd_parallel, xk, weight, eps, y, rstd)
    return y.view(x2.dtype), rstd


def rms_norm_backward(dy2, x2, rstd, weight):
    """Gradients of :func:`rms_norm_forward`.

    With ``g = dy * weight`` and ``N`` values per row:
    ``dx = rstd * g - x * rstd**3 * mean_row(g * x)``, ``dweight = sum_rows(dy * x * rstd)``.

    Parameters
    ----------
    dy2, x2 : numpy.ndarray
        C-contiguous ``(R, N)`` gradient of the output and forward input, same dtype.
    rstd : numpy.ndarray
        As returned by :func:`rms_norm_forward`.
    weight : numpy.ndarray
        Length-``N`` weight of dtype ``stats_dtype(x2.dtype)``.

    Returns
    -------
    dx2 : numpy.ndarray
        In ``x2.dtype``.
    dweight : numpy.ndarray
        Length ``N``, in ``stats_dtype(x2.dtype)``.
    """
    R, n = x2.shape
    xk, dyk = _kernel_view(x2), _kernel_view(dy2)
    if xk is None:
        dx, dw = rms_norm_backward(dy2.astype(_F32), x2.astype(_F32), rstd, weight)
        return dx.astype(x2.dtype), dw
    dx = _out(x2.shape, xk.dtype, x2.size)
    dw = np.empty(n, weight.dtype)
    _call(x2.size, _rms_bwd_serial, _rms_bwd_parallel, dyk, xk, rstd, weight, dx, dw)
    return dx.view(x2.dtype), dw


# A cache entry that cannot be read is compiled again and rewritten, not an error forever.
_jitcache.harden(globals())
