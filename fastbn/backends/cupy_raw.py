"""The ``"cupy"`` backend: CUDA C kernels compiled with NVRTC through ``cupy.RawModule``.

The kernels live in ``fastbn/kernels/`` (shipped with the package and read with
:mod:`importlib.resources`): one ``.cu`` file per op family (``batchnorm.cu``,
``rownorm.cu``) on shared headers (``common.cuh``, ``reduce.cuh``). A source is compiled
once per (device, dtype, file) and cached; every launch goes to CuPy's current stream
(``cupy.cuda.get_current_stream()``), and every temporary is allocated from CuPy's memory
pool on that stream, so a call is asynchronous like any CuPy operation and nothing is
copied to the host. The host code that plans and launches the kernels is shared with the
``numba-cuda`` backend (:mod:`fastbn.backends._gpu_batchnorm`,
:mod:`fastbn.backends._gpu_rows`); this module supplies the launcher.

The functions follow the backend contract documented in :mod:`fastbn.backends`
(C-contiguous ``(A, C, B)`` arrays, no validation here). They run on the device that
holds ``x3`` (made current for the call); the caller guarantees that every array of a
call lives on that device.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

import numpy as np

# stats_dtype: the shared rule, re-exported as this backend's
from fastbn.backends import _cuda_shim, _gpu_batchnorm, _gpu_rows, is_bfloat16, stats_dtype

__all__ = ["name", "dtypes", "available", "stats_dtype", "forward_train", "forward_eval",
           "backward", "layer_norm_forward", "layer_norm_backward", "rms_norm_forward",
           "rms_norm_backward", "kernel_source"]

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

#: kernels of fastbn/kernels/rownorm.cu (launched by fastbn.backends._gpu_rows)
_ROW_KERNEL_NAMES = (
    "ln_forward", "rms_forward", "ln_backward", "rms_backward", "ln_backward_cols",
    "rms_backward_cols", "row_cols_finalize",
)
#: kernel names of each source file
KERNELS = {"batchnorm.cu": _KERNEL_NAMES, "rownorm.cu": _ROW_KERNEL_NAMES}


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


_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_]+\.cuh)"[ \t]*$', re.MULTILINE)


def kernel_source(name: str = "batchnorm.cu") -> str:
    """Return the CUDA C source of one kernel file, its ``#include "*.cuh"`` lines inlined.

    NVRTC (through ``cupy.RawModule``) compiles a string with no include path of its own;
    inlining the package's headers here makes the string complete, and makes it change
    (so CuPy's compile cache misses) whenever a header changes. Each header is inlined
    once, where it is first included.

    Parameters
    ----------
    name : str, optional
        A file of ``fastbn/kernels`` (a key of :data:`KERNELS`).

    Returns
    -------
    str
    """
    root = resources.files("fastbn").joinpath("kernels")
    seen: set[str] = set()

    def expand(text: str) -> str:
        def one(m):
            header = m.group(1)
            if header in seen:
                return f"// {header}: already included"
            seen.add(header)
            body = root.joinpath(header).read_text("utf-8").replace("#pragma once\n", "")
            return f"// ---- {header} ----\n{expand(body)}// ---- end of {header} ----"

        return _INCLUDE.sub(one, text)

    return expand(root.joinpath(name).read_text("utf-8"))


@functools.cache
def _kernels(device_id: int, dtype_code: int, source: str = "batchnorm.cu") -> dict:
    """Compile one kernel file for one (device, dtype); its kernels by name (cached)."""
    import cupy

    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(
            code=kernel_source(source),
            options=("-std=c++17", f"-DFASTBN_DTYPE={dtype_code}"),
        )
        module.compile()
        return {k: module.get_function(k) for k in KERNELS[source]}


@functools.cache
def _num_sms(device_id: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


def _launcher(x, source: str) -> _cuda_shim.Launcher:
    """The launcher of the kernels of `source` for data like `x`, on x's device."""
    import cupy

    device_id = x.device.id
    k = _kernels(device_id, _dtype_code(x.dtype), source)
    return _cuda_shim.Launcher(
        empty=cupy.empty, empty_like=cupy.empty_like, data=_same, arr=_same,
        kernel=k.__getitem__, i32=np.int32, num_sms=_num_sms(device_id), plan_kw={},
        vectorize=True, ptr=_ptr)


def _same(a):
    return a


def _ptr(a) -> int:
    return int(a.data.ptr)


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
        return _gpu_batchnorm.forward_train(_launcher(x3, "batchnorm.cu"), x3, weight, bias,
                                            eps)


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
        return _gpu_batchnorm.forward_eval(_launcher(x3, "batchnorm.cu"), x3, mean, var,
                                           weight, bias, eps)


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
        return _gpu_batchnorm.backward(_launcher(x3, "batchnorm.cu"), dy3, x3, mean, invstd,
                                       weight)


# ----------------------------------------------------------------------------------------
# layer norm and RMS norm
# ----------------------------------------------------------------------------------------


def _run_rows(op, x2, *args):
    with x2.device:
        return op(_launcher(x2, "rownorm.cu"), *args)


layer_norm_forward, layer_norm_backward, rms_norm_forward, rms_norm_backward = (
    _gpu_rows.entry_points(_run_rows))
