"""fastbn.jax against a pure jax.numpy batch norm: values and gradients under jit, grad
and vmap, dtypes, and error messages."""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
fj = pytest.importorskip("fastbn.jax")

import fastbn


def jnp_batch_norm(x, weight, bias, *, axis=1, eps=1e-5):
    """Plain two-pass batch norm in jax.numpy: the oracle (differentiated by JAX itself)."""
    dims = tuple(d for d in range(x.ndim) if d != axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    mean = x.mean(dims)
    var = ((x - mean.reshape(shape)) ** 2).mean(dims)
    y = (x - mean.reshape(shape)) / jnp.sqrt(var.reshape(shape) + eps) * weight.reshape(shape)
    return y + bias.reshape(shape), mean, var


def rel_tol(dtype, m: int) -> float:
    """Bound on the difference of two correct batch norms relative to the result's scale.

    As in tests/test_torch.py: sums of M terms carry a relative error of about
    u * log2(M) for pairwise/blocked summation (XLA's reductions and fastbn's blocked
    kernels both), the mean and invstd inherit it, the output adds a few roundings and
    |x - mean| / std stays below about 6 for the normal data used here (|mean|/std <= 1),
    so each result is within u * (log2(M) + 4) * 8 of exact relative to its scale, and two
    results are within twice that of each other.
    """
    u = float(jnp.finfo(dtype).eps) / 2
    return 16 * u * (math.log2(max(m, 2)) + 4)


def assert_close(actual, expected, tol, scale=None, what=""):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    if scale is None:
        scale = np.abs(expected).max()
    err = np.abs(actual - expected).max()
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:.3g} * scale {scale:.3g}"


def make_case(shape, axis, dtype, seed):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = jnp.asarray((rng.standard_normal(shape) * 2 + 0.5).astype(dtype))
    w = jnp.asarray(rng.uniform(0.5, 1.5, c).astype(dtype))
    b = jnp.asarray(rng.uniform(-1, 1, c).astype(dtype))
    return x, w, b


CASES = [((32, 5), 1), ((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1), ((6, 4, 7), 2), ((3, 7), 0)]


def _x64(dtype):
    """Context enabling float64 in JAX for float64 cases (older JAX: jax.experimental)."""
    if callable(getattr(jax, "enable_x64", None)):
        return jax.enable_x64(dtype == np.float64)
    from jax.experimental import disable_x64, enable_x64

    return enable_x64() if dtype == np.float64 else disable_x64()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis", CASES, ids=[f"{len(s)}d-axis{a}" for s, a in CASES])
def test_values_under_jit(shape, axis, dtype):
    with _x64(dtype):
        x, w, b = make_case(shape, axis, dtype, 0)
        m = x.size // shape[axis]
        tol = rel_tol(dtype, m)
        y, mean, var = jax.jit(fj.batch_norm, static_argnames=("axis", "eps"))(x, w, b, axis=axis)
        y_r, mean_r, var_r = jnp_batch_norm(x, w, b, axis=axis % x.ndim)
        assert y.dtype == x.dtype and mean.dtype == x.dtype and var.dtype == x.dtype
        assert_close(y, y_r, tol, scale=float(jnp.abs(y_r).max()) + 1, what="y")
        assert_close(mean, mean_r, tol, scale=float(jnp.abs(x).max()), what="mean")
        assert_close(var, var_r, tol, what="var")
        # eager call gives the same as jit
        y2, _, _ = fj.batch_norm(x, w, b, axis=axis)
        np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis", CASES[:4], ids=[f"{len(s)}d-axis{a}" for s, a in CASES[:4]])
def test_gradients_under_jit(shape, axis, dtype):
    with _x64(dtype):
        x, w, b = make_case(shape, axis, dtype, 1)
        rng = np.random.default_rng(2)
        r = jnp.asarray(rng.standard_normal(shape).astype(dtype))
        a_mean = jnp.asarray(rng.standard_normal(shape[axis]).astype(dtype))
        a_var = jnp.asarray(rng.standard_normal(shape[axis]).astype(dtype))

        def loss_all(f):  # through all three outputs
            def loss(x, w, b):
                y, mean, var = f(x, w, b, axis=axis % x.ndim)
                return jnp.sum(y * r) + jnp.sum(mean * a_mean) + jnp.sum(var * a_var)
            return loss

        def loss_y(f):  # through y only: the mean/var cotangents are symbolic zeros
            def loss(x, w, b):
                return jnp.sum(jnp.tanh(f(x, w, b, axis=axis % x.ndim)[0]) * r)
            return loss

        m = x.size // shape[axis]
        tol = rel_tol(dtype, m)
        dims = tuple(d for d in range(x.ndim) if d != axis % x.ndim)
        invstd = 1 / jnp.sqrt(x.var(dims) + 1e-5)
        xhat = (x - x.mean(dims, keepdims=True)) * jnp.expand_dims(invstd, dims)
        xhat_max = float(jnp.abs(xhat).max())
        # per-channel sum of |dy| * (1 + |xhat|) bounds sum|dy| and sum|dy * xhat|
        # (|dy| <= |r| for both losses, since |tanh'| <= 1)
        sum_scale = float((jnp.abs(r) * (1 + jnp.abs(xhat))).sum(dims).max())
        for make in (loss_all, loss_y):
            g = jax.jit(jax.grad(make(fj.batch_norm), argnums=(0, 1, 2)))(x, w, b)
            g_r = jax.grad(make(jnp_batch_norm), argnums=(0, 1, 2))(x, w, b)
            # dx: terms of size |w| * invstd * max|dy| * (1 + max|xhat|) cancel (plus the
            # small mean/var contributions); dw, db: sums of M terms of size |dy| * |xhat|.
            dx_scale = float(w.max() * invstd.max()) * float(jnp.abs(r).max()) * (1 + xhat_max)
            assert_close(g[0], g_r[0], tol, scale=dx_scale + float(jnp.abs(g_r[0]).max()),
                         what=f"{make.__name__}: dx")
            assert_close(g[1], g_r[1], tol, scale=sum_scale, what=f"{make.__name__}: dweight")
            assert_close(g[2], g_r[2], tol, scale=sum_scale, what=f"{make.__name__}: dbias")
            assert all(gi.dtype == x.dtype for gi in g)


def test_default_weight_and_bias():
    x, _, _ = make_case((10, 3), 1, np.float32, 3)
    y, _, _ = fj.batch_norm(x)
    y_r, _, _ = jnp_batch_norm(x, jnp.ones(3), jnp.zeros(3))
    assert_close(y, y_r, rel_tol(np.float32, 10), scale=float(jnp.abs(y_r).max()) + 1)
    g = jax.grad(lambda x: jnp.sum(fj.batch_norm(x)[0] ** 3))(x)
    g_r = jax.grad(lambda x: jnp.sum(jnp_batch_norm(x, jnp.ones(3), jnp.zeros(3))[0] ** 3))(x)
    assert_close(g, g_r, rel_tol(np.float32, 10) * 4, scale=float(jnp.abs(g_r).max()) + 1)


def test_vmap_normalizes_each_element_on_its_own():
    xs, w, b = make_case((4, 6, 3, 5), 2, np.float32, 4)  # 4 independent (6, 3, 5) batches
    f = jax.jit(jax.vmap(lambda x: fj.batch_norm(x, w, b, axis=1)))
    y, _, var = f(xs)
    tol = rel_tol(np.float32, 30)
    for i in range(xs.shape[0]):
        y_r, _, var_r = jnp_batch_norm(xs[i], w, b, axis=1)
        assert_close(y[i], y_r, tol, scale=float(jnp.abs(y_r).max()) + 1)
        assert_close(var[i], var_r, tol)
    g = jax.grad(lambda xs: jnp.sum(jax.vmap(lambda x: fj.batch_norm(x, w, b)[0])(xs) ** 2 * xs))(xs)
    g_r = jax.grad(lambda xs: jnp.sum(jax.vmap(lambda x: jnp_batch_norm(x, w, b)[0])(xs) ** 2 * xs))(xs)
    assert_close(g, g_r, tol * 4, scale=float(jnp.abs(g_r).max()) + 1)


@pytest.mark.parametrize("dtype, ulp", [(jnp.float16, 2.0**-11), (jnp.bfloat16, 2.0**-8)],
                         ids=["float16", "bfloat16"])
def test_16_bit_input(dtype, ulp):
    """16-bit data with float32 statistics (JAX's bfloat16 is ml_dtypes.bfloat16, which the
    CPU kernels read and write); y is rounded to the data's dtype (relative error `ulp`),
    which dominates: batch norm, layer norm and RMS norm (eps None: the dtype's own
    epsilon, 2 ulp) against float32 oracles on the same 16-bit values, to 2 ulps of
    max|y|; gradients come back in the data's dtype."""
    x, w, b = make_case((16, 4, 5), 1, np.float32, 5)
    xh = x.astype(dtype)
    x32 = xh.astype(jnp.float32)
    y, mean, var = jax.jit(fj.batch_norm)(xh, w, b)
    y_r, _, var_r = jnp_batch_norm(x32, w, b)
    assert y.dtype == dtype and mean.dtype == jnp.float32 and var.dtype == jnp.float32
    assert_close(y, y_r, 2 * ulp, scale=float(jnp.abs(y_r).max()))
    assert_close(var, var_r, rel_tol(np.float32, 80))
    w5, b5 = w[:1].repeat(5), b[:1].repeat(5)
    rows = [(fj.layer_norm(xh, 5, w5, b5), jnp_layer_norm(x32, (5,), w5, b5)),
            (fj.rms_norm(xh, (4, 5)), jnp_rms_norm(x32, (4, 5), 1.0, 2 * ulp))]
    for got, want in rows:
        assert got.dtype == dtype
        assert_close(got, want, 2 * ulp, scale=float(jnp.abs(want).max()))
    for f, c in ((lambda x, w: fj.batch_norm(x, w, b)[0], 4),
                 (lambda x, w: fj.layer_norm(x, 5, w), 5)):
        gx, gw = jax.grad(lambda x, w, f=f: jnp.sum(f(x, w).astype(jnp.float32) ** 2),
                          argnums=(0, 1))(xh, jnp.ones(c, dtype))
        assert gx.dtype == dtype and gw.dtype == dtype


def test_host_arrays_are_views_of_jax_buffers(monkeypatch):
    # The callback hands fastbn NumPy views of JAX's buffers (no copy): such a view owns
    # no data, and it is read-only because XLA owns the buffer.
    seen = []
    real = fastbn.batch_norm_forward

    def spy(x, *args, **kwargs):
        seen.append((x.flags.owndata, x.flags.writeable))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(fastbn, "batch_norm_forward", spy)
    x, w, b = make_case((8, 3), 1, np.float32, 6)
    jax.block_until_ready(jax.jit(fj.batch_norm)(x, w, b))
    assert seen == [(False, False)]


def test_errors_name_the_argument():
    x = jnp.ones((4, 3))
    with pytest.raises(TypeError, match="x must have dtype float16, bfloat16, float32 or float64, "
                                        "got int32"):
        fj.batch_norm(jnp.ones((4, 3), jnp.int32))
    with pytest.raises(TypeError, match="x must have dtype .* got complex64"):
        fj.batch_norm(x.astype(jnp.complex64))
    with pytest.raises(TypeError, match="x must be a JAX array"):
        fj.batch_norm([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        fj.batch_norm(x, jnp.ones(4))
    with pytest.raises(TypeError, match="bias must have dtype"):
        fj.batch_norm(x, None, jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="axis must be in"):
        fj.batch_norm(x, axis=2)
    with pytest.raises(TypeError, match="axis must be an int"):
        fj.batch_norm(x, axis=1.0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        fj.batch_norm(x, eps=-1e-5)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        fj.batch_norm(jnp.ones(5))
    with pytest.raises(ValueError, match="more than 1 value per feature"):
        fj.batch_norm(jnp.ones((1, 3)))


# ---------------------------------------------------------------------------------------
# Layer norm and RMS norm
# ---------------------------------------------------------------------------------------
def jnp_layer_norm(x, ns, w, b, eps=1e-5):
    dims = tuple(range(x.ndim - len(ns), x.ndim))
    m = x.mean(dims, keepdims=True)
    v = ((x - m) ** 2).mean(dims, keepdims=True)
    return (x - m) / jnp.sqrt(v + eps) * w + b


def jnp_rms_norm(x, ns, w, eps):
    dims = tuple(range(x.ndim - len(ns), x.ndim))
    return x / jnp.sqrt((x * x).mean(dims, keepdims=True) + eps) * w


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, ns", [((6, 8), (8,)), ((2, 3, 4, 5), (4, 5))], ids=str)
def test_row_norms_values_and_gradients_under_jit(shape, ns, dtype):
    with _x64(dtype):
        _check_row_norms(shape, ns, dtype)


def _check_row_norms(shape, ns, dtype):
    rng = np.random.default_rng(5)
    x = jnp.asarray((rng.standard_normal(shape) * 2 + 0.5).astype(dtype))
    w = jnp.asarray(rng.uniform(0.5, 1.5, ns).astype(dtype))
    b = jnp.asarray(rng.standard_normal(ns).astype(dtype))
    probe = jnp.asarray(rng.standard_normal(shape).astype(dtype))  # a non-trivial loss
    tol = rel_tol(dtype, math.prod(ns))
    cases = [(lambda x, w, b: fj.layer_norm(x, ns, w, b), lambda x, w, b: jnp_layer_norm(x, ns, w, b)),
             (lambda x, w, b: fj.rms_norm(x, ns, w, 1e-6) + b, lambda x, w, b: jnp_rms_norm(x, ns, w, 1e-6) + b)]
    for fast, oracle in cases:
        assert_close(jax.jit(fast)(x, w, b), oracle(x, w, b), tol, what="y")
        grads = jax.jit(jax.grad(lambda *a, f=fast: (f(*a) * probe).sum(), (0, 1, 2)))(x, w, b)
        want = jax.grad(lambda *a, f=oracle: (f(*a) * probe).sum(), (0, 1, 2))(x, w, b)
        for got, exp, name in zip(grads, want, ("dx", "dweight", "dbias")):
            assert_close(got, exp, tol * 4, what=name)


def test_row_norms_vmap_and_defaults():
    x = jnp.asarray(np.random.default_rng(6).standard_normal((3, 4, 6)).astype(np.float32))
    got = jax.vmap(lambda xi: fj.layer_norm(xi, 6))(x)
    assert_close(got, jnp_layer_norm(x, (6,), 1.0, 0.0), rel_tol(np.float32, 6), what="vmap")
    eps = float(np.finfo(np.float32).eps)
    assert_close(fj.rms_norm(x, 6), jnp_rms_norm(x, (6,), 1.0, eps), rel_tol(np.float32, 6))


def test_row_norm_errors():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="trailing dimensions"):
        fj.layer_norm(x, 4)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        fj.layer_norm(x, 3, jnp.ones(2))
    with pytest.raises(TypeError, match="x must have dtype"):
        fj.rms_norm(jnp.ones((2, 3), jnp.int32), 3)
    with pytest.raises(ValueError, match="eps"):
        fj.layer_norm(x, 3, eps=-1.0)
