"""A cache of large output buffers for the CPU kernels.

Why: a fresh multi-megabyte NumPy array is mapped from the operating system page by page
on first touch, and the kernel zeroes every page before handing it over. On the reference
machine a fresh 51 MB output costs about 4 ms of page faults, more than the batch norm
itself (about 3.5 ms for a memcpy of the same tensor). Training repeats the same shapes
every step, so the outputs of one step can back the outputs of the next, as PyTorch's CUDA
caching allocator does for GPU memory.

How: outputs of at least :data:`MIN_BYTES` are views of byte buffers that the cache keeps
(*tracks*). A buffer is reused only when no array refers to it any more: every view of a
NumPy array keeps a reference to the array that owns the memory, and every export of its
memory (``memoryview``, DLPack, ``torch.from_numpy``, ctypes, arrays built on it) keeps a
reference to the array exported, so the buffer's reference count tells whether any result
is alive. Only buffers of exactly the requested size (in bytes) are reused. Results
backed by the cache look like any NumPy array, except that they do not own their memory
(``y.flags.owndata`` is False, ``y.base`` is the cached buffer). A raw address (``y.ctypes.data``,
``y.__array_interface__``) holds no reference: memory reached only through one may be
reused, as it may be freed for any NumPy array.

Policy:

* **Admission.** A size is cached only once it has come back: the first
  :data:`ADMIT_AFTER` requests of a size are served by a plain :func:`numpy.empty`,
  untracked, so their memory returns to the system as soon as the result dies. The
  sizes of the last :data:`SIZES_REMEMBERED` distinct requests that found no free buffer
  are remembered with their number of requests (least recent forgotten first); a size
  that has a tracked buffer is admitted without them. A training step asks for each
  shape twice (forward output, backward output), so two requests do not yet show that a
  shape recurs; the third (the next step's forward) does. The trade-off: a training loop
  is served from the cache from its third step on instead of its second, and every size
  pays its first two requests in page faults (as without a cache); in exchange, shapes
  that never come back (inference on varying shapes, or one forward and backward per
  shape) keep no memory at all.
* **Limit.** The tracked buffers hold at most ``limit`` bytes in all, free or in use
  (default 1 GiB, environment variable ``FASTBN_CACHE_BYTES``; 0 turns the cache off).
  A new buffer that does not fit evicts free buffers, least recently used first; if the
  buffers in use alone leave no room, the request is served untracked. Lowering the limit
  (:func:`set_cache_limit`) releases free buffers and stops tracking buffers in use beyond
  the new limit, least recently used first, so their memory returns to the system when
  the last array using them dies, without a further call.

Limits of the policy: a size requested three times or more and then never again (e.g.
several layers of the same shape in a training step on a shape that does not recur) keeps
its buffers, as free memory, until the limit evicts them, :func:`empty_cache` releases
them, or :func:`set_cache_limit` lowers the limit. Sizes are matched exactly: shapes that
vary a little from batch to batch never reuse each other's buffers. Reuse depends on
reference counts; where they cannot be trusted (checked once at import) the cache stays
off.

Threads: one lock guards the cache (results are handed out and evicted under it); a child
process created by :func:`os.fork` gets a new lock.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import warnings

import numpy as np

__all__ = [
    "ADMIT_AFTER",
    "MIN_BYTES",
    "SIZES_REMEMBERED",
    "cache_info",
    "empty",
    "empty_cache",
    "set_cache_limit",
]

#: Outputs smaller than this come from :func:`numpy.empty` (the heap serves them without
#: page faults).
MIN_BYTES = 1 << 20

#: Requests of a size served untracked before that size is cached: a training step asks
#: for each shape twice (forward and backward output), the next step's forward is the third.
ADMIT_AFTER = 2

#: How many distinct sizes the admission remembers (least recently requested forgotten
#: first). More than the distinct large shapes of a training step of usual networks; a
#: size that has a tracked buffer is admitted whether remembered or not.
SIZES_REMEMBERED = 64

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
# Tracked 1-d uint8 buffers, least recently handed out first. Their total is at most the
# limit at all times (set_cache_limit untracks what no longer fits).
_bufs: list = []
# Sizes (bytes) of recent requests not served from the cache -> how many there were, least
# recent first. A hit needs no entry: a buffer of its size is tracked.
_sizes: dict = {}
_state = {
    "limit": _limit_from_env() if _FREE is not None else 0,
    "hits": 0,
    "misses": 0,
    "uncached": 0,
}


def _reset_lock_after_fork():
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_after_fork)


def empty(shape, dtype):
    """An uninitialized array, backed by a cached buffer when it is large.

    Requests of at least :data:`MIN_BYTES` are served from a free cached buffer of the
    same size when there is one; else by a new buffer that the cache tracks, when the size
    has come back (requested :data:`ADMIT_AFTER` times before, or a buffer of it is in
    use) and fits under the limit; else by a plain :func:`numpy.empty`. See the module
    docstring for the policy.

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
    if nbytes < MIN_BYTES or nbytes > _state["limit"]:
        return np.empty(shape, dtype)
    with _lock:
        limit = _state["limit"]  # again: set_cache_limit may have run since
        if nbytes > limit:
            return np.empty(shape, dtype)
        bufs = _bufs
        known = False  # whether a buffer of this size is tracked (and in use)
        for i in range(len(bufs) - 1, -1, -1):  # most recently used first
            if bufs[i].nbytes == nbytes:
                if sys.getrefcount(bufs[i]) == _FREE:
                    buf = bufs.pop(i)
                    bufs.append(buf)
                    _state["hits"] += 1
                    return buf.view(dtype).reshape(shape)
                known = True
        _state["misses"] += 1
        sizes = _sizes
        seen = sizes.pop(nbytes, 0)
        sizes[nbytes] = seen + 1  # now the most recently requested
        if len(sizes) > SIZES_REMEMBERED:
            del sizes[next(iter(sizes))]
        if (known or seen >= ADMIT_AFTER) and _evict_to(limit - nbytes) + nbytes <= limit:
            buf = np.empty(nbytes, np.uint8)
            bufs.append(buf)
            return buf.view(dtype).reshape(shape)
        _state["uncached"] += 1
        return np.empty(shape, dtype)


def empty_cache():
    """Release the cached output buffers that no array uses any more.

    Buffers still backing live results stay tracked and are reused once those results are
    gone. The sizes remembered for admission are kept.

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

    Free buffers beyond the new limit are released now, least recently used first. If the
    buffers still in use exceed it, those used least recently stop being tracked: their
    memory returns to the system when the last array using them dies.

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
    nbytes = int(nbytes)
    with _lock:
        old = _state["limit"]
        _state["limit"] = nbytes
        if _evict_to(nbytes) > nbytes:
            _untrack_to(nbytes)
    return old


def _evict_to(budget):
    """Drop free buffers, least recently used first, until the cache holds at most
    `budget` bytes or only buffers in use; return the bytes it holds. Call with the lock
    held."""
    bufs = _bufs
    total = sum(b.nbytes for b in bufs)
    i = 0
    while total > budget and i < len(bufs):
        if sys.getrefcount(bufs[i]) == _FREE:
            total -= bufs.pop(i).nbytes
        else:
            i += 1
    return total


def _untrack_to(budget):
    """Stop tracking buffers, least recently used first, until the cache holds at most
    `budget` bytes; a buffer still in use is freed with the last array using it. Call with
    the lock held."""
    bufs = _bufs
    total = sum(b.nbytes for b in bufs)
    while total > budget:
        total -= bufs.pop(0).nbytes


def cache_info():
    """Statistics of the output-buffer cache.

    Returns
    -------
    dict
        ``limit`` (bytes), ``cached_bytes`` (all buffers tracked), ``in_use_bytes`` (those
        backing live arrays), ``buffers`` (their number), and, counting the requests of at
        least :data:`MIN_BYTES` and at most the limit since import, ``hits`` (served from
        a free cached buffer), ``misses`` (not), and ``uncached`` (misses served by a plain
        :func:`numpy.empty`, not tracked: first requests of a size, or no room under the
        limit).
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
            "uncached": _state["uncached"],
        }
