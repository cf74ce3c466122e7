"""Numba CPU kernels (``fastbn.backends.cpu``) against plain float64 NumPy.

The backend functions are called directly on canonical ``(A, C, B)`` arrays, for both
kernel families (channels-first ``B > 1``, channels-last ``B == 1``), serial and
parallel sizes, and the split paths whose partial results are merged.

Error analysis behind the tolerances
------------------------------------
``u`` is the unit roundoff of the output dtype (2**-11, 2**-24, 2**-53 for float16/32/64,
2**-8 for bfloat16), ``us`` that of the statistics dtype (float32 for float16 and bfloat16
data), ``u64 = 2**-53``. The kernels accumulate in float64:

* Summation: however the kernels order a float64 sum of ``M`` terms (blocks, row tiles,
  per-thread partials), each term takes part in at most ``M - 1`` additions, so the
  error is at most ``(M - 1) u64 sum(|terms|)`` (to first order) for any order. The
  float64 reference is within the same bound, so comparisons use
  ``G = 2 (M + 16) u64`` (the 16 covers the few divisions and merges around the sums).
* mean: ``|dm| <= us |m| + e`` with ``e = G max|x|`` (rounding to the stats dtype +
  summation; ``e`` also bounds the error of every block or partial mean).
* var (two-pass per block, Chan merges): the squared deviations are non-negative
  terms, summed with relative error ``2G``; merging blocks whose means are off by up to
  ``e`` moves M2 by at most ``2 e sum_b n_b |d_b| <= 2 e M std`` (Cauchy-Schwarz), plus
  ``M e**2``. So ``|dv| <= us v + 4G v + 2 e std + e**2``: relative error
  ``~ G |m| / std``. ``E[x**2] - E[x]**2`` instead has relative error
  ``~ u64 (m / std)**2``: for float64 data with ``|m| / std = 1e6`` that is ~1e-4, far
  above the stable bound (~1e-6 for the sizes tested), so the tests can tell them apart.
* invstd ``= (v + eps)**-1/2``: relative error ``us`` (rounding) plus half the relative
  error of ``v + eps`` (float64 var, before rounding) plus a few u64.
* y ``= x * alpha + beta`` in float64: errors from the float64 mean and invstd
  (``|w| inv dm + |w| |x - m| dinv``), from the float64 evaluation (``8 u64 (|x alpha| +
  |beta|)``, the terms that cancel when ``|m| >> std``), and the final rounding ``u |y|``
  (``u = 2**-11 + 2**-24`` for float16 and ``2**-8 + 2**-24`` for bfloat16 leave room for
  one extra float32 rounding); rounding into the subnormal range adds up to half the
  smallest subnormal (``TINY``), which matters for float16 (2**-25; bfloat16's is
  2**-134, negligible for the data here). float16 and bfloat16 outputs are computed
  in float32 (``alpha`` and ``beta`` rounded to float32, then one fused multiply-add: at
  most ``3 u32 (|x alpha| + |beta|)`` before the final rounding; ``ARITH`` is the unit of
  that arithmetic, ``u64`` for the other dtypes, and the ``8 ARITH`` terms cover it).
* backward: ``sum(dy)`` and ``sum(dy (x - m))`` have error ``2G`` times the sum of
  absolute terms; ``dx = g dy + c2 x + c3`` adds ``8 ARITH (|g dy| + |c2 x| + |c3|)``
  (float32 for float16 and bfloat16: three coefficient roundings and two multiply-adds,
  at most ``5 u32`` times that sum) and the errors of the two sums scaled by ``|g| / M`` and
  ``|g| |xhat| / M``.

bfloat16 (``ml_dtypes.bfloat16``, ``BF16`` below) has float32's exponent range and 8
significant bits: unlike float16, no test data leave its range, but its inputs are
coarse (at ``|m| / std = 1e4`` all of a channel's values round to one or two numbers).
Its statistics, weight and bias are float32, so they are checked at float32 precision.
"""

from __future__ import annotations

import threading

import ml_dtypes
import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastbn.backends import cpu
from fastbn.backends.cpu import batchnorm as cbn

U64 = 2.0**-53
BF16 = ml_dtypes.bfloat16  # the scalar type, as x.dtype.type gives it
UNIT = {np.float16: 2.0**-11 + 2.0**-24, np.float32: 2.0**-24, np.float64: 2.0**-53,
        BF16: 2.0**-8 + 2.0**-24}
STATS_UNIT = {np.float16: 2.0**-24, np.float32: 2.0**-24, np.float64: 2.0**-53, BF16: 2.0**-24}
DTYPES = [np.float16, np.float32, np.float64, BF16]
# unit roundoff of the arithmetic of the elementwise passes (float16, bfloat16 data: float32)
ARITH = {np.float16: 2.0**-24, np.float32: 2.0**-53, np.float64: 2.0**-53, BF16: 2.0**-24}
# np.finfo does not know bfloat16; ml_dtypes.finfo knows all four
TINY = {t: float(ml_dtypes.finfo(t).smallest_subnormal) / 2 for t in DTYPES}


# ----------------------------------------------------------------------------------
# float64 NumPy oracle and tolerances
# ----------------------------------------------------------------------------------


def _bc(v):
    return np.asarray(v, np.float64)[None, :, None]


def ref_stats(x):
    x = x.astype(np.float64)
    m = x.mean(axis=(0, 2))
    v = ((x - _bc(m)) ** 2).mean(axis=(0, 2))
    return m, v


def ref_invstd(v, eps):
    ve = np.asarray(v, np.float64) + eps
    with np.errstate(divide="ignore"):
        return np.where(ve == 0, 0.0, 1.0 / np.sqrt(ve))


def growth(M):
    """G: summation error bound of kernel + reference, relative to sum(|terms|)."""
    return 2.0 * (M + 16) * U64


def check_forward_train(x, w, b, eps, out):
    y, mean, var, inv = out
    dt = x.dtype.type
    sdt = cpu.stats_dtype(x.dtype)
    assert y.shape == x.shape and y.dtype == x.dtype
    for s in (mean, var, inv):
        assert s.shape == (x.shape[1],) and s.dtype == sdt
    u, us = UNIT[dt], STATS_UNIT[dt]
    M = x.shape[0] * x.shape[2]
    G = growth(M)
    x64 = x.astype(np.float64)
    m, v = ref_stats(x)
    e = G * np.abs(x64).max(axis=(0, 2))
    dm = e
    dv = 4 * G * v + 2 * e * np.sqrt(v) + e**2
    np.testing.assert_array_less(np.abs(mean - m), us * np.abs(m) + dm + 1e-300)
    np.testing.assert_array_less(np.abs(var - v), us * v + dv + 1e-300)
    iv = ref_invstd(v, eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        dinv = np.where(iv == 0, 0.0, (0.5 * dv / (v + eps) + 4 * U64) * iv)
    np.testing.assert_array_less(np.abs(inv - iv), us * iv + dinv + 1e-300)
    w64, b64 = w.astype(np.float64), b.astype(np.float64)
    alpha = w64 * iv
    beta = b64 - m * alpha
    yr = x64 * _bc(alpha) + _bc(beta)
    e64 = np.abs(_bc(w64)) * (
        _bc(iv * dm) + np.abs(x64 - _bc(m)) * _bc(dinv)
    ) + 8 * ARITH[dt] * (np.abs(x64 * _bc(alpha)) + np.abs(_bc(beta)))
    tol = u * (np.abs(yr) + e64) + e64 + TINY[dt]
    err = np.abs(y.astype(np.float64) - yr)
    assert np.all(err <= tol + 1e-300), f"max err/tol {np.max(err / (tol + 1e-300))}"


def check_forward_eval(x, mean, var, w, b, eps, y):
    dt = x.dtype.type
    assert y.shape == x.shape and y.dtype == x.dtype
    x64 = x.astype(np.float64)
    iv = ref_invstd(var, eps)
    alpha = w.astype(np.float64) * iv
    beta = b.astype(np.float64) - mean.astype(np.float64) * alpha
    yr = x64 * _bc(alpha) + _bc(beta)
    e64 = 8 * ARITH[dt] * (np.abs(x64 * _bc(alpha)) + np.abs(_bc(beta)) + np.abs(_bc(b)))
    tol = UNIT[dt] * (np.abs(yr) + e64) + e64 + TINY[dt]
    err = np.abs(y.astype(np.float64) - yr)
    assert np.all(err <= tol + 1e-300), f"max err/tol {np.max(err / (tol + 1e-300))}"


def check_backward(dy, x, mean, inv, w, out):
    dx, dw, db = out
    dt = x.dtype.type
    sdt = cpu.stats_dtype(x.dtype)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert dw.dtype == sdt and db.dtype == sdt
    u, us = UNIT[dt], STATS_UNIT[dt]
    M = x.shape[0] * x.shape[2]
    G = growth(M)
    g64 = dy.astype(np.float64)
    x64 = x.astype(np.float64)
    m = mean.astype(np.float64)
    iv = inv.astype(np.float64)
    w64 = w.astype(np.float64)
    xc = x64 - _bc(m)
    sdy = g64.sum(axis=(0, 2))
    sdyx = (g64 * xc).sum(axis=(0, 2))
    e_sdy = G * np.abs(g64).sum(axis=(0, 2))
    e_sdyx = G * np.abs(g64 * xc).sum(axis=(0, 2))
    dwr = iv * sdyx
    e_dw = iv * e_sdyx + 4 * U64 * np.abs(dwr)
    np.testing.assert_array_less(np.abs(db - sdy), us * np.abs(sdy) + e_sdy + 1e-300)
    np.testing.assert_array_less(np.abs(dw - dwr), us * np.abs(dwr) + e_dw + 1e-300)
    gg = w64 * iv
    xhat = xc * _bc(iv)
    dxr = _bc(gg / M) * (M * g64 - _bc(sdy) - xhat * _bc(dwr))
    c2 = -gg * iv * dwr / M
    c3 = gg * (iv * dwr * m - sdy) / M
    e64 = np.abs(_bc(gg / M)) * (_bc(e_sdy) + np.abs(xhat) * _bc(e_dw)) + 8 * ARITH[dt] * (
        np.abs(_bc(gg) * g64) + np.abs(_bc(c2) * x64) + np.abs(_bc(c3))
    )
    tol = u * (np.abs(dxr) + e64) + e64 + TINY[dt]
    err = np.abs(dx.astype(np.float64) - dxr)
    assert np.all(err <= tol + 1e-300), f"max err/tol {np.max(err / (tol + 1e-300))}"


def check_backward_eval(dy, x, mean, var, w, eps, out):
    """backward_eval: dx is the eval forward's elementwise pass applied to dy (mean 0, bias
    0), checked as such; dweight = invstd * sum(dy * (x - mean)) with invstd rounded once to
    the statistics dtype, dbias = sum(dy)."""
    dx, dw, db = out
    sdt = cpu.stats_dtype(x.dtype)
    assert dw.dtype == sdt and db.dtype == sdt
    zero = np.zeros_like(w)
    check_forward_eval(dy, zero, var, w, zero, eps, dx)
    us = STATS_UNIT[x.dtype.type]
    G = growth(x.shape[0] * x.shape[2])
    g64 = dy.astype(np.float64)
    xc = x.astype(np.float64) - _bc(mean.astype(np.float64))
    iv = ref_invstd(var, eps)
    sdy = g64.sum(axis=(0, 2))
    dwr = iv * (g64 * xc).sum(axis=(0, 2))
    e_dw = iv * G * np.abs(g64 * xc).sum(axis=(0, 2)) + (2 * us + 4 * U64) * np.abs(dwr)
    np.testing.assert_array_less(np.abs(db - sdy), us * np.abs(sdy) + G * np.abs(g64).sum(axis=(0, 2)) + 1e-300)
    np.testing.assert_array_less(np.abs(dw - dwr), e_dw + 1e-300)


def make(shape, dtype, seed=0, offset=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = (rng.standard_normal(shape) * scale + offset * scale).astype(dtype)
    sdt = cpu.stats_dtype(dtype)
    w = rng.uniform(0.5, 2.0, C).astype(sdt)
    b = rng.standard_normal(C).astype(sdt)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, w, b, dy


def run_all(shape, dtype, seed=0, offset=0.0, scale=1.0, eps=1e-5):
    """Forward-train, forward-eval with its statistics, and backward, all checked."""
    x, w, b, dy = make(shape, dtype, seed, offset, scale)
    x0, dy0 = x.copy(), dy.copy()
    out = cpu.forward_train(x, w, b, eps)
    check_forward_train(x, w, b, eps, out)
    _, mean, var, inv = out
    check_forward_eval(
        x, mean, var, w, b, eps, cpu.forward_eval(x, mean, var, w, b, eps)
    )
    check_backward(dy, x, mean, inv, w, cpu.backward(dy, x, mean, inv, w))
    # eval-mode backward, with statistics other than the batch's
    rm, rv = mean + np.asarray(0.25, mean.dtype), var * np.asarray(1.5, var.dtype)
    check_backward_eval(dy, x, rm, rv, w, eps, cpu.backward_eval(dy, x, rm, rv, w, eps))
    # inputs are never modified
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(dy, dy0)


# ----------------------------------------------------------------------------------
# Contract
# ----------------------------------------------------------------------------------


def test_contract_attributes():
    assert cpu.name == "cpu"
    assert cpu.xp is np
    assert cpu.available() == (True, "")
    assert set(cpu.dtypes) == {
        np.dtype(np.float16),
        np.dtype(np.float32),
        np.dtype(np.float64),
    }
    assert cpu.stats_dtype(np.float16) == np.float32
    assert cpu.stats_dtype(np.dtype(np.float32)) == np.float32
    assert cpu.stats_dtype(np.float64) == np.float64
    # bfloat16 is accepted though not listed (see the contract in fastbn.backends)
    assert cpu.stats_dtype(BF16) == np.float32
    assert cpu.stats_dtype(np.dtype(BF16)) == np.float32


# Shapes chosen around the kernels' thresholds and paths (2 threads): serial/parallel
# size (SERIAL_MAX = 65536 values, BACKWARD_SERIAL_MAX = 32768 for the backward); channels-first runs of >= 512 values (per-run
# kernels; a statistics block of 4096 values splits longer runs) or shorter (row
# tiles); rows of C*B < 256 values regrouped k at a time (with A % k tail rows, or
# A < k: tail only); fused channel groups; row ranges with partials merged.
SHAPES_CF = [
    (1, 1, 2),  # wide rows, k = 32, tail only
    (3, 5, 7),  # k = 16, tail only
    (1, 3, 511),  # row tiles, one row
    (2, 2, 512),  # per-run
    (1, 2, 4097),  # per-run, run split into blocks
    (3, 4, 5000),
    (50, 3, 83),  # row tiles of odd width 249
    (64, 4, 257),  # parallel: fused channel groups
    (1, 2, 40000),  # parallel per-run, whole channels
    (7, 300, 33),  # parallel: fused channel groups of 31 channels
    (300, 40, 7),  # parallel: row ranges (groups of rows >= 256 values: too few for 2T)
    (2003, 3, 11),  # parallel: row ranges of wide rows (k = 16) plus 3 tail rows
    (1000, 2, 40),  # parallel: row ranges, elementwise run by run
    (3001, 1, 40),  # parallel: runs of 40 but wide rows (k = 2) with a tail row
]
SHAPES_CL = [
    (1, 7, 1),
    (2, 1, 1),
    (5, 3, 1),
    (63, 1, 1),
    (64, 1, 1),
    (65, 1, 1),
    (100, 4, 1),
    (70, 255, 1),  # odd width
    (70, 64, 1),
    (70, 65, 1),
    (64, 128, 1),
    (70, 63, 1),  # k = 16, 6 tail rows
    (70, 256, 1),
    (3, 1100, 1),
    (1100, 60, 1),  # parallel, row ranges, k = 4
    (20003, 5, 1),  # parallel, k = 16, 3 tail rows
    (2, 40000, 1),  # parallel, fused column groups; eval splits columns
    (600, 256, 1),  # parallel, row ranges, k = 1, one row at a time (1-2 KiB rows)
    (300, 255, 1),  # parallel, row ranges of odd width
    (300, 2100, 1),  # parallel, row ranges of whole rows (8 KiB float32: four at a time)
    (9, 17000, 1),  # parallel; forward-eval splits the columns (rows of >= 16384 values)
    (2000, 64, 1),  # parallel, row ranges of 256-byte float32 rows: four rows at a time
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", SHAPES_CF + SHAPES_CL, ids=str)
def test_matches_float64_numpy(shape, dtype):
    run_all(shape, dtype, seed=sum(shape))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
def test_update_running_stats(dtype):
    """torch's update: r = (1 - momentum) r + momentum * stat, unbiased variance."""
    rng = np.random.default_rng(7)
    C, n, momentum = 9, 37, 0.3
    rm, rv = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    mean, var = (
        rng.standard_normal(C).astype(dtype),
        rng.uniform(0.5, 2, C).astype(dtype),
    )
    em = (1 - momentum) * rm.astype(np.float64) + momentum * mean.astype(np.float64)
    ev = (1 - momentum) * rv.astype(np.float64) + momentum * var.astype(
        np.float64
    ) * n / (n - 1)
    cpu.update_running_stats(rm, rv, mean, var, momentum, n)
    # float64 arithmetic (a few u64) then one rounding to the dtype
    u = STATS_UNIT[dtype]
    assert np.all(np.abs(rm - em) <= u * np.abs(em) + 8 * U64 * (np.abs(em) + 1))
    assert np.all(np.abs(rv - ev) <= u * np.abs(ev) + 8 * U64 * (np.abs(ev) + 1))


# ----------------------------------------------------------------------------------
# Numerics
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "offset"),
    # bfloat16 at |m| / std = 30 (not 1e4: its 8 bits would round all of a channel's values
    # to one or two numbers, a variance of 0): its statistics must still have float32's
    # precision, which they would not if any step rounded to bfloat16 (~2**-8).
    [(np.float32, 1e4), (np.float64, 1e6), (BF16, 30.0)],
    ids=["float32-1e4", "float64-1e6", "bfloat16-30"],
)
# M = A * B <= 8000 keeps the stable bound (which grows with M) well below the naive error.
@pytest.mark.parametrize(
    "shape", [(8, 3, 1000), (4000, 3, 1), (20, 5, 300), (8000, 9, 1)], ids=str
)
def test_large_mean_offset(shape, dtype, offset):
    """|mean| / std = 1e4 (float32), 1e6 (float64) or 30 (bfloat16): the variance stays
    accurate."""
    run_all(shape, dtype, seed=1, offset=offset, scale=3.0)
    x, w, b, _ = make(shape, dtype, seed=1, offset=offset, scale=3.0)
    _, _, var, _ = cpu.forward_train(x, w, b, 1e-5)
    _, v = ref_stats(x)
    rel = np.abs(var - v) / v
    G = growth(shape[0] * shape[2])
    ratio = np.abs(x.astype(np.float64)).max(axis=(0, 2)) / np.sqrt(v)
    limit = STATS_UNIT[dtype] + 4 * G + 2 * G * ratio + (G * ratio) ** 2
    assert np.all(rel <= limit), (rel, limit)
    if dtype != np.float64:
        assert np.all(limit < 4 * 2.0**-24)  # float32 precision (float32 statistics)
    else:  # the bound is far below the error of E[x^2] - E[x]^2 (~u64 (m/std)^2)
        assert np.all(limit < U64 * offset**2 / 10)


SPLIT_SHAPES = [
    (1, 1, 100000),  # one channel: ranges of a channel, merged with Chan's formula
    (2, 3, 40000),  # fewer channels than threads * 2
    (5, 8, 3000),
    (64, 4, 257),  # channel groups (of 3 or 1) or row ranges, by thread count
    (10, 50, 200),
    (50003, 3, 1),  # channels-last, row ranges, k = 32 with 19 tail rows
    (3000, 100, 1),
    (4, 20000, 1),  # channels-last, wide: column groups
]


# One shape per path of the statistics (see the package docstring of fastbn.backends.cpu):
# serial runs, serial rows of channels, serial wide rows with a tail; parallel runs of
# whole channels, runs split into ranges, channel groups, row ranges of wide rows with a
# tail, and rows of channels (at 2 threads; SPLIT_SHAPES cover other counts).
PATH_SHAPES = [
    (3, 3, 40),  # serial, runs of >= _SHORT values
    (9, 3, 1),  # serial, rows of channels
    (7, 3, 5),  # serial, wide rows and a tail
    (2, 8, 6000),  # parallel, whole channels per thread
    (40, 3, 1000),  # parallel, channel ranges merged with Chan's formula
    (64, 8, 257),  # parallel, channel groups
    (50003, 3, 1),  # parallel, row ranges of wide rows, 19 tail rows
    (3000, 100, 1),  # parallel, row ranges of rows of channels
    (64, 4096, 1),  # parallel, channel groups of channels-last columns
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("value", [2.5, 0.1, -12345.6789], ids=["2.5", "0.1", "-12345.6789"])
@pytest.mark.parametrize("shape", PATH_SHAPES, ids=str)
def test_constant_channel_eps_zero(shape, value, dtype):
    """A constant feature has mean = its value and variance 0 exactly, so with eps = 0
    invstd = 0 (torch's convention) and y = bias, dx = 0, dweight = 0 exactly: checked
    against these exact values, not a reference. 0.1 is the hard case: no float64 sum of
    n copies of it equals n * 0.1, and a plain mean leaves a variance of ~1e-33 (invstd
    ~1e16, y = +-1 noise). The other channels stay normal."""
    x, w, b, dy = make(shape, dtype)
    v = dtype(value)
    x[:, 1, :] = v
    y, mean, var, inv = cpu.forward_train(x, w, b, 0.0)
    assert mean[1] == np.float64(v) and var[1] == 0.0 and inv[1] == 0.0
    np.testing.assert_array_equal(y[:, 1, :], np.full_like(y[:, 1, :], b[1]))
    assert np.all(np.isfinite(y))
    ye = cpu.forward_eval(x, mean, var, w, b, 0.0)
    np.testing.assert_array_equal(ye[:, 1, :], np.full_like(ye[:, 1, :], b[1]))
    dx, dw, db = cpu.backward(dy, x, mean, inv, w)
    assert np.all(dx[:, 1, :] == 0) and dw[1] == 0
    np.testing.assert_allclose(
        db[1],
        dy[:, 1, :].astype(np.float64).sum(),
        # bfloat16: dbias is float32, a float64 sum of the exact dy values rounded once (as
        # for float32 data): 2**-24 + G sum|dy| / |sum dy| < 1e-6 for these sizes
        rtol=1e-3 if dtype == np.float16 else 1e-6,
    )
    # with eps > 0 the variance is still exactly 0: invstd = 1/sqrt(eps)
    _, mean2, var2, inv2 = cpu.forward_train(x, w, b, 1e-5)
    assert mean2[1] == np.float64(v) and var2[1] == 0.0
    assert inv2[1] == inv2.dtype.type(1.0 / np.sqrt(1e-5))
    # the other channels are normal
    keep = [0, 2]
    check_forward_train(
        x[:, keep, :].copy(),
        w[keep],
        b[keep],
        0.0,
        (y[:, keep, :], mean[keep], var[keep], inv[keep]),
    )


@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=str)
def test_constant_channel_every_split(shape, threads):
    """Every merge of partial statistics keeps a constant channel exact."""
    x, w, b, _ = make(shape, np.float64)
    x[:, 0, :] = 0.1
    _, mean, var, inv = cbn._ft_parallel(x, w, b, 0.0, threads, np.empty_like(x))
    assert mean[0] == 0.1 and var[0] == 0.0 and inv[0] == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64, BF16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", PATH_SHAPES, ids=str)
def test_infinities(shape, dtype):
    """Infinities give what a sum over all the values gives, on every path (NumPy's and
    torch's answer): +inf values make the mean +inf, +inf and -inf make it NaN; the
    variance of a channel with an infinity is NaN (inf - inf), and so are its invstd and
    outputs. Other channels are unaffected. (The serial path always did this; merges of
    partial means used to compute inf - inf = NaN for the mean too.)"""
    x, w, b, _ = make(shape, dtype)
    x[0, 0, 0] = np.inf  # first value: also the shift of the first block
    x[-1, 0, -1] = np.inf  # last value: another block, range or thread
    x[x.shape[0] // 2, 1, 0] = np.inf
    x[-1, 1, -1] = -np.inf
    _, mean, var, inv = cpu.forward_train(x, w, b, 1e-5)
    with np.errstate(invalid="ignore"):
        expect_mean = x.astype(np.float64).mean(axis=(0, 2))
    assert mean[0] == np.inf and np.isnan(mean[1]) and expect_mean[0] == np.inf
    assert np.isnan(var[0]) and np.isnan(var[1]) and np.isnan(inv[0])
    keep = [2]
    y, mean, var, inv = cpu.forward_train(x, w, b, 1e-5)
    assert np.all(np.isnan(y[:, :2, :]))
    check_forward_train(x[:, keep, :].copy(), w[keep], b[keep], 1e-5,
                        (y[:, keep, :], mean[keep], var[keep], inv[keep]))


@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=str)
def test_infinity_every_split(shape, threads):
    x, w, b, _ = make(shape, np.float32)
    x[-1, 0, -1] = np.inf  # in the last range: merged into finite partial means
    _, mean, var, _ = cbn._ft_parallel(x, w, b, 1e-5, threads, np.empty_like(x))
    assert mean[0] == np.inf and np.isnan(var[0])


def test_merges_of_huge_means_do_not_overflow():
    """Finite partial means of opposite sign whose difference overflows merge to the right
    mean (within the summation bound e = G max|x| of check_forward_train), not NaN."""
    x = np.empty((4, 1, 40000))
    x[:2] = 1.5e308
    x[2:] = -1.5e308
    w, b = np.ones(1), np.zeros(1)
    _, mean, var, _ = cbn._ft_parallel(x, w, b, 1e-5, 2, np.empty_like(x))
    assert abs(mean[0]) <= growth(x.size) * 1.5e308
    assert var[0] == np.inf  # the true variance, 2.25e616, overflows


# bfloat16: NaN outputs go through f2b, which must quiet them (not round them to inf)
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=lambda d: d.__name__)
@pytest.mark.parametrize(
    "shape",
    [(4, 3, 5), (9, 3, 1), (40, 3, 1000), (30000, 3, 1), (1, 3, 100000)],
    ids=str,
)
def test_nan_propagates(shape, dtype):
    x, w, b, dy = make(shape, dtype)
    x[shape[0] // 2, 1, shape[2] // 2] = np.nan
    y, mean, var, inv = cpu.forward_train(x, w, b, 1e-5)
    assert np.isnan(mean[1]) and np.isnan(var[1]) and np.isnan(inv[1])
    assert np.all(np.isnan(y[:, 1, :]))
    keep = [0, 2]
    check_forward_train(
        x[:, keep, :].copy(),
        w[keep],
        b[keep],
        1e-5,
        (y[:, keep, :], mean[keep], var[keep], inv[keep]),
    )
    dx, dw, _ = cpu.backward(dy, x, mean, inv, w)
    assert np.all(np.isnan(dx[:, 1, :])) and np.isnan(dw[1])
    assert np.all(np.isfinite(dx[:, keep, :]))


# ----------------------------------------------------------------------------------
# Parallel paths
# ----------------------------------------------------------------------------------



def _kernel_view(a):
    """What the kernels see: bfloat16 data as int16 bits (see fastbn.backends.cpu._half)."""
    return a.view(np.int16) if a.dtype == BF16 else a


def _data_view(a, dtype):
    return a.view(dtype) if dtype == BF16 else a


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=str)
def test_parallel_split_and_merge(shape, threads, dtype):
    """The parallel kernels' work split depends only on the thread count they are
    given; pretending to have more threads than the machine exercises every merge.
    bfloat16 data are passed as the int16 views that forward_train etc. pass."""
    x, w, b, dy = make(shape, dtype, seed=3, offset=50.0)
    xk, dyk = _kernel_view(x), _kernel_view(dy)
    y, mean, var, inv = cbn._ft_parallel(xk, w, b, 1e-5, threads, np.empty_like(xk))
    check_forward_train(x, w, b, 1e-5, (_data_view(y, dtype), mean, var, inv))
    y = cbn._fe_parallel(xk, mean, var, w, b, 1e-5, threads, np.empty_like(xk))
    check_forward_eval(x, mean, var, w, b, 1e-5, _data_view(y, dtype))
    dx, dw, db = cbn._bw_parallel(dyk, xk, mean, inv, w, threads, np.empty_like(xk), False)
    check_backward(dy, x, mean, inv, w, (_data_view(dx, dtype), dw, db))
    # the reductions alone (backward_eval's pass): the same sums, dx left alone
    _, dw2, db2 = cbn._bw_parallel(dyk, xk, mean, inv, w, threads, np.empty((0, 0, 0), xk.dtype), True)
    np.testing.assert_array_equal(dw2, dw)
    np.testing.assert_array_equal(db2, db)


@pytest.mark.parametrize("dtype, bits", [(np.float16, np.uint16), (BF16, np.int16)],
                         ids=["float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(3, 5, 7), (100, 4, 1), (64, 4, 257), (1100, 60, 1)], ids=str)
def test_half_without_native_conversions(shape, dtype, bits, monkeypatch):
    """Where the 16-bit conversions are unusable, float16 and bfloat16 run through the
    float32 kernels with astype around them: float64 arithmetic rounded to float32, then
    to the 16-bit type; two roundings, still within UNIT (each RNE step is at most
    u_t |z| / (1 + u_t))."""
    seen = []

    def spy(kernel):
        def call(*args):
            seen.append(args[0].dtype)
            return kernel(*args)
        return call

    for name in ("_ft_serial", "_ft_parallel", "_fe_serial", "_fe_parallel", "_bw_serial", "_bw_parallel"):
        monkeypatch.setattr(cbn, name, spy(getattr(cbn, name)))
    ch = np.dtype(dtype).char
    monkeypatch.setitem(cpu._plan._half_native, ch, False)
    run_all(shape, dtype, seed=5)
    # the float32 kernels ran: train, eval, backward, eval backward (reductions, dx)
    assert seen == [np.dtype(np.float32)] * 5
    monkeypatch.delitem(cpu._plan._half_native, ch, raising=False)
    seen.clear()
    run_all(shape, dtype, seed=5)  # as the machine allows
    native = cpu._plan._half_native[ch]
    assert seen == [np.dtype(bits if native else np.float32)] * 5


def test_respects_numba_num_threads():
    shape = (300, 4, 257)
    x, w, b, _ = make(shape, np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        check_forward_train(x, w, b, 1e-5, cpu.forward_train(x, w, b, 1e-5))
    finally:
        numba.set_num_threads(before)


def test_concurrent_python_threads():
    """Four Python threads calling the parallel kernels at once get correct results
    (the threading layer must tolerate concurrent calls)."""
    shapes = [(16, 8, 2000), (40000, 6, 1), (16, 8, 2000), (40000, 6, 1)]
    inputs = [make(s, np.float32, seed=i) for i, s in enumerate(shapes)]
    expected = [cpu.forward_train(x, w, b, 1e-5) for x, w, b, _ in inputs]
    results = [None] * len(shapes)
    errors = []
    barrier = threading.Barrier(len(shapes))

    def work(i):
        try:
            x, w, b, _ = inputs[i]
            barrier.wait()
            for _ in range(5):
                results[i] = cpu.forward_train(x, w, b, 1e-5)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(shapes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (x, w, b, _), got, exp in zip(inputs, results, expected):
        check_forward_train(x, w, b, 1e-5, got)
        for g, e in zip(got, exp):  # same work split: bitwise the same result
            np.testing.assert_array_equal(g, e)


# ----------------------------------------------------------------------------------
# Property test
# ----------------------------------------------------------------------------------


@st.composite
def cases(draw):
    A = draw(st.integers(1, 300))
    C = draw(st.integers(1, 70))
    B = draw(st.one_of(st.just(1), st.integers(1, 300)))
    if A * B == 0 or A * C * B > 150_000:
        B = 1
        A = max(1, min(A, 150_000 // C))
    dtype = draw(st.sampled_from(DTYPES))
    offset = draw(st.sampled_from([0.0, 1.0, -30.0, 1e4]))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    if dtype == np.float16:
        scale, offset = (
            min(scale, 1.0),
            min(offset, 30.0),
        )  # stay inside float16's range
    # bfloat16 has float32's range: no clamp. Its 8 bits make channels with |m| / std up
    # to 1e4 nearly or exactly constant, which the bounds (relative to the reference's
    # variance of the rounded data) must and do handle.
    seed = draw(st.integers(0, 2**32 - 1))
    eps = draw(st.sampled_from([0.0, 1e-5, 0.1]))
    return (A, C, B), dtype, seed, offset, scale, eps


@settings(deadline=None, max_examples=40)
@given(cases())
def test_property_against_float64_numpy(case):
    shape, dtype, seed, offset, scale, eps = case
    run_all(shape, dtype, seed=seed, offset=offset, scale=scale, eps=eps)


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 2, 600), (100, 4, 1), (16, 64, 64)], ids=str)
def test_backward_eval_ignores_infinite_x(shape):
    """dx = dy * weight * invstd does not depend on x: an infinite x leaves it finite (a dx
    pass of the form g * dy + c2 * x + c3 with c2 = 0 would give 0 * inf = NaN); dweight of
    that channel is infinite."""
    x, w, _, dy = make(shape, np.float32, seed=2)
    x[0, 1, 0] = np.inf
    mean, var = np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32)
    dx, dw, db = cpu.backward_eval(dy, x, mean, var, w, 1e-5)
    assert np.all(np.isfinite(dx))
    np.testing.assert_array_equal(dx, cpu.forward_eval(dy, mean, var, w, mean, 1e-5))
    assert np.isinf(dw[1]) and np.all(np.isfinite(np.delete(dw, 1))) and np.all(np.isfinite(db))
