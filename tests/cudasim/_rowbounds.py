"""Float64 oracle and error bounds for the GPU layer-norm and RMS-norm kernels (used by
tests/cudasim and tests/test_gpu.py), on the backend contract's ``(R, N)`` rows.

Error bounds
------------
u is the unit roundoff of the accumulation dtype (float32 for float16, bfloat16 and float32
data, float64 for float64 data), N the row length, R the number of rows, K and L as in
``_bounds.py`` (K = 8, L = log2(N) + 2), r = |mean| / std of a row, xhat = (x - mean) rstd.

Layer norm forward: a row is one channel of ``_bounds.py`` (Welford states merged with
Chan's formula over a block), so the mean has an absolute error <= K u L (|mean| + std)
and the variance, hence rstd, a relative error <= K u L (1 + r) (plus the rounding of eps
to the accumulation dtype, one u). y = (x - mean) rstd w + b carries the mean's error
(relative K u L (1 + r) of a deviation of size std, times rstd |w|) and rstd's (times
|xhat| |w|), a few roundings of its own (within K), u |b|, and its rounding to the output
dtype: |y - y_ref| <= K u L (1 + r) |w| (1 + |xhat|) + u |b| + u_o |y_ref| + tiny.

RMS norm forward: the mean square is a sum of N non-negative terms, accumulated in any
order: relative error <= (N + 2) u with the division; rstd then at most half of that plus
two roundings: e_rms = (N / 2 + 3) u. |y - y_ref| <= |w| |x| rstd (e_rms + 3 u) + u_o
|y_ref| + tiny.

Backward, given the forward's statistics (the kernel's own mean and rstd), with
g = dy w and terms rounded a few times each (xhat: two roundings and u |x| rstd): the two
row sums s1 = sum g and s2 = sum g xhat have errors e1 <= (N + 2) u sum |g| and
e2 <= (N + 4) u sum |g| (|xhat| + |x| rstd) (recursive summation in any order); then
dx = rstd ((g - s1 / N) - xhat s2 / N) adds a few roundings (8 u of each of its terms,
generously) and its own rounding: |dx - dx_ref| <= rstd (e1 / N + |xhat| e2 / N + 8 u
(|g| + |s1| / N + |xhat| |s2| / N + |s2| / N |x| rstd)) + u_o |dx_ref| + tiny. dweight and
dbias are column sums over R rows (partials added in float64, rounded once):
(R + 4) u sum_r |dy| (|xhat| + |x| rstd) + u_s |dweight| and (R + 2) u sum_r |dy| + u_s
|dbias|.
"""

from __future__ import annotations

import math

import numpy as np

from _bounds import K, acc_u, out_u, stats_dtype


def _tiny(dtype) -> float:
    import ml_dtypes

    return float(ml_dtypes.finfo(dtype).smallest_subnormal) / 2


def make_rows(rng, shape, dtype, offset_ratio=0.0):
    """x2 with per-row offset = offset_ratio * std, weight and bias of length N."""
    R, N = shape
    sd = stats_dtype(dtype)
    std = rng.uniform(0.5, 2.0, size=R)
    off = rng.choice([-1.0, 1.0], size=R) * offset_ratio * std
    x2 = (off[:, None] + std[:, None] * rng.standard_normal(shape)).astype(dtype)
    w = rng.uniform(0.5, 1.5, size=N).astype(sd)
    b = rng.standard_normal(N).astype(sd)
    return x2, w, b


def _rstd(v, eps):
    ve = v + eps
    return np.where(ve > 0, 1.0 / np.sqrt(np.where(ve > 0, ve, 1.0)), 0.0)


def _check_meta(x2, y, stats):
    sd = stats_dtype(x2.dtype)
    assert y.shape == x2.shape and y.dtype == x2.dtype
    for s in stats:
        assert s.shape == (x2.shape[0],) and s.dtype == sd


def _assert_within(name, got, want, tol):
    err = np.abs(np.asarray(got, np.float64) - want)
    bad = ~(err <= tol)
    assert not bad.any(), (f"{name}: {bad.sum()} of {bad.size} values outside the bound, "
                           f"max err/tol {np.max(err / np.where(tol > 0, tol, 1e-300))}")


def check_layer_norm_forward(x2, w, b, eps, out):
    """``out = (y2, mean, rstd)`` against the oracle with the bounds of the module docstring."""
    y, mean, rstd = (np.asarray(a) for a in out)
    _check_meta(x2, y, (mean, rstd))
    dt = x2.dtype
    x = x2.astype(np.float64)
    N = x.shape[1]
    m = x.mean(axis=1)
    d = x - m[:, None]
    var = (d * d).mean(axis=1)
    rs = _rstd(var, eps)
    w64, b64 = w.astype(np.float64), b.astype(np.float64)
    y_ref = d * rs[:, None] * w64 + b64
    u, L = acc_u(dt), math.log2(N) + 2
    std = np.sqrt(var)
    r = np.abs(m) / np.where(std > 0, std, 1.0)
    e_rel = K * u * L * (1 + r) + u
    _assert_within("mean", mean, m, K * u * L * (np.abs(m) + std))
    _assert_within("rstd", rstd, rs, (e_rel + out_u(stats_dtype(dt))) * rs)
    xhat = np.abs(d) * rs[:, None]
    tol = (e_rel[:, None] * np.abs(w64) * (1 + xhat) + u * np.abs(b64) + out_u(dt) * np.abs(y_ref)
           + _tiny(dt))
    _assert_within("y", y, y_ref, tol)


def check_rms_norm_forward(x2, w, eps, out):
    """``out = (y2, rstd)`` against the oracle."""
    y, rstd = (np.asarray(a) for a in out)
    _check_meta(x2, y, (rstd,))
    dt = x2.dtype
    x = x2.astype(np.float64)
    N = x.shape[1]
    rs = _rstd((x * x).mean(axis=1), eps)
    w64 = w.astype(np.float64)
    y_ref = x * rs[:, None] * w64
    u = acc_u(dt)
    e_rms = (N / 2 + 3) * u
    _assert_within("rstd", rstd, rs, (e_rms + out_u(stats_dtype(dt))) * rs)
    tol = np.abs(w64) * np.abs(x) * rs[:, None] * (e_rms + 3 * u) + out_u(dt) * np.abs(y_ref) + _tiny(dt)
    _assert_within("y", y, y_ref, tol)


def check_row_backward(dy2, x2, mean, rstd, w, out, *, rms):
    """``out = (dx2, dweight[, dbias])`` for the given statistics (``mean`` None for RMS)."""
    out = tuple(np.asarray(a) for a in out)
    dx = out[0]
    sd = stats_dtype(x2.dtype)
    assert dx.shape == x2.shape and dx.dtype == x2.dtype
    dt = x2.dtype
    x, dy = x2.astype(np.float64), dy2.astype(np.float64)
    R, N = x.shape
    rs = np.asarray(rstd, np.float64)[:, None]
    m = 0.0 if rms else np.asarray(mean, np.float64)[:, None]
    w64 = w.astype(np.float64)
    xhat = (x - m) * rs
    g = dy * w64
    s1 = np.zeros((R, 1)) if rms else g.sum(axis=1, keepdims=True)
    s2 = (g * xhat).sum(axis=1, keepdims=True)
    dx_ref = rs * ((g - s1 / N) - xhat * s2 / N)
    u = acc_u(dt)
    ag, axr = np.abs(g), np.abs(x) * rs
    e1 = (N + 2) * u * ag.sum(axis=1, keepdims=True)
    e2 = (N + 4) * u * (ag * (np.abs(xhat) + axr)).sum(axis=1, keepdims=True)
    tol = (rs * (e1 / N + np.abs(xhat) * e2 / N
                 + 8 * u * (ag + np.abs(s1) / N + np.abs(xhat) * np.abs(s2) / N
                            + np.abs(s2) / N * axr))
           + out_u(dt) * np.abs(dx_ref) + _tiny(dt))
    _assert_within("dx", dx, dx_ref, tol)
    dw_ref = (dy * xhat).sum(axis=0)
    us = out_u(sd)
    adx = np.abs(dy) * (np.abs(xhat) + axr)
    assert out[1].shape == (N,) and out[1].dtype == sd
    _assert_within("dweight", out[1], dw_ref, (R + 4) * u * adx.sum(axis=0) + us * np.abs(dw_ref))
    if not rms:
        db_ref = dy.sum(axis=0)
        assert out[2].shape == (N,) and out[2].dtype == sd
        _assert_within("dbias", out[2], db_ref,
                       (R + 2) * u * np.abs(dy).sum(axis=0) + us * np.abs(db_ref))


def run_rows(be_fns, rng, shape, dtype, *, eps=1e-5, offset_ratio=0.0, view=lambda a: a,
             param=lambda a: a):
    """Forward and backward of both row norms through ``be_fns`` (an object with the four
    contract functions), checked against the oracle. ``view``/``param`` turn the NumPy
    inputs into the backend's arrays."""
    x2, w, b = make_rows(rng, shape, dtype, offset_ratio)
    dy2 = rng.standard_normal(shape).astype(dtype)
    gx, gdy, gw, gb = view(x2), view(dy2), param(w), param(b)
    out = be_fns.layer_norm_forward(gx, gw, gb, eps)
    check_layer_norm_forward(x2, w, b, eps, out)
    _, mean, rstd = out
    check_row_backward(dy2, x2, np.asarray(mean), np.asarray(rstd), w,
                       be_fns.layer_norm_backward(gdy, gx, mean, rstd, gw), rms=False)
    out = be_fns.rms_norm_forward(gx, gw, eps)
    check_rms_norm_forward(x2, w, eps, out)
    check_row_backward(dy2, x2, None, np.asarray(out[1]), w,
                       be_fns.rms_norm_backward(gdy, gx, out[1], gw), rms=True)
