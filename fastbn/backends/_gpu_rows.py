"""Host side of the GPU layer norm and RMS norm, shared by the ``cupy`` and ``numba-cuda`` backends.

The CUDA C kernels (``fastbn/kernels/rownorm.cu``) and the numba.cuda kernels
(:func:`fastbn.backends.numba_cuda.row_kernels`) have the same names, argument lists (every
integer 64-bit) and launch plan, so one host code runs both. A backend hands it a
:class:`fastbn.backends._cuda_shim.Launcher`: how to allocate, how to pass an array to a
kernel, how to launch a kernel by name, and the device's size. Nothing here validates: the arrays follow the backend
contract of :mod:`fastbn.backends` (C-contiguous ``(R, N)`` data, ``R, N >= 1``, length-``N``
parameters and length-``R`` statistics of dtype ``stats_dtype(x2.dtype)``).
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from fastbn.backends import stats_dtype
from fastbn.backends._cuda_shim import Launcher

__all__ = ["RowPlan", "entry_points", "row_plan", "layer_norm_forward", "layer_norm_backward",
           "rms_norm_forward", "rms_norm_backward"]

#: resident threads per SM aimed at by the row kernels' grid (the sm_80/sm_90 limit)
_THREADS_PER_SM = 2048
#: blocks per SM aimed at by the column-partials kernel (as the batch-norm reductions)
_COL_BLOCKS_PER_SM = 8
_MAX_GRID_Y = 65535


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class RowPlan:
    """How one row-norm call is cut into blocks.

    Attributes
    ----------
    threads : int
        Threads per block of the row kernels (a power of two): about four vector loads
        (four values each where the kernels vectorize) per thread and row.
    grid : int
        Blocks of the row kernels, at most one wave of resident blocks; each grid-strides
        over the rows.
    vec_ok : int
        1 if the vector path may be used (every data pointer congruent modulo the vector
        size), else 0.
    col_block, col_grid : tuple of int
        Block ``(BX, BY)`` and grid ``(ceil(N / BX), S)`` of the column-partials kernel.
    S : int
        Splits of the rows in the column partials (rows of the partial-sum workspace).
    """

    threads: int
    grid: int
    vec_ok: int
    col_block: tuple
    col_grid: tuple
    S: int


def row_plan(R: int, N: int, itemsize: int, num_sms: int, pointers: tuple = (), *,
             max_threads: int = 256, vectorize: bool = True) -> RowPlan:
    """Choose block and grid shapes for an ``(R, N)`` row normalization.

    Parameters
    ----------
    R, N : int
        Rows and row length (both >= 1).
    itemsize : int
        Bytes per data element.
    num_sms : int
        Streaming multiprocessors of the device.
    pointers : tuple of int
        Device addresses of the data arrays of the call (the vector path needs them
        congruent modulo ``4 * itemsize``).
    max_threads : int, optional
        Most threads per block (a power of two; small for the CUDA simulator).
    vectorize : bool, optional
        Whether the kernels have vector paths (the CUDA C kernels do, numba.cuda's do not).

    Returns
    -------
    RowPlan

    Raises
    ------
    ValueError
        If ``N >= 2**31`` (the kernels index inside a row with 32-bit integers).
    """
    if N >= 2**31:
        raise ValueError(f"rows too long for the GPU kernels: {N} values (at most 2**31 - 1)")
    vec = 4 if vectorize else 1
    threads = max(min(32, max_threads), min(max_threads, _next_pow2(_ceil_div(N, 4 * vec))))
    grid = max(1, min(R, num_sms * max(1, _THREADS_PER_SM // threads), 2**31 - 1))
    vec_ok = int(vectorize and len({p % (vec * itemsize) for p in pointers}) <= 1)
    bx = min(32, max_threads, _next_pow2(N))
    by = max(1, max_threads // bx)
    gx = _ceil_div(N, bx)
    S = max(1, min(_ceil_div(R, by), _ceil_div(_COL_BLOCKS_PER_SM * num_sms, gx), _MAX_GRID_Y))
    return RowPlan(threads, grid, vec_ok, (bx, by), (gx, S), S)


_I = np.int64


def _plan(L: Launcher, x2, *others) -> RowPlan:
    R, N = (int(s) for s in x2.shape)
    ptrs = tuple(L.ptr(a) for a in (x2, *others)) if L.vectorize else ()
    return row_plan(R, N, x2.dtype.itemsize, L.num_sms, ptrs, max_threads=L.max_threads(),
                    vectorize=L.vectorize)


def layer_norm_forward(L: Launcher, x2, weight, bias, eps):
    """``(y2, mean, rstd)`` of the rows of `x2`; see :mod:`fastbn.backends`."""
    R, N = (int(s) for s in x2.shape)
    sd = stats_dtype(x2.dtype)
    y2 = L.empty_like(x2)
    mean, rstd = L.empty((R,), sd), L.empty((R,), sd)
    p = _plan(L, x2, y2)
    L.kernel("ln_forward")((p.grid,), (p.threads,), (
        L.data(x2), L.data(y2), _I(R), _I(N), _I(p.vec_ok), L.arr(weight), L.arr(bias),
        sd.type(eps), L.arr(mean), L.arr(rstd)))
    return y2, mean, rstd


def rms_norm_forward(L: Launcher, x2, weight, eps):
    """``(y2, rstd)`` of the rows of `x2`; see :mod:`fastbn.backends`."""
    R, N = (int(s) for s in x2.shape)
    sd = stats_dtype(x2.dtype)
    y2 = L.empty_like(x2)
    rstd = L.empty((R,), sd)
    p = _plan(L, x2, y2)
    L.kernel("rms_forward")((p.grid,), (p.threads,), (
        L.data(x2), L.data(y2), _I(R), _I(N), _I(p.vec_ok), L.arr(weight), sd.type(eps),
        L.arr(rstd)))
    return y2, rstd


def _column_sums(L: Launcher, p: RowPlan, name: str, args: tuple, N: int, sd, k: int):
    """Launch the column-partials kernel `name` and add its ``k`` partial sums up."""
    parts = [L.empty((p.S * N,), sd) for _ in range(k)]
    outs = [L.empty((N,), sd) for _ in range(k)]
    L.kernel(name)(p.col_grid, p.col_block, args + tuple(L.arr(a) for a in parts))
    t = min(256, L.max_threads())
    for a, o in zip(parts, outs):
        L.kernel("row_cols_finalize")((_ceil_div(N, t),), (t,), (L.arr(a), _I(p.S), _I(N), L.arr(o)))
    return outs


def layer_norm_backward(L: Launcher, dy2, x2, mean, rstd, weight):
    """``(dx2, dweight, dbias)``; see :mod:`fastbn.backends`."""
    R, N = (int(s) for s in x2.shape)
    dx2 = L.empty_like(x2)
    p = _plan(L, x2, dy2, dx2)
    dyk, xk, wm, wr = L.data(dy2), L.data(x2), L.arr(mean), L.arr(rstd)
    L.kernel("ln_backward")((p.grid,), (p.threads,), (
        dyk, xk, L.data(dx2), _I(R), _I(N), _I(p.vec_ok), wm, wr, L.arr(weight)))
    dweight, dbias = _column_sums(L, p, "ln_backward_cols", (dyk, xk, _I(R), _I(N), wm, wr),
                                  N, stats_dtype(x2.dtype), 2)
    return dx2, dweight, dbias


def rms_norm_backward(L: Launcher, dy2, x2, rstd, weight):
    """``(dx2, dweight)``; see :mod:`fastbn.backends`."""
    R, N = (int(s) for s in x2.shape)
    dx2 = L.empty_like(x2)
    p = _plan(L, x2, dy2, dx2)
    dyk, xk, wr = L.data(dy2), L.data(x2), L.arr(rstd)
    L.kernel("rms_backward")((p.grid,), (p.threads,), (
        dyk, xk, L.data(dx2), _I(R), _I(N), _I(p.vec_ok), wr, L.arr(weight)))
    (dweight,) = _column_sums(L, p, "rms_backward_cols", (dyk, xk, _I(R), _I(N), wr), N,
                              stats_dtype(x2.dtype), 1)
    return dx2, dweight


def entry_points(run):
    """The backend contract's four row functions for a GPU backend.

    Parameters
    ----------
    run : callable
        ``run(op, x2, *args)`` calls ``op(launcher, *args)`` on the device holding `x2`, with
        the backend's launcher for the row kernels (``op`` is one of this module's host
        functions).

    Returns
    -------
    tuple of callable
        ``(layer_norm_forward, layer_norm_backward, rms_norm_forward, rms_norm_backward)``
        with the contract's signatures (see :mod:`fastbn.backends`).
    """

    def layer_norm_forward_(x2, weight, bias, eps):
        """Layer norm of each row of `x2`; see :mod:`fastbn.backends` for the contract.

        Parameters
        ----------
        x2 : cupy.ndarray
            C-contiguous ``(R, N)`` input, ``R, N >= 1``.
        weight, bias : cupy.ndarray
            Length-``N`` parameters of dtype ``stats_dtype(x2.dtype)``.
        eps : float
            Added to the variance.

        Returns
        -------
        y2, mean, rstd : cupy.ndarray
        """
        return run(layer_norm_forward, x2, x2, weight, bias, eps)

    def layer_norm_backward_(dy2, x2, mean, rstd, weight):
        """Gradients of :func:`layer_norm_forward`.

        Parameters
        ----------
        dy2, x2 : cupy.ndarray
            C-contiguous ``(R, N)`` upstream gradient and forward input.
        mean, rstd : cupy.ndarray
            Length-``R`` statistics of the forward.
        weight : cupy.ndarray
            Length-``N`` weight.

        Returns
        -------
        dx2, dweight, dbias : cupy.ndarray
        """
        return run(layer_norm_backward, x2, dy2, x2, mean, rstd, weight)

    def rms_norm_forward_(x2, weight, eps):
        """RMS norm of each row of `x2`: ``y2 = x2 * rstd * weight``.

        Parameters
        ----------
        x2 : cupy.ndarray
            C-contiguous ``(R, N)`` input.
        weight : cupy.ndarray
            Length-``N`` weight.
        eps : float
            Added to the mean square.

        Returns
        -------
        y2, rstd : cupy.ndarray
        """
        return run(rms_norm_forward, x2, x2, weight, eps)

    def rms_norm_backward_(dy2, x2, rstd, weight):
        """Gradients of :func:`rms_norm_forward`.

        Parameters
        ----------
        dy2, x2 : cupy.ndarray
            C-contiguous ``(R, N)`` upstream gradient and forward input.
        rstd : cupy.ndarray
            Length-``R`` statistics of the forward.
        weight : cupy.ndarray
            Length-``N`` weight.

        Returns
        -------
        dx2, dweight : cupy.ndarray
        """
        return run(rms_norm_backward, x2, dy2, x2, rstd, weight)

    fns = (layer_norm_forward_, layer_norm_backward_, rms_norm_forward_, rms_norm_backward_)
    for f in fns:
        f.__name__ = f.__qualname__ = f.__name__.rstrip("_")
    return fns
