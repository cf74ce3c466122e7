"""Data generators and error bounds shared by the tests."""

import ml_dtypes
import numpy as np

#: the NumPy backends every CPU test runs on. Listed explicitly (not discovered) so that a
#: backend that fails to load fails the tests instead of being skipped.
NUMPY_BACKENDS = ["cpu", "reference"]


def unit_roundoff(dtype) -> float:
    """u = eps / 2 of a floating dtype (ml_dtypes.finfo knows bfloat16 too)."""
    return float(ml_dtypes.finfo(dtype).eps) / 2


def make_data(rng, shape, axis, dtype, *, scale=1.0, offset_ratio=0.0):
    """Per-feature data ``offset_c + scale_c * N(0, 1)`` with ``|offset_c| = offset_ratio * scale_c``.

    Returns the array (in `dtype`) and the per-feature ratio |mean| / std of the data.
    """
    c = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = c
    scales = scale * rng.uniform(0.5, 2.0, size=c)
    signs = rng.choice([-1.0, 1.0], size=c)
    offsets = signs * offset_ratio * scales
    x = offsets.reshape(bshape) + scales.reshape(bshape) * rng.standard_normal(shape)
    return x.astype(dtype)


def with_layout(x, layout, rng=None):
    """The same values as `x` in another memory layout: C, F, a permuted dense layout or strided."""
    if layout == "C":
        return np.ascontiguousarray(x)
    if layout == "F":
        return np.asfortranarray(x)
    if layout == "permuted":  # dense, neither C nor F (e.g. channels-last storage of NCHW)
        perm = list(range(x.ndim))[::-1]
        perm = perm[1:] + perm[:1]
        inverse = np.argsort(perm)
        return np.ascontiguousarray(x.transpose(perm)).transpose(inverse)
    if layout == "strided":  # every other element of a bigger array along the first axis
        big = np.empty((2 * x.shape[0],) + x.shape[1:], dtype=x.dtype)
        big[::2] = x
        big[1::2] = np.nan
        return big[::2]
    raise ValueError(layout)


LAYOUTS = ["C", "F", "permuted", "strided"]


def channel_view(a, axis):
    """Move `axis` first and flatten the rest: shape (C, M)."""
    return np.moveaxis(np.asarray(a, dtype=np.float64), axis, 0).reshape(a.shape[axis], -1)
