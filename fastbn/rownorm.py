"""Layer norm and RMS norm: torch's ``layer_norm`` and ``rms_norm`` on any array library.

Both normalize each *row*: the values of the trailing ``normalized_shape`` dimensions of
one leading index. The kernels see x as a C-contiguous ``(R, N)`` array (``R`` the product
of the leading dimensions, ``N`` of ``normalized_shape``): free for C-ordered input, one
copy otherwise. Results are C-ordered, as torch's. Statistics (``mean``, ``rstd``) have
the shape of the leading dimensions, in the statistics dtype (float32 for float16 and
bfloat16 data, else x's); ``rstd = 1 / sqrt(var + eps)`` with the biased variance (RMS
norm: the mean square), 0 where that sum is 0.

Each function is one call of :func:`fastbn._pipeline.run` with the operation's hooks: the
layout :class:`fastbn._layout.Rows` (``normalized_shape``, the ``(R, N)`` view; weight and
bias of that shape, statistics of the leading shape), the roles of the arrays, the checks
of the scalars and the backend function.
"""

from __future__ import annotations

import numpy as np

from . import _pipeline
from . import _validation as v
from ._layout import Rows
from ._pipeline import LIKE, PARAM, SAVED, Arg, Op

__all__ = ["layer_norm", "layer_norm_backward", "layer_norm_forward", "rms_norm",
           "rms_norm_backward", "rms_norm_forward"]


# --------------------------------------------------------------------------- the hooks
_eps_of_dtype: dict = {}


def _rms_eps(eps, dtype):
    """``eps=None`` means ``finfo(x.dtype).eps``, as in torch's ``rms_norm``; otherwise a
    finite float >= 0."""
    if eps is not None:
        return v.check_eps(eps)
    e = _eps_of_dtype.get(dtype)
    if e is None:
        if np.dtype(dtype).kind == "f":
            e = float(np.finfo(dtype).eps)
        else:
            import ml_dtypes  # bfloat16 data: ml_dtypes is imported already

            e = float(ml_dtypes.finfo(dtype).eps)
        _eps_of_dtype[dtype] = e
    return e


def _check_rms_eps(eps):
    """The scalar checker of RMS norm's ``eps``: None, or a finite float >= 0."""
    return None if eps is None else v.check_eps(eps)


def _rms_forward(fn, be, x2, arrays, scalars):
    return fn(x2, arrays[0], _rms_eps(scalars[0], x2.dtype))


_WEIGHT = Arg("weight", PARAM, 1.0)
_DY = Arg("dy", LIKE)
#: layer_norm_forward: fn(x2, weight, bias, eps) -> (y2, mean, rstd)
LAYER_NORM_FORWARD = Op("layer_norm_forward", Rows, outputs="dss", scalars=(v.check_eps,),
                        arrays=(_WEIGHT, Arg("bias", PARAM, 0.0)))
#: layer_norm_backward: fn(dy2, x2, mean, rstd, weight) -> (dx2, dweight, dbias)
LAYER_NORM_BACKWARD = Op("layer_norm_backward", Rows, outputs="dgg", grads_need=3, arrays=(
    _DY, Arg("mean", SAVED, "layer_norm_forward"), Arg("rstd", SAVED, "layer_norm_forward"),
    _WEIGHT))
#: rms_norm_forward: fn(x2, weight, eps) -> (y2, rstd)
RMS_NORM_FORWARD = Op("rms_norm_forward", Rows, outputs="ds", scalars=(_check_rms_eps,),
                      arrays=(_WEIGHT,), compute=_rms_forward)
#: rms_norm_backward: fn(dy2, x2, rstd, weight) -> (dx2, dweight)
RMS_NORM_BACKWARD = Op("rms_norm_backward", Rows, outputs="dg", grads_need=2, arrays=(
    _DY, Arg("rstd", SAVED, "rms_norm_forward"), _WEIGHT))


# --------------------------------------------------------------------------- layer norm
def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, backend=None):
    """Layer normalization that also returns what the backward pass needs.

    Each row of the trailing `normalized_shape` dimensions is normalized with its own
    statistics: ``y = (x - mean) / sqrt(var + eps) * weight + bias``, biased variance.

    Parameters
    ----------
    x : array
        float16, bfloat16, float32 or float64; a NumPy array (CPU kernels), a CuPy array
        (GPU kernels) or any ``__dlpack__`` object (returned as the same kind). Any layout.
    normalized_shape : int or tuple of int
        The trailing dimensions of `x` that form a row.
    weight, bias : array or None, optional
        Elementwise scale and shift of shape `normalized_shape` (any float dtype; used in
        the statistics dtype); None means 1 and 0.
    eps : float, optional
        Added to the variance; ``>= 0``.
    backend : str or None, optional
        Force a backend (``"cpu"``, ``"reference"``, ...); None picks the default.

    Returns
    -------
    y : array
        Same shape and dtype as `x`, C-ordered.
    mean, rstd : array
        Per row, shape ``x.shape[:x.ndim - len(normalized_shape)]``, in the statistics
        dtype (float32 for 16-bit data): the mean and ``1 / sqrt(var + eps)`` (0 where
        ``var + eps == 0``).

    Raises
    ------
    TypeError
        For arguments of the wrong kind or dtype, arrays of different libraries, or a
        backend without layer-norm kernels.
    ValueError
        If the trailing dimensions of `x` are not `normalized_shape`, for weight or bias of
        another shape, or a negative or NaN `eps`. Nothing is computed then.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    >>> y, mean, rstd = fastbn.layer_norm_forward(x, 3)
    >>> mean
    array([1., 4.], dtype=float32)
    """
    return _pipeline.run(LAYER_NORM_FORWARD, x, normalized_shape, backend, (weight, bias), (eps,))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, backend=None):
    """Layer normalization with ``torch.nn.functional.layer_norm``'s signature and semantics.

    Parameters and errors as :func:`layer_norm_forward`.

    Returns
    -------
    array
        ``(x - mean) / sqrt(var + eps) * weight + bias`` per row of the trailing
        `normalized_shape` dimensions: same shape and dtype as `x`, C-ordered.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    >>> fastbn.layer_norm(x, (3,), eps=0.0).round(4)
    array([[-1.2247,  0.    ,  1.2247]], dtype=float32)
    """
    return layer_norm_forward(x, normalized_shape, weight, bias, eps, backend=backend)[0]


def layer_norm_backward(dy, x, mean, rstd, normalized_shape, weight=None, *, backend=None):
    """Gradients of :func:`layer_norm_forward`.

    With ``xhat = (x - mean) * rstd`` and ``g = dy * weight`` per row of ``N`` values:
    ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``,
    ``dweight = sum over rows of dy * xhat``, ``dbias = sum over rows of dy``.

    Parameters
    ----------
    dy : array
        Gradient of the loss with respect to the output; the shape of `x`.
    x : array
        The forward input.
    mean, rstd : array
        The statistics :func:`layer_norm_forward` returned for `x`.
    normalized_shape : int or tuple of int
        As in the forward.
    weight : array or None, optional
        The forward weight; None means 1.
    backend : str or None, optional
        Force a backend; None picks the default.

    Returns
    -------
    dx : array
        Shape and dtype of `x`, C-ordered.
    dweight, dbias : array or None
        Shape `normalized_shape`, statistics dtype; None when `weight` is None (torch's
        convention: no affine parameters, no gradients for them).

    Raises
    ------
    TypeError, ValueError
        As :func:`layer_norm_forward`, and for `dy`, `mean` or `rstd` of the wrong shape,
        dtype or library.
    """
    return _pipeline.run(LAYER_NORM_BACKWARD, x, normalized_shape, backend,
                         (dy, mean, rstd, weight))


# --------------------------------------------------------------------------- RMS norm
def rms_norm_forward(x, normalized_shape, weight=None, eps=None, *, backend=None):
    """RMS normalization that also returns what the backward pass needs.

    Each row of the trailing `normalized_shape` dimensions is scaled by the inverse of its
    root mean square: ``y = x / sqrt(mean(x**2) + eps) * weight``.

    Parameters
    ----------
    x : array
        As for :func:`layer_norm_forward`.
    normalized_shape : int or tuple of int
        The trailing dimensions of `x` that form a row.
    weight : array or None, optional
        Elementwise scale of shape `normalized_shape`; None means 1.
    eps : float or None, optional
        Added to the mean square; None means ``finfo(x.dtype).eps``, as in torch.
    backend : str or None, optional
        Force a backend; None picks the default.

    Returns
    -------
    y : array
        Same shape and dtype as `x`, C-ordered.
    rstd : array
        ``1 / sqrt(mean(x**2) + eps)`` per row (0 where that sum is 0), shape
        ``x.shape[:x.ndim - len(normalized_shape)]``, statistics dtype.

    Raises
    ------
    TypeError, ValueError
        As :func:`layer_norm_forward`.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> y, rstd = fastbn.rms_norm_forward(np.array([[3.0, 4.0]]), 2, eps=0.0)
    >>> y.round(4)
    array([[0.8485, 1.1314]])
    """
    return _pipeline.run(RMS_NORM_FORWARD, x, normalized_shape, backend, (weight,), (eps,))


def rms_norm(x, normalized_shape, weight=None, eps=None, *, backend=None):
    """RMS normalization with ``torch.nn.functional.rms_norm``'s signature and semantics.

    Parameters and errors as :func:`rms_norm_forward`.

    Returns
    -------
    array
        ``x / sqrt(mean(x**2) + eps) * weight`` per row of the trailing
        `normalized_shape` dimensions: same shape and dtype as `x`, C-ordered.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> fastbn.rms_norm(np.array([[3.0, 4.0]], dtype=np.float32), 2, eps=0.0).round(4)
    array([[0.8485, 1.1314]], dtype=float32)
    """
    return rms_norm_forward(x, normalized_shape, weight, eps, backend=backend)[0]


def rms_norm_backward(dy, x, rstd, normalized_shape, weight=None, *, backend=None):
    """Gradients of :func:`rms_norm_forward`.

    With ``g = dy * weight`` per row of ``N`` values:
    ``dx = rstd * g - x * rstd**3 * mean(g * x)``,
    ``dweight = sum over rows of dy * x * rstd``.

    Parameters
    ----------
    dy, x : array
        Gradient of the output and the forward input, same shape.
    rstd : array
        As :func:`rms_norm_forward` returned it for `x`.
    normalized_shape : int or tuple of int
        As in the forward.
    weight : array or None, optional
        The forward weight; None means 1.
    backend : str or None, optional
        Force a backend; None picks the default.

    Returns
    -------
    dx : array
        Shape and dtype of `x`, C-ordered.
    dweight : array or None
        Shape `normalized_shape`, statistics dtype; None when `weight` is None.

    Raises
    ------
    TypeError, ValueError
        As :func:`layer_norm_backward`.
    """
    return _pipeline.run(RMS_NORM_BACKWARD, x, normalized_shape, backend, (dy, rstd, weight))
