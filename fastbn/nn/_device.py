"""Pick the array module (NumPy or CuPy) once, from a device name."""

from __future__ import annotations

import importlib

__all__ = ["DEVICES", "array_module", "to_host"]

#: the devices a model can live on.
DEVICES = ("cpu", "gpu")


def array_module(device: str):
    """Return the array namespace for `device`.

    Parameters
    ----------
    device : {"cpu", "gpu"}
        ``"cpu"`` gives :mod:`numpy` (fastbn's Numba kernels), ``"gpu"`` gives :mod:`cupy`
        (fastbn's CUDA kernels).

    Returns
    -------
    module
        :mod:`numpy` or :mod:`cupy`.

    Raises
    ------
    ValueError
        If `device` is not one of :data:`DEVICES`.
    RuntimeError
        If ``device="gpu"`` but CuPy cannot be imported or sees no GPU.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {list(DEVICES)}, got {device!r}")
    if device == "cpu":
        return importlib.import_module("numpy")
    try:
        cupy = importlib.import_module("cupy")
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise RuntimeError(
            f"device 'gpu' needs CuPy and a CUDA GPU ({type(exc).__name__}: {exc})"
        ) from None
    if count < 1:
        raise RuntimeError("device 'gpu' needs a CUDA GPU, but CuPy sees none")
    return cupy


def to_host(a):
    """Return `a` as a NumPy array (a no-op for NumPy arrays; copies CuPy arrays)."""
    get = getattr(a, "get", None)
    if get is not None and type(a).__module__.partition(".")[0] == "cupy":
        return get()
    return a
