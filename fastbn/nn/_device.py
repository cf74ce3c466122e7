"""Pick the array module (NumPy or CuPy) once, from a device name; move results home."""

from __future__ import annotations

from .._device import DEVICES, array_module

__all__ = ["DEVICES", "array_module", "to_host"]


def to_host(a):
    """Return `a` as a NumPy array (a no-op for NumPy arrays; copies CuPy arrays)."""
    get = getattr(a, "get", None)
    if get is not None and type(a).__module__.partition(".")[0] == "cupy":
        return get()
    return a
