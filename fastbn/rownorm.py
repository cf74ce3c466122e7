"""Layer norm and RMS norm: torch's ``layer_norm`` and ``rms_norm`` on any array library.

Both normalize each *row*: the values of the trailing ``normalized_shape`` dimensions of
one leading index. The kernels see x as a C-contiguous ``(R, N)`` array (``R`` the product
of the leading dimensions, ``N`` of ``normalized_shape``): free for C-ordered input, one
copy otherwise. Results are C-ordered, as torch's. Statistics (``mean``, ``rstd``) have
the shape of the leading dimensions, in the statistics dtype (float32 for float16 and
bfloat16 data, else x's); ``rstd = 1 / sqrt(var + eps)`` with the biased variance (RMS
norm: the mean square), 0 where that sum is 0.

The steps are :mod:`fastbn._pipeline`'s; this module adds the row ops' checks
(``normalized_shape``, weight and bias of that shape, statistics of the leading shape) and
their canonical view.
"""

from __future__ import annotations

import math

import numpy as np

from . import _pipeline
from . import _validation as v

__all__ = ["layer_norm", "layer_norm_backward", "layer_norm_forward", "rms_norm",
           "rms_norm_backward", "rms_norm_forward"]


# --------------------------------------------------------------------------- the row view
def _fast(x, normalized_shape, backend):
    """``(backend, x2, leading shape, normalized shape)`` for the small-call fast path
    (see :func:`fastbn._pipeline.fast_backend`), else None."""
    be = _pipeline.fast_backend(x, backend)
    if be is None:
        return None
    ns = (normalized_shape,) if type(normalized_shape) is int else normalized_shape
    if type(ns) is not tuple or not ns:
        return None
    k = len(ns)
    shape = x.shape
    if len(shape) < k or shape[len(shape) - k:] != ns or not all(type(d) is int for d in ns):
        return None
    lead = shape[:len(shape) - k]
    return be, x.reshape(math.prod(lead), math.prod(ns)), lead, ns


def _prepare(x, normalized_shape, backend):
    """The general path: ``(x as an array, library, wrap, backend, normalized shape)``."""
    arr, lib, wrap, be = _pipeline.prepare(x, backend, min_ndim=1)
    ns = v.check_normalized_shape(normalized_shape, arr.shape)
    return arr, lib, wrap, be, ns


def _rows(arr, ns, xp):
    """``(x2, leading shape)``: the C-contiguous ``(R, N)`` view of `arr` (one copy when
    `arr` is not C-ordered)."""
    lead = arr.shape[:arr.ndim - len(ns)]
    if not arr.flags.c_contiguous:
        arr = xp.ascontiguousarray(arr)
    return arr.reshape(math.prod(lead), math.prod(ns)), lead


def _prepare_backward(dy, x, normalized_shape, weight, stats, backend, op):
    """The backward functions' checks and views: ``(x as an array, wrap, backend,
    normalized shape, kernel, statistics dtype, x2, dy2, the statistics as the kernels take
    them, weight)``; `stats` are ``(name, array)`` pairs of the leading shape."""
    arr, lib, wrap, be, ns = _prepare(x, normalized_shape, backend)
    d = v.check_like_x("dy", dy, arr, lib)
    lead = arr.shape[:arr.ndim - len(ns)]
    checked = []
    for name, s in stats:
        s = v.check_shaped(name, s, lead, lib, arr)
        if s is None:
            raise TypeError(f"{name} must be the array {op}_forward returned, got None")
        checked.append(s)
    w = v.check_shaped("weight", weight, ns, lib, arr)
    fn = _pipeline.kernel(be, f"{op}_backward")
    sd = _pipeline.stats_dtype(be, arr.dtype)
    x2, _ = _rows(arr, ns, be.xp)
    dy2, _ = _rows(d if d.dtype == arr.dtype else d.astype(arr.dtype), ns, be.xp)
    r = x2.shape[0]
    stats2 = [_pipeline.param(s.reshape(-1), 0.0, r, be, sd) for s in checked]
    return arr, wrap, be, ns, fn, sd, x2, dy2, stats2, w


def _vector(p, default, n, be, sd):
    """A weight or bias (shape `normalized_shape`) as the kernels take it: a contiguous
    length-`n` array of the statistics dtype; None becomes `default`s."""
    return _pipeline.param(None if p is None else p.reshape(n), default, n, be, sd)


def _empty_forward(be, arr, lead, ns, sd, nstats):
    """Forward results for an empty x: an empty y; statistics of the leading shape, NaN
    (a row of no values has no mean; torch's CPU kernels give NaN rstd likewise)."""
    xp = be.xp
    stats = tuple(xp.full(lead, np.nan, dtype=sd) for _ in range(nstats))
    return (xp.empty(arr.shape, arr.dtype), *stats)


def _rms_eps(eps, dtype):
    """``eps=None`` means ``finfo(x.dtype).eps``, as in torch's ``rms_norm``."""
    if eps is None:
        if np.dtype(dtype).kind == "f":
            return float(np.finfo(dtype).eps)
        import ml_dtypes  # bfloat16 data: ml_dtypes is imported already

        return float(ml_dtypes.finfo(dtype).eps)
    return v.check_eps(eps)


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
    fast = _fast(x, normalized_shape, backend)
    if fast is not None and _pipeline.fast_eps(eps):
        be, x2, lead, ns = fast
        sd = _pipeline.stats_dtype(be, x.dtype)
        if _pipeline.fast_array(weight, ns) and _pipeline.fast_array(bias, ns):
            n = x2.shape[1]
            y2, mean, rstd = _pipeline.kernel(be, "layer_norm_forward")(
                x2, _vector(weight, 1.0, n, be, sd), _vector(bias, 0.0, n, be, sd), eps)
            return y2.reshape(x.shape), mean.reshape(lead), rstd.reshape(lead)
    arr, lib, wrap, be, ns = _prepare(x, normalized_shape, backend)
    w = v.check_shaped("weight", weight, ns, lib, arr)
    b = v.check_shaped("bias", bias, ns, lib, arr)
    eps = v.check_eps(eps)
    fn = _pipeline.kernel(be, "layer_norm_forward")
    sd = _pipeline.stats_dtype(be, arr.dtype)
    x2, lead = _rows(arr, ns, be.xp)
    if x2.size == 0:
        return _pipeline.wrap(wrap, *_empty_forward(be, arr, lead, ns, sd, 2))
    n = x2.shape[1]
    y2, mean, rstd = fn(x2, _vector(w, 1.0, n, be, sd), _vector(b, 0.0, n, be, sd), eps)
    return _pipeline.wrap(wrap, y2.reshape(arr.shape), mean.reshape(lead), rstd.reshape(lead))


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
    arr, wrap, be, ns, fn, sd, x2, dy2, (m, r), w = _prepare_backward(
        dy, x, normalized_shape, weight, (("mean", mean), ("rstd", rstd)), backend, "layer_norm")
    xp = be.xp
    if x2.size == 0:
        dx2, dw, db = xp.empty(x2.shape, arr.dtype), xp.zeros(ns, sd), xp.zeros(ns, sd)
    else:
        dx2, dw, db = fn(dy2, x2, m, r, _vector(w, 1.0, x2.shape[1], be, sd))
        dw, db = dw.reshape(ns), db.reshape(ns)
    dx = dx2.reshape(arr.shape)
    if w is None:
        return (_pipeline.wrap(wrap, dx), None, None)
    return _pipeline.wrap(wrap, dx, dw, db)


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
    fast = _fast(x, normalized_shape, backend)
    if fast is not None and (eps is None or _pipeline.fast_eps(eps)):
        be, x2, lead, ns = fast
        sd = _pipeline.stats_dtype(be, x.dtype)
        if _pipeline.fast_array(weight, ns):
            y2, rstd = _pipeline.kernel(be, "rms_norm_forward")(
                x2, _vector(weight, 1.0, x2.shape[1], be, sd), _rms_eps(eps, x.dtype))
            return y2.reshape(x.shape), rstd.reshape(lead)
    arr, lib, wrap, be, ns = _prepare(x, normalized_shape, backend)
    w = v.check_shaped("weight", weight, ns, lib, arr)
    eps = _rms_eps(eps, arr.dtype)
    fn = _pipeline.kernel(be, "rms_norm_forward")
    sd = _pipeline.stats_dtype(be, arr.dtype)
    x2, lead = _rows(arr, ns, be.xp)
    if x2.size == 0:
        return _pipeline.wrap(wrap, *_empty_forward(be, arr, lead, ns, sd, 1))
    y2, rstd = fn(x2, _vector(w, 1.0, x2.shape[1], be, sd), eps)
    return _pipeline.wrap(wrap, y2.reshape(arr.shape), rstd.reshape(lead))


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
    arr, wrap, be, ns, fn, sd, x2, dy2, (r,), w = _prepare_backward(
        dy, x, normalized_shape, weight, (("rstd", rstd),), backend, "rms_norm")
    xp = be.xp
    if x2.size == 0:
        dx2, dw = xp.empty(x2.shape, arr.dtype), xp.zeros(ns, sd)
    else:
        dx2, dw = fn(dy2, x2, r, _vector(w, 1.0, x2.shape[1], be, sd))
        dw = dw.reshape(ns)
    dx = dx2.reshape(arr.shape)
    if w is None:
        return (_pipeline.wrap(wrap, dx), None)
    return _pipeline.wrap(wrap, dx, dw)
