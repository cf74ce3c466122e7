"""The steps every public function runs: validate x and pick its backend, view it
canonically, call the backend's kernels, restore the caller's layout, hand the results back
as the caller's kind of array, write state last.

This module holds the steps that do not depend on the operation: the dispatch of an array
to a backend (with the default backend per array library remembered), the dtype checks of
x against what the backend takes, the per-feature parameters as contiguous arrays of the
statistics dtype (constants cached for None), the wrapping of results, and the small-call
fast path's recognition of a plain NumPy x. The operations (:mod:`fastbn.functional` for
batch norm, :mod:`fastbn.rownorm` for layer and RMS norm) add their own argument checks and
canonical views.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from . import _validation as v
from . import backends as _backends

__all__ = ["fast_array", "fast_backend", "fast_eps", "fast_momentum", "fast_running_stats",
           "kernel", "param", "prepare", "select_backend", "stats_dtype", "wrap"]


_default_backend = {}
_numpy_backends: dict = {}  # backend= names already resolved for NumPy input


def select_backend(library: str, backend):
    """Backend module for arrays of `library`, honouring an explicit `backend=`."""
    if backend is None:
        be = _default_backend.get(library)
        if be is not None:
            return be
        be = _default_backend[library] = _default_for(library)
        return be
    be = _backends.get_backend(backend)
    be_lib = be.xp.__name__.partition(".")[0]
    if be_lib != library:
        raise TypeError(f"backend {backend!r} runs on {be_lib} arrays, but x is a {library} array")
    if library == "numpy" and type(backend) is str:
        _numpy_backends[backend] = be  # known good for NumPy input: the fast path may use it
    return be


def _default_for(library: str):
    """The default backend for `library`; NumPy falls back to the reference if Numba fails."""
    try:
        return _backends.backend_for(library)
    except RuntimeError as exc:
        if library != "numpy":
            raise
        warnings.warn(f"{exc}; falling back to the slow 'reference' backend", RuntimeWarning,
                      stacklevel=5)
        return _backends.get_backend("reference")


_dtype_sets: dict = {}


_stats_dtypes: dict = {}


def stats_dtype(be, dtype):
    """``be.stats_dtype(dtype)``, memoized (it is on the hot path of every call)."""
    key = (be.name, dtype)
    sd = _stats_dtypes.get(key)
    if sd is None:
        sd = _stats_dtypes[key] = np.dtype(be.stats_dtype(dtype))
    return sd


_host_constants: dict = {}


def param(arr, default: float, c: int, be, sd):
    """A per-feature array as a contiguous array of dtype `sd`; None becomes `default`s.

    Constants for NumPy are cached (the kernels never write their inputs).
    """
    if arr is None:
        if be.xp is np:
            key = (default, c, sd)
            const = _host_constants.get(key)
            if const is None:
                if len(_host_constants) > 256:
                    _host_constants.clear()
                const = _host_constants[key] = np.full(c, default, dtype=sd)
            return const
        return be.xp.full(c, default, dtype=sd)
    if arr.dtype == sd and arr.flags.c_contiguous:
        return arr
    return be.xp.ascontiguousarray(arr, dtype=sd)


def wrap(wrap, *arrays):
    """The results as the caller's kind of array (`wrap` from :func:`prepare`; None keeps
    them); one array alone, several as a tuple."""
    if wrap is None:
        return arrays if len(arrays) > 1 else arrays[0]
    out = tuple(wrap(a) for a in arrays)
    return out if len(out) > 1 else out[0]


def prepare(x, backend, min_ndim: int = 2):
    """Validate x and pick its backend: ``(array, source library of x, wrap, backend)``.

    `wrap` turns a result array back into x's kind (a torch tensor, a JAX array, ...), or is
    None for NumPy and CuPy input.
    """
    arr, lib, wrap = v.as_array("x", x)
    be = select_backend(lib, backend)
    dtypes = _dtype_sets.get(be.name)
    if dtypes is None:
        dtypes = _dtype_sets[be.name] = frozenset(np.dtype(d) for d in be.dtypes)
    arr = v.check_x("x", arr, dtypes, min_ndim)
    if arr.dtype not in dtypes:  # bfloat16, accepted with float16: from now on on the fast path
        _dtype_sets[be.name] = dtypes | {arr.dtype}
    # the other arguments must come from x's library (a torch CPU tensor is viewed as a
    # NumPy array, but a NumPy weight with it is still a mix of libraries)
    return arr, v.source_library(x), wrap, be


def fast_backend(x, backend):
    """The backend for a plain, C-contiguous, non-empty NumPy `x` of a dtype it is known to
    take, else None (then the caller takes the general path, which validates and explains).

    The small-call fast path: such calls spend as long in argument checks as in the kernel.
    Known means seen once on the general path (the default backend is resolved, and a
    bfloat16 dtype accepted, there).
    """
    if type(x) is not np.ndarray:
        return None
    if backend is None:
        be = _default_backend.get("numpy")
    else:
        be = _numpy_backends.get(backend) if type(backend) is str else None
    if be is None or not x.flags.c_contiguous or x.size == 0:
        return None
    dtypes = _dtype_sets.get(be.name)
    if dtypes is None or x.dtype not in dtypes:
        return None
    return be


def kernel(be, name: str):
    """The backend function `name`, or a TypeError saying that this backend does not have
    the operation (a kernel family the backend does not know never falls through)."""
    fn = getattr(be, name, None)
    if fn is None:
        raise TypeError(f"backend {be.name!r} has no {name.rpartition('_')[0] or name} kernels "
                        f"({name}); backends with them: "
                        + ", ".join(n for n in _backends.available_backends()
                                    if hasattr(_backends.get_backend(n), name)))
    return fn


# --------------------------------------------------------------------------- the fast path
# Small tensors spend as long in argument checks as in the kernel. Every public function
# first tries the fast path: x through fast_backend, its other arguments through the
# predicates below (a few inline tests each). Anything else, valid or not, takes the general
# path, which does the full validation and raises the errors; the fast path accepts a subset
# of what the general path accepts and computes the same thing (param() converts dtypes).


def fast_array(p, shape: tuple) -> bool:
    """`p` is None, or a plain NumPy float array of exactly `shape` (a weight, a bias, saved
    statistics)."""
    return p is None or (type(p) is np.ndarray and p.shape == shape
                         and p.dtype in v.FLOAT_DTYPES)


def fast_eps(eps) -> bool:
    """`eps` is a Python float in ``[0, inf)``."""
    return type(eps) is float and 0.0 <= eps < math.inf


def fast_momentum(momentum) -> bool:
    """`momentum` is a Python float in ``[0, 1]``."""
    return type(momentum) is float and 0.0 <= momentum <= 1.0


def fast_running_stats(rm, rv, c: int, training: bool) -> bool:
    """Both running statistics are plain, distinct NumPy float arrays of length `c`
    (writable in training) that own their memory (so cannot overlap); or both are None."""
    if rm is None:
        return rv is None
    if not (type(rm) is np.ndarray and type(rv) is np.ndarray and rm is not rv
            and rm.shape == (c,) and rv.shape == (c,) and rm.dtype in v.FLOAT_DTYPES
            and rv.dtype in v.FLOAT_DTYPES):
        return False
    f, g = rm.flags, rv.flags
    return f.owndata and g.owndata and (not training or (f.writeable and g.writeable))
