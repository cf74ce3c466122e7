"""The array module (NumPy or CuPy) of a device name: one rule for the layers and the
trainer."""

from __future__ import annotations

import importlib

__all__ = ["DEVICES", "array_module"]

#: the devices a layer or a model can live on.
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
    TypeError
        If `device` is not a string.
    ValueError
        If `device` is not one of :data:`DEVICES`.
    RuntimeError
        If ``device="gpu"`` but CuPy cannot be imported or sees no GPU.
    """
    if not isinstance(device, str):
        raise TypeError(f"device must be 'cpu' or 'gpu', got {type(device).__name__}")
    if device == "cpu":
        return importlib.import_module("numpy")
    if device != "gpu":
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
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
