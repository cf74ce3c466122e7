"""Float64 oracle and error bounds for the GPU kernels (used by tests/cudasim and
tests/test_gpu.py).

Error bounds
------------
With u the unit roundoff of the accumulation dtype (float32 for float16, bfloat16 and
float32 data, float64 for float64 data), M = A * B values per channel and r = |mean| / std of a
channel, a stable kernel (Welford states merged with Chan's formula) computes

* the mean with absolute error <= K u L (|mean| + std), and
* the variance with relative error <= K u L (1 + r):
  each deviation x - mean is formed from a mean that carries an absolute error of order
  u |mean|, i.e. a relative error of order u r of a deviation of size std,

where L = log2(M) + 2 covers the depth of the merge tree plus the last roundings and K = 8
is a small constant for the few roundings per merge. The naive E[x^2] - E[x]^2 has a
relative error of order u r^2 instead; with r = 1e4 in float32 that is about 6 (600 %),
which :func:`test_large_offset_float32` checks the bound would catch.

Sums (the backward reductions, accumulated without compensation) get the classical
bound for recursive summation in any order: |error| <= M u sum |terms|.
"""

from __future__ import annotations

import math

import numpy as np

#: constant of the error bounds (a few roundings per merge step)
K = 8.0


def stats_dtype(dtype):
    """float16 and bfloat16 (ml_dtypes) -> float32, other dtypes unchanged."""
    dtype = np.dtype(dtype)
    half = dtype == np.float16 or (dtype.kind == "V" and dtype.name == "bfloat16")
    return np.dtype(np.float32) if half else dtype


def acc_u(dtype) -> float:
    """Unit roundoff of the accumulation dtype of data of `dtype`."""
    return float(np.finfo(np.float64 if np.dtype(dtype) == np.float64 else np.float32).eps) / 2


def out_u(dtype) -> float:
    return float(np.finfo(dtype).eps) / 2


# ----------------------------------------------------------------------------------------
# float64 oracle on the canonical (A, C, B) form
# ----------------------------------------------------------------------------------------


def ref_forward(x3, w, b, eps):
    x = x3.astype(np.float64)
    mean = x.mean(axis=(0, 2))
    d = x - mean[None, :, None]
    var = (d * d).mean(axis=(0, 2))
    ve = var + eps
    invstd = np.where(ve > 0, 1.0 / np.sqrt(np.where(ve > 0, ve, 1.0)), 0.0)
    y = d * (invstd * w.astype(np.float64))[None, :, None] + b.astype(np.float64)[None, :, None]
    return y, mean, var, invstd


def ref_backward(dy3, x3, mean, invstd, w):
    dy = dy3.astype(np.float64)
    m = x3.shape[0] * x3.shape[2]
    xhat = (x3.astype(np.float64) - mean[None, :, None]) * invstd[None, :, None]
    db = dy.sum(axis=(0, 2))
    dw = (dy * xhat).sum(axis=(0, 2))
    k = (w.astype(np.float64) * invstd / m)[None, :, None]
    dx = k * (m * dy - db[None, :, None] - xhat * dw[None, :, None])
    return dx, dw, db


def make_case(rng, shape, dtype, offset_ratio=0.0):
    """x3 with per-channel offset = offset_ratio * std, plus weight and bias."""
    A, C, B = shape
    sd = stats_dtype(dtype)
    std = rng.uniform(0.5, 2.0, size=C)
    off = rng.choice([-1.0, 1.0], size=C) * offset_ratio * std
    x3 = (off[None, :, None] + std[None, :, None] * rng.standard_normal(shape)).astype(dtype)
    w = rng.uniform(0.5, 1.5, size=C).astype(sd)
    b = rng.standard_normal(C).astype(sd)
    return x3, w, b


# ----------------------------------------------------------------------------------------
# checks with the bounds of the module docstring
# ----------------------------------------------------------------------------------------


def forward_bounds(x3, w, b, eps):
    """Exact (float64) training-forward results and their error bounds, per element.

    Returns ``{"y"|"mean"|"var"|"invstd": (exact, bound)}`` for the ``(A, C, B)`` input.
    """
    sd = stats_dtype(x3.dtype)
    yr, mr, vr, ir = ref_forward(x3, w, b, eps)
    M = x3.shape[0] * x3.shape[2]
    u, L = acc_u(x3.dtype), math.log2(M) + 2
    std = np.sqrt(vr)
    r = np.abs(mr) / np.where(std > 0, std, 1.0)
    e_rel = K * u * L * (1 + r)  # relative error of var, invstd (per channel)
    # y = xhat * w + b: the deviation carries the mean's error (relative K u L (1 + r) of
    # std) and xhat the invstd error; then the rounding of y to the output dtype
    xhat = np.abs(yr - b[None, :, None]) / np.where(w > 0, w, 1.0)[None, :, None]
    tol_y = (e_rel[None, :, None] * np.abs(w)[None, :, None] * (1 + xhat)
             + u * np.abs(b)[None, :, None] + out_u(x3.dtype) * np.abs(yr))
    return {
        "y": (yr, tol_y),
        "mean": (mr, K * u * L * (np.abs(mr) + std)),
        "var": (vr, e_rel * vr),
        "invstd": (ir, e_rel * ir + out_u(sd) * ir),
    }


def backward_bounds(dy3, x3, mean, invstd, w):
    """Exact backward results for the given statistics, and their error bounds.

    Returns ``{"dx"|"dweight"|"dbias": (exact, bound)}``.
    """
    sd = stats_dtype(x3.dtype)
    m64, i64 = np.asarray(mean, np.float64), np.asarray(invstd, np.float64)
    dxr, dwr, dbr = ref_backward(dy3, x3, m64, i64, w)
    M = x3.shape[0] * x3.shape[2]
    u = acc_u(x3.dtype)
    ady = np.abs(dy3.astype(np.float64))
    dev = np.abs(x3.astype(np.float64) - m64[None, :, None])
    # the statistics are given, so the only errors are the sums' (M u sum|terms|), the
    # deviation x - mean rounded once (u |x|), and the final roundings
    e_db = M * u * ady.sum(axis=(0, 2)) + out_u(sd) * np.abs(dbr)
    e_s2 = M * u * (ady * dev).sum(axis=(0, 2)) + u * (ady * np.abs(x3)).sum(axis=(0, 2))
    e_dw = i64 * e_s2 * (1 + out_u(sd)) + out_u(sd) * np.abs(dwr)
    # dx = w invstd (dy - db/M - xhat dw/M): propagate e_db, e_dw, and the roundings of
    # the coefficients (a few u each) and of dx itself
    xh = dev * i64[None, :, None]
    k = (np.abs(w) * i64)[None, :, None]
    tol_dx = (k * ((e_db / M)[None, :, None] + xh * (e_dw / M)[None, :, None]
                   + K * u * (ady + (np.abs(dbr) / M)[None, :, None]
                              + (1 + xh) * (np.abs(dwr) / M)[None, :, None]))
              + out_u(x3.dtype) * np.abs(dxr))
    return {"dx": (dxr, tol_dx), "dweight": (dwr, e_dw), "dbias": (dbr, e_db)}


def assert_within(name, got, exact, bound):
    """|got - exact| <= bound elementwise (equality allowed where the bound is 0)."""
    err = np.abs(np.asarray(got, np.float64) - exact)
    bad = ~(err <= bound)
    if bad.any():
        idx = np.argwhere(bad)[0]
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.size} values outside the error bound; first at "
            f"{tuple(idx)}: got {np.asarray(got)[tuple(idx)]!r}, exact {exact[tuple(idx)]!r}, "
            f"bound {np.broadcast_to(bound, err.shape)[tuple(idx)]!r}")


def check_forward(x3, w, b, eps, out):
    """Check ``(y3, mean, var, invstd)`` of a training forward pass against the bounds."""
    y, mean, var, invstd = out
    sd = stats_dtype(x3.dtype)
    assert y.dtype == x3.dtype and y.shape == x3.shape
    for a in (mean, var, invstd):
        assert a.dtype == sd and a.shape == (x3.shape[1],)
    bounds = forward_bounds(x3, w, b, eps)
    for name, got in zip(("y", "mean", "var", "invstd"), out):
        assert_within(name, got, *bounds[name])


def check_backward(dy3, x3, mean, invstd, w, out):
    """Check ``(dx3, dweight, dbias)`` against the bounds (statistics as given)."""
    dx, dw, db = out
    sd = stats_dtype(x3.dtype)
    assert dx.dtype == x3.dtype and dx.shape == x3.shape
    assert dw.dtype == sd and db.dtype == sd
    bounds = backward_bounds(dy3, x3, mean, invstd, w)
    for name, got in zip(("dx", "dweight", "dbias"), out):
        assert_within(name, got, *bounds[name])


def special_case(rng, shape, dtype):
    """Data with special features: channel 0 constant 0.1 (no exact float sum of copies of
    it), channel 1 (if any) with +inf at its first and last value, channel 2 (if any) with
    +inf and -inf; the others normal. Returns ``(x3, w, b)``."""
    x3, w, b = make_case(rng, shape, dtype)
    x3[:, 0, :] = 0.1
    if shape[1] > 1:
        x3[0, 1, 0] = x3[-1, 1, -1] = np.inf
    if shape[1] > 2:
        x3[0, 2, 0], x3[-1, 2, -1] = np.inf, -np.inf
    return x3, w, b


def check_special(x3, w, b, out):
    """What :func:`special_case` data must give with eps = 0, as on the CPU and in torch:
    the constant channel has its value as mean, variance and invstd exactly 0 and outputs
    exactly b; an infinity of one sign gives mean +-inf and variance NaN; infinities of both
    signs give a NaN mean; the normal channels are within the bounds."""
    y, mean, var, invstd = (np.asarray(a) for a in out)
    v0 = np.asarray(np.asarray(0.1, x3.dtype), mean.dtype)
    assert mean[0] == v0 and var[0] == 0 and invstd[0] == 0, (mean[0], var[0], invstd[0])
    np.testing.assert_array_equal(y[:, 0], np.asarray(b[0], y.dtype))
    if x3.shape[1] > 1:
        assert mean[1] == np.inf and np.isnan(var[1]), (mean[1], var[1])
    if x3.shape[1] > 2:
        assert np.isnan(mean[2]), mean[2]
    rest = list(range(3, x3.shape[1]))
    if rest:
        check_forward(x3[:, rest].copy(), w[rest], b[rest], 0.0,
                      (y[:, rest], mean[rest], var[rest], invstd[rest]))


# ----------------------------------------------------------------------------------------
# bfloat16 loads and stores on every bit pattern
# ----------------------------------------------------------------------------------------

#: (alpha, beta) of the every-pattern tests: alpha = 1, beta = -0 returns every value
#: unchanged (-0 too); alpha = 9/8 makes 11-bit products that round, with many ties, and
#: overflow near the largest value
BF16_PATTERN_CASES = {"exact": (1.0, -0.0), "rounded": (1.125, 0.375)}


def bf16_every_pattern(shape):
    """All 65536 bfloat16 bit patterns as an array of `shape` (the canonical (A, C, B))."""
    import ml_dtypes

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    return bits.view(np.dtype(ml_dtypes.bfloat16)).reshape(shape)


def check_bf16_every_pattern(x3, y, alpha, beta, nan_rule):
    """Check the eval-mode output `y` of ``y = (x3 - 0) * alpha + beta`` (mean 0, var 1,
    eps 0: alpha is the weight) on :func:`bf16_every_pattern` input.

    The float32 arithmetic is IEEE, so NumPy's float32 gives the same float32 result, and
    ml_dtypes' round to nearest even the expected bfloat16. `nan_rule` checks the bits of
    the NaN outputs, given the float32 values they came from: the one place the backends
    differ (a canonical NaN or the quieted input).
    """
    import ml_dtypes

    y = np.asarray(y).reshape(-1).view(np.uint16)
    with np.errstate(over="ignore", invalid="ignore"):
        y32 = (x3.reshape(-1).astype(np.float32) - np.float32(0)) * np.float32(alpha) \
            + np.float32(beta)
        want = y32.astype(ml_dtypes.bfloat16).view(np.uint16)
    nan = np.isnan(y32)
    np.testing.assert_array_equal(y[~nan], want[~nan])
    nan_rule(y[nan], y32[nan])
    if alpha == 1.0:
        np.testing.assert_array_equal(y[~nan], x3.reshape(-1).view(np.uint16)[~nan])
