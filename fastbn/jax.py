"""JAX embedding: fastbn's CPU kernels as a jit-able, differentiable JAX function.

Importing this module imports JAX (an optional dependency: ``pip install
"fastbn[jax]"``); ``import fastbn`` alone never does.

:func:`batch_norm` is a :func:`jax.custom_vjp` whose forward and backward each run one
:func:`jax.pure_callback` into fastbn's public API (the Numba CPU kernels):

* the callbacks receive JAX's CPU buffers and view them as NumPy arrays with
  :func:`numpy.from_dlpack` (no copy); the results are copied once into XLA buffers, as
  every ``pure_callback`` result is;
* ``vmap_method="sequential"``: under :func:`jax.vmap` each batch element is normalized
  on its own (batch norm reduces over the batch axis, so the mapped axis must not be
  merged into it);
* the backward is fastbn's fused kernel (two reductions and one elementwise pass); the
  gradient contributions of the returned ``mean`` and ``var`` (nonzero only if the
  caller differentiates through them) are added with :mod:`jax.numpy`, and skipped when
  their cotangents are symbolically zero, which is the usual case.

Callbacks run on the host: inside a computation placed on a GPU or TPU, JAX moves the
operands to the host and back. Use ``fastbn.torch`` or CuPy arrays for fastbn's GPU
kernels.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from .backends import stats_dtype  # the shared rule: float16 data, float32 statistics

__all__ = ["batch_norm", "layer_norm", "rms_norm"]

_SUPPORTED_DTYPES = (np.dtype(np.float16), np.dtype(jnp.bfloat16), np.dtype(np.float32),
                     np.dtype(np.float64))
_DTYPE_NAMES = "float16, bfloat16, float32 or float64"


def _check_dtype(name: str, a) -> None:
    """A TypeError unless `a` has one of the dtypes the kernels take (JAX's bfloat16 is
    ml_dtypes', which fastbn's CPU kernels read and write)."""
    if np.dtype(a.dtype) not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name} must have dtype {_DTYPE_NAMES}, got {a.dtype}")


def _reduced_count(shape, axis: int) -> int:
    m = 1
    for i, n in enumerate(shape):
        if i != axis:
            m *= n
    return m


# ---------------------------------------------------------------------------------------
# Host side: what the callbacks run (NumPy arrays in, NumPy arrays out)
# ---------------------------------------------------------------------------------------
_BF16 = np.dtype(jnp.bfloat16)


def _host(a) -> np.ndarray:
    """A NumPy view of a callback argument (JAX hands over CPU arrays; older versions NumPy).
    DLPack has no bfloat16 for NumPy: such arrays come through ``__array__``."""
    if isinstance(a, np.ndarray):
        return a
    return np.asarray(a) if a.dtype == _BF16 else np.from_dlpack(a)


def _host_forward(x, weight, bias, *, axis: int, eps: float):
    """Return ``(y, mean, var, invstd)`` computed by fastbn on the host."""
    import fastbn

    x, weight, bias = _host(x), _host(weight), _host(bias)
    sdt = stats_dtype(x.dtype)
    m = _reduced_count(x.shape, axis)
    c = x.shape[axis]
    if m > 0:
        # The biased variance is not one of the public API's outputs; its running-variance
        # update with momentum 1 from zeros is exactly the unbiased batch variance
        # (0 * 0 + 1 * v = v, rounded once), and v * (M - 1) / M is the biased one.
        running_mean = np.zeros(c, sdt)
        running_var = np.zeros(c, sdt)
        y, mean, invstd = fastbn.batch_norm_forward(
            x, weight, bias, eps=eps, axis=axis,
            running_mean=running_mean, running_var=running_var, momentum=1.0,
        )
        var = running_var.astype(np.float64) * ((m - 1) / m)
    else:
        # empty batch: fastbn returns NaN statistics and an empty output
        y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, eps=eps, axis=axis)
        var = np.full(c, np.nan)
    return (
        np.asarray(y, x.dtype),
        np.asarray(mean, sdt),
        np.asarray(var, sdt),
        np.asarray(invstd, sdt),
    )


def _host_backward(dy, x, mean, invstd, weight, *, axis: int):
    """Return ``(dx, dweight, dbias)`` computed by fastbn on the host."""
    import fastbn

    x = _host(x)
    sdt = stats_dtype(x.dtype)
    dx, dw, db = fastbn.batch_norm_backward(
        _host(dy), x, _host(mean), _host(invstd), _host(weight), axis=axis
    )
    return np.asarray(dx, x.dtype), np.asarray(dw, sdt), np.asarray(db, sdt)


# ---------------------------------------------------------------------------------------
# Traced side: custom_vjp over pure_callback
# ---------------------------------------------------------------------------------------
def _forward_call(x, weight, bias, axis, eps):
    sdt = stats_dtype(x.dtype)
    c = x.shape[axis]
    shapes = (
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        *(jax.ShapeDtypeStruct((c,), sdt) for _ in range(3)),
    )
    return jax.pure_callback(
        functools.partial(_host_forward, axis=axis, eps=eps),
        shapes,
        x,
        weight.astype(sdt),
        bias.astype(sdt),
        vmap_method="sequential",
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm(x, weight, bias, axis, eps):
    y, mean, var, _invstd = _forward_call(x, weight, bias, axis, eps)
    return y, mean, var


def _batch_norm_fwd(x, weight, bias, axis, eps):
    # symbolic_zeros=True: primal inputs arrive wrapped (value, perturbed)
    x, weight, bias = x.value, weight.value, bias.value
    y, mean, var, invstd = _forward_call(x, weight, bias, axis, eps)
    return (y, mean, var), (x, weight, bias, mean, invstd)


def _broadcast_feature(v, ndim: int, axis: int):
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def _batch_norm_bwd(axis, eps, residuals, cotangents):
    x, weight, bias, mean, invstd = residuals
    ct_y, ct_mean, ct_var = cotangents
    sdt = stats_dtype(x.dtype)
    c = x.shape[axis]
    if isinstance(ct_y, SymbolicZero):
        dx = jnp.zeros(x.shape, sdt)
        dw = jnp.zeros((c,), sdt)
        db = jnp.zeros((c,), sdt)
    else:
        dx, dw, db = jax.pure_callback(
            functools.partial(_host_backward, axis=axis),
            (
                jax.ShapeDtypeStruct(x.shape, x.dtype),
                jax.ShapeDtypeStruct((c,), sdt),
                jax.ShapeDtypeStruct((c,), sdt),
            ),
            ct_y.astype(x.dtype),
            x,
            mean,
            invstd,
            weight.astype(sdt),
            vmap_method="sequential",
        )
    m = _reduced_count(x.shape, axis)
    if not isinstance(ct_mean, SymbolicZero) or not isinstance(ct_var, SymbolicZero):
        # mean = sum(x) / M          ->  d mean / dx = 1 / M
        # var = sum((x - mean)^2) / M ->  d var / dx = 2 (x - mean) / M
        #   (the term through mean vanishes: sum(x - mean) = 0)
        extra = jnp.zeros(x.shape, sdt)
        if not isinstance(ct_mean, SymbolicZero):
            extra = extra + _broadcast_feature(ct_mean.astype(sdt) / m, x.ndim, axis)
        if not isinstance(ct_var, SymbolicZero):
            centered = x.astype(sdt) - _broadcast_feature(mean, x.ndim, axis)
            extra = extra + centered * _broadcast_feature(ct_var.astype(sdt) * (2.0 / m), x.ndim, axis)
        dx = (dx.astype(sdt) + extra)
    return dx.astype(x.dtype), dw.astype(weight.dtype), db.astype(bias.dtype)


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd, symbolic_zeros=True)


def _check_param(name, p, c, x_dtype):
    if p is None:
        return jnp.ones((c,), stats_dtype(x_dtype)) if name == "weight" else jnp.zeros(
            (c,), stats_dtype(x_dtype)
        )
    if not hasattr(p, "shape") or not hasattr(p, "dtype"):
        raise TypeError(f"{name} must be an array or None, got {type(p).__name__}")
    _check_dtype(name, p)
    if tuple(p.shape) != (c,):
        raise ValueError(f"{name} must have shape ({c},) (one value per feature), got {tuple(p.shape)}")
    return jnp.asarray(p)


def batch_norm(x, weight=None, bias=None, *, axis=1, eps=1e-5):
    """Training-mode batch normalization of a JAX array with fastbn's CPU kernels.

    Usable inside :func:`jax.jit`, differentiable with :func:`jax.grad` (first order)
    and mappable with :func:`jax.vmap` (each mapped element is normalized on its own).

    Parameters
    ----------
    x : jax.Array
        Input of dtype float16, bfloat16, float32 or float64 (float64 needs
        ``jax_enable_x64``), at least 2-d, with more than one value per feature.
    weight, bias : jax.Array or None
        Shape ``(C,)`` with ``C = x.shape[axis]``; None means ones and zeros. Their
        gradients come back in their own dtype.
    axis : int, default 1
        The feature axis; statistics reduce over every other axis. Negative values count
        from the end. Static under ``jit``.
    eps : float, default 1e-5
        Added to the variance before the square root; must be >= 0. Static.

    Returns
    -------
    y : jax.Array
        ``(x - mean) / sqrt(var + eps) * weight + bias``, shape and dtype of `x`.
    mean : jax.Array
        Batch mean per feature, shape ``(C,)``.
    var : jax.Array
        *Biased* batch variance per feature (the one used to normalize), shape
        ``(C,)``. For a running average in PyTorch's convention use the unbiased
        ``var * M / (M - 1)``, ``M = x.size // C``.

    ``mean`` and ``var`` are float32 for float16 and bfloat16 input and of `x`'s dtype
    otherwise.
    All three outputs are differentiable.

    Raises
    ------
    TypeError
        If `x`, `weight` or `bias` is not a float16/bfloat16/float32/float64 array, or
        `axis`/`eps` has the wrong type.
    ValueError
        If `x` has fewer than 2 dimensions or one value per feature, `axis` is out of
        range, `weight`/`bias` do not have shape ``(C,)`` or `eps` is negative.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, fastbn.jax
    >>> x = jnp.arange(12.0).reshape(4, 3)
    >>> y, mean, var = jax.jit(fastbn.jax.batch_norm)(x)
    >>> mean
    Array([4.5, 5.5, 6.5], dtype=float32)
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x must be a JAX array, got {type(x).__name__}")
    _check_dtype("x", x)
    x = jnp.asarray(x)
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if x.ndim < 2:
        raise ValueError(
            f"x must have at least 2 dimensions (a batch axis and a feature axis), got shape {x.shape}"
        )
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis must be in [{-x.ndim}, {x.ndim}) for a {x.ndim}-d x, got {axis}")
    axis = int(axis) % x.ndim
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    c = x.shape[axis]
    if x.size // max(c, 1) == 1 and c > 0:
        raise ValueError(f"Expected more than 1 value per feature, got x of shape {x.shape} (axis={axis})")
    weight = _check_param("weight", weight, c, x.dtype)
    bias = _check_param("bias", bias, c, x.dtype)
    return _batch_norm(x, weight, bias, axis, float(eps))


# ---------------------------------------------------------------------------------------
# Layer norm and RMS norm: the same pattern, rows of the trailing normalized dimensions
# ---------------------------------------------------------------------------------------
def _host_rows_forward(x, weight, bias, *, ns, eps, op):
    import fastbn

    x, weight = _host(x), _host(weight)
    sdt = stats_dtype(x.dtype)
    if op == "layer_norm":
        y, mean, rstd = fastbn.layer_norm_forward(x, ns, weight, _host(bias), eps)
    else:
        y, rstd = fastbn.rms_norm_forward(x, ns, weight, eps)
        mean = np.zeros(rstd.shape, sdt)
    return np.asarray(y, x.dtype), np.asarray(mean, sdt), np.asarray(rstd, sdt)


def _host_rows_backward(dy, x, mean, rstd, weight, *, ns, op):
    import fastbn

    x = _host(x)
    sdt = stats_dtype(x.dtype)
    if op == "layer_norm":
        dx, dw, db = fastbn.layer_norm_backward(_host(dy), x, _host(mean), _host(rstd), ns,
                                                _host(weight))
    else:
        dx, dw = fastbn.rms_norm_backward(_host(dy), x, _host(rstd), ns, _host(weight))
        db = np.zeros(ns, sdt)
    return np.asarray(dx, x.dtype), np.asarray(dw, sdt), np.asarray(db, sdt)


def _rows_forward_call(x, weight, bias, ns, eps, op):
    sdt = stats_dtype(x.dtype)
    lead = x.shape[:x.ndim - len(ns)]
    shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(lead, sdt),
              jax.ShapeDtypeStruct(lead, sdt))
    return jax.pure_callback(functools.partial(_host_rows_forward, ns=ns, eps=eps, op=op),
                             shapes, x, weight.astype(sdt), bias.astype(sdt),
                             vmap_method="sequential")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _rows(x, weight, bias, ns, eps, op):
    return _rows_forward_call(x, weight, bias, ns, eps, op)[0]


def _rows_fwd(x, weight, bias, ns, eps, op):
    x, weight, bias = x.value, weight.value, bias.value
    y, mean, rstd = _rows_forward_call(x, weight, bias, ns, eps, op)
    return y, (x, weight, bias, mean, rstd)


def _rows_bwd(ns, eps, op, residuals, ct_y):
    x, weight, bias, mean, rstd = residuals
    sdt = stats_dtype(x.dtype)
    if isinstance(ct_y, SymbolicZero):
        return jnp.zeros_like(x), jnp.zeros_like(weight), jnp.zeros_like(bias)
    dx, dw, db = jax.pure_callback(
        functools.partial(_host_rows_backward, ns=ns, op=op),
        (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(ns, sdt),
         jax.ShapeDtypeStruct(ns, sdt)),
        ct_y.astype(x.dtype), x, mean, rstd, weight.astype(sdt), vmap_method="sequential")
    return dx, dw.astype(weight.dtype), db.astype(bias.dtype)


_rows.defvjp(_rows_fwd, _rows_bwd, symbolic_zeros=True)


def _rows_args(x, normalized_shape, params):
    """Checked x, normalized shape and parameters (None: ones and zeros)."""
    from . import _validation

    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x must be a JAX array, got {type(x).__name__}")
    _check_dtype("x", x)
    x = jnp.asarray(x)
    ns = _validation.check_normalized_shape(normalized_shape, x.shape)
    sdt = stats_dtype(x.dtype)
    out = []
    for name, p, fill in params:
        if p is None:
            out.append(jnp.full(ns, fill, sdt))
            continue
        if not hasattr(p, "shape") or not hasattr(p, "dtype"):
            raise TypeError(f"{name} must be an array or None, got {type(p).__name__}")
        _check_dtype(name, p)
        if tuple(p.shape) != ns:
            raise ValueError(f"{name} must have shape {ns}, got {tuple(p.shape)}")
        out.append(jnp.asarray(p))
    return x, ns, out


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer normalization of a JAX array with fastbn's CPU kernels (torch's semantics).

    Usable inside :func:`jax.jit`, differentiable with :func:`jax.grad` (first order) with
    respect to `x`, `weight` and `bias`, mappable with :func:`jax.vmap`.

    Parameters
    ----------
    x : jax.Array
        float16, bfloat16, float32 or float64.
    normalized_shape : int or tuple of int
        The trailing dimensions normalized together.
    weight, bias : jax.Array or None
        Shape `normalized_shape`; None means 1 and 0.
    eps : float
        Added to the variance; ``>= 0``.

    Returns
    -------
    jax.Array
        Same shape and dtype as `x`.

    Examples
    --------
    >>> import jax.numpy as jnp, fastbn.jax
    >>> fastbn.jax.layer_norm(jnp.array([[1.0, 2.0, 3.0]]), 3, eps=0.0).round(4)
    Array([[-1.2247,  0.    ,  1.2247]], dtype=float32)
    """
    from . import _validation

    eps = _validation.check_eps(eps)
    x, ns, (w, b) = _rows_args(x, normalized_shape, (("weight", weight, 1.0), ("bias", bias, 0.0)))
    return _rows(x, w, b, ns, eps, "layer_norm")


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """RMS normalization of a JAX array with fastbn's CPU kernels (torch's semantics).

    Parameters
    ----------
    x : jax.Array
        float16, bfloat16, float32 or float64.
    normalized_shape : int or tuple of int
        The trailing dimensions normalized together.
    weight : jax.Array or None
        Shape `normalized_shape`; None means 1.
    eps : float or None
        Added to the mean square; None means ``finfo(x.dtype).eps``.

    Returns
    -------
    jax.Array
        Same shape and dtype as `x`; jit, grad and vmap as :func:`layer_norm`.

    Examples
    --------
    >>> import jax.numpy as jnp, fastbn.jax
    >>> fastbn.jax.rms_norm(jnp.array([[2.0, -2.0]]), 2, eps=0.0)
    Array([[ 1., -1.]], dtype=float32)
    """
    from .rownorm import _rms_eps

    x, ns, (w, b) = _rows_args(x, normalized_shape, (("weight", weight, 1.0), ("bias", None, 0.0)))
    eps = _rms_eps(eps, np.dtype(x.dtype))  # None: finfo(x.dtype).eps, the core API's rule
    return _rows(x, w, b, ns, eps, "rms_norm")
