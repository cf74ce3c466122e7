"""Layout: the canonical views the kernels see, and the way back to the caller's layout.

Batch norm's kernels take a C-contiguous ``(A, C, B)`` view (see :mod:`fastbn.backends`):
for any dense memory layout the axes are reordered by stride so that the view is free;
other arrays (sliced, broadcast, negatively strided) are copied once. Results are reshaped
and transposed back, so they keep the input's memory layout.

The row normalizations (layer norm, RMS norm) take a C-contiguous ``(R, N)`` view: free
for C-ordered input, one copy otherwise; their results are C-ordered, as torch's.

:class:`FeatureAxis` and :class:`Rows` are these two families as the pipeline
(:func:`fastbn._pipeline.run`) uses them: each checks its shape argument (``axis``,
``normalized_shape``), makes the view, views a second array of x's shape (``dy``) the
same way and restores results. A *geometry* ``(param_shape, stat_shape, n, key)`` is what
the checks found: the shape of the per-feature arrays (weight, bias), that of the
statistics, the number of values of a per-feature array and the layout's own key (the
normalized axis, the normalized shape).
"""

from __future__ import annotations

import math

from . import _validation as v

__all__ = ["FeatureAxis", "Rows", "canonical", "canonical_perm", "restore", "same_layout"]


def canonical_perm(arr, axis: int):
    """Return ``(perm, position)``: an axis order in which `arr` is C-contiguous, if one exists.

    `perm` orders the axes by decreasing stride so that ``arr.transpose(perm)`` is
    C-contiguous for any dense layout (C order, Fortran order, channels-last, ...);
    `position` is where the feature axis lands. Returns ``(None, axis)`` when no such order
    exists (sliced, broadcast or negatively strided arrays): the caller copies then.
    """
    ndim = arr.ndim
    if arr.flags.c_contiguous:
        return tuple(range(ndim)), axis
    strides = arr.strides
    shape = arr.shape
    # Contiguity ignores the strides of size-1 axes, so they may go anywhere (last, here).
    perm = tuple(sorted(range(ndim), key=lambda i: -strides[i] if shape[i] != 1 else 0))
    if arr.transpose(perm).flags.c_contiguous:
        return perm, perm.index(axis)
    return None, axis


def canonical(arr, ax, xp):
    """The ``(A, C, B)`` view of `arr`: returns ``(x3, perm, shape)``.

    ``perm`` is None when no axis reordering was needed, else the axis order in which the
    data is C-contiguous; ``shape`` is the shape of ``arr.transpose(perm)``. Dense layouts
    are viewed without a copy; others are copied once.
    """
    if arr.flags.c_contiguous:  # fast path: the common case
        xt, perm, pos = arr, None, ax
    else:
        perm, pos = canonical_perm(arr, ax)
        if perm is None:
            xt = xp.ascontiguousarray(arr)
            pos = ax
        else:
            xt = arr.transpose(perm)
    shape = xt.shape
    c = shape[pos]
    a = math.prod(shape[:pos])
    return xt.reshape(a, c, math.prod(shape[pos + 1:])), perm, shape


def same_layout(other, perm, shape3, xp):
    """View `other` (same shape as the input) in the input's canonical order, copying if needed."""
    if perm is not None:
        other = other.transpose(perm)
    return xp.ascontiguousarray(other).reshape(shape3)


def restore(y3, perm, shape):
    """Turn an ``(A, C, B)`` result back into the input's shape and memory layout."""
    y = y3.reshape(shape)
    if perm is None:
        return y
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return y.transpose(inverse)


class FeatureAxis:
    """Statistics per feature along ``axis``, over every other axis (batch norm).

    The kernels see the ``(A, C, B)`` view of :func:`canonical`; the results keep x's
    memory layout. Per-feature arrays and statistics have shape ``(C,)``.
    """

    min_ndim = 2
    #: what a per-feature array's shape error adds
    what = v.PER_FEATURE
    #: per-feature arrays and statistics are 1-d, as the kernels take and return them
    flat = True

    @staticmethod
    def fast(x, axis):
        """``(x3, geometry)`` for a C-contiguous NumPy `x` and an int `axis` in range, else
        None (the general path decides). A result of the view's shape is reshaped to x's
        shape for x."""
        if type(axis) is not int:
            return None
        nd = x.ndim
        if nd < 2 or not -nd <= axis < nd:
            return None
        shape = x.shape
        ax = axis % nd
        c = shape[ax]
        geom = ((c,), (c,), c, ax)
        if nd == 2:
            x3 = x.reshape(shape[0], c, 1) if ax == 1 else x.reshape(1, c, shape[1])
        else:
            x3 = x.reshape(math.prod(shape[:ax]), c, math.prod(shape[ax + 1:]))
        return x3, geom

    @staticmethod
    def check(axis, arr):
        """The geometry for a valid `axis` of `arr`; raises for an invalid one."""
        ax = v.check_axis(axis, arr.ndim)
        c = arr.shape[ax]
        return (c,), (c,), c, ax

    @staticmethod
    def view(arr, geom, xp):
        """``(x3, info)``: the ``(A, C, B)`` view, and what :meth:`restore` needs."""
        x3, perm, shape = canonical(arr, geom[3], xp)
        return x3, (perm, shape)

    @staticmethod
    def like(other, x3, info, xp):
        """`other` (x's shape) in x's canonical order, copied if its layout differs."""
        return same_layout(other, info[0], x3.shape, xp)

    @staticmethod
    def restore(y3, info):
        """A result of the view's shape in x's shape and memory layout."""
        return restore(y3, *info)

    @staticmethod
    def empty(arr, xp):
        """The data output for an empty `arr`."""
        return xp.empty_like(arr)


class Rows:
    """Statistics per row of the trailing ``normalized_shape`` dimensions (layer norm, RMS
    norm).

    The kernels see the C-contiguous ``(R, N)`` view; results are C-ordered. Per-feature
    arrays have shape ``normalized_shape``, statistics the shape of the leading dimensions.
    """

    min_ndim = 1
    what = ""
    flat = False

    @staticmethod
    def fast(x, normalized_shape):
        """``(x2, geometry)`` for a C-contiguous NumPy `x` whose trailing dimensions are
        `normalized_shape` (an int or a tuple of ints), else None."""
        ns = (normalized_shape,) if type(normalized_shape) is int else normalized_shape
        if type(ns) is not tuple or not ns:
            return None
        k = len(ns)
        shape = x.shape
        if len(shape) < k or shape[len(shape) - k:] != ns or not all(type(d) is int for d in ns):
            return None
        lead = shape[:len(shape) - k]
        n = math.prod(ns)
        return x.reshape(math.prod(lead), n), (ns, lead, n, ns)

    @staticmethod
    def check(normalized_shape, arr):
        """The geometry for a valid `normalized_shape` of `arr`; raises for an invalid one."""
        ns = v.check_normalized_shape(normalized_shape, arr.shape)
        return ns, arr.shape[:arr.ndim - len(ns)], math.prod(ns), ns

    @staticmethod
    def view(arr, geom, xp):
        """``(x2, info)``: the C-contiguous ``(R, N)`` view (one copy when `arr` is not
        C-ordered) and x's shape."""
        if not arr.flags.c_contiguous:
            arr = xp.ascontiguousarray(arr)
        return arr.reshape(math.prod(geom[1]), geom[2]), arr.shape

    @staticmethod
    def like(other, x2, info, xp):
        """`other` (x's shape) as a C-contiguous ``(R, N)`` array."""
        return xp.ascontiguousarray(other).reshape(x2.shape)

    @staticmethod
    def restore(y2, shape):
        """A result of the view's shape in x's shape (C-ordered)."""
        return y2.reshape(shape)

    @staticmethod
    def empty(arr, xp):
        """The data output for an empty `arr` (C-ordered)."""
        return xp.empty(arr.shape, arr.dtype)
