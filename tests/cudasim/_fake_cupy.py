"""A stand-in for the few CuPy calls the GPU backends make, on NumPy memory (tests only).

Used to run the backends' host code without a GPU: the CUDA C kernels through the CPU
emulation (test_cuda_c_emulated.py), the numba.cuda kernels through Numba's simulator.
"""

from __future__ import annotations

import types

import numpy as np


class FakeDevice:
    id = 0
    attributes = {"MultiProcessorCount": 2}  # a tiny GPU: small grids, several splits

    def __init__(self, device_id=0):
        assert device_id == 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class FakeArray(np.ndarray):
    """A NumPy array that answers like a cupy.ndarray where the backend asks."""

    @property
    def device(self):
        return FakeDevice(0)

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])


def to_fake(a):
    return np.ascontiguousarray(a).view(FakeArray)


def make_fake_cupy(raw_module=None):
    """A module object named ``cupy`` with ``empty``, ``empty_like``, ``cuda.Device``,
    ``cuda.get_current_stream`` (the legacy default stream, pointer 0) and, if given,
    ``RawModule``."""
    cp = types.ModuleType("cupy")
    cp.empty = lambda shape, dtype: np.empty(shape, dtype).view(FakeArray)
    cp.empty_like = lambda a: np.empty_like(np.asarray(a)).view(FakeArray)
    cp.ndarray = FakeArray
    if raw_module is not None:
        cp.RawModule = raw_module
    cp.cuda = types.SimpleNamespace(
        Device=FakeDevice, get_current_stream=lambda: types.SimpleNamespace(ptr=0))
    return cp
