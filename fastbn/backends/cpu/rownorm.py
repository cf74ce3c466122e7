"""Layer norm and RMS norm on the CPU: normalization of each row of a C-contiguous
``(R, N)`` array (``N`` the product of the normalized trailing dimensions).

A row is usually cache-resident, so each kernel reads it from memory once: the row's
statistics (two passes over the cached row: the shifted sum of :mod:`._moments` for the
mean, then the squared deviations from it; RMS norm sums squares, which cannot cancel),
then the elementwise pass over the same row. The forward loops are software-pipelined: the
first statistics pass of row r + 1 runs in the same loop as a pass over row r (layer norm:
its squared deviations; RMS norm, rows of at least ``_PIPELINE_MIN_N`` values: its
normalization), so that the next row's reads from memory overlap this row's arithmetic.
Parallel over ranges of rows; calls of at most ``SERIAL_MAX`` values run serially. The backward accumulates ``dweight``/``dbias`` as
float64 partial column sums per range of rows, merged once at the end (no shared
accumulator).

Arithmetic: float64 statistics; the elementwise passes compute in float64 for float32 and
float64 data and in float32 for float16 and bfloat16 data (as batch norm's, see
:func:`fastbn.backends.cpu._half.cf`), one rounding per output value.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ... import _buffers, _threading
from .. import _jitcache
from ._half import cf, ld, st
from ._moments import _invstd, _k, _shift, _sqdev, _sum
from ._plan import (
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


#: RMS norm's forward pipelines rows of at least this many values. Measured (float32, 2
#: cores, fastest of 5 blocks, 3 alternating runs): the pipelined loop took (16384, 1024)
#: from 5.6-6.1 to 4.7 ms and (2048, 12288) from 9.2-11.8 to 7.4-7.6 ms, but (65536, 128)
#: from 1.64-1.68 to 1.77-1.86 ms (a second loop's overhead per short row).
_PIPELINE_MIN_N = 512


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
def _rms_apply_and_next_sumsq(xf, yf, o, n, rs, w):
    """:func:`_rms_apply` over row xf[o:o + n], fused with the sum of squares of the next
    row (returned), so that the next row's reads overlap this row's work. The output is a
    product of three factors, which reassociation may regroup (a rounding's difference,
    no cancellation): this loop may carry the reduction's ``reassoc`` flag."""
    r = cf(rs, yf)
    u = np.uint64(o)
    v = np.uint64(o + n)
    q = 0.0
    for j in range(np.uint64(n)):
        yf[u + j] = st(ld(xf[u + j]) * r * w[j], yf)
        t = np.float64(ld(xf[v + j]))
        q += t * t
    return q


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
@njit(**_OPTS)
def _ln_fwd_rows(xf, yf, r0, r1, n, w, b, eps, mean, rstd):
    """Rows r0..r1-1, software-pipelined: the squared deviations of row r are summed in the
    same loop as the values of row r + 1 (two passes over each row all the same)."""
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
    """Rows r0..r1-1, software-pipelined for rows of at least ``_PIPELINE_MIN_N`` values: the
    sum of squares of row r + 1 is taken in the loop that normalizes row r."""
    if n < _PIPELINE_MIN_N:
        for r in range(r0, r1):
            o = r * n
            rs = _invstd(_sumsq(xf, o, o + n) / n, eps)
            rstd[r] = rs
            _rms_apply(xf, yf, o, n, rs, w)
        return
    if r1 <= r0:
        return
    q = _sumsq(xf, r0 * n, r0 * n + n)
    for r in range(r0, r1):
        o = r * n
        rs = _invstd(q / n, eps)
        rstd[r] = rs
        if r + 1 < r1:
            q = _rms_apply_and_next_sumsq(xf, yf, o, n, rs, w)
        else:
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
