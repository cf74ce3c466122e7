"""Layout: the canonical views the kernels see, and the way back to the caller's layout.

Batch norm's kernels take a C-contiguous ``(A, C, B)`` view (see :mod:`fastbn.backends`):
for any dense memory layout the axes are reordered by stride so that the view is free;
other arrays (sliced, broadcast, negatively strided) are copied once. Results are reshaped
and transposed back, so they keep the input's memory layout.
"""

from __future__ import annotations

import math

__all__ = ["canonical", "canonical_perm", "restore", "same_layout"]


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
