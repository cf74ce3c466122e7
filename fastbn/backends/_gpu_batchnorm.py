"""Host side of the GPU batch norm, shared by the ``cupy`` and ``numba-cuda`` backends.

The CUDA C kernels (``fastbn/kernels/batchnorm.cu``) and the numba.cuda kernels
(:func:`fastbn.backends.numba_cuda.kernels`) have the same names and argument lists; the
numba.cuda ones take the ``vec_ok`` flag and ignore it (scalar loads), and have one
channels-last kernel each, registered under the ``..._cl1`` name (the plan never asks them
for the 4-column variants: ``vectorize=False``). A backend hands these functions a
:class:`fastbn.backends._cuda_shim.Launcher`. Nothing here validates: the arrays follow the
backend contract of :mod:`fastbn.backends`. Workspaces are 1-d, ``S * cols`` long.
"""

from __future__ import annotations

import numpy as np

from fastbn.backends import _cuda_shim, stats_dtype
from fastbn.backends._cuda_shim import Launcher

__all__ = ["forward_train", "forward_eval", "backward"]

#: channels per block of the finalize kernels (one warp per channel)
_FINALIZE_WARPS = 8

_I = np.int64
_F = np.float64


def _plan(L: Launcher, x3, *others) -> _cuda_shim.GpuPlan:
    A, C, B = (int(s) for s in x3.shape)
    ptrs = tuple(L.ptr(a) for a in (x3, *others)) if L.vectorize else ()
    return _cuda_shim.plan(A, C, B, x3.dtype.itemsize, L.num_sms, ptrs, vectorize=L.vectorize,
                           **L.plan_kw)


def _cf_args(L: Launcher, p):
    return (_I(p.A), L.i32(p.C), _I(p.B), L.i32(p.bch), _I(p.nbc), L.i32(p.vec))


def _cl(name: str, p) -> str:
    return f"{name}_cl4" if p.vec == 4 else f"{name}_cl1"


def _finalize_launch(C: int):
    return (-(-C // _FINALIZE_WARPS),), (32, _FINALIZE_WARPS)


def forward_train(L: Launcher, x3, weight, bias, eps):
    """``(y3, mean, var, invstd)``; see ``forward_train`` in :mod:`fastbn.backends`."""
    sd = stats_dtype(x3.dtype)
    A, C, B = (int(s) for s in x3.shape)
    y3 = L.empty_like(x3)
    mean, var, invstd = L.empty((C,), sd), L.empty((C,), sd), L.empty((C,), sd)
    if x3.size == 0:
        return y3, mean, var, invstd
    p = _plan(L, x3, y3)
    pmean, pm2 = L.empty((p.S * p.cols,), sd), L.empty((p.S * p.cols,), sd)
    pn = L.empty((p.S * p.cols,), np.int32)
    alpha = L.empty((C,), sd)
    xk, yk = L.data(x3), L.data(y3)
    wpm, wpm2, wpn = L.arr(pmean), L.arr(pm2), L.arr(pn)
    if p.family == "cf":
        L.kernel("bn_stats_cf")(p.grid_reduce, p.threads, (xk, *_cf_args(L, p), wpm, wpm2, wpn))
    else:
        L.kernel(_cl("bn_stats", p))(p.grid_reduce, p.threads,
                                     (xk, _I(A), L.i32(p.cols), wpm, wpm2, wpn))
    grid, block = _finalize_launch(C)
    wmean, walpha = L.arr(mean), L.arr(alpha)
    L.kernel("bn_stats_finalize")(grid, block, (
        wpm, wpm2, wpn, L.i32(p.S), L.i32(C), L.i32(p.G), _F(eps), L.arr(weight), wmean,
        L.arr(var), L.arr(invstd), walpha))
    _apply(L, p, xk, yk, wmean, walpha, L.arr(bias))
    return y3, mean, var, invstd


def _apply(L: Launcher, p, xk, yk, mean, alpha, beta):
    if p.family == "cf":
        L.kernel("bn_apply_cf")(p.grid_apply, p.threads,
                                (xk, yk, *_cf_args(L, p), mean, alpha, beta))
    else:
        L.kernel(_cl("bn_apply", p))(p.grid_apply, p.threads, (
            xk, yk, _I(p.A), L.i32(p.cols), L.i32(p.G), mean, alpha, beta))


def forward_eval(L: Launcher, x3, mean, var, weight, bias, eps):
    """``y3``; see ``forward_eval`` in :mod:`fastbn.backends`."""
    sd = stats_dtype(x3.dtype)
    C = int(x3.shape[1])
    y3 = L.empty_like(x3)
    if x3.size == 0:
        return y3
    p = _plan(L, x3, y3)
    alpha = L.empty((C,), sd)
    walpha = L.arr(alpha)
    t = min(256, L.max_threads())
    L.kernel("bn_eval_prep")((-(-C // t),), (t,), (L.arr(var), L.arr(weight), L.i32(C), _F(eps),
                                                  walpha))
    _apply(L, p, L.data(x3), L.data(y3), L.arr(mean), walpha, L.arr(bias))
    return y3


def backward(L: Launcher, dy3, x3, mean, invstd, weight):
    """``(dx3, dweight, dbias)``; see ``backward`` in :mod:`fastbn.backends`."""
    sd = stats_dtype(x3.dtype)
    A, C, B = (int(s) for s in x3.shape)
    dx3 = L.empty_like(x3)
    dweight, dbias = L.empty((C,), sd), L.empty((C,), sd)
    if x3.size == 0:
        return dx3, dweight, dbias
    p = _plan(L, x3, dy3, dx3)
    ps1, ps2 = L.empty((p.S * p.cols,), sd), L.empty((p.S * p.cols,), sd)
    k1, k2, k3 = L.empty((C,), sd), L.empty((C,), sd), L.empty((C,), sd)
    dyk, xk, dxk = L.data(dy3), L.data(x3), L.data(dx3)
    wmean, wps1, wps2 = L.arr(mean), L.arr(ps1), L.arr(ps2)
    wk = (L.arr(k1), L.arr(k2), L.arr(k3))
    if p.family == "cf":
        L.kernel("bn_bwd_reduce_cf")(p.grid_reduce, p.threads,
                                     (dyk, xk, *_cf_args(L, p), wmean, wps1, wps2))
    else:
        L.kernel(_cl("bn_bwd_reduce", p))(p.grid_reduce, p.threads, (
            dyk, xk, _I(A), L.i32(p.cols), L.i32(p.G), wmean, wps1, wps2))
    grid, block = _finalize_launch(C)
    L.kernel("bn_bwd_finalize")(grid, block, (
        wps1, wps2, L.i32(p.S), L.i32(C), L.i32(p.G), _F(A * B), L.arr(invstd), L.arr(weight),
        L.arr(dweight), L.arr(dbias), *wk))
    if p.family == "cf":
        L.kernel("bn_bwd_apply_cf")(p.grid_apply, p.threads,
                                    (dyk, xk, dxk, *_cf_args(L, p), wmean, *wk))
    else:
        L.kernel(_cl("bn_bwd_apply", p))(p.grid_apply, p.threads, (
            dyk, xk, dxk, _I(p.A), L.i32(p.cols), L.i32(p.G), wmean, *wk))
    return dx3, dweight, dbias
