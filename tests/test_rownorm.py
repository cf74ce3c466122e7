"""Layer norm and RMS norm on NumPy arrays: property tests against the float64 reference,
parity with torch.nn.functional, edge cases, and every bad input.

Error bounds, per row of N values (u_s: unit roundoff of the statistics dtype, float32 for
16-bit data; u_o: of the output dtype; r = |mean| / std of the row; xhat = (x - mean) * rstd;
k = 8 + 2 sqrt(N) u_64 / u_s, as in tests/test_functional.py):

* mean (float64 two-pass sums, rounded once): |m - m_ref| <= (k/2) u_s (|m| + std).
* rstd: relative (k/2) u_s (the variance is accurate to the float64 sums; one rounding).
* y = (x - mean) rstd w + b, computed in float64 (float32 for 16-bit data) with unrounded
  statistics, rounded once: |y - y_ref| <= k u_s |w| (1 + r + |xhat|) + 2 u_s |b|
  + u_o |y_ref| (+ half the smallest subnormal of the output dtype).
  RMS norm: the same with mean 0 (|x| rstd in place of 1 + r + |xhat|).
* backward, given the forward's own statistics (so only its sums and one rounding are
  tested): the row sums of N terms are float64, error <= G sum |terms| with
  G = 2 (N + 16) u_64; dx = rstd (g - mean(g) - xhat mean(g xhat)) then rounds once:
  |dx - dx_ref| <= u_o |dx_ref| + rstd G (|g| + mean|g| + |xhat| mean|g xhat|) + tiny;
  dweight, dbias: column sums over R rows, G_R sum |terms|, then one rounding u_s.

A naive E[x^2] - E[x]^2 in float32 has an error of order u_s r^2 in the variance: at
r = 1e4 that is 6 (600 %), far outside these bounds; the data reach r = 1e4.
"""

import copy
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastbn

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float16), BF16, np.dtype(np.float32), np.dtype(np.float64)]
U64 = 2.0**-53


def _sd(dtype):
    return np.dtype(np.float32) if dtype in (np.dtype(np.float16), BF16) else np.dtype(dtype)


def _u(dtype):
    return float(ml_dtypes.finfo(dtype).eps) / 2


def _tiny(dtype):
    return float(ml_dtypes.finfo(dtype).smallest_subnormal) / 2


def _rows64(a, ns):
    a = np.asarray(a).astype(np.float64)
    return a.reshape(-1, math.prod(ns)) if a.size else a.reshape(0, max(1, math.prod(ns)))


@st.composite
def problems(draw, dtypes=DTYPES):
    lead = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=2)))
    ns = tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=3)))
    dtype = draw(st.sampled_from(dtypes))
    offset_ratio = draw(st.sampled_from([0.0, 1.0, 100.0, 1e4]))
    if dtype == np.float16:
        offset_ratio = min(offset_ratio, 10.0)  # ~3 significant digits: no signal left
    if dtype == BF16:
        offset_ratio = min(offset_ratio, 1.0)
    scale = 10.0 ** draw(st.floats(-2, 2))
    if dtype == np.float16:
        scale = min(scale, 100.0 / (1 + offset_ratio))  # stay below float16's max
    affine = draw(st.booleans())
    layout = draw(st.sampled_from(["C", "F", "sliced"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return lead, ns, dtype, offset_ratio, scale, affine, layout, seed


def _make(lead, ns, dtype, offset_ratio, scale, affine, layout, seed):
    rng = np.random.default_rng(seed)
    shape = lead + ns
    x = (rng.standard_normal(shape) + offset_ratio) * scale
    x = x.astype(dtype)
    if layout == "F":
        x = np.asfortranarray(x)
    elif layout == "sliced":
        big = np.empty(shape[:-1] + (2 * shape[-1],), dtype)
        big[..., ::2] = x
        x = big[..., ::2]
    sd = _sd(np.dtype(dtype))
    w = rng.uniform(0.5, 2.0, ns).astype(sd) if affine else None
    b = rng.standard_normal(ns).astype(sd) if affine else None
    dy = rng.standard_normal(shape).astype(dtype)
    return x, w, b, dy


def _row_stats64(x, ns):
    x2 = _rows64(x, ns)
    m = x2.mean(axis=1)
    std = np.sqrt(((x2 - m[:, None]) ** 2).mean(axis=1))
    return x2, m, std


def check_layer_norm_forward(x, ns, w, b, eps, out):
    y, mean, rstd = out
    dt = x.dtype
    sd = _sd(dt)
    lead = x.shape[:x.ndim - len(ns)]
    assert y.shape == x.shape and y.dtype == dt and y.flags.c_contiguous
    assert mean.shape == lead and rstd.shape == lead and mean.dtype == sd and rstd.dtype == sd
    yr, mr, rr = fastbn.reference.layer_norm_forward(x, ns, w, b, eps)
    n = math.prod(ns)
    us, uo = _u(sd), _u(dt)
    k = 8 + 2 * math.sqrt(n) * U64 / us
    x2, m64, std = _row_stats64(x, ns)
    np.testing.assert_array_less(np.abs(mean.astype(np.float64).ravel() - mr.ravel()),
                                 k / 2 * us * (np.abs(m64) + std) + 1e-300)
    np.testing.assert_array_less(np.abs(rstd.astype(np.float64).ravel() - rr.ravel()),
                                 k / 2 * us * np.abs(rr.ravel()) + 1e-300)
    w64 = np.ones(n) if w is None else w.astype(np.float64).ravel()
    b64 = np.zeros(n) if b is None else b.astype(np.float64).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(std > 0, np.abs(m64) / np.where(std > 0, std, 1), 0)
    xhat = np.abs(x2 - m64[:, None]) * rr.ravel()[:, None]
    y_ref = _rows64(yr, ns)
    tol = (k * us * np.abs(w64) * (1 + r[:, None] + xhat) + 2 * us * np.abs(b64)
           + uo * np.abs(y_ref) + _tiny(dt))
    err = np.abs(_rows64(y, ns) - y_ref)
    assert np.all(err <= tol), f"max err/tol {np.max(err / tol)}"


def check_rms_norm_forward(x, ns, w, eps, out):
    y, rstd = out
    dt = x.dtype
    sd = _sd(dt)
    lead = x.shape[:x.ndim - len(ns)]
    assert y.shape == x.shape and y.dtype == dt and rstd.shape == lead and rstd.dtype == sd
    yr, rr = fastbn.reference.rms_norm_forward(x, ns, w, eps)
    n = math.prod(ns)
    us, uo = _u(sd), _u(dt)
    k = 8 + 2 * math.sqrt(n) * U64 / us
    np.testing.assert_array_less(np.abs(rstd.astype(np.float64).ravel() - rr.ravel()),
                                 k / 2 * us * np.abs(rr.ravel()) + 1e-300)
    w64 = np.ones(n) if w is None else w.astype(np.float64).ravel()
    x2 = _rows64(x, ns)
    y_ref = _rows64(yr, ns)
    tol = k * us * np.abs(w64) * (1 + np.abs(x2) * rr.ravel()[:, None]) + uo * np.abs(y_ref) + _tiny(dt)
    err = np.abs(_rows64(y, ns) - y_ref)
    assert np.all(err <= tol), f"max err/tol {np.max(err / tol)}"


def check_layer_norm_backward(dy, x, mean, rstd, ns, w, out):
    dx, dw, db = out
    dt = x.dtype
    sd = _sd(dt)
    assert dx.shape == x.shape and dx.dtype == dt
    dxr, dwr, dbr = fastbn.reference.layer_norm_backward(dy, x, mean, rstd, ns, w)
    n = math.prod(ns)
    x2, g2 = _rows64(x, ns), _rows64(dy, ns)
    R = x2.shape[0]
    w64 = np.ones(n) if w is None else w.astype(np.float64).ravel()
    rs = rstd.astype(np.float64).reshape(-1, 1)
    xhat = (x2 - mean.astype(np.float64).reshape(-1, 1)) * rs
    g = g2 * w64
    G = 2 * (n + 16) * U64
    tol = (_u(dt) * np.abs(_rows64(dxr, ns)) + rs * G * (np.abs(g) + np.abs(g).mean(1, keepdims=True)
           + np.abs(xhat) * np.abs(g * xhat).mean(1, keepdims=True)) + _tiny(dt))
    err = np.abs(_rows64(dx, ns) - _rows64(dxr, ns))
    assert np.all(err <= tol), f"max err/tol {np.max(err / tol)}"
    if w is None:
        assert dw is None and db is None
        return
    assert dw.shape == ns and db.shape == ns and dw.dtype == sd and db.dtype == sd
    GR = 2 * (R + 16) * U64
    us = _u(sd)
    for got, want, terms in ((dw, dwr, np.abs(g2 * xhat).sum(0)), (db, dbr, np.abs(g2).sum(0))):
        np.testing.assert_array_less(np.abs(got.astype(np.float64).ravel() - want.ravel()),
                                     us * np.abs(want.ravel()) + GR * terms + 1e-300)


def check_rms_norm_backward(dy, x, rstd, ns, w, out):
    dx, dw = out
    dt = x.dtype
    dxr, dwr = fastbn.reference.rms_norm_backward(dy, x, rstd, ns, w)
    n = math.prod(ns)
    x2, g2 = _rows64(x, ns), _rows64(dy, ns)
    R = x2.shape[0]
    w64 = np.ones(n) if w is None else w.astype(np.float64).ravel()
    rs = rstd.astype(np.float64).reshape(-1, 1)
    g = g2 * w64
    G = 2 * (n + 16) * U64
    tol = (_u(dt) * np.abs(_rows64(dxr, ns)) + rs * G * (np.abs(g) + np.abs(x2) * rs * rs
           * np.abs(g * x2).mean(1, keepdims=True)) + _tiny(dt))
    err = np.abs(_rows64(dx, ns) - _rows64(dxr, ns))
    assert np.all(err <= tol), f"max err/tol {np.max(err / tol)}"
    if w is None:
        assert dw is None
        return
    GR = 2 * (R + 16) * U64
    us = _u(_sd(dt))
    np.testing.assert_array_less(np.abs(dw.astype(np.float64).ravel() - dwr.ravel()),
                                 us * np.abs(dwr.ravel()) + GR * np.abs(g2 * x2 * rs).sum(0) + 1e-300)


# --------------------------------------------------------------------------- properties
@given(problems())
def test_layer_norm_matches_reference(problem):
    lead, ns, *_ = problem
    x, w, b, dy = _make(*problem)
    x0 = x.copy()
    out = fastbn.layer_norm_forward(x, ns, w, b, 1e-5)
    check_layer_norm_forward(x, ns, w, b, 1e-5, out)
    np.testing.assert_array_equal(fastbn.layer_norm(x, ns, w, b), out[0])
    grads = fastbn.layer_norm_backward(dy, x, out[1], out[2], ns, w)
    check_layer_norm_backward(dy, x, out[1], out[2], ns, w, grads)
    np.testing.assert_array_equal(x, x0)  # inputs are never written


@given(problems())
def test_rms_norm_matches_reference(problem):
    lead, ns, *_ = problem
    x, w, _, dy = _make(*problem)
    out = fastbn.rms_norm_forward(x, ns, w)  # eps None: finfo(x.dtype).eps
    check_rms_norm_forward(x, ns, w, None, out)
    grads = fastbn.rms_norm_backward(dy, x, out[1], ns, w)
    check_rms_norm_backward(dy, x, out[1], ns, w, grads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, ns", [((3, 70000), (70000,)), ((4096, 64), (64,)),
                                       ((64, 8, 128), (8, 128)), ((600, 256), (256,))], ids=str)
def test_parallel_sizes(shape, ns, dtype):
    """Calls above SERIAL_MAX values run the parallel kernels (ranges of rows, partial
    column sums merged once)."""
    lead = shape[:len(shape) - len(ns)]
    x, w, b, dy = _make(lead, ns, dtype, 1.0, 2.0, True, "C", 3)
    out = fastbn.layer_norm_forward(x, ns, w, b)
    check_layer_norm_forward(x, ns, w, b, 1e-5, out)
    check_layer_norm_backward(dy, x, out[1], out[2], ns, w,
                              fastbn.layer_norm_backward(dy, x, out[1], out[2], ns, w))
    out = fastbn.rms_norm_forward(x, ns, w, 1e-6)
    check_rms_norm_forward(x, ns, w, 1e-6, out)
    check_rms_norm_backward(dy, x, out[1], ns, w, fastbn.rms_norm_backward(dy, x, out[1], ns, w))


@pytest.mark.parametrize("n", [64, 600])
@pytest.mark.parametrize("reps", [1, 40], ids=["serial", "parallel"])
@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.float64)], ids=str)
def test_consecutive_rows_are_independent(n, reps, dtype):
    """Layer norm's forward takes the statistics of row r + 1 in the loop over row r
    (software pipelining: float64 rows, and shorter float32 ones): rows of very different
    kinds in sequence (a constant row, a
    large offset, zeros, an ordinary row, a one-value-different row), serial and parallel,
    each get their own statistics: exact for the constant and zero rows (eps = 0: rstd 0,
    y = bias), within the bounds for the others."""
    rng = np.random.default_rng(n)
    block = np.stack([np.full(n, 0.1), rng.standard_normal(n) + 1e4, np.zeros(n),
                      rng.standard_normal(n), np.r_[np.ones(n - 1), 2.0]])
    x = np.tile(block, (reps, 1)).astype(dtype)
    b = np.full(n, 0.25, dtype)
    y, mean, rstd = fastbn.layer_norm_forward(x, n, None, b, eps=0.0)
    assert (rstd[0::5] == 0).all() and (rstd[2::5] == 0).all()
    assert (mean[0::5] == dtype.type(0.1)).all() and (y[0::5] == dtype.type(0.25)).all()
    assert (y[2::5] == dtype.type(0.25)).all()
    ok = np.ones(len(x), bool)
    ok[0::5] = ok[2::5] = False
    check_layer_norm_forward(x[ok], (n,), None, b, 0.0, (y[ok], mean[ok], rstd[ok]))
    y, rstd = fastbn.rms_norm_forward(x, n, eps=0.0)
    assert (rstd[2::5] == 0).all() and (y[2::5] == 0).all()
    ok = np.ones(len(x), bool)
    ok[2::5] = False
    check_rms_norm_forward(x[ok], (n,), None, 0.0, (y[ok], rstd[ok]))


def test_large_offset_float32_keeps_float32_accuracy():
    """Rows with |mean| / std = 1e4 in float32: the bound above holds (shifted float64
    sums); the naive E[x^2] - E[x]^2 of the same data in float32 is off by far more."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((64, 1024)) + 1e4).astype(np.float32)
    out = fastbn.layer_norm_forward(x, 1024)
    check_layer_norm_forward(x, (1024,), None, None, 1e-5, out)
    m = x.mean(axis=1, dtype=np.float32)
    naive_var = (x * x).mean(axis=1, dtype=np.float32) - m * m
    rr = fastbn.reference.layer_norm_forward(x, 1024)[2]
    naive_rstd = 1 / np.sqrt(np.maximum(naive_var, 0) + 1e-5)
    assert np.max(np.abs(naive_rstd - rr) / rr) > 0.1  # the bound is (k/2) u_s ~ 5e-7


@pytest.mark.parametrize("n", [256, 1024, 4096, 4097, 10000], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("dtype, offset", [(np.dtype(np.float32), 1e4),
                                           (np.dtype(np.float32), 1e6),
                                           (np.dtype(np.float16), 8.0)], ids=str)
def test_one_pass_statistics_at_their_worst_shift(n, dtype, offset):
    """float32, float16 and bfloat16 rows are summed in one pass, shifted by the first value
    of each block of 4096 (longer rows: several blocks, merged with Chan's formula; rows of
    fewer than 512 values are summed in the loop over the previous row). Their cancellation
    grows with ((mean - shift) / std)**2, largest when the shift is an outlier: here every
    block starts with a value sqrt(m - 1) / 2 standard deviations from the mean, the rows
    run serially and in parallel, and the forward still meets the two-pass bound of
    check_layer_norm_forward. The mean is 1e4 std (float16: 8, as the Hypothesis data) or
    1e6 std: there unshifted float64 sums would cancel ~u64 * 1e12 = 1e-4 of the variance,
    outside the bound (5e-7)."""
    rng = np.random.default_rng(n)
    rows = 40 if n <= 4096 else 8
    z = rng.standard_normal((rows, n))
    z[:, ::4096] = math.sqrt(min(n, 4096) - 1) / 2  # every block's first value, the shift
    for x in (((z + offset) * 0.01).astype(dtype)[:2], ((z + offset) * 0.01).astype(dtype)):
        w = rng.uniform(0.5, 2.0, n).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        check_layer_norm_forward(x, (n,), w, b, 1e-5, fastbn.layer_norm_forward(x, n, w, b))


@pytest.mark.parametrize("n", [600, 9000], ids=lambda n: f"n{n}")
def test_one_pass_constant_and_infinite_rows(n):
    """A constant float32 row has variance exactly 0 (eps = 0: rstd 0, y = bias) on both
    one-pass routes; rows with infinities or NaN give the statistics the float64 two-pass
    kernel gives for the same values (an infinite mean, NaN for both signs; NaN rstd)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, n)).astype(np.float32)
    x[0] = 0.1
    x[1, 7] = np.inf
    x[2, 0] = -np.inf
    x[3, 5], x[3, n - 1] = np.inf, -np.inf
    x[4, n // 2] = np.nan
    b = np.full(n, 0.25, np.float32)
    with np.errstate(invalid="ignore"):
        y, mean, rstd = fastbn.layer_norm_forward(x, n, None, b, eps=0.0)
        _, mean64, rstd64 = fastbn.layer_norm_forward(x.astype(np.float64), n, None, b, eps=0.0)
    assert mean[0] == np.float32(0.1) and rstd[0] == 0 and (y[0] == np.float32(0.25)).all()
    np.testing.assert_array_equal(mean[1:5], mean64[1:5].astype(np.float32))
    np.testing.assert_array_equal(rstd[1:5], rstd64[1:5].astype(np.float32))  # NaN == NaN here
    assert np.isinf(mean[1:3]).all() and np.isnan(mean[3:5]).all() and np.isnan(rstd[1:5]).all()
    check_layer_norm_forward(x[5:], (n,), None, b, 0.0, (y[5:], mean[5:], rstd[5:]))


# --------------------------------------------------------------------------- torch parity
torch = pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, ns", [((8, 16), (16,)), ((2, 3, 4, 5), (4, 5)), ((7,), (7,))],
                         ids=str)
def test_matches_torch(shape, ns, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=dtype, generator=g) * 3 + 1
    w = torch.rand(ns, dtype=dtype, generator=g) + 0.5
    b = torch.randn(ns, dtype=dtype, generator=g)
    dy = torch.randn(shape, dtype=dtype, generator=g)
    tol = dict(rtol=0, atol=64 * torch.finfo(dtype).eps * 4)
    for fn, tfn, args in ((fastbn.layer_norm, torch.nn.functional.layer_norm, (w, b)),
                          (fastbn.rms_norm, torch.nn.functional.rms_norm, (w,))):
        xt = x.clone().requires_grad_(True)
        ps = [a.clone().requires_grad_(True) for a in args]
        yt = tfn(xt, ns, *ps)
        yt.backward(dy)
        y = fn(x.numpy(), ns, *(a.numpy() for a in args))
        torch.testing.assert_close(torch.from_numpy(y), yt.detach(), **tol)
        if fn is fastbn.layer_norm:
            _, mean, rstd = fastbn.layer_norm_forward(x.numpy(), ns, w.numpy(), b.numpy())
            dx, dw, db = fastbn.layer_norm_backward(dy.numpy(), x.numpy(), mean, rstd, ns, w.numpy())
            got = (dx, dw, db)
        else:
            _, rstd = fastbn.rms_norm_forward(x.numpy(), ns, w.numpy())
            got = fastbn.rms_norm_backward(dy.numpy(), x.numpy(), rstd, ns, w.numpy())
        for a, t in zip(got, [xt.grad, *(p.grad for p in ps)]):
            torch.testing.assert_close(torch.from_numpy(np.asarray(a)), t, **tol)


def test_torch_tensors_in_torch_tensors_out():
    x = torch.randn(4, 6)
    y = fastbn.layer_norm(x, 6)
    assert isinstance(y, torch.Tensor)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (6,)), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- edge cases
def test_one_element_rows_and_empty_batches():
    x = np.full((3, 1), 5.0, np.float32)
    y, mean, rstd = fastbn.layer_norm_forward(x, 1, bias=np.full(1, 0.25, np.float32))
    np.testing.assert_array_equal(y, np.full((3, 1), 0.25, np.float32))  # variance 0: y = b
    np.testing.assert_array_equal(mean, np.full(3, 5.0, np.float32))
    e = np.empty((0, 4), np.float32)
    y, mean, rstd = fastbn.layer_norm_forward(e, 4)
    assert y.shape == (0, 4) and mean.shape == (0,) and rstd.shape == (0,)
    dx, dw, db = fastbn.layer_norm_backward(e, e, mean, rstd, 4, np.ones(4, np.float32))
    assert dx.shape == (0, 4)
    np.testing.assert_array_equal(dw, np.zeros(4, np.float32))
    y, rstd = fastbn.rms_norm_forward(e, 4)
    assert y.shape == (0, 4) and rstd.shape == (0,)


def test_default_rms_eps_is_the_dtype_epsilon():
    x = np.zeros((2, 3), np.float32)
    x[0, 0] = 1e-4
    _, rstd = fastbn.rms_norm_forward(x, 3)
    want = 1 / np.sqrt(np.float64(1e-4) ** 2 / 3 + np.finfo(np.float32).eps)
    assert rstd[0] == np.float32(want)
    assert rstd[1] == np.float32(1 / np.sqrt(np.finfo(np.float32).eps))


# --------------------------------------------------------------------------- bad input
def _x():
    return np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)


BAD_FORWARD = [
    (dict(normalized_shape=4), ValueError, r"trailing dimensions must be normalized_shape \(4,\)"),
    (dict(normalized_shape=(2, 5)), ValueError, "trailing dimensions"),
    (dict(normalized_shape=()), ValueError, "at least one dimension"),
    (dict(normalized_shape=-5), ValueError, "negative"),
    (dict(normalized_shape=5.0), TypeError, "normalized_shape must be an int"),
    (dict(normalized_shape=(5, "a")), TypeError, "element of type str"),
    (dict(normalized_shape=5, weight=np.ones(4, np.float32)), ValueError, r"weight must have shape \(5,\)"),
    (dict(normalized_shape=5, weight=np.ones(5, np.int32)), TypeError, "weight"),
    (dict(normalized_shape=5, weight=[1.0] * 5), TypeError, "weight"),
    (dict(normalized_shape=5, eps=-1.0), ValueError, "eps"),
    (dict(normalized_shape=5, eps=float("nan")), ValueError, "eps"),
    (dict(normalized_shape=5, eps="1e-5"), TypeError, "eps"),
]


@pytest.mark.parametrize("kwargs, exc, match", BAD_FORWARD)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_bad_forward_arguments(op, kwargs, exc, match):
    x = _x()
    x0 = x.copy()
    kwargs = dict(kwargs)
    if op == "rms_norm":
        kwargs.pop("bias", None)
    with pytest.raises(exc, match=match):
        getattr(fastbn, op)(x, **kwargs)
    np.testing.assert_array_equal(x, x0)


def test_bad_x_and_mixed_libraries():
    with pytest.raises(TypeError, match="x"):
        fastbn.layer_norm(np.ones((2, 3), np.int64), 3)
    with pytest.raises(TypeError, match="x"):
        fastbn.layer_norm([[1.0, 2.0]], 2)
    with pytest.raises(TypeError, match="weight is a torch array but x is a numpy array"):
        fastbn.layer_norm(np.ones((2, 3), np.float32), 3, torch.ones(3))


def test_bad_backward_arguments():
    x = _x()
    y, mean, rstd = fastbn.layer_norm_forward(x, 5)
    dy = np.ones_like(x)
    with pytest.raises(ValueError, match=r"dy must have the shape of x"):
        fastbn.layer_norm_backward(np.ones((4, 4), np.float32), x, mean, rstd, 5)
    with pytest.raises(ValueError, match=r"mean must have shape \(4,\)"):
        fastbn.layer_norm_backward(dy, x, mean[:3], rstd, 5)
    with pytest.raises(TypeError, match="mean must be the array layer_norm_forward returned"):
        fastbn.layer_norm_backward(dy, x, None, rstd, 5)
    with pytest.raises(ValueError, match=r"rstd must have shape \(4,\)"):
        fastbn.rms_norm_backward(dy, x, rstd[:2], 5)


def test_backend_without_row_kernels_is_a_clear_error(monkeypatch):
    from fastbn import _pipeline
    from fastbn.backends import cpu

    class Bare:  # a backend that knows batch norm only
        name = "bare"
        xp = np
        dtypes = cpu.dtypes
        stats_dtype = staticmethod(cpu.stats_dtype)

    monkeypatch.setitem(_pipeline._default_backend, "numpy", Bare)
    with pytest.raises(TypeError, match="backend 'bare' has no layer_norm kernels"):
        fastbn.layer_norm(_x(), 5)


# --------------------------------------------------------------------------- layers
@pytest.mark.parametrize("affine, bias", [(True, True), (True, False), (False, True)])
def test_layer_norm_layer_matches_torch_module(affine, bias):
    g = torch.Generator().manual_seed(3)
    tm = torch.nn.LayerNorm((3, 4), elementwise_affine=affine, bias=bias)
    if affine:
        with torch.no_grad():
            tm.weight.uniform_(0.5, 1.5, generator=g)
            if bias:
                tm.bias.normal_(generator=g)
    fm = fastbn.LayerNorm((3, 4), elementwise_affine=affine, bias=bias)
    fm.load_state_dict(tm.state_dict())
    assert sorted(fm.state_dict()) == sorted(tm.state_dict())
    x = torch.randn(5, 3, 4, generator=g)
    dy = torch.randn(5, 3, 4, generator=g)
    xt = x.clone().requires_grad_(True)
    yt = tm(xt)
    yt.backward(dy)
    y = fm(x.numpy())
    dx = fm.backward(dy.numpy())
    tol = dict(rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(y), yt.detach(), **tol)
    torch.testing.assert_close(torch.from_numpy(dx), xt.grad, **tol)
    if affine:
        torch.testing.assert_close(torch.from_numpy(fm.grad_weight), tm.weight.grad, **tol)
        if bias:
            torch.testing.assert_close(torch.from_numpy(fm.grad_bias), tm.bias.grad, **tol)
        else:
            assert fm.grad_bias is None
    else:
        assert fm.grad_weight is None and fm.state_dict() == {}


def test_rms_norm_layer_matches_torch_module():
    g = torch.Generator().manual_seed(4)
    tm = torch.nn.RMSNorm(6)
    with torch.no_grad():
        tm.weight.uniform_(0.5, 1.5, generator=g)
    fm = fastbn.RMSNorm(6)
    fm.load_state_dict(tm.state_dict())
    x, dy = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    xt = x.clone().requires_grad_(True)
    tm(xt).backward(dy)
    y = fm(x.numpy())
    dx = fm.backward(dy.numpy())
    torch.testing.assert_close(torch.from_numpy(y), tm(x).detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(dx), xt.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(fm.grad_weight), tm.weight.grad, rtol=0, atol=1e-5)


def test_layer_errors_change_nothing():
    ln = fastbn.LayerNorm(4)
    before = ln.state_dict()
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\)"):
        ln.load_state_dict({"weight": np.ones(3), "bias": np.zeros(4)})
    with pytest.raises(KeyError, match="missing keys"):
        ln.load_state_dict({"weight": np.ones(4)})
    with pytest.raises(TypeError, match="mapping"):
        ln.load_state_dict([("weight", np.ones(4))])
    assert all(np.array_equal(before[k], v) for k, v in ln.state_dict().items())
    with pytest.raises(RuntimeError, match="forward pass first"):
        ln.backward(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="trailing dimensions"):
        ln(np.ones((2, 5), np.float32))
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        fastbn.LayerNorm(4, dtype="int32")
    with pytest.raises(ValueError, match="eps"):
        fastbn.RMSNorm(4, eps=-1.0)
    with pytest.raises(ValueError, match="normalized_shape"):
        fastbn.LayerNorm(())


# --------------------------------------------------------------------------- fastbn.torch
ft = pytest.importorskip("fastbn.torch")


def test_torch_modules_match_and_convert_swaps():
    g = torch.Generator().manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 8), torch.nn.RMSNorm(8))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5, generator=g)
        model[1].bias.normal_(generator=g)
        model[4].weight.uniform_(0.5, 1.5, generator=g)
    ref = copy.deepcopy(model)
    params = [model[1].weight, model[4].weight]
    ft.convert(model)
    assert type(model[1]) is ft.LayerNorm and type(model[4]) is ft.RMSNorm
    assert model[1].weight is params[0] and model[4].weight is params[1]  # shared, not copied
    assert model.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(16, 8, generator=g)
    for m in (model, ref):
        m.zero_grad()
        out = m(x)
        out.relu_()  # in place after the layer: outputs are fresh tensors
        out.square().sum().backward()
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-4)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_torch_gradcheck_and_gradgradcheck(op):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=g).requires_grad_(True)
    w = (torch.rand(3, 5, dtype=torch.float64, generator=g) + 0.5).requires_grad_(True)
    b = torch.randn(3, 5, dtype=torch.float64, generator=g).requires_grad_(True)
    if op == "layer_norm":
        fn, args = (lambda x, w, b: ft.layer_norm(x, (3, 5), w, b)), (x, w, b)
    else:
        fn, args = (lambda x, w: ft.rms_norm(x, (3, 5), w, 1e-6)), (x, w)
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)
    # forward-mode AD (the Functions' jvp) and batched gradients (their vmap rule)
    assert torch.autograd.gradcheck(fn, args, check_forward_ad=True, check_backward_ad=False,
                                    check_batched_forward_grad=True)
    assert torch.autograd.gradcheck(fn, args, check_batched_grad=True)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_torch_func_transforms_match_torch(op):
    """torch.func's jvp, vmap (batched input, weight and bias, and an unbatched input with a
    batched weight), jacrev, jacfwd, grad and hessian of fastbn's functions against the
    same transforms of torch's, in float64 (torch's default float64 tolerances: the two
    compute the same formulas, a wrong one is off by O(1))."""
    from torch import func

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=g)
    w = torch.rand(5, dtype=torch.float64, generator=g) + 0.5
    b = torch.randn(5, dtype=torch.float64, generator=g)
    wb = torch.rand(4, 5, dtype=torch.float64, generator=g) + 0.5
    bb = torch.randn(4, 5, dtype=torch.float64, generator=g)
    if op == "layer_norm":
        def ours(x, w, b):
            return ft.layer_norm(x, (5,), w, b)

        def theirs(x, w, b):
            return torch.nn.functional.layer_norm(x, (5,), w, b)
    else:
        def ours(x, w, b):
            return ft.rms_norm(x, (5,), w) + 0 * b.sum()

        def theirs(x, w, b):
            return torch.nn.functional.rms_norm(x, (5,), w) + 0 * b.sum()

    def both(transform):
        torch.testing.assert_close(transform(ours), transform(theirs))

    t = tuple(torch.randn(a.shape, dtype=torch.float64, generator=g) for a in (x, w, b))
    both(lambda f: func.jvp(f, (x, w, b), t)[1])
    both(lambda f: func.vmap(f, in_dims=(1, 0, 0))(x, wb, bb))
    both(lambda f: func.vmap(f, in_dims=(None, 0, None))(x, wb, b))
    both(lambda f: func.vmap(lambda x: f(x, w, b))(x))
    both(lambda f: func.jacrev(lambda x: f(x, w, b))(x[0]))
    both(lambda f: func.jacfwd(lambda x: f(x, w, b))(x[0]))
    both(lambda f: func.grad(lambda w: f(x, w, b).sin().sum())(w))
    both(lambda f: func.hessian(lambda x: f(x, w, b).sin().sum())(x[0, 0]))


def test_torch_bfloat16_forward_and_errors():
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    m = torch.nn.LayerNorm(32)
    want = torch.nn.functional.layer_norm(x.float(), (32,)).to(torch.bfloat16)
    got = ft.LayerNorm(32)(x)
    assert got.dtype == torch.bfloat16
    # both round a float32 result once to bfloat16: at most one bfloat16 ulp apart
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-7)
    del m
    with pytest.raises(NotImplementedError, match="CPU tensors only"):
        ft.layer_norm(torch.empty(2, 3, device="meta"), 3)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        ft.rms_norm(np.ones((2, 3)), 3)
    with pytest.raises(ValueError, match="trailing dimensions"):
        ft.layer_norm(torch.ones(2, 3), 4)


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), BF16], ids=str)
def test_half_without_native_conversions(dtype, monkeypatch):
    """Where the 16-bit conversions are unusable, the row kernels run on a float32 copy and
    round once more to the 16-bit type: still within the bounds (u_o covers the final
    rounding; the float32 intermediate adds 2**-24 relative, inside k u_s)."""
    from fastbn.backends import cpu
    from fastbn.backends.cpu import rownorm as kernels

    seen = []
    for name in ("_ln_fwd_serial", "_ln_bwd_serial", "_rms_fwd_serial", "_rms_bwd_serial"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real: (seen.append(a[0].dtype), _real(*a))[1])
    monkeypatch.setitem(cpu._plan._half_native, dtype.char, False)
    x, w, b, dy = _make((6,), (40,), dtype, 1.0, 1.0, True, "C", 9)
    out = fastbn.layer_norm_forward(x, 40, w, b)
    check_layer_norm_forward(x, (40,), w, b, 1e-5, out)
    check_layer_norm_backward(dy, x, out[1], out[2], (40,), w,
                              fastbn.layer_norm_backward(dy, x, out[1], out[2], 40, w))
    out = fastbn.rms_norm_forward(x, 40, w)
    check_rms_norm_forward(x, (40,), w, None, out)
    check_rms_norm_backward(dy, x, out[1], (40,), w, fastbn.rms_norm_backward(dy, x, out[1], 40, w))
    assert seen == [np.dtype(np.float32)] * 4  # the float32 kernels ran
