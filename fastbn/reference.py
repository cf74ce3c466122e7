"""The float64 NumPy oracle.

Plain, obviously correct batch normalization, written for reading rather than speed. It
has the same three functions as the public API (:func:`batch_norm`,
:func:`batch_norm_forward`, :func:`batch_norm_backward`) with the same arguments and
validation, but always computes in float64 with two-pass statistics and returns float64
arrays, so that tests can compare every backend against it. It works on the array in its
own shape (reducing over every axis but `axis`), independently of the canonical
``(A, C, B)`` form the kernels use. Running statistics given in training are updated in
place (rounded to their own dtype), exactly as the public API does.
"""

from __future__ import annotations

import numpy as np

from . import _validation as v
from .backends.reference import (  # one copy of the oracles' rules
    invstd_of,
    shifted_mean,
)

__all__ = ["batch_norm", "batch_norm_backward", "batch_norm_forward", "layer_norm",
           "layer_norm_backward", "layer_norm_forward", "rms_norm", "rms_norm_backward",
           "rms_norm_forward"]

_DTYPES = (np.float16, np.float32, np.float64)


def _numpy(name, obj):
    arr, lib, _ = v.as_array(name, obj)
    if lib != "numpy":
        raise TypeError(f"{name}: the reference runs on NumPy arrays only, got a {lib} array")
    return arr


def _setup(x, axis):
    """``(x as a NumPy array, axis, reduced axes, per-feature shape, library of x)``."""
    lib = v.source_library(x)
    x = _numpy("x", x)
    x = v.check_x("x", x, _DTYPES)
    axis = v.check_axis(axis, x.ndim)
    reduce_axes = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return x, axis, reduce_axes, tuple(shape), lib


def _per_channel(name, a, c, lib, like, *, default=None, writable=False):
    a = v.check_per_channel(name, a, c, lib, like, writable=writable)
    if a is None:
        return None if default is None else np.full(c, default, dtype=np.float64)
    return a.astype(np.float64)


@np.errstate(invalid="ignore", divide="ignore", over="ignore")  # NaN, inf: as the kernels
def batch_norm_forward(x, weight=None, bias=None, *, eps=1e-5, axis=1, running_mean=None,
                       running_var=None, momentum=0.1, backend=None):
    """Training-mode batch normalization in float64.

    Parameters
    ----------
    x : numpy.ndarray
        Input with at least 2 dimensions, float16/32/64.
    weight, bias : numpy.ndarray or None
        Per-feature scale and shift (length ``x.shape[axis]``); None means 1 and 0.
    eps : float
        Added to the variance before the square root.
    axis : int
        The feature axis; statistics reduce over every other axis.
    running_mean, running_var : numpy.ndarray or None
        Running statistics, updated in place if given.
    momentum : float
        Weight of the new batch statistics in the running average.
    backend : None
        Accepted for signature compatibility; must be None or ``"reference"``.

    Returns
    -------
    y : numpy.ndarray
        float64 output, same shape as `x`.
    mean, invstd : numpy.ndarray
        float64 batch mean and ``1 / sqrt(var + eps)`` (biased variance), per feature.
    """
    _check_backend(backend)
    x, axis, red, shape, lib = _setup(x, axis)
    c = x.shape[axis]
    eps = v.check_eps(eps)
    momentum = v.check_momentum(momentum)
    v.check_training_batch(x.shape, axis)
    w = _per_channel("weight", weight, c, lib, x, default=1.0)
    b = _per_channel("bias", bias, c, lib, x, default=0.0)
    rm, rv = v.check_running_stats(running_mean, running_var, c, lib, x, training=True)

    x64 = x.astype(np.float64)
    m = x.size // c if c else 0
    if m == 0:
        nan = np.full(c, np.nan)
        return x64.copy(), nan, nan.copy()
    mean = shifted_mean(x64, red)  # a constant feature: its value, variance exactly 0
    centered = x64 - mean.reshape(shape)
    var = (centered * centered).mean(axis=red)  # biased; two-pass
    invstd = invstd_of(var, eps)
    y = centered * invstd.reshape(shape) * w.reshape(shape) + b.reshape(shape)
    if rm is not None:
        unbiased = var * (m / (m - 1))
        rm[...] = (1.0 - momentum) * rm.astype(np.float64) + momentum * mean
        rv[...] = (1.0 - momentum) * rv.astype(np.float64) + momentum * unbiased
    return y, mean, invstd


@np.errstate(invalid="ignore", divide="ignore", over="ignore")  # NaN, inf: as the kernels
def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, backend=None):
    """Batch normalization with ``torch.nn.functional.batch_norm``'s semantics, in float64.

    Parameters
    ----------
    x : numpy.ndarray
        Input with at least 2 dimensions.
    running_mean, running_var : numpy.ndarray or None
        Running statistics: used to normalize when ``training`` is False (required then),
        updated in place when it is True.
    weight, bias : numpy.ndarray or None
        Per-feature scale and shift; None means 1 and 0.
    training : bool
        Use (and record) batch statistics instead of the running ones.
    momentum : float
        Weight of the batch statistics in the running average.
    eps : float
        Added to the variance before the square root.
    axis : int
        The feature axis.
    backend : None
        Must be None or ``"reference"``.

    Returns
    -------
    numpy.ndarray
        The float64 output.
    """
    _check_backend(backend)
    if v.check_bool("training", training):
        return batch_norm_forward(x, weight, bias, eps=eps, axis=axis, running_mean=running_mean,
                                  running_var=running_var, momentum=momentum)[0]
    x, axis, red, shape, lib = _setup(x, axis)
    c = x.shape[axis]
    eps = v.check_eps(eps)
    v.check_momentum(momentum)
    w = _per_channel("weight", weight, c, lib, x, default=1.0)
    b = _per_channel("bias", bias, c, lib, x, default=0.0)
    rm, rv = v.check_running_stats(running_mean, running_var, c, lib, x, training=False)
    if rm is None:
        raise ValueError("running_mean and running_var must be given when training=False "
                         "(eval mode normalizes with them)")
    invstd = invstd_of(rv.astype(np.float64), eps)
    x64 = x.astype(np.float64)
    return (x64 - rm.astype(np.float64).reshape(shape)) * (invstd * w).reshape(shape) + b.reshape(shape)


@np.errstate(invalid="ignore", divide="ignore", over="ignore")  # NaN, inf: as the kernels
def batch_norm_backward(dy, x, save_mean, save_invstd, weight=None, *, axis=1, backend=None):
    """Gradient of training-mode batch normalization, in float64.

    Parameters
    ----------
    dy : numpy.ndarray
        Gradient of the loss with respect to the output; same shape as `x`.
    x : numpy.ndarray
        The forward input.
    save_mean, save_invstd : numpy.ndarray
        The batch statistics returned by :func:`batch_norm_forward`.
    weight : numpy.ndarray or None
        The forward weight; None means 1.
    axis : int
        The feature axis.
    backend : None
        Must be None or ``"reference"``.

    Returns
    -------
    dx : numpy.ndarray
        float64 gradient with respect to `x`.
    dweight, dbias : numpy.ndarray
        float64 gradients with respect to the weight and bias.
    """
    _check_backend(backend)
    x, axis, red, shape, lib = _setup(x, axis)
    c = x.shape[axis]
    dy, mean, invstd, w = v.check_backward_args(dy, x, lib, c, save_mean, save_invstd, weight)
    mean, invstd = mean.astype(np.float64), invstd.astype(np.float64)
    w = np.ones(c) if w is None else w.astype(np.float64)

    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    m = x.size // c if c else 0
    if m == 0:
        return x64.copy(), np.zeros(c), np.zeros(c)
    xhat = (x64 - mean.reshape(shape)) * invstd.reshape(shape)
    dbias = dy64.sum(axis=red)
    dweight = (dy64 * xhat).sum(axis=red)
    dx = (w * invstd).reshape(shape) / m * (
        m * dy64 - dbias.reshape(shape) - xhat * dweight.reshape(shape)
    )
    return dx, dweight, dbias


def _check_backend(backend):
    if backend not in (None, "reference"):
        raise ValueError(f"the reference ignores backends; backend must be None or 'reference', got {backend!r}")


# --------------------------------------------------------------------------- row norms
def _float64_rows(x, fn, *args, **kwargs):
    """Run the public row-norm function `fn` on the ``"reference"`` backend with x in
    float64: its validation, the float64 NumPy formulas of
    :mod:`fastbn.backends.reference`, float64 results."""
    _check_backend(kwargs.pop("backend", None))
    x = _numpy("x", x)
    return fn(x.astype(np.float64) if x.dtype.kind in "fV" else x, *args, backend="reference",
              **kwargs)


def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, backend=None):
    """Layer norm in float64 (see :func:`fastbn.layer_norm_forward`): float64 y, mean, rstd."""
    from . import rownorm

    return _float64_rows(x, rownorm.layer_norm_forward, normalized_shape, weight, bias, eps,
                         backend=backend)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, backend=None):
    """Layer norm in float64 (see :func:`fastbn.layer_norm`)."""
    return layer_norm_forward(x, normalized_shape, weight, bias, eps, backend=backend)[0]


def layer_norm_backward(dy, x, mean, rstd, normalized_shape, weight=None, *, backend=None):
    """Gradients of layer norm in float64 (see :func:`fastbn.layer_norm_backward`)."""
    from . import rownorm

    dy = _numpy("dy", dy)
    return _float64_rows(x, lambda x64, *a, **k: rownorm.layer_norm_backward(
        dy.astype(np.float64), x64, *a, **k), np.asarray(mean, np.float64),
        np.asarray(rstd, np.float64), normalized_shape, weight, backend=backend)


def rms_norm_forward(x, normalized_shape, weight=None, eps=None, *, backend=None):
    """RMS norm in float64 (see :func:`fastbn.rms_norm_forward`); ``eps=None`` is the
    machine epsilon of x's own dtype, as for the kernels."""
    from . import rownorm

    x = _numpy("x", x)
    if eps is None and x.dtype.kind in "fV":
        eps = rownorm._rms_eps(None, x.dtype)
    return _float64_rows(x, rownorm.rms_norm_forward, normalized_shape, weight, eps,
                         backend=backend)


def rms_norm(x, normalized_shape, weight=None, eps=None, *, backend=None):
    """RMS norm in float64 (see :func:`fastbn.rms_norm`)."""
    return rms_norm_forward(x, normalized_shape, weight, eps, backend=backend)[0]


def rms_norm_backward(dy, x, rstd, normalized_shape, weight=None, *, backend=None):
    """Gradients of RMS norm in float64 (see :func:`fastbn.rms_norm_backward`)."""
    from . import rownorm

    dy = _numpy("dy", dy)
    return _float64_rows(x, lambda x64, *a, **k: rownorm.rms_norm_backward(
        dy.astype(np.float64), x64, *a, **k), np.asarray(rstd, np.float64), normalized_shape,
        weight, backend=backend)
