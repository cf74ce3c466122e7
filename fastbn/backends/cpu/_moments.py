"""Reductions of the CPU kernels: per-channel statistics (blocked two-pass sums, Chan
merges) and the backward's sums, for runs of a channel and for row tiles."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from .. import _jitcache
from ._half import ld
from ._plan import (
    _EW,
    _OPTS,
    _RED,
    _SHORT,
    _WIDE,
    _cf_block,
    _expand,
    _four,
    _tile,
    _wide_k,
)

# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


@njit(**_OPTS)
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, M2) summaries with Chan's formula.

    Equal means merge exactly (a constant feature keeps its value). When the difference
    of the means is not finite (an infinite mean, or finite means whose difference
    overflows), ``mean_a + d * f`` would give inf - inf = NaN for an infinite ``mean_a``:
    the weighted average is used instead, which gives +-inf, or NaN for opposite
    infinities, as a sum over all the values would."""
    if n_a == 0:
        return n_b, mean_b, m2_b
    if n_b == 0:
        return n_a, mean_a, m2_a
    n = n_a + n_b
    f = n_b / n
    d = mean_b - mean_a
    if abs(d) < np.inf:
        mean = mean_a + d * f
    else:
        mean = mean_a * (n_a / n) + mean_b * f
    return n, mean, m2_a + m2_b + d * d * n_a * f


@njit(**_OPTS)
def _finite_or_zero(v):
    v = np.float64(v)
    return v if abs(v) < np.inf else 0.0


def _shift(xf, v):
    """The shift K of the shifted-data sums of data `xf`, given a value `v` of the data.

    Statistics of float64 data sum ``x - K`` with ``K`` one of the values summed: a
    constant feature then sums exact zeros, so its mean is ``K`` and its variance 0
    exactly (a float64 sum of n copies of 0.1 is not n * 0.1, and would leave a variance
    of about 1e-33 that eps = 0 turns into invstd 1e16). The sums of deviations are also
    smaller than the sums of the values, so their rounding no longer grows with |mean|.
    An infinite or NaN ``v`` gives K = 0 (the plain sum): x - inf would be NaN for every x,
    while the plain sum gives NumPy's and torch's results (+-inf means for infinities of
    one sign, NaN otherwise). For float32, float16 and bfloat16 data K is the constant 0 and the
    subtractions compile away: their float64 sums of up to 2**29 copies of a value are
    exact, so a constant feature is exact there without a shift. (``@njit`` only.)"""
    raise NotImplementedError("_shift is only usable inside Numba-compiled code")


def _kat(xf, kw, j):
    """``kw[j]``, the shift of column j, for float64 data; the constant 0 otherwise (see
    :func:`_shift`). (``@njit`` only.)"""
    raise NotImplementedError("_kat is only usable inside Numba-compiled code")


def _k(xf, k):
    """`k` for float64 data, the constant 0 otherwise (see :func:`_shift`)."""
    raise NotImplementedError("_k is only usable inside Numba-compiled code")


def _float64_data(xf):
    return isinstance(xf, types.Array) and xf.dtype == types.float64


@overload(_shift)
def _shift_impl(xf, v):
    if _float64_data(xf):
        return lambda xf, v: _finite_or_zero(v)
    return lambda xf, v: 0.0


@overload(_kat)
def _kat_impl(xf, kw, j):
    if _float64_data(xf):
        return lambda xf, kw, j: kw[j]
    return lambda xf, kw, j: 0.0


@overload(_k)
def _k_impl(xf, k):
    if _float64_data(xf):
        return lambda xf, k: k
    return lambda xf, k: 0.0


@njit(**_OPTS)
def _invstd(var, eps):
    ve = var + eps
    if ve == 0.0:
        return 0.0
    return 1.0 / math.sqrt(ve)


@njit(**_OPTS)
def _finish(mean64, m2, n, w, b, eps, mean_out, var_out, invstd_out, alpha, beta):
    """From per-channel mean and M2 over n values: write the statistics and alpha/beta."""
    inn = 1.0 / n
    for c in range(mean64.shape[0]):
        mu = mean64[c]
        var = m2[c] * inn
        ve = var + eps
        r = 1.0 / math.sqrt(ve)  # branch-free, so the loop vectorizes
        inv = r if ve != 0.0 else 0.0
        mean_out[c] = mu
        var_out[c] = var
        invstd_out[c] = inv
        a = np.float64(w[c]) * inv
        alpha[c] = a
        beta[c] = np.float64(b[c]) - mu * a


# Innermost loops index with unsigned integers: an index Numba knows is non-negative
# skips the negative-index wraparound, which otherwise blocks vectorization
# (``for i in range(i0, i1): x[i]`` with signed i0 measured 15-25x slower). Slicing
# would avoid it too, but every slice is a reference-counted view (an atomic update of
# a counter shared by all threads), too costly per short run.


@njit(fastmath=_RED, **_OPTS)
def _sum(xf, i0, i1, k):
    """sum(x[i0:i1] - k) (see :func:`_shift`)."""
    k = _k(xf, k)
    s = 0.0
    for i in range(np.uint64(i0), np.uint64(i1)):
        s += ld(xf[i]) - k
    return s


@njit(fastmath=_RED, **_OPTS)
def _sqdev(xf, i0, i1, mu):
    q = 0.0
    for i in range(np.uint64(i0), np.uint64(i1)):
        d = ld(xf[i]) - mu
        q += d * d
    return q


@njit(fastmath=_RED, **_OPTS)
def _bsums(dyf, xf, i0, i1, mu):
    s = 0.0
    t = 0.0
    for i in range(np.uint64(i0), np.uint64(i1)):
        g = np.float64(ld(dyf[i]))
        s += g
        t += g * (ld(xf[i]) - mu)
    return s, t


@njit(**_OPTS)
def _cf_stats(xf, C, B, c, m0, m1):
    """(mean, M2) of values [m0, m1) of channel c, blocked two-pass + Chan merges."""
    blk = _cf_block(B)
    n = 0.0
    mean = 0.0
    m2 = 0.0
    b0 = m0
    while b0 < m1:
        b1 = min(b0 + blk, m1)
        a = b0 // B
        k = _shift(xf, ld(xf[(a * C + c) * B + b0 - a * B]))  # the block's first value
        s = 0.0
        m = b0
        while m < b1:
            a = m // B
            j = m - a * B
            e = min(b1 - m, B - j)
            base = (a * C + c) * B + j
            s += _sum(xf, base, base + e, k)
            m += e
        nb = np.float64(b1 - b0)
        bm = k + s / nb
        q = 0.0
        m = b0
        while m < b1:
            a = m // B
            j = m - a * B
            e = min(b1 - m, B - j)
            base = (a * C + c) * B + j
            q += _sqdev(xf, base, base + e, bm)
            m += e
        n, mean, m2 = _chan(n, mean, m2, nb, bm, q)
        b0 = b1
    return mean, m2


@njit(**_OPTS)
def _cf_bsums(dyf, xf, C, B, c, m0, m1, mu):
    s = 0.0
    t = 0.0
    m = m0
    while m < m1:
        a = m // B
        j = m - a * B
        e = min(m1 - m, B - j)
        base = (a * C + c) * B + j
        s1, t1 = _bsums(dyf, xf, base, base + e, mu)
        s += s1
        t += t1
        m += e
    return s, t


# --------------------------------------------------------------------------------------
# Row tiles: a 2-d view of R rows of `wd` contiguous values, row r starting at flat
# offset base + r * stride. Column J of the view belongs to channel (J % (C*B)) // B.
# Loops run over blocks of rows and chunks of at most _COLS columns, so a block
# (at most _BLOCK values) and its per-column accumulators stay in L1 while memory is
# read row after row.
# --------------------------------------------------------------------------------------


@njit(fastmath=_EW, **_OPTS)
def _acc_row(xf, o, kw, s, n):
    """s[:n] += xf[o:o + n] - kw[:n] (per-column shifts, see :func:`_shift`)"""
    u = np.uint64(o)
    for j in range(np.uint64(n)):
        s[j] += ld(xf[u + j]) - _kat(xf, kw, j)


@njit(fastmath=_EW, **_OPTS)
def _acc_rows4(xf, o, st, kw, s, n):
    """s[:n] += the n values at o, o + st, o + 2 st, o + 3 st, each minus kw[:n] (four
    rows per load of s)."""
    u0 = np.uint64(o)
    u1 = np.uint64(o + st)
    u2 = np.uint64(o + 2 * st)
    u3 = np.uint64(o + 3 * st)
    for j in range(np.uint64(n)):
        # (x0 + x1) + (x2 + x3) - 4k: exact zero for a constant column (2v, 4v and 4k are
        # exact), one subtraction per four values
        s[j] += (
            (np.float64(ld(xf[u0 + j])) + np.float64(ld(xf[u1 + j])))
            + (np.float64(ld(xf[u2 + j])) + np.float64(ld(xf[u3 + j])))
        ) - 4.0 * _kat(xf, kw, j)


@njit(fastmath=_EW, **_OPTS)
def _sqdev_row(xf, o, bm, q, n):
    """q[:n] += (xf[o:o + n] - bm[:n]) ** 2"""
    u = np.uint64(o)
    for j in range(np.uint64(n)):
        d = ld(xf[u + j]) - bm[j]
        q[j] += d * d


@njit(fastmath=_EW, **_OPTS)
def _sqdev_rows4(xf, o, st, bm, q, n):
    u0 = np.uint64(o)
    u1 = np.uint64(o + st)
    u2 = np.uint64(o + 2 * st)
    u3 = np.uint64(o + 3 * st)
    for j in range(np.uint64(n)):
        m = bm[j]
        d0 = ld(xf[u0 + j]) - m
        d1 = ld(xf[u1 + j]) - m
        d2 = ld(xf[u2 + j]) - m
        d3 = ld(xf[u3 + j]) - m
        q[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)


@njit(fastmath=_EW, **_OPTS)
def _merge_cols(mo, qo, j0, s, q, n, f, h):
    """Chan merge of a block's column (mean s, M2 q) into (mo, qo)[j0:j0 + n]."""
    u = np.uint64(j0)
    for j in range(np.uint64(n)):
        m = mo[u + j]
        d = s[j] - m
        # as _chan: the weighted average where d is not finite (a branch-free select)
        mo[u + j] = m + d * f if abs(d) < np.inf else m * (1.0 - f) + s[j] * f
        qo[u + j] += q[j] + d * d * h


@njit(**_OPTS)
def _rows_stats(xf, base, stride, wd, r0, r1, mo, qo):
    """Per-column (mean, M2) over rows [r0, r1) of the view, into mo[:wd], qo[:wd]:
    two passes over each cache-resident block of rows, blocks merged with Chan's formula."""
    four = _four(xf, stride)
    cwm, rb = _tile(wd)
    s = np.empty(cwm)
    q = np.empty(cwm)
    kw = np.empty(cwm)
    n = 0.0
    for b0 in range(r0, r1, rb):
        b1 = min(b0 + rb, r1)
        nb = np.float64(b1 - b0)
        f = nb / (n + nb)
        h = n * f
        for j0 in range(0, wd, cwm):
            cw = min(cwm, wd - j0)
            o0 = base + b0 * stride + j0
            for j in range(cw):
                s[j] = 0.0
                q[j] = 0.0
                kw[j] = _shift(xf, ld(xf[o0 + j]))  # the column's value in the first row
            r = b0
            while four and r + 4 <= b1:
                _acc_rows4(xf, base + r * stride + j0, stride, kw, s, cw)
                r += 4
            while r < b1:
                _acc_row(xf, base + r * stride + j0, kw, s, cw)
                r += 1
            for j in range(cw):
                s[j] = kw[j] + s[j] / nb
            r = b0
            while four and r + 4 <= b1:
                _sqdev_rows4(xf, base + r * stride + j0, stride, s, q, cw)
                r += 4
            while r < b1:
                _sqdev_row(xf, base + r * stride + j0, s, q, cw)
                r += 1
            if n == 0.0:
                for j in range(cw):
                    mo[j0 + j] = s[j]
                    qo[j0 + j] = q[j]
            else:
                _merge_cols(mo, qo, j0, s, q, cw, f, h)
        n += nb


@njit(fastmath=_EW, **_OPTS)
def _bsums_row(dyf, xf, o, mw, so, to, j0, n):
    u = np.uint64(o)
    v = np.uint64(j0)
    for j in range(np.uint64(n)):
        g = np.float64(ld(dyf[u + j]))
        so[v + j] += g
        to[v + j] += g * (ld(xf[u + j]) - mw[v + j])


@njit(fastmath=_EW, **_OPTS)
def _bsums_rows4(dyf, xf, o, st, mw, so, to, j0, n):
    u0 = np.uint64(o)
    u1 = np.uint64(o + st)
    u2 = np.uint64(o + 2 * st)
    u3 = np.uint64(o + 3 * st)
    v = np.uint64(j0)
    for j in range(np.uint64(n)):
        m = mw[v + j]
        g0 = np.float64(ld(dyf[u0 + j]))
        g1 = np.float64(ld(dyf[u1 + j]))
        g2 = np.float64(ld(dyf[u2 + j]))
        g3 = np.float64(ld(dyf[u3 + j]))
        so[v + j] += (g0 + g1) + (g2 + g3)
        to[v + j] += (g0 * (ld(xf[u0 + j]) - m) + g1 * (ld(xf[u1 + j]) - m)) + (
            g2 * (ld(xf[u2 + j]) - m) + g3 * (ld(xf[u3 + j]) - m)
        )


@njit(**_OPTS)
def _rows_bsums(dyf, xf, base, stride, wd, r0, r1, mw, so, to):
    """Per-column sum(dy), sum(dy * (x - mw[J])) over rows [r0, r1), added to so, to."""
    four = _four(xf, stride)
    cwm, rb = _tile(wd)
    for b0 in range(r0, r1, rb):
        b1 = min(b0 + rb, r1)
        for j0 in range(0, wd, cwm):
            cw = min(cwm, wd - j0)
            r = b0
            while four and r + 4 <= b1:
                _bsums_rows4(
                    dyf, xf, base + r * stride + j0, stride, mw, so, to, j0, cw
                )
                r += 4
            while r < b1:
                _bsums_row(dyf, xf, base + r * stride + j0, mw, so, to, j0, cw)
                r += 1


@njit(**_OPTS)
def _fold(mo, qo, CB, B, k, c, n):
    """(mean, M2) of channel c from its k*B columns J = g*CB + c*B + j of a view, each
    column summarizing n values: mean of means, M2 = sum(M2) + n * sum((mean_J - mean)**2)."""
    cnt = k * B
    sh = _finite_or_zero(mo[c * B])  # shifted like the data sums: equal means stay exact
    s = 0.0
    for g in range(k):
        o = g * CB + c * B
        for j in range(B):
            s += mo[o + j] - sh
    mu = sh + s / cnt
    q = 0.0
    d2 = 0.0
    for g in range(k):
        o = g * CB + c * B
        for j in range(B):
            d = mo[o + j] - mu
            d2 += d * d
            q += qo[o + j]
    return mu, q + n * d2


@njit(**_OPTS)
def _fold_sum(so, CB, B, k, c):
    s = 0.0
    for g in range(k):
        o = g * CB + c * B
        for j in range(B):
            s += so[o + j]
    return s


@njit(**_OPTS)
def _merge_parts(pm, pq, rows, tm, tq, Rt, C, B, k, mean64, m2):
    """Per-channel (mean, M2) from per-(row range, column) partials and the tail rows."""
    CB = C * B
    cnt = np.zeros(C)
    for p in range(rows.shape[0] - 1):
        nr = rows[p + 1] - rows[p]
        if nr > 0:
            mo = pm[p]  # one view per range, not per channel
            qo = pq[p]
            for c in range(C):
                m1, q1 = _fold(mo, qo, CB, B, k, c, np.float64(nr))
                cnt[c], mean64[c], m2[c] = _chan(
                    cnt[c], mean64[c], m2[c], np.float64(nr * k * B), m1, q1
                )
    if Rt > 0:
        for c in range(C):
            m1, q1 = _fold(tm, tq, CB, B, 1, c, np.float64(Rt))
            cnt[c], mean64[c], m2[c] = _chan(
                cnt[c], mean64[c], m2[c], np.float64(Rt * B), m1, q1
            )


# --------------------------------------------------------------------------------------
# Top-level kernels: forward training
# --------------------------------------------------------------------------------------


@njit(**_OPTS)
def _rows_sum(xf, base, stride, wd, r0, r1, kw, s):
    """s[:wd] += column sums of (x - kw[J]) over rows [r0, r1) of the view."""
    four = _four(xf, stride)
    r = r0
    while four and r + 4 <= r1:
        _acc_rows4(xf, base + r * stride, stride, kw, s, wd)
        r += 4
    while r < r1:
        _acc_row(xf, base + r * stride, kw, s, wd)
        r += 1


@njit(**_OPTS)
def _rows_sqdev(xf, base, stride, wd, r0, r1, mw, q):
    """q[:wd] += column sums of (x - mw[J])**2 over rows [r0, r1) of the view."""
    four = _four(xf, stride)
    r = r0
    while four and r + 4 <= r1:
        _sqdev_rows4(xf, base + r * stride, stride, mw, q, wd)
        r += 4
    while r < r1:
        _sqdev_row(xf, base + r * stride, mw, q, wd)
        r += 1


@njit(**_OPTS)
def _serial_stats(xf, A, C, B, mean64, m2):
    """Per-channel mean and M2 of a small (cache-resident) tensor by the plain two-pass
    algorithm: channel sums, then squared deviations from the channel means. Without
    merges of partial means, the error does not grow with |mean| / std at all."""
    M = A * B
    if B >= _SHORT:
        for c in range(C):
            k = _shift(xf, ld(xf[c * B]))  # the channel's first value
            s = 0.0
            for a in range(A):
                o = (a * C + c) * B
                s += _sum(xf, o, o + B, k)
            mu = k + s / M
            q = 0.0
            for a in range(A):
                o = (a * C + c) * B
                q += _sqdev(xf, o, o + B, mu)
            mean64[c] = mu
            m2[c] = q
        return
    CB = C * B
    k = _wide_k(CB, _WIDE)
    W = k * CB
    R = A // k
    Rt = A - R * k
    ks = np.empty(C)  # per-channel shifts: each channel's first value
    for c in range(C):
        ks[c] = _shift(xf, ld(xf[c * B]))
    if W == C:  # plain rows of channels: columns are channels
        mean64[:] = 0.0
        _rows_sum(xf, 0, C, C, 0, A, ks, mean64)
        for c in range(C):
            mean64[c] = ks[c] + mean64[c] / M
        m2[:] = 0.0
        _rows_sqdev(xf, 0, C, C, 0, A, mean64, m2)
        return
    kw = _expand(ks, CB, B, W)
    acc = np.zeros(W)
    _rows_sum(xf, 0, W, W, 0, R, kw, acc)
    _rows_sum(xf, R * W, CB, CB, 0, Rt, kw, acc)  # tail rows: columns [0, CB) map alike
    for c in range(C):
        mean64[c] = ks[c] + _fold_sum(acc, CB, B, k, c) / M
    mw = _expand(mean64, CB, B, W)
    acc[:] = 0.0
    _rows_sqdev(xf, 0, W, W, 0, R, mw, acc)
    _rows_sqdev(xf, R * W, CB, CB, 0, Rt, mw, acc)
    for c in range(C):
        m2[c] = _fold_sum(acc, CB, B, k, c)


# A cache entry that cannot be read is compiled again and rewritten, not an error forever.
_jitcache.harden(globals())
