"""The public functional API: validate once, canonicalize, dispatch, update state last.

Every function takes the same kinds of arrays: NumPy arrays run on the CPU kernels, CuPy
arrays (and objects with ``__cuda_array_interface__``) on the GPU kernels, and other objects
with ``__dlpack__`` (torch tensors, JAX arrays) are viewed zero-copy through DLPack and the
results are handed back as the same kind of object.

The data is viewed as a 3-d array ``(A, C, B)`` (see :mod:`fastbn.backends`): for any dense
memory layout (C order, Fortran order, channels-last) the axes are reordered by stride so
that the view is free, and outputs get the input's memory layout. Other inputs (sliced,
broadcast) are copied once to a contiguous array.
"""

from __future__ import annotations

import math

import numpy as np

from . import _pipeline
from . import _validation as v
from ._layout import canonical, restore, same_layout
from ._pipeline import fast_array as _fast_array
from ._pipeline import fast_eps as _fast_eps
from ._pipeline import fast_momentum as _fast_momentum
from ._pipeline import fast_running_stats as _fast_running_stats
from ._pipeline import param as _param
from ._pipeline import select_backend as _select_backend  # noqa: F401 - fastbn.torch uses it
from ._pipeline import stats_dtype as _stats_dtype
from ._pipeline import wrap as _wrap

__all__ = ["batch_norm", "batch_norm_forward", "batch_norm_backward"]


# --------------------------------------------------------------------------- dispatch
def _prepare(x, axis, backend):
    """Validate x: ``(array, source library of x, wrap, backend, axis)``."""
    arr, lib, wrap, be = _pipeline.prepare(x, backend)
    return arr, lib, wrap, be, v.check_axis(axis, arr.ndim)


# --------------------------------------------------------------------------- fast path
# (the checks are fastbn._pipeline's; this is batch norm's canonical view of a fast x)


def _fast_x(x, axis, backend):
    """``(backend, x3)`` for a C-contiguous, non-empty NumPy `x`, else None."""
    if type(axis) is not int:
        return None
    be = _pipeline.fast_backend(x, backend)
    if be is None:
        return None
    nd = x.ndim
    if nd < 2 or not -nd <= axis < nd:
        return None
    shape = x.shape
    ax = axis % nd
    if nd == 2:
        return be, x.reshape(shape[0], shape[1], 1) if ax == 1 else x.reshape(1, shape[0], shape[1])
    return be, x.reshape(math.prod(shape[:ax]), shape[ax], math.prod(shape[ax + 1:]))


# --------------------------------------------------------------------------- training forward
def _forward_train(arr, ax, be, w, b, eps, rm, rv, momentum):
    """Run the training forward and update the running stats last. Returns y, mean, invstd."""
    xp = be.xp
    c = arr.shape[ax]
    sd = _stats_dtype(be, arr.dtype)
    if arr.size == 0:
        # Nothing to normalize: an empty result, undefined (NaN) statistics, state untouched.
        nan = xp.full(c, np.nan, dtype=sd)
        return xp.empty_like(arr), nan, nan.copy()
    x3, perm, shape = canonical(arr, ax, xp)
    return _forward_train3(x3, perm, shape, be, sd, w, b, eps, rm, rv, momentum)


#: running-statistics dtypes the backends' compiled updates take (native byte order)
_KERNEL_STATS = frozenset((np.dtype(np.float32), np.dtype(np.float64)))


def _forward_train3(x3, perm, shape, be, sd, w, b, eps, rm, rv, momentum):
    """The training forward on the canonical view `x3` (see :func:`_forward_train`)."""
    c = x3.shape[1]
    wc, bc = _param(w, 1.0, c, be, sd), _param(b, 0.0, c, be, sd)
    compiled = rm is not None and rm.dtype in _KERNEL_STATS and rv.dtype in _KERNEL_STATS
    if compiled:
        fused = getattr(be, "forward_train_update", None)
        if fused is not None:  # one call: statistics, output, then the running stats
            y3, mean, _, invstd = fused(x3, wc, bc, eps, rm, rv, momentum)
            return restore(y3, perm, shape), mean, invstd
    y3, mean, var, invstd = be.forward_train(x3, wc, bc, eps)
    if rm is not None:
        m = x3.shape[0] * x3.shape[2]
        update = getattr(be, "update_running_stats", None) if compiled else None
        if update is not None:  # one compiled call instead of six small array operations
            update(rm, rv, mean, var, momentum, m)
            return restore(y3, perm, shape), mean, invstd
        # torch's update for any running-statistics dtype and byte order (float16, '>f4',
        # or a backend without a compiled update): computed in float64 and rounded once
        # into the running statistics' dtype; both new values are formed before either
        # array is written.
        f64 = be.xp.float64
        keep = 1.0 - momentum
        new_rm = rm.astype(f64) * keep + mean.astype(f64) * momentum
        new_rv = rv.astype(f64) * keep + var.astype(f64) * (momentum * m / (m - 1))
        rm[...] = new_rm
        rv[...] = new_rv
    return restore(y3, perm, shape), mean, invstd


def batch_norm_forward(x, weight=None, bias=None, *, eps=1e-5, axis=1, running_mean=None,
                       running_var=None, momentum=0.1, backend=None):
    """Training-mode batch normalization that also returns what the backward pass needs.

    Normalizes `x` with the statistics of the batch, computed over every axis except
    `axis`: ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the biased variance.

    Parameters
    ----------
    x : array
        Input with at least 2 dimensions and more than one value per feature: a
        ``numpy.ndarray`` (CPU kernels), ``cupy.ndarray`` or ``__cuda_array_interface__``
        object (GPU kernels), or any ``__dlpack__`` object (returned as the same kind).
        float16, bfloat16 (``ml_dtypes.bfloat16``), float32 or float64; any memory layout.
    weight, bias : array or None, optional
        Per-feature scale and shift, shape ``(x.shape[axis],)``; None means 1 and 0.
    eps : float, optional
        Added to the variance for numerical stability; ``>= 0``.
    axis : int, optional
        The feature (channel) axis: 1 for NCHW and (N, C), -1 for channels-last.
    running_mean, running_var : array or None, optional
        If given (both), updated in place after the computation succeeded:
        ``r = (1 - momentum) * r + momentum * batch_stat``, with the unbiased batch variance
        for `running_var`.
    momentum : float, optional
        In ``[0, 1]``.
    backend : str or None, optional
        Force a backend (``"cpu"``, ``"reference"``, ``"cupy"``, ``"numba-cuda"``); None picks
        the default for the array's library.

    Returns
    -------
    y : array
        Normalized output: same shape, dtype and memory layout as `x`.
    save_mean : array
        Batch mean per feature (float32 for float16 and bfloat16 input, else the input
        dtype).
    save_invstd : array
        ``1 / sqrt(var + eps)`` per feature; 0 where ``var + eps == 0``.

    Raises
    ------
    TypeError
        For an argument of the wrong kind or dtype, or arrays from different libraries.
    ValueError
        For shape or length mismatches, an out-of-range axis, ``ndim < 2``, a single value
        per feature, a negative or NaN `eps`, `momentum` outside ``[0, 1]``, or read-only
        running statistics. Nothing is modified when an error is raised.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.random.default_rng(0).normal(5.0, 2.0, size=(32, 4)).astype(np.float32)
    >>> y, mean, invstd = fastbn.batch_norm_forward(x)
    >>> bool(np.allclose(y.mean(axis=0), 0, atol=1e-5))
    True
    """
    fast = _fast_x(x, axis, backend)
    if fast is not None and _fast_eps(eps) and _fast_momentum(momentum):
        be, x3 = fast
        c = x3.shape[1]
        if (x3.shape[0] * x3.shape[2] > 1 and _fast_array(weight, (c,))
                and _fast_array(bias, (c,))
                and _fast_running_stats(running_mean, running_var, c, True)):
            return _forward_train3(x3, None, x.shape, be, _stats_dtype(be, x.dtype), weight,
                                   bias, eps, running_mean, running_var, momentum)
    arr, lib, wrap, be, ax = _prepare(x, axis, backend)
    eps = v.check_eps(eps)
    momentum = v.check_momentum(momentum)
    v.check_training_batch(arr.shape, ax)
    c = arr.shape[ax]
    w = v.check_per_channel("weight", weight, c, lib, arr)
    b = v.check_per_channel("bias", bias, c, lib, arr)
    rm, rv = v.check_running_stats(running_mean, running_var, c, lib, arr, training=True)
    return _wrap(wrap, *_forward_train(arr, ax, be, w, b, eps, rm, rv, momentum))


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, backend=None):
    """Batch normalization with ``torch.nn.functional.batch_norm``'s signature and semantics.

    Parameters
    ----------
    x : array
        Input with at least 2 dimensions (see :func:`batch_norm_forward` for the kinds of
        arrays accepted).
    running_mean, running_var : array or None
        Running statistics per feature. With ``training=False`` they normalize `x` and are
        not changed (they are required then, as in torch); with ``training=True`` they are
        updated in place if given.
    weight, bias : array or None, optional
        Per-feature scale and shift; None means 1 and 0.
    training : bool, optional
        Normalize with (and record) the batch statistics.
    momentum : float, optional
        Weight of the batch statistics in the running average, in ``[0, 1]``.
    eps : float, optional
        Added to the variance for numerical stability; ``>= 0``.
    axis : int, optional
        The feature (channel) axis.
    backend : str or None, optional
        Force a backend; None picks the default for the array's library.

    Returns
    -------
    array
        Normalized output with the shape, dtype and memory layout of `x`.

    Raises
    ------
    TypeError, ValueError
        As :func:`batch_norm_forward`; the single-value-per-feature check applies in
        training only, as in torch.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.ones((8, 3, 4, 4), dtype=np.float32)
    >>> rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    >>> y = fastbn.batch_norm(x, rm, rv)             # eval: uses the running stats
    >>> float(y[0, 0, 0, 0]) == float(1 / np.sqrt(1 + 1e-5, dtype=np.float32))
    True
    """
    fast = _fast_x(x, axis, backend)
    if (fast is not None and type(training) is bool and _fast_eps(eps)
            and _fast_momentum(momentum)):
        be, x3 = fast
        c = x3.shape[1]
        if (_fast_array(weight, (c,)) and _fast_array(bias, (c,))
                and _fast_running_stats(running_mean, running_var, c, training)):
            sd = _stats_dtype(be, x.dtype)
            if training:
                if x3.shape[0] * x3.shape[2] > 1:
                    return _forward_train3(x3, None, x.shape, be, sd, weight, bias, eps,
                                           running_mean, running_var, momentum)[0]
            elif running_mean is not None:
                return _forward_eval3(x3, x.shape, be, sd, running_mean, running_var, weight,
                                      bias, eps)
    training = v.check_bool("training", training)
    arr, lib, wrap, be, ax = _prepare(x, axis, backend)
    eps = v.check_eps(eps)
    momentum = v.check_momentum(momentum)
    if training:
        v.check_training_batch(arr.shape, ax)
    c = arr.shape[ax]
    w = v.check_per_channel("weight", weight, c, lib, arr)
    b = v.check_per_channel("bias", bias, c, lib, arr)
    rm, rv = v.check_running_stats(running_mean, running_var, c, lib, arr, training=training)
    if training:
        return _wrap(wrap, _forward_train(arr, ax, be, w, b, eps, rm, rv, momentum)[0])
    if rm is None:
        raise ValueError("running_mean and running_var must be given when training=False "
                         "(eval mode normalizes with them)")
    xp = be.xp
    if arr.size == 0:
        return _wrap(wrap, xp.empty_like(arr))
    x3, perm, shape = canonical(arr, ax, xp)
    y3 = _forward_eval3(x3, None, be, _stats_dtype(be, arr.dtype), rm, rv, w, b, eps)
    return _wrap(wrap, restore(y3, perm, shape))


def _forward_eval3(x3, shape, be, sd, rm, rv, w, b, eps):
    """Eval forward on the canonical view; reshaped to `shape` unless it is None."""
    c = x3.shape[1]
    y3 = be.forward_eval(x3, _param(rm, 0.0, c, be, sd), _param(rv, 1.0, c, be, sd),
                         _param(w, 1.0, c, be, sd), _param(b, 0.0, c, be, sd), eps)
    return y3 if shape is None else y3.reshape(shape)


# --------------------------------------------------------------------------- backward
def batch_norm_backward(dy, x, save_mean, save_invstd, weight=None, *, axis=1, backend=None):
    """Gradients of training-mode batch normalization.

    With ``xhat = (x - mean) * invstd`` and ``M`` values per feature:
    ``dbias = sum(dy)``, ``dweight = sum(dy * xhat)``,
    ``dx = weight * invstd / M * (M * dy - dbias - xhat * dweight)``.

    Parameters
    ----------
    dy : array
        Gradient of the loss with respect to the forward output; same shape as `x`.
    x : array
        The forward input.
    save_mean, save_invstd : array
        The statistics returned by :func:`batch_norm_forward` for this `x`.
    weight : array or None, optional
        The forward weight; None means 1.
    axis : int, optional
        The feature axis used in the forward pass.
    backend : str or None, optional
        Force a backend; None picks the default for the array's library.

    Returns
    -------
    dx : array
        Gradient with respect to `x`: shape, dtype and memory layout of `x`.
    dweight, dbias : array
        Gradients with respect to the weight and bias (statistics dtype), returned even
        when `weight` is None.

    Raises
    ------
    TypeError, ValueError
        For arguments of the wrong kind, dtype or shape (see :func:`batch_norm_forward`).

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    >>> y, mean, invstd = fastbn.batch_norm_forward(x)
    >>> dx, dw, db = fastbn.batch_norm_backward(np.ones_like(y), x, mean, invstd)
    >>> bool(np.abs(dx).max() < 1e-5)       # a constant upstream gradient is absorbed
    True
    """
    fast = _fast_x(x, axis, backend)
    if (fast is not None and type(dy) is np.ndarray and dy.shape == x.shape
            and dy.dtype == x.dtype and dy.flags.c_contiguous
            and save_mean is not None and save_invstd is not None):
        be, x3 = fast
        c = x3.shape[1]
        if (_fast_array(save_mean, (c,)) and _fast_array(save_invstd, (c,))
                and _fast_array(weight, (c,))):
            sd = _stats_dtype(be, x.dtype)
            dx3, dweight, dbias = be.backward(
                dy.reshape(x3.shape), x3, _param(save_mean, 0.0, c, be, sd),
                _param(save_invstd, 1.0, c, be, sd), _param(weight, 1.0, c, be, sd))
            return dx3.reshape(x.shape), dweight, dbias
    arr, lib, wrap, be, ax = _prepare(x, axis, backend)
    c = arr.shape[ax]
    d, mean, invstd, w = v.check_backward_args(dy, arr, lib, c, save_mean, save_invstd, weight)

    xp = be.xp
    sd = _stats_dtype(be, arr.dtype)
    if arr.size == 0:
        return _wrap(wrap, xp.empty_like(arr), xp.zeros(c, dtype=sd), xp.zeros(c, dtype=sd))
    x3, perm, shape = canonical(arr, ax, xp)
    if d.dtype != arr.dtype:
        d = d.astype(arr.dtype)
    dy3 = same_layout(d, perm, x3.shape, xp)
    dx3, dweight, dbias = be.backward(dy3, x3, _param(mean, 0.0, c, be, sd),
                                      _param(invstd, 1.0, c, be, sd), _param(w, 1.0, c, be, sd))
    return _wrap(wrap, restore(dx3, perm, shape), dweight, dbias)


# --------------------------------------------------------------------------- eval backward
def _backward_eval3(be, sd, dy3, x3, mean, var, w, eps):
    """Gradients of the eval-mode forward (statistics constant) on the canonical views:
    ``(dx3, dweight, dbias)``.

    ``be.backward_eval`` where the backend has it; otherwise composed of the backend's
    other functions: dx is the eval forward applied to dy (mean 0, bias 0), dweight and
    dbias are the sums of the training backward at mean = `mean`,
    invstd = 1 / sqrt(var + eps) (0 where var + eps == 0, as in the forward).
    """
    c = x3.shape[1]
    mean, var = _param(mean, 0.0, c, be, sd), _param(var, 1.0, c, be, sd)
    w = _param(w, 1.0, c, be, sd)
    fused = getattr(be, "backward_eval", None)
    if fused is not None:
        return fused(dy3, x3, mean, var, w, eps)
    xp = be.xp
    zero = xp.zeros(c, sd)
    dx3 = be.forward_eval(dy3, zero, var, w, zero, eps)
    ve = var.astype(xp.float64) + eps
    invstd = xp.where(ve == 0, 0.0, 1.0 / xp.sqrt(xp.where(ve == 0, 1.0, ve))).astype(sd)
    _, dweight, dbias = be.backward(dy3, x3, mean, invstd, w)
    return dx3, dweight, dbias


def _batch_norm_backward_eval(dy, x, running_mean, running_var, weight, eps, axis):
    """Gradients of ``batch_norm(x, running_mean, running_var, weight, ..., training=False)``
    for arrays the caller has validated (the layer's own): ``(dx, dweight, dbias)``, dx in
    the shape and memory layout of `x`; `dy` is checked against `x`."""
    arr, lib, wrap, be, ax = _prepare(x, axis, None)
    d = v.check_like_x("dy", dy, arr, lib)
    xp = be.xp
    sd = _stats_dtype(be, arr.dtype)
    c = arr.shape[ax]
    if arr.size == 0:
        return _wrap(wrap, xp.empty_like(arr), xp.zeros(c, dtype=sd), xp.zeros(c, dtype=sd))
    x3, perm, shape = canonical(arr, ax, xp)
    if d.dtype != arr.dtype:
        d = d.astype(arr.dtype)
    dy3 = same_layout(d, perm, x3.shape, xp)
    dx3, dweight, dbias = _backward_eval3(be, sd, dy3, x3, running_mean, running_var, weight, eps)
    return _wrap(wrap, restore(dx3, perm, shape), dweight, dbias)
