"""Batch normalization: torch's ``batch_norm`` on any array library, with a feature axis.

The operation's hooks for the pipeline (:func:`fastbn._pipeline.run`): its layout is
:class:`fastbn._layout.FeatureAxis` (statistics per feature over every other axis, the
kernels see the ``(A, C, B)`` view, results keep x's memory layout), its array arguments
by role, and the computations on the canonical view. Those computations
(:func:`forward_train3`, :func:`backward_eval3`) are also what
:mod:`fastbn.torch` calls on the views of tensors it has validated by torch's rules.
"""

from __future__ import annotations

import numpy as np

from . import _pipeline
from . import _validation as v
from ._layout import FeatureAxis
from ._pipeline import LIKE, PARAM, RUNNING, SAVED, Arg, Op

__all__ = ["batch_norm", "batch_norm_forward", "batch_norm_backward"]


# --------------------------------------------------------------------------- computations
#: running-statistics dtypes the backends' compiled updates take (native byte order)
_KERNEL_STATS = frozenset((np.dtype(np.float32), np.dtype(np.float64)))


def forward_train3(be, x3, w, b, eps, rm, rv, momentum):
    """The training forward on the canonical view `x3`: ``(y3, mean, invstd)``; the
    running statistics (if not None) are updated in place after the kernel succeeded.

    `w` and `b` are contiguous arrays of the statistics dtype (:func:`fastbn._pipeline.param`).
    """
    compiled = rm is not None and rm.dtype in _KERNEL_STATS and rv.dtype in _KERNEL_STATS
    if compiled:
        fused = getattr(be, "forward_train_update", None)
        if fused is not None:  # one call: statistics, output, then the running stats
            y3, mean, _, invstd = fused(x3, w, b, eps, rm, rv, momentum)
            return y3, mean, invstd
    y3, mean, var, invstd = be.forward_train(x3, w, b, eps)
    if rm is not None:
        m = x3.shape[0] * x3.shape[2]
        update = getattr(be, "update_running_stats", None) if compiled else None
        if update is not None:  # one compiled call instead of six small array operations
            update(rm, rv, mean, var, momentum, m)
            return y3, mean, invstd
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
    return y3, mean, invstd


def backward_eval3(be, dy3, x3, mean, var, w, eps):
    """Gradients of the eval-mode forward (statistics constant) on the canonical views:
    ``(dx3, dweight, dbias)``; `mean`, `var`, `w` contiguous, of the statistics dtype.

    ``be.backward_eval`` where the backend has it; otherwise composed of the backend's
    other functions: dx is the eval forward applied to dy (mean 0, bias 0), dweight and
    dbias are the sums of the training backward at mean = `mean`,
    invstd = 1 / sqrt(var + eps) (0 where var + eps == 0, as in the forward).
    """
    fused = getattr(be, "backward_eval", None)
    if fused is not None:
        return fused(dy3, x3, mean, var, w, eps)
    xp = be.xp
    zero = xp.zeros(x3.shape[1], w.dtype)
    dx3 = be.forward_eval(dy3, zero, var, w, zero, eps)
    ve = var.astype(xp.float64) + eps
    invstd = xp.where(ve == 0, 0.0, 1.0 / xp.sqrt(xp.where(ve == 0, 1.0, ve))).astype(w.dtype)
    _, dweight, dbias = be.backward(dy3, x3, mean, invstd, w)
    return dx3, dweight, dbias


# --------------------------------------------------------------------------- the hooks
def _check_training(shape, geom):
    v.check_training_batch(shape, geom[3])


def _train(fn, be, x3, arrays, scalars):
    w, b, (rm, rv) = arrays
    return forward_train3(be, x3, w, b, scalars[0], rm, rv, scalars[1])


def _eval(fn, be, x3, arrays, scalars):
    w, b, (rm, rv) = arrays
    return (fn(x3, rm, rv, w, b, scalars[0]),)


def _backward_eval(fn, be, x3, arrays, scalars):
    dy3, (rm, rv), w = arrays
    return backward_eval3(be, dy3, x3, rm, rv, w, scalars[0])


_WEIGHT, _BIAS = Arg("weight", PARAM, 1.0), Arg("bias", PARAM, 0.0)
_TRAIN = dict(kernel="forward_train", layout=FeatureAxis, compute=_train, check=_check_training,
              scalars=(v.check_eps, v.check_momentum),
              arrays=(_WEIGHT, _BIAS, Arg(("running_mean", "running_var"), RUNNING, write=True)))
#: batch_norm_forward, and batch_norm(training=True)
FORWARD = Op(outputs="dss", **_TRAIN)
_TRAIN_Y = Op(outputs="d", **_TRAIN)
#: batch_norm(training=False)
EVAL = Op("forward_eval", FeatureAxis, compute=_eval, outputs="d",
          scalars=(v.check_eps, v.check_momentum),
          arrays=(_WEIGHT, _BIAS, Arg(("running_mean", "running_var"), RUNNING, missing=(
              "running_mean and running_var must be given when training=False (eval mode "
              "normalizes with them)"))))
#: batch_norm_backward
BACKWARD = Op("backward", FeatureAxis, outputs="dgg", arrays=(
    Arg("dy", LIKE), Arg("save_mean", SAVED, "batch_norm_forward"),
    Arg("save_invstd", SAVED, "batch_norm_forward"), _WEIGHT))
#: the eval-mode backward (fastbn.BatchNorm's)
BACKWARD_EVAL = Op("backward", FeatureAxis, compute=_backward_eval, outputs="dgg",
                   scalars=(v.check_eps,),
                   arrays=(Arg("dy", LIKE), Arg(("running_mean", "running_var"), RUNNING, missing=(
                       "running_mean and running_var must be given (the eval-mode backward "
                       "uses them)")), _WEIGHT))


# --------------------------------------------------------------------------- public functions
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
    return _pipeline.run(FORWARD, x, axis, backend, (weight, bias, (running_mean, running_var)),
                         (eps, momentum))


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
    if training is True:
        op = _TRAIN_Y
    elif training is False:
        op = EVAL
    else:
        op = _TRAIN_Y if v.check_bool("training", training) else EVAL
    return _pipeline.run(op, x, axis, backend, (weight, bias, (running_mean, running_var)),
                         (eps, momentum))


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
    return _pipeline.run(BACKWARD, x, axis, backend, (dy, save_mean, save_invstd, weight))


def _batch_norm_backward_eval(dy, x, running_mean, running_var, weight, eps, axis):
    """Gradients of ``batch_norm(x, running_mean, running_var, weight, ..., training=False)``:
    ``(dx, dweight, dbias)``, dx in the shape and memory layout of `x` (fastbn.BatchNorm's
    eval-mode backward)."""
    return _pipeline.run(BACKWARD_EVAL, x, axis, None, (dy, (running_mean, running_var), weight),
                         (eps,))
