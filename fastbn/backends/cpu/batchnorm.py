"""Batch normalization on the CPU: the backend contract's functions and their kernels,
composed of the package's reductions (:mod:`._moments`) and elementwise passes
(:mod:`._elementwise`) as planned by :mod:`._plan`."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ... import _buffers, _threading
from .. import _jitcache
from ._elementwise import (
    _cf_affine,
    _cf_bapply,
    _rows_affine,
    _rows_bapply,
    _runs_affine,
    _runs_bapply,
)
from ._moments import (
    _cf_bsums,
    _cf_stats,
    _chan,
    _finish,
    _fold,
    _fold_sum,
    _invstd,
    _merge_parts,
    _rows_bsums,
    _rows_stats,
    _serial_stats,
)
from ._plan import (
    _F32,
    _HALF_TYPES,
    _OPTS,
    _RUN,
    _SHORT,
    _SPLIT_COLS,
    _WIDE,
    _WIDE_EW,
    BACKWARD_SERIAL_MAX,
    SERIAL_MAX,
    _bits,
    _cf_chunks,
    _cf_fused,
    _col_chunks,
    _expand,
    _group,
    _nthreads,
    _outputs,
    _split,
    _spread,
    _wide_k,
)


@njit(**_OPTS)
def _bcoef(sdy, sdyx, mu, inv, w, M):
    """Per-channel backward coefficients: dx = g * dy + c2 * x + c3."""
    dw = inv * sdyx
    g = np.float64(w) * inv
    c2 = -g * inv * dw / M
    c3 = g * (inv * dw * mu - sdy) / M
    return dw, g, c2, c3


@njit(**_OPTS)
def _ft_serial(x, w, b, eps, y, mean_out, var_out, inv_out):
    """Serial training forward into preallocated outputs (allocating them in Python and
    returning nothing is cheaper than boxing four arrays made by Numba)."""
    A, C, B = x.shape
    M = A * B
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    scratch = np.empty(4 * C)  # one allocation for the four float64 work arrays
    mean64 = scratch[:C]
    m2 = scratch[C : 2 * C]
    alpha = scratch[2 * C : 3 * C]
    beta = scratch[3 * C :]
    _serial_stats(xf, A, C, B, mean64, m2)
    _finish(
        mean64, m2, np.float64(M), w, b, eps, mean_out, var_out, inv_out, alpha, beta
    )
    if B >= _SHORT:
        _runs_affine(xf, yf, C, B, 0, A, 0, C, alpha, beta)
        return
    CB = C * B
    k = _wide_k(CB, _WIDE_EW)
    W = k * CB
    R = A // k
    if W == C:  # rows of channels: the per-column coefficients are alpha and beta
        _rows_affine(xf, yf, 0, C, C, 0, A, alpha, beta)
        return
    aw = _expand(alpha, CB, B, W)
    bw = _expand(beta, CB, B, W)
    _rows_affine(xf, yf, 0, W, W, 0, R, aw, bw)
    _rows_affine(xf, yf, R * W, CB, CB, 0, A - R * k, aw, bw)


@njit(**_OPTS)
def _ft_serial_update(x, w, b, eps, y, mean_out, var_out, inv_out, rm, rv, momentum):
    """:func:`_ft_serial`, then the running-statistics update (one call from Python)."""
    _ft_serial(x, w, b, eps, y, mean_out, var_out, inv_out)
    A, _, B = x.shape
    update_running_stats(rm, rv, mean_out, var_out, momentum, A * B)


@njit(parallel=True, **_OPTS)
def _ft_parallel(x, w, b, eps, T, y):
    A, C, B = x.shape
    M = A * B
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    mean_out = np.empty(C, w.dtype)
    var_out = np.empty(C, w.dtype)
    inv_out = np.empty(C, w.dtype)
    mean64 = np.empty(C)
    m2 = np.empty(C)
    alpha = np.empty(C)
    beta = np.empty(C)
    if B >= _RUN:
        if _cf_fused(C, T):
            for c in prange(C):
                mu, q = _cf_stats(xf, C, B, c, 0, M)
                inv = _invstd(q / M, eps)
                a = np.float64(w[c]) * inv
                mean_out[c] = mu
                var_out[c] = q / M
                inv_out[c] = inv
                _cf_affine(xf, yf, C, B, c, 0, M, a, np.float64(b[c]) - mu * a)
            return y, mean_out, var_out, inv_out
        P = _cf_chunks(C, M, T)
        pmean = np.empty(C * P)
        pm2 = np.empty(C * P)
        for it in prange(C * P):
            c = it // P
            p = it - c * P
            mu, q = _cf_stats(xf, C, B, c, (p * M) // P, ((p + 1) * M) // P)
            pmean[it] = mu
            pm2[it] = q
        for ch in range(C):
            tn = 0.0
            tmu = 0.0
            tq = 0.0
            for pp in range(P):
                nb = np.float64(((pp + 1) * M) // P - (pp * M) // P)
                tn, tmu, tq = _chan(
                    tn, tmu, tq, nb, pmean[ch * P + pp], pm2[ch * P + pp]
                )
            mean64[ch] = tmu
            m2[ch] = tq
        _finish(
            mean64,
            m2,
            np.float64(M),
            w,
            b,
            eps,
            mean_out,
            var_out,
            inv_out,
            alpha,
            beta,
        )
        for it in prange(C * P):
            c = it // P
            p = it - c * P
            _cf_affine(
                xf, yf, C, B, c, (p * M) // P, ((p + 1) * M) // P, alpha[c], beta[c]
            )
        return y, mean_out, var_out, inv_out
    CB = C * B
    k = _wide_k(CB, _WIDE)
    g = _group(A, C, B, T) if k == 1 else 0
    if g > 0:
        for grp in prange((C + g - 1) // g):
            c0 = grp * g
            c1 = min(C, c0 + g)
            cw = (c1 - c0) * B
            mo = np.empty(cw)
            qo = np.empty(cw)
            _rows_stats(xf, c0 * B, CB, cw, 0, A, mo, qo)
            for c in range(c0, c1):
                mu, q = _fold(mo, qo, cw, B, 1, c - c0, np.float64(A))
                var = q / M
                inv = _invstd(var, eps)
                a = np.float64(w[c]) * inv
                mean_out[c] = mu
                var_out[c] = var
                inv_out[c] = inv
                alpha[c] = a
                beta[c] = np.float64(b[c]) - mu * a
            if B >= _SHORT:
                _runs_affine(xf, yf, C, B, 0, A, c0, c1, alpha, beta)
            else:
                _spread(alpha, c0, c1, B, mo)
                _spread(beta, c0, c1, B, qo)
                _rows_affine(xf, yf, c0 * B, CB, cw, 0, A, mo, qo)
        return y, mean_out, var_out, inv_out
    W = k * CB
    R = A // k
    Rt = A - R * k
    rows = _split(R, 2 * T)
    P = rows.shape[0] - 1
    pm = np.empty((P, W))
    pq = np.empty((P, W))
    for p in prange(P):
        _rows_stats(xf, 0, W, W, rows[p], rows[p + 1], pm[p], pq[p])
    tm = np.empty(CB)
    tq = np.empty(CB)
    _rows_stats(xf, R * W, CB, CB, 0, Rt, tm, tq)
    _merge_parts(pm, pq, rows, tm, tq, Rt, C, B, k, mean64, m2)
    _finish(
        mean64, m2, np.float64(M), w, b, eps, mean_out, var_out, inv_out, alpha, beta
    )
    if B >= _SHORT and k == 1:
        for p in prange(P):
            _runs_affine(xf, yf, C, B, rows[p], rows[p + 1], 0, C, alpha, beta)
        return y, mean_out, var_out, inv_out
    # the normalization regroups rows for itself (_WIDE_EW)
    k = _wide_k(CB, _WIDE_EW)
    W = k * CB
    R = A // k
    rows = _split(R, 2 * T)
    aw = _expand(alpha, CB, B, W)
    bw = _expand(beta, CB, B, W)
    for p in prange(rows.shape[0] - 1):
        _rows_affine(xf, yf, 0, W, W, rows[p], rows[p + 1], aw, bw)
    _rows_affine(xf, yf, R * W, CB, CB, 0, A - R * k, aw, bw)
    return y, mean_out, var_out, inv_out


# --------------------------------------------------------------------------------------
# Forward evaluation (given statistics)
# --------------------------------------------------------------------------------------


@njit(**_OPTS)
def _eval_coef(mean, var, w, b, eps):
    C = mean.shape[0]
    alpha = np.empty(C)
    beta = np.empty(C)
    for c in range(C):
        a = np.float64(w[c]) * _invstd(np.float64(var[c]), eps)
        alpha[c] = a
        beta[c] = np.float64(b[c]) - np.float64(mean[c]) * a
    return alpha, beta


@njit(**_OPTS)
def _fe_serial(x, mean, var, w, b, eps):
    A, C, B = x.shape
    xf = x.reshape(x.size)
    y = np.empty_like(x)
    yf = y.reshape(y.size)
    alpha, beta = _eval_coef(mean, var, w, b, eps)
    if B >= _SHORT:
        _runs_affine(xf, yf, C, B, 0, A, 0, C, alpha, beta)
        return y
    CB = C * B
    k = _wide_k(CB, _WIDE_EW)
    W = k * CB
    R = A // k
    aw = _expand(alpha, CB, B, W)
    bw = _expand(beta, CB, B, W)
    _rows_affine(xf, yf, 0, W, W, 0, R, aw, bw)
    _rows_affine(xf, yf, R * W, CB, CB, 0, A - R * k, aw, bw)
    return y


@njit(parallel=True, **_OPTS)
def _fe_parallel(x, mean, var, w, b, eps, T, y):
    A, C, B = x.shape
    M = A * B
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    alpha, beta = _eval_coef(mean, var, w, b, eps)
    if B >= _SHORT:
        if A >= 2 * T:
            rows = _split(A, 2 * T)
            for p in prange(rows.shape[0] - 1):
                _runs_affine(xf, yf, C, B, rows[p], rows[p + 1], 0, C, alpha, beta)
            return y
        P = _cf_chunks(C, M, T)
        for it in prange(C * P):
            c = it // P
            p = it - c * P
            _cf_affine(
                xf, yf, C, B, c, (p * M) // P, ((p + 1) * M) // P, alpha[c], beta[c]
            )
        return y
    CB = C * B
    k = _wide_k(CB, _WIDE_EW)
    W = k * CB
    R = A // k
    aw = _expand(alpha, CB, B, W)
    bw = _expand(beta, CB, B, W)
    if W >= _SPLIT_COLS or R < 2 * T:
        Q = _col_chunks(W, T)
        for qq in prange(Q):
            j0 = (qq * W) // Q
            j1 = ((qq + 1) * W) // Q
            _rows_affine(xf, yf, j0, W, j1 - j0, 0, R, aw[j0:j1], bw[j0:j1])
    else:
        rows = _split(R, 2 * T)
        for p in prange(rows.shape[0] - 1):
            _rows_affine(xf, yf, 0, W, W, rows[p], rows[p + 1], aw, bw)
    _rows_affine(xf, yf, R * W, CB, CB, 0, A - R * k, aw, bw)
    return y


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------


@njit(**_OPTS)
def _bw_rows_finish(
    so, to, tso, tto, Rt, C, B, k, mean, invstd, w, M, dw_out, db_out, g, c2, c3
):
    CB = C * B
    s = np.zeros(C)
    t = np.zeros(C)
    for p in range(so.shape[0]):
        sp = so[p]  # one view per range, not per channel
        tp = to[p]
        for c in range(C):
            s[c] += _fold_sum(sp, CB, B, k, c)
            t[c] += _fold_sum(tp, CB, B, k, c)
    if Rt > 0:
        for c in range(C):
            s[c] += _fold_sum(tso, CB, B, 1, c)
            t[c] += _fold_sum(tto, CB, B, 1, c)
    for c in range(C):
        dwc, g[c], c2[c], c3[c] = _bcoef(
            s[c], t[c], np.float64(mean[c]), np.float64(invstd[c]), w[c], M
        )
        dw_out[c] = dwc
        db_out[c] = s[c]


@njit(**_OPTS)
def _bw_serial(dy, x, mean, invstd, w, dx, dw_out, db_out, reduce_only):
    """Serial backward into preallocated outputs; `reduce_only`: dweight and dbias only
    (`dx` is not written)."""
    A, C, B = x.shape
    M = np.float64(A * B)
    Mi = A * B
    dyf = dy.reshape(dy.size)
    xf = x.reshape(x.size)
    dxf = dx.reshape(dx.size)
    if B >= _RUN:
        for c in range(C):
            mu = np.float64(mean[c])
            inv = np.float64(invstd[c])
            sdy, sdyx = _cf_bsums(dyf, xf, C, B, c, 0, Mi, mu)
            dwc, g, c2, c3 = _bcoef(sdy, sdyx, mu, inv, w[c], M)
            dw_out[c] = dwc
            db_out[c] = sdy
            if not reduce_only:
                _cf_bapply(dyf, xf, dxf, C, B, c, 0, Mi, g, c2, c3)
        return
    CB = C * B
    k = _wide_k(CB, _WIDE_EW)
    W = k * CB
    R = A // k
    Rt = A - R * k
    mw = _expand(mean.astype(np.float64), CB, B, W)
    so = np.zeros((1, W))
    to = np.zeros((1, W))
    _rows_bsums(dyf, xf, 0, W, W, 0, R, mw, so[0], to[0])
    tso = np.zeros(CB)
    tto = np.zeros(CB)
    _rows_bsums(dyf, xf, R * W, CB, CB, 0, Rt, mw, tso, tto)
    g = np.empty(C)
    c2 = np.empty(C)
    c3 = np.empty(C)
    _bw_rows_finish(
        so, to, tso, tto, Rt, C, B, k, mean, invstd, w, M, dw_out, db_out, g, c2, c3
    )
    if reduce_only:
        return
    if B >= _SHORT:
        _runs_bapply(dyf, xf, dxf, C, B, 0, A, 0, C, g, c2, c3)
        return
    gw = _expand(g, CB, B, W)
    c2w = _expand(c2, CB, B, W)
    c3w = _expand(c3, CB, B, W)
    _rows_bapply(dyf, xf, dxf, 0, W, W, 0, R, gw, c2w, c3w)
    _rows_bapply(dyf, xf, dxf, R * W, CB, CB, 0, Rt, gw, c2w, c3w)


@njit(parallel=True, **_OPTS)
def _bw_parallel(dy, x, mean, invstd, w, T, dx, reduce_only):
    """Parallel backward; `reduce_only`: see :func:`_bw_serial`."""
    A, C, B = x.shape
    M = np.float64(A * B)
    Mi = A * B
    dyf = dy.reshape(dy.size)
    xf = x.reshape(x.size)
    dxf = dx.reshape(dx.size)
    dw_out = np.empty(C, w.dtype)
    db_out = np.empty(C, w.dtype)
    g = np.empty(C)
    c2 = np.empty(C)
    c3 = np.empty(C)
    if B >= _RUN:
        if _cf_fused(C, T):
            for c in prange(C):
                mu = np.float64(mean[c])
                inv = np.float64(invstd[c])
                sdy, sdyx = _cf_bsums(dyf, xf, C, B, c, 0, Mi, mu)
                dwc, gc, c2c, c3c = _bcoef(sdy, sdyx, mu, inv, w[c], M)
                dw_out[c] = dwc
                db_out[c] = sdy
                if not reduce_only:
                    _cf_bapply(dyf, xf, dxf, C, B, c, 0, Mi, gc, c2c, c3c)
            return dx, dw_out, db_out
        P = _cf_chunks(C, Mi, T)
        ps = np.empty(C * P)
        pt = np.empty(C * P)
        for it in prange(C * P):
            c = it // P
            p = it - c * P
            s1, t1 = _cf_bsums(
                dyf,
                xf,
                C,
                B,
                c,
                (p * Mi) // P,
                ((p + 1) * Mi) // P,
                np.float64(mean[c]),
            )
            ps[it] = s1
            pt[it] = t1
        for ch in range(C):
            s = 0.0
            t = 0.0
            for pp in range(P):
                s += ps[ch * P + pp]
                t += pt[ch * P + pp]
            dwc, g[ch], c2[ch], c3[ch] = _bcoef(
                s, t, np.float64(mean[ch]), np.float64(invstd[ch]), w[ch], M
            )
            dw_out[ch] = dwc
            db_out[ch] = s
        if reduce_only:
            return dx, dw_out, db_out
        for it in prange(C * P):
            c = it // P
            p = it - c * P
            _cf_bapply(
                dyf,
                xf,
                dxf,
                C,
                B,
                c,
                (p * Mi) // P,
                ((p + 1) * Mi) // P,
                g[c],
                c2[c],
                c3[c],
            )
        return dx, dw_out, db_out
    CB = C * B
    k = _wide_k(CB, _WIDE_EW)
    gsz = _group(A, C, B, T) if k == 1 else 0
    if gsz > 0:
        for grp in prange((C + gsz - 1) // gsz):
            c0 = grp * gsz
            c1 = min(C, c0 + gsz)
            cw = (c1 - c0) * B
            mw = np.empty(cw)
            _spread(mean, c0, c1, B, mw)
            so = np.zeros(cw)
            to = np.zeros(cw)
            _rows_bsums(dyf, xf, c0 * B, CB, cw, 0, A, mw, so, to)
            for c in range(c0, c1):
                s = _fold_sum(so, cw, B, 1, c - c0)
                t = _fold_sum(to, cw, B, 1, c - c0)
                dwc, g[c], c2[c], c3[c] = _bcoef(
                    s, t, np.float64(mean[c]), np.float64(invstd[c]), w[c], M
                )
                dw_out[c] = dwc
                db_out[c] = s
            if reduce_only:
                pass
            elif B >= _SHORT:
                _runs_bapply(dyf, xf, dxf, C, B, 0, A, c0, c1, g, c2, c3)
            else:
                _spread(g, c0, c1, B, so)
                _spread(c2, c0, c1, B, to)
                _spread(c3, c0, c1, B, mw)
                _rows_bapply(dyf, xf, dxf, c0 * B, CB, cw, 0, A, so, to, mw)
        return dx, dw_out, db_out
    W = k * CB
    R = A // k
    Rt = A - R * k
    mw = _expand(mean.astype(np.float64), CB, B, W)
    rows = _split(R, 2 * T)
    P = rows.shape[0] - 1
    so = np.zeros((P, W))
    to = np.zeros((P, W))
    for p in prange(P):
        _rows_bsums(dyf, xf, 0, W, W, rows[p], rows[p + 1], mw, so[p], to[p])
    tso = np.zeros(CB)
    tto = np.zeros(CB)
    _rows_bsums(dyf, xf, R * W, CB, CB, 0, Rt, mw, tso, tto)
    _bw_rows_finish(
        so, to, tso, tto, Rt, C, B, k, mean, invstd, w, M, dw_out, db_out, g, c2, c3
    )
    if reduce_only:
        return dx, dw_out, db_out
    if B >= _SHORT and k == 1:
        for p in prange(P):
            _runs_bapply(dyf, xf, dxf, C, B, rows[p], rows[p + 1], 0, C, g, c2, c3)
        return dx, dw_out, db_out
    gw = _expand(g, CB, B, W)
    c2w = _expand(c2, CB, B, W)
    c3w = _expand(c3, CB, B, W)
    for p in prange(P):
        _rows_bapply(dyf, xf, dxf, 0, W, W, rows[p], rows[p + 1], gw, c2w, c3w)
    _rows_bapply(dyf, xf, dxf, R * W, CB, CB, 0, Rt, gw, c2w, c3w)
    return dx, dw_out, db_out


# --------------------------------------------------------------------------------------
# Running statistics (optional backend function, used by the public API when present)
# --------------------------------------------------------------------------------------


@njit(**_OPTS)
def update_running_stats(running_mean, running_var, mean, var, momentum, n):
    """Update running statistics in place, as torch does in training.

    ``running_mean = (1 - momentum) * running_mean + momentum * mean`` and
    ``running_var = (1 - momentum) * running_var + momentum * var * n / (n - 1)``
    (the unbiased batch variance), computed in float64 and stored in the running
    statistics' dtype. One compiled call instead of several small NumPy operations.

    Parameters
    ----------
    running_mean, running_var : numpy.ndarray
        Length-``C`` running statistics, updated in place.
    mean, var : numpy.ndarray
        Batch mean and biased batch variance from :func:`forward_train`.
    momentum : float
        Weight of the batch statistics.
    n : int
        Values per channel in the batch (``A * B``), at least 2.
    """
    keep = 1.0 - momentum
    unbias = momentum * n / (n - 1.0)
    for c in range(running_mean.shape[0]):
        running_mean[c] = keep * running_mean[c] + momentum * np.float64(mean[c])
        running_var[c] = keep * running_var[c] + unbias * np.float64(var[c])


def forward_train(x3, weight, bias, eps):
    """Training-mode forward: batch statistics and normalized output.

    Parameters
    ----------
    x3 : numpy.ndarray
        C-contiguous input of shape ``(A, C, B)``, ``A * B >= 1``.
    weight, bias : numpy.ndarray
        Length-``C`` arrays of dtype ``stats_dtype(x3.dtype)``.
    eps : float
        Added to the variance before the square root.

    Returns
    -------
    y3 : numpy.ndarray
        ``(x3 - mean) * invstd * weight + bias`` in ``x3.dtype``.
    mean, var, invstd : numpy.ndarray
        Per-channel batch mean, biased variance and ``1 / sqrt(var + eps)`` (0 where
        ``var + eps == 0``), in ``stats_dtype(x3.dtype)``.
    """
    if x3.dtype.char in _HALF_TYPES:
        bits = _bits(x3.dtype.char)
        y, m, v, i = forward_train(x3.astype(_F32) if bits is None else x3.view(bits),
                                   weight, bias, eps)
        return (y.astype(x3.dtype) if bits is None else y.view(x3.dtype)), m, v, i
    if x3.size <= SERIAL_MAX or not _threading.begin():
        y, mean, var, invstd = _outputs(x3, weight.dtype)
        _ft_serial(x3, weight, bias, eps, y, mean, var, invstd)
        return y, mean, var, invstd
    try:
        return _ft_parallel(
            x3, weight, bias, eps, _nthreads(), _buffers.empty(x3.shape, x3.dtype)
        )
    finally:
        _threading.end()


def forward_train_update(x3, weight, bias, eps, running_mean, running_var, momentum):
    """:func:`forward_train`, then :func:`update_running_stats` (optional contract function).

    Small tensors run both in one compiled call.

    Parameters
    ----------
    x3, weight, bias, eps
        As for :func:`forward_train`.
    running_mean, running_var : numpy.ndarray
        Length-``C`` running statistics (any floating dtype, any stride), updated in place
        after the statistics are computed.
    momentum : float
        Weight of the batch statistics.

    Returns
    -------
    tuple
        ``(y3, mean, var, invstd)`` as :func:`forward_train` returns them.
    """
    if x3.size <= SERIAL_MAX and x3.dtype.char not in ("e", "E"):  # not float16, bfloat16
        y, mean, var, invstd = _outputs(x3, weight.dtype)
        _ft_serial_update(
            x3, weight, bias, eps, y, mean, var, invstd, running_mean, running_var, momentum
        )
        return y, mean, var, invstd
    out = forward_train(x3, weight, bias, eps)
    update_running_stats(
        running_mean, running_var, out[1], out[2], momentum, x3.shape[0] * x3.shape[2]
    )
    return out


def forward_eval(x3, mean, var, weight, bias, eps):
    """Evaluation-mode forward: normalize with given (running) statistics.

    Parameters
    ----------
    x3 : numpy.ndarray
        C-contiguous input of shape ``(A, C, B)``.
    mean, var : numpy.ndarray
        Length-``C`` statistics of dtype ``stats_dtype(x3.dtype)``.
    weight, bias : numpy.ndarray
        Length-``C`` affine parameters of the same dtype.
    eps : float
        Added to the variance before the square root.

    Returns
    -------
    numpy.ndarray
        ``(x3 - mean) / sqrt(var + eps) * weight + bias`` in ``x3.dtype``.
    """
    if x3.dtype.char in _HALF_TYPES:
        bits = _bits(x3.dtype.char)
        if bits is None:
            return forward_eval(x3.astype(_F32), mean, var, weight, bias, eps).astype(x3.dtype)
        return forward_eval(x3.view(bits), mean, var, weight, bias, eps).view(x3.dtype)
    if x3.size <= SERIAL_MAX or not _threading.begin():
        return _fe_serial(x3, mean, var, weight, bias, eps)
    try:
        return _fe_parallel(
            x3, mean, var, weight, bias, eps, _nthreads(), _buffers.empty(x3.shape, x3.dtype)
        )
    finally:
        _threading.end()


def backward(dy3, x3, mean, invstd, weight):
    """Gradient of the training-mode forward.

    Parameters
    ----------
    dy3 : numpy.ndarray
        Gradient of the output, same shape and dtype as `x3`, C-contiguous.
    x3 : numpy.ndarray
        The forward input, C-contiguous ``(A, C, B)``.
    mean, invstd : numpy.ndarray
        The statistics returned by :func:`forward_train`.
    weight : numpy.ndarray
        Length-``C`` weight of dtype ``stats_dtype(x3.dtype)``.

    Returns
    -------
    dx3 : numpy.ndarray
        Gradient of the input, in ``x3.dtype``.
    dweight, dbias : numpy.ndarray
        ``sum(dy * xhat)`` and ``sum(dy)`` per channel, in ``stats_dtype(x3.dtype)``.
    """
    return _backward(dy3, x3, mean, invstd, weight, False)


def backward_eval(dy3, x3, mean, var, weight, eps):
    """Gradient of :func:`forward_eval` (the statistics are constants; optional contract
    function).

    Parameters
    ----------
    dy3, x3, weight
        As for :func:`backward`.
    mean, var : numpy.ndarray
        The statistics the forward normalized with (the running ones).
    eps : float
        As given to the forward.

    Returns
    -------
    dx3 : numpy.ndarray
        ``dy * weight * invstd`` in ``x3.dtype``, with ``invstd = 1 / sqrt(var + eps)``
        (0 where ``var + eps == 0``, as in the forward): the forward's elementwise pass
        applied to `dy3` (it reads `dy3` only, so an infinite `x3` leaves it finite).
    dweight, dbias : numpy.ndarray
        ``sum(dy * (x - mean) * invstd)`` and ``sum(dy)`` per channel, in
        ``stats_dtype(x3.dtype)``: the backward's reduction pass, without its dx pass.
    """
    _, dw, db = _backward(dy3, x3, mean, _invstd_array(var, eps, weight), weight, True)
    zero = np.zeros_like(weight)
    return forward_eval(dy3, zero, var, weight, zero, eps), dw, db


@njit(**_OPTS)
def _invstd_array(var, eps, like):
    """``1 / sqrt(var + eps)`` (0 where ``var + eps == 0``) in the dtype of `like`."""
    out = np.empty(var.shape[0], like.dtype)
    for c in range(var.shape[0]):
        out[c] = _invstd(np.float64(var[c]), eps)
    return out


def _backward(dy3, x3, mean, invstd, weight, reduce_only):
    """:func:`backward`; with `reduce_only`, dx3 is None and only the reductions run."""
    if x3.dtype.char in _HALF_TYPES:
        bits = _bits(x3.dtype.char)
        if bits is None:
            dx, dw, db = _backward(dy3.astype(_F32), x3.astype(_F32), mean, invstd, weight,
                                   reduce_only)
            return (None if reduce_only else dx.astype(x3.dtype)), dw, db
        dx, dw, db = _backward(dy3.view(bits), x3.view(bits), mean, invstd, weight, reduce_only)
        return (None if reduce_only else dx.view(x3.dtype)), dw, db
    limit = BACKWARD_SERIAL_MAX if x3.shape[2] >= _SHORT else SERIAL_MAX
    if x3.size <= limit or not _threading.begin():
        c = x3.shape[1]
        if reduce_only:
            dx = np.empty((0, 0, 0), x3.dtype)
        else:  # (a large x3 runs serially in a forked child, see _outputs)
            dx = _outputs(x3, weight.dtype)[0]
        dw, db = np.empty(c, weight.dtype), np.empty(c, weight.dtype)
        _bw_serial(dy3, x3, mean, invstd, weight, dx, dw, db, reduce_only)
        return (None if reduce_only else dx), dw, db
    try:
        dx = (np.empty((0, 0, 0), x3.dtype) if reduce_only
              else _buffers.empty(x3.shape, x3.dtype))
        dx, dw, db = _bw_parallel(dy3, x3, mean, invstd, weight, _nthreads(), dx, reduce_only)
        return (None if reduce_only else dx), dw, db
    finally:
        _threading.end()


# A cache entry that cannot be read is compiled again and rewritten, not an error forever.
_jitcache.harden(globals())
