"""The ``"cupy"`` backend: CUDA C kernels compiled with NVRTC through ``cupy.RawModule``.

The kernels live in ``fastbn/kernels/batchnorm.cu`` (shipped with the package and read
with :mod:`importlib.resources`). The source is compiled once per (device, dtype) and
cached; every launch goes to CuPy's current stream (``cupy.cuda.get_current_stream()``),
and every temporary is allocated from CuPy's memory pool on that stream, so a call is
asynchronous like any CuPy operation and nothing is copied to the host.

The functions follow the backend contract documented in :mod:`fastbn.backends`
(C-contiguous ``(A, C, B)`` arrays, no validation here). They run on the device that
holds ``x3`` (made current for the call); the caller guarantees that every array of a
call lives on that device.
"""

from __future__ import annotations

import functools
from importlib import resources

import numpy as np

from fastbn.backends import _cuda_shim, is_bfloat16, stats_dtype  # stats_dtype: the shared rule

__all__ = ["name", "dtypes", "available", "stats_dtype", "forward_train", "forward_eval",
           "backward"]

name = "cupy"
#: also ml_dtypes.bfloat16 (not listed: see the contract in :mod:`fastbn.backends`)
dtypes = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

#: value of the FASTBN_DTYPE macro of batchnorm.cu for each input dtype
_DTYPE_CODE = {np.dtype(np.float16): 0, np.dtype(np.float32): 1, np.dtype(np.float64): 2}
#: FASTBN_DTYPE of bfloat16 data (the kernels' __nv_bfloat16, with float32 statistics)
_BF16_CODE = 3


def _dtype_code(dtype) -> int:
    dtype = np.dtype(dtype)
    code = _DTYPE_CODE.get(dtype)
    if code is None and is_bfloat16(dtype):
        return _BF16_CODE
    return code

_KERNEL_NAMES = (
    "bn_stats_cf", "bn_stats_cl4", "bn_stats_cl1", "bn_stats_finalize", "bn_eval_prep",
    "bn_apply_cf", "bn_apply_cl4", "bn_apply_cl1", "bn_bwd_reduce_cf", "bn_bwd_reduce_cl4",
    "bn_bwd_reduce_cl1", "bn_bwd_finalize", "bn_bwd_apply_cf", "bn_bwd_apply_cl4",
    "bn_bwd_apply_cl1",
)

#: channels per block of the finalize kernels (one warp per channel)
_FINALIZE_WARPS = 8


def __getattr__(attr):
    # ``xp`` is the cupy module, imported only when asked for.
    if attr == "xp":
        import cupy

        return cupy
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def available() -> tuple[bool, str]:
    """Whether CuPy and a CUDA device are usable here.

    Returns
    -------
    (bool, str)
        ``(True, "ok")``, or ``(False, reason)`` with a readable reason such as
        ``"cupy is not installed"`` or ``"no CUDA device"``.
    """
    try:
        import cupy
    except ImportError as exc:
        return False, f"cupy is not installed ({exc})"
    except Exception as exc:  # noqa: BLE001 - a broken CuPy install must not break fastbn
        return False, f"cupy cannot be imported ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - CUDARuntimeError without a driver/device
        return False, f"no CUDA device ({type(exc).__name__}: {exc})"
    if count < 1:
        return False, "no CUDA device"
    return True, "ok"


def kernel_source() -> str:
    """Return the CUDA C source of the kernels (``fastbn/kernels/batchnorm.cu``).

    Returns
    -------
    str
    """
    return resources.files("fastbn").joinpath("kernels", "batchnorm.cu").read_text("utf-8")


@functools.cache
def _kernels(device_id: int, dtype_code: int) -> dict:
    """Compile the kernels for one (device, dtype) and return them by name (cached)."""
    import cupy

    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(
            code=kernel_source(),
            options=("-std=c++17", f"-DFASTBN_DTYPE={dtype_code}"),
        )
        module.compile()
        return {k: module.get_function(k) for k in _KERNEL_NAMES}


@functools.cache
def _num_sms(device_id: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


def _setup(x3, *others):
    """Kernels, plan and scalar types for a call on `x3` (plus the other data arrays)."""
    device_id = x3.device.id
    kernels = _kernels(device_id, _dtype_code(x3.dtype))
    A, C, B = (int(s) for s in x3.shape)
    p = _cuda_shim.plan(A, C, B, x3.dtype.itemsize, _num_sms(device_id),
                        tuple(int(a.data.ptr) for a in (x3, *others)))
    return kernels, p


def _reduce_args_cf(p):
    return (np.int64(p.A), np.int32(p.C), np.int64(p.B), np.int32(p.bch), np.int64(p.nbc),
            np.int32(p.vec))


def _finalize_launch(C):
    return (-(-C // _FINALIZE_WARPS),), (32, _FINALIZE_WARPS)


def forward_train(x3, weight, bias, eps):
    """Training-mode forward pass on the GPU; see :mod:`fastbn.backends` for the contract.

    Parameters
    ----------
    x3 : cupy.ndarray
        C-contiguous ``(A, C, B)`` input (float16, bfloat16, float32 or float64).
    weight, bias : cupy.ndarray
        Length-``C`` parameters of dtype ``stats_dtype(x3.dtype)``.
    eps : float
        Added to the variance.

    Returns
    -------
    y3, mean, var, invstd : cupy.ndarray
        Output like `x3`; per-channel mean, biased variance and ``1/sqrt(var + eps)``
        (0 where ``var + eps == 0``).
    """
    with x3.device:
        return _forward_train(x3, weight, bias, eps)


def _forward_train(x3, weight, bias, eps):
    import cupy

    sd = stats_dtype(x3.dtype)
    A, C, B = x3.shape
    y3 = cupy.empty_like(x3)
    mean = cupy.empty(C, sd)
    var = cupy.empty(C, sd)
    invstd = cupy.empty(C, sd)
    if x3.size == 0:
        return y3, mean, var, invstd
    k, p = _setup(x3, y3)
    pmean = cupy.empty((p.S, p.cols), sd)
    pm2 = cupy.empty((p.S, p.cols), sd)
    pn = cupy.empty((p.S, p.cols), np.int32)
    alpha = cupy.empty(C, sd)
    if p.family == "cf":
        k["bn_stats_cf"](p.grid_reduce, p.threads, (x3, *_reduce_args_cf(p), pmean, pm2, pn))
    else:
        kern = k["bn_stats_cl4" if p.vec == 4 else "bn_stats_cl1"]
        kern(p.grid_reduce, p.threads, (x3, np.int64(p.A), np.int32(p.cols), pmean, pm2, pn))
    grid, block = _finalize_launch(C)
    k["bn_stats_finalize"](grid, block, (pmean, pm2, pn, np.int32(p.S), np.int32(C),
                                         np.int32(p.G), np.float64(eps), weight, mean, var,
                                         invstd, alpha))
    _apply(k, p, x3, y3, mean, alpha, bias)
    return y3, mean, var, invstd


def _apply(k, p, x3, y3, mean, alpha, beta):
    if p.family == "cf":
        k["bn_apply_cf"](p.grid_apply, p.threads, (x3, y3, *_reduce_args_cf(p), mean, alpha, beta))
    else:
        kern = k["bn_apply_cl4" if p.vec == 4 else "bn_apply_cl1"]
        kern(p.grid_apply, p.threads, (x3, y3, np.int64(p.A), np.int32(p.cols), np.int32(p.G),
                                       mean, alpha, beta))


def forward_eval(x3, mean, var, weight, bias, eps):
    """Evaluation-mode forward pass with given statistics (the running ones).

    Parameters
    ----------
    x3 : cupy.ndarray
        C-contiguous ``(A, C, B)`` input.
    mean, var, weight, bias : cupy.ndarray
        Length-``C`` arrays of dtype ``stats_dtype(x3.dtype)``.
    eps : float
        Added to the variance.

    Returns
    -------
    y3 : cupy.ndarray
        ``(x3 - mean) / sqrt(var + eps) * weight + bias`` in ``x3.dtype``.
    """
    with x3.device:
        return _forward_eval(x3, mean, var, weight, bias, eps)


def _forward_eval(x3, mean, var, weight, bias, eps):
    import cupy

    sd = stats_dtype(x3.dtype)
    C = x3.shape[1]
    y3 = cupy.empty_like(x3)
    if x3.size == 0:
        return y3
    k, p = _setup(x3, y3)
    alpha = cupy.empty(C, sd)
    k["bn_eval_prep"]((-(-C // 256),), (256,), (var, weight, np.int32(C), np.float64(eps), alpha))
    _apply(k, p, x3, y3, mean, alpha, bias)
    return y3


def backward(dy3, x3, mean, invstd, weight):
    """Gradient of the training-mode forward pass.

    Parameters
    ----------
    dy3, x3 : cupy.ndarray
        C-contiguous ``(A, C, B)`` upstream gradient and forward input (same dtype).
    mean, invstd : cupy.ndarray
        The statistics saved by :func:`forward_train`.
    weight : cupy.ndarray
        Length-``C`` weight.

    Returns
    -------
    dx3, dweight, dbias : cupy.ndarray
        ``dx3`` like `x3`; ``dweight = sum(dy * xhat)``, ``dbias = sum(dy)`` of dtype
        ``stats_dtype(x3.dtype)``.
    """
    with x3.device:
        return _backward(dy3, x3, mean, invstd, weight)


def _backward(dy3, x3, mean, invstd, weight):
    import cupy

    sd = stats_dtype(x3.dtype)
    A, C, B = x3.shape
    dx3 = cupy.empty_like(x3)
    dweight = cupy.empty(C, sd)
    dbias = cupy.empty(C, sd)
    if x3.size == 0:
        return dx3, dweight, dbias
    k, p = _setup(x3, dy3, dx3)
    ps1 = cupy.empty((p.S, p.cols), sd)
    ps2 = cupy.empty((p.S, p.cols), sd)
    k1 = cupy.empty(C, sd)
    k2 = cupy.empty(C, sd)
    k3 = cupy.empty(C, sd)
    if p.family == "cf":
        k["bn_bwd_reduce_cf"](p.grid_reduce, p.threads,
                              (dy3, x3, *_reduce_args_cf(p), mean, ps1, ps2))
    else:
        kern = k["bn_bwd_reduce_cl4" if p.vec == 4 else "bn_bwd_reduce_cl1"]
        kern(p.grid_reduce, p.threads, (dy3, x3, np.int64(p.A), np.int32(p.cols), np.int32(p.G),
                                        mean, ps1, ps2))
    grid, block = _finalize_launch(C)
    k["bn_bwd_finalize"](grid, block, (ps1, ps2, np.int32(p.S), np.int32(C), np.int32(p.G),
                                       np.float64(p.A * p.B), invstd, weight, dweight, dbias,
                                       k1, k2, k3))
    if p.family == "cf":
        k["bn_bwd_apply_cf"](p.grid_apply, p.threads,
                             (dy3, x3, dx3, *_reduce_args_cf(p), mean, k1, k2, k3))
    else:
        kern = k["bn_bwd_apply_cl4" if p.vec == 4 else "bn_bwd_apply_cl1"]
        kern(p.grid_apply, p.threads, (dy3, x3, dx3, np.int64(p.A), np.int32(p.cols),
                                       np.int32(p.G), mean, k1, k2, k3))
    return dx3, dweight, dbias
