"""Property tests of the public API on NumPy arrays, against the float64 reference.

Error bounds (u_s = unit roundoff of the statistics dtype, u_o = that of the output dtype,
r = |mean| / std of the feature, xhat = (x - mean) / std, M = values per feature,
k = 8 + 2 sqrt(M) u_64 / u_s: the float64 accumulation's own error, about sqrt(M) u_64 for
blocked recursive sums (see _k), matters only when the data itself is float64):

* mean: accumulated in float64 and rounded once: |m - m_ref| <= (k/2) u_s (|m| + std).
* invstd: var is accurate to the accumulation before one rounding and a sqrt/division:
  a relative error of (k/2) u_s, plus k u_64 r: merging blocks with Chan's formula takes
  differences of partial means, each off by u_64 |mean|, which is r u_64 relative to std
  (negligible for float32 data, not for float64 data with a large mean).
* y = x * alpha + beta with alpha = w * invstd and beta = b - mean * alpha rounded to the
  statistics dtype: the roundings of alpha and beta are amplified by |x| / std ~ r + |xhat|
  and by |beta| ~ |w| r + |b|, the invstd error by |xhat|, and the result is rounded once:
  |y - y_ref| <= k u_s |w| (1 + r + |xhat|) + 2 u_s |b| + u_o |y_ref| (+ the smallest
  subnormal, for results below the normal range of float16).
* dx = w invstd / M (M dy - dbias - xhat dweight): each of the three terms carries a rounding
  error of u_s times its size, and xhat (if formed in the data precision) carries
  u_s (1 + r + |xhat|):
  |dx - dx_ref| <= k u_s |w| invstd (|dy| + |dbias| / M + (1 + r + |xhat|) |dweight| / M) + u_o |dx_ref|.
* dweight = sum(dy xhat): k u_s sum(|dy| (1 + r + |xhat|)); dbias = sum(dy): k u_s sum(|dy|).

A naive E[x^2] - E[x]^2 kernel in the data precision fails these bounds by orders of
magnitude once r >~ 1 / sqrt(u_s) (about 4e3 in float32): the data below reaches r = 1e4.
"""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastbn
from _helpers import LAYOUTS, NUMPY_BACKENDS, channel_view, make_data, unit_roundoff, with_layout

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.float16, BF16.type, np.float32, np.float64]


def _stats_dtype(dtype):
    return np.float32 if np.dtype(dtype) in (np.float16, BF16) else dtype


@st.composite
def problems(draw, dtypes=DTYPES):
    shape = draw(hnp.array_shapes(min_dims=2, max_dims=5, min_side=1, max_side=6))
    ndim = len(shape)
    axis = draw(st.integers(-ndim, ndim - 1))
    c = shape[axis]
    m = int(np.prod(shape)) // c
    assume(m > 1)
    dtype = draw(st.sampled_from(dtypes))
    scale = 10.0 ** draw(st.floats(-3, 3))
    offset_ratio = draw(st.sampled_from([0.0, 1.0, 100.0, 1e4]))
    # float16 holds ~3 significant digits, bfloat16 ~2: an offset of 1e4 std would leave no
    # signal at all. (bfloat16 has float32's range: no limit on the scale.)
    if dtype == np.float16:
        offset_ratio = min(offset_ratio, 10.0)
        scale = min(scale, 10.0)
    if dtype == BF16.type:
        offset_ratio = min(offset_ratio, 10.0)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = make_data(rng, shape, axis, dtype, scale=scale, offset_ratio=offset_ratio)
    layout = draw(st.sampled_from(LAYOUTS))
    affine = draw(st.booleans())
    sd = _stats_dtype(dtype)
    w = rng.uniform(-2, 2, size=c).astype(sd) if affine else None
    b = rng.uniform(-2, 2, size=c).astype(sd) if affine else None
    eps = draw(st.sampled_from([0.0, 1e-5, 1e-3]))
    return dict(x=with_layout(x, layout), axis=axis, w=w, b=b, eps=eps, rng=rng)


def _ratio(x, axis):
    """Per-feature |mean| / std of the data (float64), and std."""
    xc = channel_view(x, axis)
    mean = xc.mean(axis=1)
    std = xc.std(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(std > 0, np.abs(mean) / std, 0.0)
    return r, std


def _bshape(x, axis):
    s = [1] * x.ndim
    s[axis] = x.shape[axis]
    return tuple(s)


def _k(x, axis, us):
    """The constant of the bounds: 8, plus the error of float64 sums of M terms measured in
    units of u_s, which matters only when the data is float64. The kernels sum blocks of
    contiguous values recursively (vectorized) and merge the blocks, whose error grows like
    sqrt(M) u64 for rounding errors of random sign (Higham, Accuracy and Stability of
    Numerical Algorithms, sect. 4.2); we allow 2 sqrt(M) u64. (The worst case, M u64, is
    never approached by data of random sign.)"""
    m = x.size // x.shape[axis]
    return 8 + 2 * np.sqrt(m) * unit_roundoff(np.float64) / us


def _subnormal(dtype):
    """Rounding to `dtype` is off by at most u |v| for normal v, and by at most half the
    smallest subnormal below the normal range (float16 results reach it: 6e-5)."""
    return float(ml_dtypes.finfo(dtype).smallest_subnormal)


def _xhat_abs(x, axis, mean, invstd):
    bs = _bshape(x, axis)
    return np.abs((x.astype(np.float64) - mean.reshape(bs)) * invstd.reshape(bs))


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
@given(p=problems())
def test_forward_matches_reference(backend, p):
    _check_forward(backend, p["x"], p["axis"], p["w"], p["b"], p["eps"])


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
@given(p=problems())
def test_backward_matches_reference(backend, p):
    _check_backward(backend, p["x"], p["axis"], p["w"], p["eps"], p["rng"])


# Shapes large enough for the parallel kernels (more values than the serial threshold), in
# both layout families and with few and many features, with large offsets.
LARGE = [((8, 16, 32, 32), 1), ((8, 32, 32, 16), -1), ((65536, 4), 1), ((16, 8192), 1),
         ((3, 5, 70000), 1), ((40000, 3), 0)]


@pytest.mark.parametrize("backend", ["cpu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", LARGE)
def test_large_tensors_match_reference(backend, shape, axis, dtype):
    rng = np.random.default_rng(abs(hash((shape, axis))) % 2**32)
    x = make_data(rng, shape, axis, dtype, scale=3.0, offset_ratio=1e3)
    c = shape[axis]
    w = rng.uniform(-2, 2, size=c).astype(dtype)
    b = rng.uniform(-2, 2, size=c).astype(dtype)
    _check_forward(backend, x, axis, w, b, 1e-5)
    _check_backward(backend, x, axis, w, 1e-5, rng)


def _check_forward(backend, x, axis, w, b, eps):
    sd = _stats_dtype(x.dtype)
    us, uo = unit_roundoff(sd), unit_roundoff(x.dtype)
    y, mean, invstd = fastbn.batch_norm_forward(x, w, b, eps=eps, axis=axis, backend=backend)
    y_ref, mean_ref, inv_ref = fastbn.reference.batch_norm_forward(x, w, b, eps=eps, axis=axis)

    assert y.shape == x.shape and y.dtype == x.dtype
    assert mean.dtype == sd and invstd.dtype == sd and mean.shape == invstd.shape == (x.shape[axis],)
    r, std = _ratio(x, axis)
    k = _k(x, axis, us)
    np.testing.assert_array_less(np.abs(mean - mean_ref), k / 2 * us * (np.abs(mean_ref) + std) + 1e-300)
    u64 = unit_roundoff(np.float64)
    np.testing.assert_array_less(np.abs(invstd - inv_ref), (k / 2 * us + k * u64 * r) * inv_ref + 1e-300)

    bs = _bshape(x, axis)
    wabs = np.ones(x.shape[axis]) if w is None else np.abs(w.astype(np.float64))
    babs = np.zeros(x.shape[axis]) if b is None else np.abs(b.astype(np.float64))
    xhat = _xhat_abs(x, axis, mean_ref, inv_ref)
    tol = (k * us * wabs.reshape(bs) * (1 + r.reshape(bs) + xhat)
           + 2 * us * babs.reshape(bs) + uo * np.abs(y_ref) + _subnormal(x.dtype))
    err = np.abs(y.astype(np.float64) - y_ref)
    assert np.all(err <= tol), f"max excess {np.max(err - tol)}"


def _check_backward(backend, x, axis, w, eps, rng):
    sd = _stats_dtype(x.dtype)
    us, uo = unit_roundoff(sd), unit_roundoff(x.dtype)
    _, mean, invstd = fastbn.batch_norm_forward(x, w, eps=eps, axis=axis, backend=backend)
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, backend=backend)
    dx_ref, dw_ref, db_ref = fastbn.reference.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)

    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert dw.dtype == sd and db.dtype == sd
    c = x.shape[axis]
    m = x.size // c
    bs = _bshape(x, axis)
    r, _ = _ratio(x, axis)
    xhat = _xhat_abs(x, axis, mean.astype(np.float64), invstd.astype(np.float64))
    amp = 1 + r.reshape(bs) + xhat
    dya = np.abs(dy.astype(np.float64))
    red = tuple(i for i in range(x.ndim) if i != axis)
    k = _k(x, axis, us)
    assert np.all(np.abs(db - db_ref) <= k * us * dya.sum(axis=red) + 1e-300)
    assert np.all(np.abs(dw - dw_ref) <= k * us * (dya * amp).sum(axis=red) + 1e-300)

    wabs = np.ones(c) if w is None else np.abs(w.astype(np.float64))
    inv = invstd.astype(np.float64)
    scale = (wabs * inv).reshape(bs)
    tol = k * us * scale * (dya + np.abs(db_ref).reshape(bs) / m + amp * np.abs(dw_ref).reshape(bs) / m) \
        + uo * np.abs(dx_ref) + _subnormal(x.dtype)
    err = np.abs(dx.astype(np.float64) - dx_ref)
    assert np.all(err <= tol), f"max excess {np.max(err - tol)}"


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
@given(p=problems(dtypes=[np.float64]))
def test_invariants(backend, p):
    """Before the affine step the output has mean 0 and variance 1 per feature; it does not
    change under a per-feature shift and positive scale of x; dx sums to 0 per feature."""
    x, axis, rng = p["x"], p["axis"], p["rng"]
    r, std = _ratio(x, axis)
    assume(np.all(std > 0))
    u = unit_roundoff(np.float64)
    y, mean, invstd = fastbn.batch_norm_forward(x, eps=0.0, axis=axis, backend=backend)
    yc = channel_view(y, axis)
    # each y carries an error <= k u (1 + r + |xhat|) (see the module docstring): the mean of
    # M such values is off by at most that, and the variance by twice that times max |xhat|.
    k = _k(x, axis, u)
    amp = k * u * (1 + r + np.abs(yc).max(axis=1))
    assert np.all(np.abs(yc.mean(axis=1)) <= amp)
    assert np.all(np.abs(yc.var(axis=1) - 1) <= 2 * amp * (1 + np.abs(yc).max(axis=1)))

    c = x.shape[axis]
    bs = _bshape(x, axis)
    a = rng.uniform(0.1, 10, size=c).reshape(bs)
    s = rng.uniform(-100, 100, size=c).reshape(bs)
    x2 = a * x + s
    r2, _ = _ratio(x2, axis)
    y2, _, _ = fastbn.batch_norm_forward(x2, eps=0.0, axis=axis, backend=backend)
    # Each of y, y2 carries an error <= k u (1 + r + |xhat|), and forming x2 rounds twice
    # (multiply, add), amplified by r2 + |xhat| after centering.
    m = x.size // c
    tol = (k * u * (2 + r.reshape(bs) + r2.reshape(bs) + 2 * np.abs(y))
           + 2 * u * (r2.reshape(bs) + np.abs(y)))
    assert np.all(np.abs(y2 - y) <= tol)

    dy = rng.standard_normal(x.shape)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis, backend=backend)
    dxc = channel_view(dx, axis)
    # sum(dx) is 0 exactly; each dx carries the error bound of the module docstring
    # (w = 1) and the float64 summation of M of them adds m u max|dx|.
    xhat_max = np.abs(channel_view(x, axis) - mean[:, None]).max(axis=1) * invstd
    per_element = k * u * invstd * (np.abs(channel_view(dy, axis)).max(axis=1) + np.abs(db) / m
                                    + (1 + r + xhat_max) * np.abs(dw) / m)
    bound = m * per_element + m * u * np.abs(dxc).max(axis=1)
    assert np.all(np.abs(dxc.sum(axis=1)) <= bound)


def test_backward_central_differences():
    """The reference backward equals central finite differences of sum(y * g) in float64.

    With h = 1e-5 on unit-scale data, truncation error is h^2/6 |L'''| ~ 1e-11 and rounding
    error ~ u |L| / h ~ 1e-10 |L|; 1e-6 (relative to the gradient's scale) leaves a margin of
    10^3-10^4 while any wrong term in the formula (O(1) relative) is caught.
    """
    rng = np.random.default_rng(3)
    for shape, axis in [((5, 3), 1), ((3, 2, 4), 1), ((2, 3, 2, 2), -1)]:
        x = rng.standard_normal(shape) * 2 + 1
        c = shape[axis]
        w = rng.uniform(0.5, 2, size=c)
        b = rng.uniform(-1, 1, size=c)
        g = rng.standard_normal(shape)
        eps = 1e-3

        def loss(xx, ww, bb):
            return float((fastbn.reference.batch_norm_forward(xx, ww, bb, eps=eps, axis=axis)[0] * g).sum())

        _, mean, invstd = fastbn.reference.batch_norm_forward(x, w, b, eps=eps, axis=axis)
        dx, dw, db = fastbn.reference.batch_norm_backward(g, x, mean, invstd, w, axis=axis)
        h = 1e-5
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            e = np.zeros_like(x)
            e[idx] = h
            num[idx] = (loss(x + e, w, b) - loss(x - e, w, b)) / (2 * h)
        num_w = np.array([(loss(x, w + h * np.eye(c)[k], b) - loss(x, w - h * np.eye(c)[k], b)) / (2 * h)
                          for k in range(c)])
        num_b = np.array([(loss(x, w, b + h * np.eye(c)[k]) - loss(x, w, b - h * np.eye(c)[k])) / (2 * h)
                          for k in range(c)])
        scale = 1 + np.abs(num).max()
        np.testing.assert_allclose(dx, num, rtol=0, atol=1e-6 * scale)
        np.testing.assert_allclose(dw, num_w, rtol=0, atol=1e-6 * (1 + np.abs(num_w).max()))
        np.testing.assert_allclose(db, num_b, rtol=0, atol=1e-6 * (1 + np.abs(num_b).max()))
        for backend in NUMPY_BACKENDS:
            dx2, dw2, db2 = fastbn.batch_norm_backward(g, x, mean, invstd, w, axis=axis, backend=backend)
            np.testing.assert_allclose(dx2, num, rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
def test_large_mean_float32_variance(backend):
    """|mean|/std = 1e4 in float32: the variance stays accurate to float32 precision."""
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal((4096, 8))).astype(np.float32)
    _, mean, invstd = fastbn.batch_norm_forward(x, eps=0.0, backend=backend)
    var_ref = x.astype(np.float64).var(axis=0)
    var = 1.0 / invstd.astype(np.float64) ** 2
    u = unit_roundoff(np.float32)
    # invstd is rounded once (u) and squared/inverted here (float64): 3u covers it.
    np.testing.assert_array_less(np.abs(var - var_ref) / var_ref, 3 * u)


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_channel_eps0(backend, dtype):
    """A constant feature with eps = 0 gets invstd 0 and output = bias, not NaN (torch's rule)."""
    x = np.random.default_rng(1).standard_normal((6, 3, 2)).astype(dtype)
    x[:, 1, :] = 3.5
    b = np.array([0.0, 0.25, 0.0], dtype=_stats_dtype(dtype))
    y, mean, invstd = fastbn.batch_norm_forward(x, bias=b, eps=0.0, backend=backend)
    assert invstd[1] == 0 and mean[1] == 3.5
    assert np.all(y[:, 1, :] == np.asarray(0.25, dtype=dtype))
    assert np.all(np.isfinite(y))
    dx, dw, db = fastbn.batch_norm_backward(np.ones_like(x), x, mean, invstd, backend=backend)
    assert np.all(dx[:, 1, :] == 0) and np.all(np.isfinite(dx))


@pytest.mark.parametrize("api", ["cpu", "reference", "fastbn.reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", [((6, 3, 2), 1), ((50000, 3), 1), ((4, 5, 6, 3), -1),
                                         ((4, 3, 100, 100), 1)], ids=str)
def test_constant_feature_is_exact(api, dtype, shape, axis):
    """The rule for a constant feature, in every dtype, on both sides of the serial size,
    in both layout families and in the float64 oracle: its mean is its value and its
    variance exactly 0, so invstd = 0 with eps = 0 (y = bias, dx = 0) and 1/sqrt(eps)
    otherwise. Checked against those exact values (0.1 has no exact float64 sum: a plain
    mean once gave invstd ~1e16 and y = +-1 here, in the kernels and the oracle alike)."""
    mod = fastbn.reference if api == "fastbn.reference" else fastbn
    kw = {} if api == "fastbn.reference" else {"backend": api}
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    c = shape[axis]
    idx = [slice(None)] * len(shape)
    idx[axis] = 1
    x[tuple(idx)] = 0.1
    v = float(np.asarray(0.1, dtype))
    b = np.linspace(-0.5, 0.5, c).astype(_stats_dtype(dtype))
    rm, rv = np.zeros(c, np.float64), np.ones(c, np.float64)
    y, mean, invstd = mod.batch_norm_forward(x, bias=b, eps=0.0, axis=axis, running_mean=rm,
                                             running_var=rv, momentum=1.0, **kw)
    assert mean[1] == v and invstd[1] == 0 and rm[1] == v and rv[1] == 0
    assert np.all(y[tuple(idx)] == np.asarray(b[1], dtype=y.dtype))
    assert np.all(np.isfinite(y))
    dx, dw, _ = mod.batch_norm_backward(np.ones_like(x), x, mean, invstd, axis=axis, **kw)
    assert np.all(dx[tuple(idx)] == 0) and dw[1] == 0
    _, _, invstd = mod.batch_norm_forward(x, eps=1e-5, axis=axis, **kw)
    assert invstd[1] == np.asarray(1 / np.sqrt(1e-5), invstd.dtype)


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
@pytest.mark.parametrize("shape", [(64, 3), (100000, 3)], ids=["serial", "parallel"])
def test_infinities_match_torch(backend, shape):
    """+inf in a feature: mean +inf, variance NaN (inf - inf), outputs NaN, running_mean
    +inf and running_var NaN, as torch computes; +inf and -inf: mean NaN. Other features
    are unaffected. The same on every path (the parallel merges once gave a NaN mean)."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    x[0, 0] = x[-1, 0] = np.inf
    x[1, 1], x[-2, 1] = np.inf, -np.inf
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, running_mean=rm, running_var=rv, backend=backend)
    trm, trv = torch.zeros(3), torch.ones(3)
    ty = torch.nn.functional.batch_norm(torch.from_numpy(x), trm, trv, training=True).numpy()
    assert mean[0] == np.inf and np.isnan(mean[1]) and np.isfinite(mean[2])
    assert np.isnan(invstd[0]) and np.isnan(invstd[1])
    np.testing.assert_array_equal(rm[:2], trm.numpy()[:2])  # inf, NaN: equal as NaN patterns
    np.testing.assert_array_equal(rv[:2], trv.numpy()[:2])
    assert np.all(np.isnan(y[:, :2])) and np.all(np.isnan(ty[:, :2]))
    # the finite feature: the forward bound 8 u (1 + r + |xhat|) against the float64 oracle
    yr = fastbn.reference.batch_norm_forward(x[:, 2:])[0][:, 0]
    r = abs(x[:, 2].mean()) / x[:, 2].std()
    tol = 8 * unit_roundoff(np.float32) * (1 + r + np.abs(yr))
    np.testing.assert_array_less(np.abs(y[:, 2] - yr), tol)


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
def test_nan_propagates(backend):
    x = np.random.default_rng(2).standard_normal((5, 2)).astype(np.float32)
    x[3, 0] = np.nan
    y, mean, invstd = fastbn.batch_norm_forward(x, backend=backend)
    assert np.isnan(mean[0]) and np.all(np.isnan(y[:, 0]))
    assert np.all(np.isfinite(y[:, 1])) and np.isfinite(mean[1])


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_independent_and_preserved(backend, layout):
    """Results do not depend on memory layout; dense outputs keep the input's layout."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 5, 2)).astype(np.float32)
    xl = with_layout(x, layout)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y0, m0, i0 = fastbn.batch_norm_forward(x, backend=backend)
    y1, m1, i1 = fastbn.batch_norm_forward(xl, backend=backend)
    # Both results obey the forward bound 8 u (1 + r + |xhat|) (module docstring); this data
    # has r < 1 and |xhat| < 4, so they differ by at most 2 * 8 u * 8 = 128 u.
    tol = 128 * unit_roundoff(np.float32)
    np.testing.assert_allclose(y1, y0, rtol=0, atol=tol)
    np.testing.assert_allclose(i1, i0, rtol=8 * unit_roundoff(np.float32))
    dx0, _, _ = fastbn.batch_norm_backward(dy, x, m0, i0, backend=backend)
    dx1, _, _ = fastbn.batch_norm_backward(with_layout(dy, "F"), xl, m0, i0, backend=backend)
    np.testing.assert_allclose(dx1, dx0, rtol=0, atol=tol * np.abs(dx0).max())
    if layout in ("F", "permuted"):
        assert y1.strides == xl.strides and dx1.strides == xl.strides
    assert not np.shares_memory(y1, xl)


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
def test_inputs_never_modified(backend):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((8, 4)).astype(np.float32)
    w, b, dy = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32), \
        rng.standard_normal((8, 4)).astype(np.float32)
    copies = [a.copy() for a in (x, w, b, dy)]
    _, mean, invstd = fastbn.batch_norm_forward(x, w, b, backend=backend)
    saved = (mean.copy(), invstd.copy())
    fastbn.batch_norm_backward(dy, x, mean, invstd, w, backend=backend)
    for a, c in zip((x, w, b, dy, mean, invstd), copies + list(saved)):
        assert np.array_equal(a, c)


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
def test_running_stats_update(backend):
    rng = np.random.default_rng(7)
    x = (3 + 2 * rng.standard_normal((10, 3, 4))).astype(np.float64)
    rm = rng.standard_normal(3)
    rv = rng.uniform(0.5, 2, 3)
    rm0, rv0 = rm.copy(), rv.copy()
    fastbn.batch_norm(x, rm, rv, training=True, momentum=0.3, backend=backend)
    xc = channel_view(x, 1)
    np.testing.assert_allclose(rm, 0.7 * rm0 + 0.3 * xc.mean(axis=1), rtol=1e-13)
    np.testing.assert_allclose(rv, 0.7 * rv0 + 0.3 * xc.var(axis=1, ddof=1), rtol=1e-13)
    # eval mode uses and keeps the running stats
    rm1, rv1 = rm.copy(), rv.copy()
    y = fastbn.batch_norm(x, rm, rv, training=False, eps=1e-5, backend=backend)
    assert np.array_equal(rm, rm1) and np.array_equal(rv, rv1)
    expected = (x - rm[None, :, None]) / np.sqrt(rv[None, :, None] + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-13, atol=1e-13)


def _as_stats(a, kind):
    """Running statistics of another dtype or layout with the values of float64 `a`."""
    if kind == "float16":
        return a.astype(np.float16)
    if kind == "big-endian":
        return a.astype(">f4")
    big = np.zeros((a.size, 2))  # a strided float64 view
    big[:, 0] = a
    return big[:, 0]


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
@pytest.mark.parametrize("kind", ["float16", "big-endian", "strided"])
@pytest.mark.parametrize("shape", [(10, 3, 4), (3, 3, 40000)], ids=["serial", "parallel"])
def test_running_stats_of_any_float_dtype(backend, kind, shape):
    """Running statistics of any floating dtype, byte order or stride are updated in place:
    torch's formula in float64, rounded once into their own dtype. So the result is that
    of float64 running statistics holding the same values, rounded once (bit for bit)."""
    rng = np.random.default_rng(8)
    x = (3 + 2 * rng.standard_normal(shape)).astype(np.float32)
    rm0 = _as_stats(rng.standard_normal(3), kind).astype(np.float64)  # values of that dtype
    rv0 = _as_stats(rng.uniform(0.5, 2, 3), kind).astype(np.float64)
    rm, rv = _as_stats(rm0, kind), _as_stats(rv0, kind)
    rm64, rv64 = rm0.copy(), rv0.copy()
    dtype = rm.dtype
    for _ in range(2):
        fastbn.batch_norm(x, rm, rv, training=True, momentum=0.3, backend=backend)
        fastbn.batch_norm(x, rm64, rv64, training=True, momentum=0.3, backend=backend)
        assert rm.dtype == dtype and rv.dtype == dtype
        np.testing.assert_array_equal(rm, rm64.astype(dtype))
        np.testing.assert_array_equal(rv, rv64.astype(dtype))
        rm64, rv64 = rm.astype(np.float64), rv.astype(np.float64)  # next step from the rounded
    y = fastbn.batch_norm(x, rm, rv, training=False, backend=backend)  # and eval uses them
    np.testing.assert_array_equal(y, fastbn.batch_norm(x, rm64, rv64, training=False, backend=backend))


def test_torch_half_running_stats():
    """torch float16 running statistics given to the core API (viewed through DLPack)."""
    torch = pytest.importorskip("torch")
    x = torch.randn(64, 3, 5) * 2 + 3
    rm, rv = torch.zeros(3, dtype=torch.half), torch.ones(3, dtype=torch.half)
    rm64, rv64 = np.zeros(3), np.ones(3)
    fastbn.batch_norm(x, rm, rv, training=True)
    fastbn.batch_norm(x.numpy(), rm64, rv64, training=True)
    assert rm.dtype == torch.half
    np.testing.assert_array_equal(rm.numpy(), rm64.astype(np.float16))
    np.testing.assert_array_equal(rv.numpy(), rv64.astype(np.float16))


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
def test_training_without_running_stats(backend):
    x = np.random.default_rng(8).standard_normal((6, 2))
    y = fastbn.batch_norm(x, training=True, backend=backend)
    y_ref, _, _ = fastbn.reference.batch_norm_forward(x)
    # float64 data: k u (1 + r + |xhat|) with k = 8 + 2 sqrt(6), r < 1, |xhat| < 3
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=(8 + 2 * np.sqrt(6)) * 5 * unit_roundoff(np.float64))


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
def test_empty_batch(backend):
    """A zero-size batch returns an empty result and leaves the running stats untouched."""
    x = np.zeros((0, 3, 4), dtype=np.float32)
    rm, rv = np.ones(3, np.float32), np.full(3, 2.0, np.float32)
    y = fastbn.batch_norm(x, rm, rv, training=True, backend=backend)
    assert y.shape == x.shape
    assert np.all(rm == 1) and np.all(rv == 2)
    y, mean, invstd = fastbn.batch_norm_forward(x, backend=backend)
    assert y.shape == (0, 3, 4) and mean.shape == (3,)
    dx, dw, db = fastbn.batch_norm_backward(x, x, mean, invstd, backend=backend)
    assert dx.shape == x.shape and np.all(dw == 0) and np.all(db == 0)
    assert fastbn.batch_norm(x, rm, rv, backend=backend).shape == x.shape


def test_backends_listed():
    names = fastbn.backends()
    assert "cpu" in names and "reference" in names
    report = fastbn.backends.backend_report()
    assert set(report) == {"cpu", "reference", "cupy", "numba-cuda"}
    for name, state in report.items():
        assert (state == "ok") == (name in names)
        assert state  # a reason is given for every unusable backend
