"""Shared pieces of the GPU backends: the launch plan and the one ``numba.cuda`` import.

Every ``numba.cuda`` import of the package goes through :func:`numba_cuda_module`, so
that the choice of provider (the ``numba-cuda`` package, which replaces the deprecated
``numba.cuda`` built into Numba) lives in one place and nothing imports it eagerly:
``import fastbn`` must work with only NumPy and Numba installed.

The launch plan (:func:`plan`) is pure Python and is used by both GPU backends
(``cupy`` and ``numba-cuda``), so both cut the work the same way. It is documented in
``docs/gpu.md`` and in ``fastbn/kernels/batchnorm.cu``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["GpuPlan", "Launcher", "plan", "numba_cuda_module", "numba_cuda_unavailable_reason",
           "device_function_decorator", "simulator_enabled", "quiet_low_occupancy_warnings"]

#: Threads per block of every data kernel (the .cu kernels are compiled with
#: ``__launch_bounds__(256)`` and size their shared memory for it).
MAX_THREADS = 256
#: Channels-first tensors whose rows (B) are shorter than this use the channels-last
#: kernels with ``G = B`` columns per channel: a block of threads sweeping rows of a few
#: dozen values would leave most of its threads idle.
SMALL_B = 256
#: Longest piece of one row handled as a unit by the channels-first kernels.
MAX_TILE = 8192
#: Resident blocks per SM aimed at by the reductions (8 x 256 threads = 2048 threads,
#: the per-SM limit on sm_80/sm_90).
BLOCKS_PER_SM = 8
#: Grid y and z are limited to 65535 by CUDA; the kernels loop over the rest.
MAX_GRID_Y = 65535
#: Bound on the values reduced by one block, so 32-bit per-block counts cannot overflow.
MAX_PER_BLOCK = 1 << 30


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class GpuPlan:
    """How one call is cut into blocks (see ``fastbn/kernels/batchnorm.cu``).

    Attributes
    ----------
    family : str
        ``"cf"`` (channels-first: B >= ``SMALL_B``) or ``"cl"`` (channels-last, used
        for B == 1 and for small B with ``G = B`` columns per channel).
    A, C, B : int
        The canonical shape.
    cols, G : int
        Columns of the partial-result workspace and columns per channel
        (``cols = C * G``; ``G = 1`` for the channels-first family).
    S : int
        Number of splits of the reduced axis (rows of the partial-result workspace).
    threads : tuple of int
        Block shape of the reduction and elementwise kernels.
    grid_reduce, grid_apply : tuple of int
        Grid shapes of the reduction and elementwise kernels.
    bch, nbc : int
        Channels-first only: tile length and number of tiles per row.
    vec : int
        Channels-first: 1 if the vector path may be used (all pointers congruent
        modulo the vector size), else 0. Channels-last: columns per thread (4 or 1).
    """

    family: str
    A: int
    C: int
    B: int
    cols: int
    G: int
    S: int
    threads: tuple
    grid_reduce: tuple
    grid_apply: tuple
    bch: int
    nbc: int
    vec: int


def plan(
    A: int,
    C: int,
    B: int,
    itemsize: int,
    num_sms: int,
    pointers: tuple = (),
    *,
    max_threads: int = MAX_THREADS,
    max_tile: int = MAX_TILE,
    vectorize: bool = True,
) -> GpuPlan:
    """Choose the kernel family, block and grid shapes for an ``(A, C, B)`` problem.

    Parameters
    ----------
    A, C, B : int
        Canonical shape (``A * B >= 1``, ``C >= 1``).
    itemsize : int
        Bytes per element of the data.
    num_sms : int
        Number of streaming multiprocessors of the device.
    pointers : tuple of int
        Device addresses of every data array the kernels touch (x, y, dy, dx); the
        vector paths are used only when their alignment allows.
    max_threads : int, optional
        Threads per block (a power of two, 32..256); smaller values are for the CUDA
        simulator.
    max_tile : int, optional
        Rows longer than ``2 * max_tile`` are cut into tiles of ``max_tile`` values
        (small values let the simulator tests exercise the tiling).
    vectorize : bool, optional
        Whether the kernels have vector paths (the CUDA C kernels do, the numba.cuda
        kernels do not).

    Returns
    -------
    GpuPlan
    """
    vbytes = 4 * itemsize
    target = max(1, BLOCKS_PER_SM * num_sms)
    if B >= SMALL_B or C * B >= 2**31:
        bch = B if B <= 2 * max_tile else max_tile
        nbc = _ceil_div(B, bch)
        ntiles = A * nbc
        S = min(ntiles, max(_ceil_div(target, C), _ceil_div(ntiles * bch, MAX_PER_BLOCK)))
        S = max(1, min(S, 2**31 - 1))
        # enough threads for two vector loads each over one tile, at least a warp
        threads = max(32, min(max_threads, _next_pow2(_ceil_div(bch, 8))))
        if A * C * nbc >= 2**31:
            # the kernels count tiles (rows of at least SMALL_B values) in 32 bits
            raise ValueError(f"tensor too large for the GPU kernels: {A * C * nbc} row tiles "
                             "(at most 2**31 - 1)")
        vec_ok = int(vectorize and len({p % vbytes for p in pointers}) <= 1)
        grid_apply = (max(1, min(A * C * nbc, 32 * num_sms)),)
        return GpuPlan("cf", A, C, B, C, 1, S, (threads,), (S, min(C, MAX_GRID_Y)), grid_apply,
                       bch, nbc, vec_ok)
    G = B
    cols = C * G
    vec = 4 if vectorize and cols % 4 == 0 and all(p % vbytes == 0 for p in pointers) else 1
    cv = _ceil_div(cols, vec)
    bx = min(32, _next_pow2(cv), max_threads)
    by = max_threads // bx
    gx = _ceil_div(cv, bx)
    row_groups = _ceil_div(A, by)
    S = max(_ceil_div(target, gx), _ceil_div(A, MAX_PER_BLOCK))
    S = max(1, min(S, row_groups, MAX_GRID_Y))
    return GpuPlan("cl", A, C, B, cols, G, S, (bx, by), (gx, S), (gx, S), 0, 0, vec)


@dataclass(frozen=True)
class Launcher:
    """What the GPU host code shared by both backends needs from a backend for one call.

    The ``cupy`` and ``numba-cuda`` kernels of each op have the same names and argument
    lists, so one host code per op (:mod:`fastbn.backends._gpu_batchnorm`,
    :mod:`fastbn.backends._gpu_rows`) plans and launches either through this.

    Attributes
    ----------
    empty, empty_like : callable
        ``empty(shape, dtype)`` allocates a device array on the call's device;
        ``empty_like(a)`` one like the data array ``a`` (CuPy keeps bfloat16 data as an
        ``ml_dtypes.bfloat16`` view, which ``empty_like`` preserves).
    data, arr : callable
        Turn a data array (``x2``, ``dy2``, outputs like them) or a parameter/statistics
        array into a kernel argument.
    kernel : callable
        ``kernel(name)(grid, block, args)`` launches the kernel ``name`` on the call's
        stream with the tuple of arguments (arrays from ``data``/``arr``; scalars as
        ``numpy.int64``, ``numpy.float64``, a statistics-dtype scalar, or ``i32``'s).
    i32 : callable
        A scalar for a parameter the CUDA C kernels declare ``int``: ``numpy.int32`` for
        them, ``numpy.int64`` for the numba.cuda kernels (whose index arithmetic must not
        be typed 32-bit).
    num_sms : int
        Streaming multiprocessors of the device.
    plan_kw : dict
        Extra keywords of the launch plans (``max_threads``, ``max_tile``: small values
        for the CUDA simulator).
    vectorize : bool
        Whether the kernels have vector paths.
    ptr : callable
        Device address of an array (for the alignment check of the vector path).
    """

    empty: Callable[..., Any]
    empty_like: Callable[[Any], Any]
    data: Callable[[Any], Any]
    arr: Callable[[Any], Any]
    kernel: Callable[[str], Callable]
    i32: Callable[[int], Any]
    num_sms: int
    plan_kw: dict
    vectorize: bool
    ptr: Callable[[Any], int]

    def max_threads(self) -> int:
        """The most threads per block of this launch (``MAX_THREADS`` unless shrunk)."""
        return self.plan_kw.get("max_threads", MAX_THREADS)


# ----------------------------------------------------------------------------------------
# numba.cuda
# ----------------------------------------------------------------------------------------


@functools.cache
def _import_numba_cuda():
    # The numba-cuda package installs itself as the provider of ``numba.cuda`` (and
    # as ``numba_cuda``); prefer it, and fall back to the copy built into older Numba.
    try:
        import numba_cuda  # noqa: F401  (presence check: the maintained provider)
    except ImportError:
        pass
    from numba import cuda

    return cuda


def numba_cuda_module():
    """Return the ``numba.cuda`` module (imported on first use).

    Returns
    -------
    module
        ``numba.cuda``, provided by the ``numba-cuda`` package where installed.

    Raises
    ------
    ImportError
        If neither the ``numba-cuda`` package nor Numba's built-in CUDA target can be
        imported.
    """
    return _import_numba_cuda()


def device_function_decorator():
    """Return the decorator for device helpers called from the numba.cuda kernels.

    The helpers are inlined into their callers at the Numba IR level
    (``inline="always"``). Besides saving calls, this lets ``numba.cuda.compile_ptx``
    compile the kernels on machines without a GPU: a separately compiled device
    function asks the driver for the current device's compute capability. Under the
    simulator, helpers are plain Python functions.

    Returns
    -------
    callable
    """
    if simulator_enabled():
        return lambda fn: fn
    cuda = numba_cuda_module()
    return cuda.jit(device=True, inline="always")


@contextlib.contextmanager
def quiet_low_occupancy_warnings():
    """Silence numba.cuda's warning about grids of fewer than 128 blocks.

    The per-channel finalize kernels are small by design (one warp per channel); the
    warning would otherwise be raised on every call.
    """
    numba_cuda_module()
    try:
        from numba.cuda.core.errors import NumbaPerformanceWarning
    except ImportError:  # older providers of numba.cuda
        from numba.core.errors import NumbaPerformanceWarning
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Grid size", category=NumbaPerformanceWarning)
        yield


def simulator_enabled() -> bool:
    """Whether Numba's CUDA simulator is switched on (``NUMBA_ENABLE_CUDASIM=1``)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def numba_cuda_unavailable_reason() -> str | None:
    """Why numba.cuda kernels cannot run on a real GPU here, or ``None`` if they can.

    Returns
    -------
    str or None
        A readable reason (``"numba-cuda is not installed"``, ``"no CUDA device"``,
        ...), or ``None`` when a CUDA device is usable.
    """
    if simulator_enabled():
        return "the CUDA simulator is enabled (NUMBA_ENABLE_CUDASIM=1): no real device"
    try:
        cuda = numba_cuda_module()
    except ImportError as exc:
        return f"numba-cuda is not installed ({exc})"
    try:
        if not cuda.is_available():
            return "no CUDA device (numba.cuda.is_available() is False)"
    except Exception as exc:  # noqa: BLE001 - a broken driver must not break fastbn
        return f"no CUDA device ({type(exc).__name__}: {exc})"
    return None
