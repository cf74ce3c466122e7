"""The output-buffer cache: reuse only of buffers no array refers to, admission of sizes that
come back, limits, memory returned to the system, threads, fork."""

import gc
import os
import threading
import weakref

import numpy as np
import pytest

import fastbn
from fastbn import _buffers

SHAPE = (512, 1024)  # 2 MiB of float32, above MIN_BYTES
assert np.prod(SHAPE) * 4 >= _buffers.MIN_BYTES
NBYTES = int(np.prod(SHAPE)) * 4
MiB = 1 << 20


def _addr(a):
    return a.__array_interface__["data"][0]


def _tracked(a):
    """Whether `a`'s memory is a buffer the cache tracks."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return any(a is b for b in _buffers._bufs)


def _admit(shape=SHAPE, dtype=np.float32):
    """Request `shape` until the cache admits its size: the next request gets a tracked
    buffer."""
    for _ in range(_buffers.ADMIT_AFTER):
        _buffers.empty(shape, dtype)


# a 1 GiB limit and an empty cache and size history for every test (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("fresh_buffer_cache")


# --------------------------------------------------------------------------- reuse


def test_released_buffer_is_reused():
    _admit()
    y = _buffers.empty(SHAPE, np.float32)
    assert _tracked(y)
    addr = _addr(y)
    hits = fastbn.cache_info()["hits"]
    del y
    z = _buffers.empty(SHAPE, np.float32)
    assert _addr(z) == addr
    assert fastbn.cache_info()["hits"] == hits + 1
    assert z.shape == SHAPE and z.dtype == np.float32 and z.flags.c_contiguous


def test_same_bytes_other_dtype_and_shape_reuse():
    _admit()
    y = _buffers.empty(SHAPE, np.float32)
    addr = _addr(y)
    del y
    z = _buffers.empty((SHAPE[0] // 2, SHAPE[1]), np.float64)
    assert _addr(z) == addr and z.dtype == np.float64


@pytest.mark.parametrize(
    "keep",
    [
        lambda y: y,  # the array itself
        lambda y: y[3],  # a view of it
        lambda y: y.T[::2],  # a view of a view
        lambda y: memoryview(y),  # a buffer export
        lambda y: np.frombuffer(y, dtype=np.uint8),  # an array over its buffer
    ],
    ids=["array", "view", "view-of-view", "memoryview", "frombuffer"],
)
def test_buffer_in_use_is_not_reused(keep):
    _admit()
    y = _buffers.empty(SHAPE, np.float32)
    assert _tracked(y)
    y.fill(7.0)
    held = keep(y)
    addr = _addr(y)
    del y
    z = _buffers.empty(SHAPE, np.float32)
    assert _addr(z) != addr
    z.fill(-1.0)
    vals = np.asarray(held)
    if vals.dtype == np.uint8:
        vals = vals.view(np.float32)
    assert vals.size > 0 and np.all(vals == 7.0)


def test_torch_tensor_keeps_buffer_alive():
    torch = pytest.importorskip("torch")
    _admit()
    y = _buffers.empty(SHAPE, np.float32)
    assert _tracked(y)
    y.fill(3.0)
    t = torch.from_numpy(y)
    addr = _addr(y)
    del y
    z = _buffers.empty(SHAPE, np.float32)
    assert _addr(z) != addr
    z.fill(0.0)
    assert bool((t == 3.0).all())


def test_small_requests_bypass_the_cache():
    before = fastbn.cache_info()
    for _ in range(_buffers.ADMIT_AFTER + 1):
        y = _buffers.empty((4, 4), np.float32)
        assert y.flags.owndata
    after = fastbn.cache_info()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])
    assert after["buffers"] == 0


# --------------------------------------------------------------------------- admission


def test_first_requests_of_a_size_are_not_cached():
    before = fastbn.cache_info()
    for _ in range(_buffers.ADMIT_AFTER):
        y = _buffers.empty(SHAPE, np.float32)
        assert y.flags.owndata  # a plain numpy.empty: freed with the result
        del y
    info = fastbn.cache_info()
    assert info["buffers"] == 0
    assert info["uncached"] - before["uncached"] == _buffers.ADMIT_AFTER
    y = _buffers.empty(SHAPE, np.float32)  # the size came back: now cached
    assert _tracked(y) and fastbn.cache_info()["buffers"] == 1


def test_forgotten_size_starts_over_unless_it_has_a_buffer():
    """Sizes are remembered in a list of SIZES_REMEMBERED; a size pushed out of it is
    admitted again only after ADMIT_AFTER requests, unless the cache tracks a buffer of it."""
    other = SHAPE[0] * SHAPE[1] * 4 + 4096

    def forget():  # request SIZES_REMEMBERED other sizes once each (plain numpy.empty)
        for k in range(_buffers.SIZES_REMEMBERED):
            _buffers.empty((other + 4096 * k,), np.uint8)
        assert NBYTES not in _buffers._sizes

    _admit()
    held = _buffers.empty(SHAPE, np.float32)
    forget()
    again = _buffers.empty(SHAPE, np.float32)  # `held` is tracked: the size is known
    assert _tracked(held) and _tracked(again)
    del held, again
    fastbn.empty_cache()
    forget()
    for _ in range(_buffers.ADMIT_AFTER):
        assert not _tracked(_buffers.empty(SHAPE, np.float32))
    assert _tracked(_buffers.empty(SHAPE, np.float32))


@pytest.mark.parametrize("hold_output", [True, False], ids=["output-held", "output-dropped"])
def test_training_loop_is_served_from_the_cache(hold_output):
    """Forward then backward on the same shapes every step: from the third step on (the
    first two requests of a size are not cached) every output comes from the cache, from
    the same buffers."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 8, 32, 64), dtype=np.float32)  # 4 MiB
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    steps = []
    for _ in range(6):
        before = fastbn.cache_info()
        y, mean, invstd = fastbn.batch_norm_forward(x)
        addrs = {_addr(y)}
        if not hold_output:
            del y
        dx = fastbn.batch_norm_backward(dy, x, mean, invstd)[0]
        addrs.add(_addr(dx))
        after = fastbn.cache_info()
        steps.append((after["hits"] - before["hits"], addrs))
        del dx
        y = None
    assert steps[0][0] == 0  # the first step: the first two requests of the size
    assert all(h == 2 for h, _ in steps[2:])  # then forward and backward are both hits
    assert all(a == steps[2][1] for _, a in steps[2:])  # from the same buffers
    assert fastbn.cache_info()["buffers"] == (2 if hold_output else 1)


# --------------------------------------------------------------------------- limits


def test_limit_zero_disables_and_limit_is_respected():
    fastbn.set_cache_limit(0)
    for _ in range(_buffers.ADMIT_AFTER + 1):
        y = _buffers.empty(SHAPE, np.float32)
        assert y.flags.owndata and fastbn.cache_info()["buffers"] == 0
    n = y.nbytes
    fastbn.set_cache_limit(3 * n)
    _admit()  # requests over the limit were not counted
    a = _buffers.empty(SHAPE, np.float32)
    b = _buffers.empty(SHAPE, np.float32)
    c = _buffers.empty(SHAPE, np.float32)
    e = _buffers.empty(SHAPE, np.float32)  # over the limit while a, b, c live: untracked
    assert _tracked(a) and _tracked(b) and _tracked(c) and not _tracked(e)
    info = fastbn.cache_info()
    assert info["cached_bytes"] == 3 * n and info["in_use_bytes"] == 3 * n
    del a, c
    double = (SHAPE[0] * 2, SHAPE[1])
    _admit(double)
    d = _buffers.empty(double, np.float32)  # evicts the free a and c
    assert _tracked(d)
    info = fastbn.cache_info()
    assert info["cached_bytes"] == 3 * n and info["buffers"] == 2  # b and d
    del b, d, e


def test_empty_cache_releases_only_free_buffers():
    _admit()
    a = _buffers.empty(SHAPE, np.float32)
    b = _buffers.empty(SHAPE, np.float32)
    del b
    released = fastbn.empty_cache()
    assert released == a.nbytes
    info = fastbn.cache_info()
    assert info["buffers"] == 1 and info["in_use_bytes"] == a.nbytes


def test_shrinking_the_limit_evicts_free_buffers():
    _admit()
    a = _buffers.empty(SHAPE, np.float32)
    del a
    assert fastbn.cache_info()["cached_bytes"] > 0
    fastbn.set_cache_limit(1)
    assert fastbn.cache_info()["cached_bytes"] == 0


def test_lowering_the_limit_untracks_buffers_in_use():
    """Buffers in use beyond a lowered limit stop being tracked, least recently used first:
    their memory is freed with the last array using them, with no further call."""
    _admit()
    a, b, c = (_buffers.empty(SHAPE, np.float32) for _ in range(3))
    bases = [weakref.ref(v.base) for v in (a, b, c)]
    fastbn.set_cache_limit(2 * NBYTES)
    info = fastbn.cache_info()
    assert info["cached_bytes"] == 2 * NBYTES and info["in_use_bytes"] == 2 * NBYTES
    assert not _tracked(a) and _tracked(b) and _tracked(c)
    del a
    assert bases[0]() is None  # freed when the array died
    fastbn.set_cache_limit(0)
    assert fastbn.cache_info()["cached_bytes"] == 0
    del b, c
    assert bases[1]() is None and bases[2]() is None
    assert fastbn.cache_info()["buffers"] == 0


@pytest.mark.parametrize("bad", [1.5, "1", None, True])
def test_set_cache_limit_rejects_non_integers(bad):
    before = fastbn.cache_info()["limit"]
    with pytest.raises(TypeError, match="nbytes must be an int"):
        fastbn.set_cache_limit(bad)
    assert fastbn.cache_info()["limit"] == before


def test_set_cache_limit_rejects_negative():
    before = fastbn.cache_info()["limit"]
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        fastbn.set_cache_limit(-1)
    assert fastbn.cache_info()["limit"] == before


# --------------------------------------------------------------------------- memory (RSS)
# Buffers of at least 48 MiB: glibc serves blocks above its mmap threshold (at most 32 MiB)
# with mmap and unmaps them on free, so freed memory leaves the resident set at once (a
# smaller block may stay in the heap after free, which would blur the measurement).

_statm = "/proc/self/statm"
needs_statm = pytest.mark.skipif(not os.path.exists(_statm), reason="needs /proc/self/statm")


def _rss():
    with open(_statm) as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@needs_statm
def test_sizes_that_never_come_back_keep_no_memory():
    """20 forward calls of distinct sizes (48 to 63.4 MiB), results dropped. With every
    output kept up to the 1 GiB limit the resident set would grow by about 1 GiB; nothing
    may stay. Allowed: 12 MiB, a quarter of the smallest output, for the interpreter's own
    allocations; keeping a single output would exceed it fourfold."""
    per_sample = 4 * 64 * 64 * 4  # bytes per sample of (N, 4, 64, 64) float32: 64 KiB
    counts = [768 + 13 * i for i in range(20)]  # 48 MiB + i * 832 KiB
    assert counts[0] * per_sample == 48 * MiB
    big = np.ones((counts[-1], 4, 64, 64), np.float32)  # inputs: C-contiguous prefixes
    # Before measuring, a call of the same kernel path on a size not in the list: the first
    # call on a tensor this large grows the process once (by about 5 MiB, measured).
    fastbn.batch_norm_forward(big[:700])
    before_info = fastbn.cache_info()
    gc.collect()
    before = _rss()
    for n in counts:
        fastbn.batch_norm_forward(big[:n])
    growth = _rss() - before
    info = fastbn.cache_info()
    assert growth < 12 * MiB, f"resident set grew by {growth / MiB:.1f} MiB"
    assert info["cached_bytes"] == 0 and info["buffers"] == 0
    assert info["uncached"] - before_info["uncached"] == len(counts)


@needs_statm
def test_result_held_when_the_limit_drops_to_zero_is_freed_with_it():
    """A cached 48 MiB result is alive when the cache is turned off; when it dies its memory
    leaves the resident set at once. All its pages are resident (the kernel wrote every
    value) and are unmapped on free, so the drop is its size; required: three quarters of
    it (the quarter left for the interpreter's allocations between the two readings)."""
    x = np.ones((768, 4, 64, 64), np.float32)  # 48 MiB
    for _ in range(_buffers.ADMIT_AFTER):
        fastbn.batch_norm_forward(x)
    y = fastbn.batch_norm_forward(x)[0]
    assert _tracked(y) and y.nbytes == 48 * MiB
    gc.collect()
    held = _rss()
    fastbn.set_cache_limit(0)
    cached = fastbn.cache_info()["cached_bytes"]
    del y
    drop = held - _rss()
    assert drop > 0.75 * 48 * MiB, f"resident set dropped by {drop / MiB:.1f} MiB"
    assert cached == 0 and fastbn.cache_info()["cached_bytes"] == 0


# --------------------------------------------------------------------------- threads, fork


def test_threads_never_share_a_buffer():
    """Eight threads allocate, fill with their id and check, many times over."""
    errors = []
    barrier = threading.Barrier(8)
    hits = fastbn.cache_info()["hits"]

    def work(tid):
        barrier.wait()
        for _ in range(30):
            y = _buffers.empty(SHAPE, np.float32)
            y.fill(tid)
            if not np.all(y == tid):
                errors.append(tid)
            del y

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert fastbn.cache_info()["buffers"] <= 8
    assert fastbn.cache_info()["hits"] > hits  # buffers were handed from thread to thread


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # JAX's; the child uses NumPy only
def test_fork_while_another_thread_holds_the_lock():
    """A child forked while the cache's lock is held by another thread gets a new lock:
    it can allocate (a deadlock would end it by SIGALRM)."""
    _admit()
    keep = _buffers.empty(SHAPE, np.float32)
    keep.fill(5.0)
    locked, release = threading.Event(), threading.Event()

    def hold_lock():
        with _buffers._lock:
            locked.set()
            release.wait(30)

    t = threading.Thread(target=hold_lock)
    t.start()
    assert locked.wait(30)
    try:
        pid = os.fork()
        if pid == 0:  # the child: exits without returning to pytest
            code = 1
            try:
                import signal

                signal.alarm(10)
                z = _buffers.empty(SHAPE, np.float32)  # `keep` is in use: a new buffer
                z.fill(1.0)
                del z
                fastbn.empty_cache()
                code = 0 if np.all(keep == 5.0) and fastbn.cache_info()["buffers"] == 1 else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        t.join()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert np.all(keep == 5.0)


def test_results_of_earlier_calls_are_not_overwritten():
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((64, 32, 32, 32), dtype=np.float32)  # 8 MiB: cached output
    x2 = rng.standard_normal(x1.shape, dtype=np.float32) * 3 + 1
    for _ in range(_buffers.ADMIT_AFTER):
        fastbn.batch_norm_forward(x1)
    y1, m1, i1 = fastbn.batch_norm_forward(x1)
    assert _tracked(y1)  # backed by the cache
    keep = y1.copy()
    y2, _, _ = fastbn.batch_norm_forward(x2)
    dx, _, _ = fastbn.batch_norm_backward(x2, x1, m1, i1)
    assert np.array_equal(y1, keep)
    assert _addr(y2) != _addr(y1) and _addr(dx) not in (_addr(y1), _addr(y2))
    addr = _addr(y1)
    del y1
    y3, _, _ = fastbn.batch_norm_forward(x1)  # reuses y1's buffer, same values
    assert _addr(y3) == addr
    assert np.array_equal(y3, keep)

