"""A cache of large output buffers for the CPU kernels.

Why: a fresh multi-megabyte NumPy array is mapped from the operating system page by page
on first touch, and the kernel zeroes every page before handing it over. On the reference
machine a fresh 51 MB output costs about 4 ms of page faults, more than the batch norm
itself (about 3.5 ms for a memcpy of the same tensor). Training repeats the same shapes
every step, so the outputs of one step can back the outputs of the next, as PyTorch's CUDA
caching allocator does for GPU memory.

How: outputs of at least :data:`MIN_BYTES` are views of byte buffers that the cache keeps.
A buffer is reused only when no array refers to it any more: every view of a NumPy array
keeps a reference to the array that owns the memory, so the buffer's reference count
tells whether any result (or a slice of one, or a tensor sharing its memory) is alive.
Only buffers of exactly the requested size are reused. The cache holds at most
``limit`` bytes (default 1 GiB, environment variable ``FASTBN_CACHE_BYTES``); free
buffers are evicted least recently used first, and a request that does not fit is served
by a plain :func:`numpy.empty`. Results look like any NumPy array, except that they do
not own their memory (``y.flags.owndata`` is False, ``y.base`` is the cached buffer).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import warnings

import numpy as np

__all__ = ["MIN_BYTES", "cache_info", "empty", "empty_cache", "set_cache_limit"]

#: Outputs smaller than this come from :func:`numpy.empty` (the heap serves them without
#: page faults).
MIN_BYTES = 1 << 20

_DEFAULT_LIMIT = 1 << 30


def _limit_from_env() -> int:
    raw = os.environ.get("FASTBN_CACHE_BYTES")
    if raw is None or raw.strip() == "":
        return _DEFAULT_LIMIT
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        warnings.warn(
            f"FASTBN_CACHE_BYTES must be a non-negative integer number of bytes, got {raw!r}; "
            f"using the default {_DEFAULT_LIMIT}",
            RuntimeWarning,
            stacklevel=2,
        )
        return _DEFAULT_LIMIT
    return value


def _free_refcount():
    """Reference count of a cached buffer nobody else holds, as seen by :func:`empty`,
    or None when reference counts cannot tell (then the cache stays off)."""
    probe = [np.empty(16, np.uint8)]
    free = sys.getrefcount(probe[0])
    view = probe[0].view(np.float32).reshape(2, 2)
    if sys.getrefcount(probe[0]) != free + 1 or view.base is not probe[0]:
        return None
    del view
    if sys.getrefcount(probe[0]) != free:
        return None
    return free


_FREE = _free_refcount()
_lock = threading.Lock()
_bufs: list = []  # 1-d uint8 buffers, least recently used first
_state = {"limit": _limit_from_env() if _FREE is not None else 0, "hits": 0, "misses": 0}


def _reset_lock_after_fork():
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_after_fork)


def empty(shape, dtype):
    """An uninitialized array, backed by a cached buffer when it is large.

    Parameters
    ----------
    shape : tuple of int
        Shape of the array.
    dtype : numpy.dtype
        Its dtype.

    Returns
    -------
    numpy.ndarray
        C-contiguous array of `shape` and `dtype`; its content is undefined.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    limit = _state["limit"]
    if nbytes < MIN_BYTES or nbytes > limit:
        return np.empty(shape, dtype)
    with _lock:
        bufs = _bufs
        for i in range(len(bufs) - 1, -1, -1):  # most recently used first
            if bufs[i].nbytes == nbytes and sys.getrefcount(bufs[i]) == _FREE:
                buf = bufs.pop(i)
                bufs.append(buf)
                _state["hits"] += 1
                return buf.view(dtype).reshape(shape)
        _state["misses"] += 1
        total = _evict_to(limit - nbytes)
        if total + nbytes > limit:
            return np.empty(shape, dtype)
        buf = np.empty(nbytes, np.uint8)
        bufs.append(buf)
        return buf.view(dtype).reshape(shape)


def empty_cache():
    """Release the cached output buffers that no array uses any more.

    Buffers still backing live results stay tracked and are reused once those results are
    gone.

    Returns
    -------
    int
        Number of bytes released.
    """
    with _lock:
        before = sum(b.nbytes for b in _bufs)
        return before - _evict_to(0)


def set_cache_limit(nbytes):
    """Set how many bytes of output buffers the CPU backend may keep for reuse.

    Parameters
    ----------
    nbytes : int
        The limit in bytes; 0 turns the cache off (every output is a fresh
        :func:`numpy.empty`). The default is 1 GiB, or the environment variable
        ``FASTBN_CACHE_BYTES`` when set.

    Returns
    -------
    int
        The previous limit.

    Raises
    ------
    TypeError
        If `nbytes` is not an integer.
    ValueError
        If `nbytes` is negative.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)):
        raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if _FREE is None and nbytes > 0:
        return 0  # reference counts cannot tell free buffers here: the cache stays off
    with _lock:
        old = _state["limit"]
        _state["limit"] = int(nbytes)
        _evict_to(int(nbytes))
    return old


def _evict_to(budget):
    """Drop free buffers, least recently used first, until the cache holds at most
    `budget` bytes or only buffers in use; return the bytes it holds. Call with the lock
    held."""
    total = sum(b.nbytes for b in _bufs)
    i = 0
    while total > budget and i < len(_bufs):
        if sys.getrefcount(_bufs[i]) == _FREE:
            total -= _bufs.pop(i).nbytes
        else:
            i += 1
    return total


def cache_info():
    """Statistics of the output-buffer cache.

    Returns
    -------
    dict
        ``limit`` (bytes), ``cached_bytes`` (all buffers held), ``in_use_bytes`` (those
        backing live arrays), ``buffers`` (their number), ``hits`` and ``misses`` (requests
        of at least :data:`MIN_BYTES` served from the cache, or not, since import).
    """
    with _lock:
        sizes = [b.nbytes for b in _bufs]
        used = [b.nbytes for b in _bufs if sys.getrefcount(b) > _FREE + 1]
        return {
            "limit": _state["limit"],
            "cached_bytes": sum(sizes),
            "in_use_bytes": sum(used),
            "buffers": len(sizes),
            "hits": _state["hits"],
            "misses": _state["misses"],
        }
