"""The steps every public function runs: validate x and pick its backend, view it
canonically, call the backend's kernels, restore the caller's layout, hand the results back
as the caller's kind of array, write state last.

Each public function is one call of :func:`run` with an :class:`Op`: the operation's hooks
(its layout, the roles of its array arguments, the checks of its scalars, the kernel and
what the results are). Everything else is here, once: the dispatch of an array to a
backend (with the default backend per array library remembered), the dtype checks of x
against what the backend takes, the checks of the other arrays by role, the per-feature
arrays as contiguous arrays of the statistics dtype (constants cached for None), empty
inputs, the restoring and wrapping of results, and the small-call fast path.

The operations are :mod:`fastbn.batchnorm` (batch norm) and :mod:`fastbn.rownorm` (layer
norm and RMS norm); the layouts are :mod:`fastbn._layout`'s.
"""

from __future__ import annotations

import warnings

import numpy as np

from . import _validation as v
from . import backends as _backends

__all__ = ["LIKE", "PARAM", "RUNNING", "SAVED", "Arg", "Op", "fast_backend", "kernel", "param",
           "prepare", "run", "select_backend", "stats_dtype"]


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
_FLOATS = v.FLOAT_DTYPES


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
            return _constant(default, c, sd)
        return be.xp.full(c, default, dtype=sd)
    if arr.dtype == sd and arr.flags.c_contiguous:
        return arr
    return be.xp.ascontiguousarray(arr, dtype=sd)


def _constant(default: float, c: int, sd):
    """A cached length-`c` NumPy array of `default`s of dtype `sd` (never written)."""
    key = (default, c, sd)
    const = _host_constants.get(key)
    if const is None:
        if len(_host_constants) > 256:
            _host_constants.clear()
        const = _host_constants[key] = np.full(c, default, dtype=sd)
    return const


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


# --------------------------------------------------------------------------- operations
#: Roles of an operation's array arguments (:class:`Arg`).
#: PARAM: optional, shape ``param_shape`` (weight, bias); None means the default constant.
#: SAVED: required statistics of the forward, shape ``stat_shape`` (mean, invstd, rstd).
#: LIKE: x's shape (dy); viewed as x is.
#: RUNNING: the pair ``(running_mean, running_var)``, per feature; written in place last
#: when the Arg says ``write``, else read (converted like PARAM).
PARAM, SAVED, LIKE, RUNNING = "param", "saved", "like", "running"


class Arg:
    """One array argument of an operation.

    Parameters
    ----------
    name : str or tuple of str
        Its name (a pair for ``RUNNING``).
    role : str
        :data:`PARAM`, :data:`SAVED`, :data:`LIKE` or :data:`RUNNING`.
    default : float or str, optional
        PARAM: the constant None stands for. SAVED: the function whose results it must be
        (named in the error for None).
    write : bool, optional
        RUNNING: updated in place (training) rather than read.
    missing : str or None, optional
        RUNNING: the ValueError's message when the pair is None (required), else None.
    """

    __slots__ = ("default", "missing", "name", "role", "write")

    def __init__(self, name, role, default=0.0, *, write=False, missing=None):
        self.name, self.role, self.default = name, role, default
        self.write, self.missing = write, missing


class Op:
    """One call of one operation as :func:`run` runs it: the operation's hooks.

    Parameters
    ----------
    kernel : str
        The backend function that computes it (a backend without it raises a TypeError).
    layout : type
        :class:`fastbn._layout.FeatureAxis` or :class:`fastbn._layout.Rows`: the shape
        argument's check, the canonical view and the way back.
    arrays : tuple of Arg
        The array arguments besides x, in the order they are checked.
    scalars : tuple of callables
        A checker per scalar argument, ``check(value) -> value``, in order (a ValueError
        or TypeError naming the argument for a bad value).
    outputs : str
        What the results are, a letter each: ``"d"`` data (x's shape, restored to x's
        layout), ``"s"`` statistics (``stat_shape``), ``"g"`` gradients of the per-feature
        arrays (``param_shape``). Results beyond these are dropped.
    compute : callable, optional
        ``compute(fn, be, xv, arrays, scalars) -> results`` on the canonical view `xv`
        (`fn` the kernel, `be` the backend, `arrays` as the kernels take them: PARAM and
        SAVED as contiguous 1-d arrays of the statistics dtype, LIKE as views like `xv`,
        RUNNING as the pair). The default calls ``fn(*likes, xv, *others, *scalars)``
        (the LIKE arrays must come first).
    check : callable, optional
        ``check(shape, geometry)``: a further check of x, after the scalars.
    grads_need : int or None, optional
        The index (in `arrays`) of the weight whose None means no ``"g"`` results (None
        each; torch's row norms), or None.
    """

    def __init__(self, kernel, layout, *, arrays=(), scalars=(), outputs, compute=None,
                 check=None, grads_need=None):
        self.kernel, self.layout, self.arrays, self.scalars = kernel, layout, arrays, scalars
        self.outputs, self.check, self.grads_need = outputs, check, grads_need
        self._nlike = sum(1 for a in arrays if a.role == LIKE)
        self._custom = compute is not None
        self.compute = compute if compute is not None else self._call
        #: the fast path's source (see :func:`_fast_path`) and the function compiled from it
        self.fast_source = _fast_path(self)
        namespace = dict(_FAST_NAMES, layout_fast=layout.fast, check=check,
                         compute=self.compute, **{f"scalar{i}": f for i, f in enumerate(scalars)})
        exec(compile(self.fast_source, f"<fast path of {kernel}>", "exec"), namespace)
        self.fast = namespace["fast"]

    def _call(self, fn, be, xv, arrays, scalars):
        k = self._nlike
        return fn(*arrays[:k], xv, *arrays[k:], *scalars)


# --------------------------------------------------------------------------- the fast path
# Small tensors spend as long in argument checks as in the kernel. run() first tries the
# op's fast path: a plain, C-contiguous, non-empty NumPy x of a dtype its backend is known
# to take (fast_backend), a layout argument the layout's fast() recognizes, and every other
# array passing its role's predicate: PARAM None, or a plain NumPy float array of exactly
# param_shape; SAVED the same of stat_shape; LIKE a C-contiguous NumPy array of x's shape
# and dtype; RUNNING both None, or plain, distinct NumPy float arrays of param_shape that
# own their memory (so cannot overlap), writable where written. Anything else, valid or
# not, takes the general path, which does the full validation and raises the errors: the
# fast path accepts a subset of what the general path accepts and computes the same thing
# (dtype conversions as param() makes them). The scalars and the op's check are the
# general path's, in the same order (each has a fast first line for valid input).

#: a fast path's answer when the call must take the general path
_SLOW = object()


def _fast_path(op) -> str:
    """The source of `op`'s fast path: ``fast(x, arg, backend, arrays, scalars)``.

    Straight-line code generated from the op's declaration (as :mod:`dataclasses` writes an
    ``__init__``): the fast path is measured in hundreds of nanoseconds, and a loop over the
    arguments' roles cost as much again as the checks themselves (measured: 1.5-2 µs more on
    a (64, 128) batch norm, 20-30 %). It returns the results, or ``_SLOW`` for any input it
    does not take (see the comment above); ``Op.fast_source`` holds the text.
    """
    flat = op.layout.flat
    code = ["def fast(x, arg, backend, arrays, scalars):",
            "    be = fast_backend(x, backend)",
            f"    fn = None if be is None else getattr(be, {op.kernel!r}, None)",
            "    f = None if fn is None else layout_fast(x, arg)",
            "    if f is None:",
            "        return SLOW",
            "    xv, geom = f"]
    code += [f"    s{i} = scalar{i}(scalars[{i}])" for i in range(len(op.scalars))]
    if op.check is not None:
        code.append("    check(x.shape, geom)")
    code.append("    sd = stats_dtype(be, x.dtype)")
    for i, a in enumerate(op.arrays):
        p = f"a{i}"
        code.append(f"    {p} = arrays[{i}]")
        if a.role == PARAM or a.role == SAVED:
            shape = "geom[0]" if a.role == PARAM else "geom[1]"
            if a.role == PARAM:
                code += [f"    if {p} is None:",
                         f"        {p} = constant({a.default!r}, geom[2], sd)",
                         f"    elif type({p}) is ndarray and {p}.shape == {shape} and "
                         f"{p}.dtype in FLOATS:"]
            else:
                code.append(f"    if type({p}) is ndarray and {p}.shape == {shape} and "
                            f"{p}.dtype in FLOATS:")
            if not flat:
                code.append(f"        {p} = {p}.reshape(-1)")
            code += [f"        if {p}.dtype != sd or not {p}.flags.c_contiguous:",
                     f"            {p} = ascontiguousarray({p}, dtype=sd)",
                     "    else:",
                     "        return SLOW"]
        elif a.role == LIKE:
            code += [f"    if type({p}) is ndarray and {p}.shape == x.shape and "
                     f"{p}.dtype == x.dtype and {p}.flags.c_contiguous:",
                     f"        {p} = {p}.reshape(xv.shape)",
                     "    else:",
                     "        return SLOW"]
        else:  # RUNNING's predicate (see above); read ones converted as PARAM
            m, v = f"{p}m", f"{p}v"
            code += [f"    {m}, {v} = {p}",
                     f"    if {m} is None:",
                     "        return SLOW" if a.missing is not None else
                     f"        if {v} is not None:\n            return SLOW",
                     f"    elif (type({m}) is ndarray and type({v}) is ndarray and {m} is not {v}"
                     f" and {m}.shape == geom[0] and {v}.shape == geom[0]"
                     f" and {m}.dtype in FLOATS and {v}.dtype in FLOATS):",
                     f"        {m}f, {v}f = {m}.flags, {v}.flags",
                     f"        if not ({m}f.owndata and {v}f.owndata"
                     + (f" and {m}f.writeable and {v}f.writeable" if a.write else "") + "):",
                     "            return SLOW"]
            if not a.write:
                code += [f"        {p} = ({m} if {m}.dtype == sd and {m}f.c_contiguous else "
                         f"ascontiguousarray({m}, dtype=sd),",
                         f"              {v} if {v}.dtype == sd and {v}f.c_contiguous else "
                         f"ascontiguousarray({v}, dtype=sd))"]
            code += ["    else:",
                     "        return SLOW"]
    names = [f"a{i}" for i in range(len(op.arrays))]
    scal = [f"s{i}" for i in range(len(op.scalars))]
    if op._custom:
        code.append(f"    o = compute(fn, be, xv, ({', '.join(names)},), ({', '.join(scal)},))")
    else:
        k = op._nlike
        code.append(f"    o = fn({', '.join(names[:k] + ['xv'] + names[k:] + scal)})")
    results = []
    for j, kind in enumerate(op.outputs):
        if kind == "d":
            results.append(f"o[{j}].reshape(x.shape)")
            continue
        shape = "geom[1]" if kind == "s" else "geom[0]"
        r = f"o[{j}]" if flat else f"o[{j}].reshape({shape})"
        if kind == "g" and op.grads_need is not None:
            r = f"(None if arrays[{op.grads_need}] is None else {r})"
        results.append(r)
    code.append(f"    return {results[0]}" if len(results) == 1 else
                f"    return ({', '.join(results)})")
    return "\n".join(code) + "\n"


#: what the generated fast paths refer to
_FAST_NAMES = dict(SLOW=_SLOW, fast_backend=fast_backend, stats_dtype=stats_dtype,
                   constant=_constant, ndarray=np.ndarray, FLOATS=_FLOATS,
                   ascontiguousarray=np.ascontiguousarray)


def run(op, x, arg, backend, arrays=(), scalars=()):
    """Run `op` on `x`: the whole pipeline, once.

    Validate x and pick its backend; check the shape argument `arg` (``axis``,
    ``normalized_shape``), the scalars and the other arrays; view x canonically; compute;
    restore the caller's layout and wrap the results as x's kind of array. State (running
    statistics) is written by the computation after its kernels succeeded; nothing is
    written when a check fails.

    Parameters
    ----------
    op : Op
        The operation's hooks.
    x : array
        The data.
    arg : object
        The layout's shape argument.
    backend : str or None
        As the public functions take it.
    arrays : tuple
        The array arguments, in ``op.arrays`` order (a RUNNING one as a pair).
    scalars : tuple
        The scalar arguments, in ``op.scalars`` order.

    Returns
    -------
    array or tuple of arrays
        The results ``op.outputs`` describes: one alone, several as a tuple.
    """
    if type(x) is np.ndarray:
        out = op.fast(x, arg, backend, arrays, scalars)
        if out is not _SLOW:
            return out
    layout = op.layout
    arr, lib, wrap_as, be = prepare(x, backend, layout.min_ndim)
    geom = layout.check(arg, arr)
    sc = [check(s) for check, s in zip(op.scalars, scalars)]
    if op.check is not None:
        op.check(arr.shape, geom)
    checked = _check_arrays(op.arrays, arrays, arr, lib, geom, layout.what)
    fn = kernel(be, op.kernel)
    sd = stats_dtype(be, arr.dtype)
    xp = be.xp
    if arr.size == 0:
        outs = [layout.empty(arr, xp) if k == "d" else
                xp.full(geom[1], np.nan, dtype=sd) if k == "s" else xp.zeros(geom[0], dtype=sd)
                for k in op.outputs]
        return _finish(op, outs, geom, None, checked, wrap_as)
    xv, info = layout.view(arr, geom, xp)
    args = _kernel_arrays(op.arrays, checked, be, sd, geom, xv, info, layout, xp)
    return _finish(op, op.compute(fn, be, xv, args, sc), geom, info, checked, wrap_as)


def _check_arrays(specs, values, arr, lib, geom, what):
    """The array arguments validated (the general path): a list in `specs` order."""
    out = []
    for spec, val in zip(specs, values):
        role = spec.role
        if role == PARAM:
            out.append(v.check_shaped(spec.name, val, geom[0], lib, arr, what=what))
        elif role == SAVED:
            out.append(v.check_saved(spec.name, val, geom[1], spec.default, lib, arr, what=what))
        elif role == LIKE:
            out.append(v.check_like_x(spec.name, val, arr, lib))
        else:
            rm, rv = v.check_running_stats(val[0], val[1], geom[2], lib, arr, training=spec.write)
            if rm is None and spec.missing is not None:
                raise ValueError(spec.missing)
            out.append((rm, rv))
    return out


def _kernel_arrays(specs, values, be, sd, geom, xv, info, layout, xp):
    """The array arguments as the kernels take them (see :class:`Op`)."""
    out = []
    n = geom[2]
    for spec, val in zip(specs, values):
        role = spec.role
        if role == PARAM:
            if val is not None and val.ndim != 1:
                val = val.reshape(-1)
            out.append(param(val, spec.default, n, be, sd))
        elif role == SAVED:
            out.append(param(val if val.ndim == 1 else val.reshape(-1), 0.0, 0, be, sd))
        elif role == LIKE:
            if val.dtype != xv.dtype:
                val = val.astype(xv.dtype)
            out.append(layout.like(val, xv, info, xp))
        elif spec.write or val[0] is None:
            out.append(val)
        else:
            out.append((param(val[0], 0.0, n, be, sd), param(val[1], 1.0, n, be, sd)))
    return out


def _finish(op, outs, geom, info, arrays, wrap_as):
    """The results in the caller's shapes (`info` None: already so) and kind of array."""
    res = []
    no_grads = op.grads_need is not None and arrays[op.grads_need] is None
    for kind, o in zip(op.outputs, outs):
        if kind == "d":
            if info is not None:
                o = op.layout.restore(o, info)
        elif kind == "g" and no_grads:
            res.append(None)
            continue
        else:
            shape = geom[1] if kind == "s" else geom[0]
            if o.shape != shape:
                o = o.reshape(shape)
        res.append(o if wrap_as is None else wrap_as(o))
    return res[0] if len(res) == 1 else tuple(res)

