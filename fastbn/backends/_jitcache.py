"""Numba's on-disk cache of the CPU kernels, made robust.

The CPU kernels are compiled with ``cache=True``: the first process compiles them (seconds)
and later ones load the machine code from ``.nbi``/``.nbc`` files. Two things break that
cache, and neither must break fastbn:

* **No writable cache location** (a read-only install and no writable ``NUMBA_CACHE_DIR``
  or user cache directory). ``@njit(cache=True)`` then raises ``RuntimeError("cannot cache
  function ...")`` as the module is imported, which would disable the CPU backend for the
  whole process. :func:`can_cache` finds this out first; the kernels are then compiled
  without a cache, with one warning.
* **A corrupt cache file** (a truncated ``.nbc``, a garbage ``.nbi``: a full disk, a killed
  process, a copied cache) makes Numba's loader raise (``UnpicklingError``, ``EOFError``,
  ...) on every call, forever. :func:`harden` wraps each dispatcher's loader: a cache entry
  that cannot be read is dropped (its index file is removed, so the next save writes a
  fresh one), the kernel is compiled again and saved over it, and one warning says so. A
  cache that cannot be written is likewise reported once and the compiled kernel used.
"""

from __future__ import annotations

import os
import threading
import warnings

__all__ = ["can_cache", "harden", "source_digest"]

_warned: set = set()
_warn_lock = threading.Lock()


def _warn_once(key: str, message: str) -> None:
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def source_digest() -> str:
    """A digest of the CPU backend's sources (every ``.py`` file of the package).

    Numba keys a cached kernel on its own source file only, so an edit of a module that a
    kernel calls into leaves the kernel's cache entry stale (numba issue 1833). Test and
    benchmark runs put ``NUMBA_CACHE_DIR`` in a folder named by this digest, so that every
    edit of the package compiles afresh and an unchanged package reuses the cache.

    Returns
    -------
    str
        16 hexadecimal digits of the SHA-256 of the files' names and contents.
    """
    import hashlib

    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu")
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            h.update(name.encode())
            with open(os.path.join(folder, name), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()[:16]


def can_cache(probe) -> bool:
    """Whether Numba can cache functions defined in the source file of `probe`.

    Parameters
    ----------
    probe : function
        A plain Python function of the module whose kernels are to be cached.

    Returns
    -------
    bool
        True if Numba finds a writable cache location for that file; False otherwise,
        after warning once.
    """
    from numba.core.caching import FunctionCache

    try:
        FunctionCache(probe)
    except RuntimeError as exc:
        _warn_once(
            "locator",
            f"fastbn: Numba has no writable cache location for the CPU kernels ({exc}); "
            "they are compiled in every process (the first calls take seconds). Set "
            "NUMBA_CACHE_DIR to a writable directory to cache them.",
        )
        return False
    return True


def harden(namespace: dict) -> int:
    """Make the cached Numba dispatchers in `namespace` recover from a bad cache.

    Parameters
    ----------
    namespace : dict
        A module's globals; every dispatcher in it with an on-disk cache is wrapped.

    Returns
    -------
    int
        The number of dispatchers wrapped.
    """
    from numba.core.registry import CPUDispatcher

    n = 0
    for disp in namespace.values():
        cache = getattr(disp, "_cache", None) if isinstance(disp, CPUDispatcher) else None
        if cache is None or not hasattr(cache, "_cache_file") or getattr(cache, "_fastbn", False):
            continue
        _wrap(cache, disp.py_func.__qualname__)
        n += 1
    return n


def _wrap(cache, name: str) -> None:
    load, save = cache.load_overload, cache.save_overload

    def load_overload(sig, target_context):
        try:
            return load(sig, target_context)
        except Exception as exc:  # noqa: BLE001 - any unreadable entry: compile instead
            index = getattr(cache._cache_file, "_index_path", None)
            if index is not None:
                try:
                    os.unlink(index)
                except OSError:
                    pass
            _warn_once(
                "corrupt",
                f"fastbn: a cached CPU kernel ({name}) could not be loaded from Numba's cache "
                f"in {cache.cache_path} ({type(exc).__name__}: {exc}); it is compiled again "
                "and the cache entry rewritten.",
            )
            return None

    def save_overload(sig, data):
        try:
            save(sig, data)
        except Exception as exc:  # noqa: BLE001 - the compiled kernel works without a cache
            cache.disable()
            _warn_once(
                "save",
                f"fastbn: Numba could not write the cache of the CPU kernels in "
                f"{cache.cache_path} ({type(exc).__name__}: {exc}); kernels that cannot be "
                "saved are compiled in every process.",
            )

    cache.load_overload = load_overload
    cache.save_overload = save_overload
    cache._fastbn = True
