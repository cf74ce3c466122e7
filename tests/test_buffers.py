"""The output-buffer cache: reuse only of buffers no array refers to, limits, threads."""

import threading

import numpy as np
import pytest

import fastbn
from fastbn import _buffers

SHAPE = (512, 1024)  # 2 MiB of float32, above MIN_BYTES
assert np.prod(SHAPE) * 4 >= _buffers.MIN_BYTES


def _addr(a):
    return a.__array_interface__["data"][0]


@pytest.fixture(autouse=True)
def _fresh_cache():
    old = fastbn.set_cache_limit(1 << 30)
    fastbn.empty_cache()
    yield
    fastbn.set_cache_limit(old)
    fastbn.empty_cache()


def test_released_buffer_is_reused():
    y = _buffers.empty(SHAPE, np.float32)
    addr = _addr(y)
    hits = fastbn.cache_info()["hits"]
    del y
    z = _buffers.empty(SHAPE, np.float32)
    assert _addr(z) == addr
    assert fastbn.cache_info()["hits"] == hits + 1
    assert z.shape == SHAPE and z.dtype == np.float32 and z.flags.c_contiguous


def test_same_bytes_other_dtype_and_shape_reuse():
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
    y = _buffers.empty(SHAPE, np.float32)
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
    y = _buffers.empty(SHAPE, np.float32)
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
    y = _buffers.empty((4, 4), np.float32)
    assert y.flags.owndata
    after = fastbn.cache_info()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


def test_limit_zero_disables_and_limit_is_respected():
    fastbn.set_cache_limit(0)
    y = _buffers.empty(SHAPE, np.float32)
    assert y.flags.owndata and fastbn.cache_info()["buffers"] == 0
    n = y.nbytes
    fastbn.set_cache_limit(3 * n)
    a = _buffers.empty(SHAPE, np.float32)
    b = _buffers.empty(SHAPE, np.float32)
    c = _buffers.empty(SHAPE, np.float32)
    e = _buffers.empty(SHAPE, np.float32)  # over the limit while a, b, c live: untracked
    assert not (a.flags.owndata or b.flags.owndata or c.flags.owndata) and e.flags.owndata
    info = fastbn.cache_info()
    assert info["cached_bytes"] == 3 * n and info["in_use_bytes"] == 3 * n
    del a, c
    d = _buffers.empty((SHAPE[0] * 2, SHAPE[1]), np.float32)  # evicts the free a and c
    assert not d.flags.owndata
    info = fastbn.cache_info()
    assert info["cached_bytes"] == 3 * n and info["buffers"] == 2  # b and d
    del b, d, e


def test_empty_cache_releases_only_free_buffers():
    a = _buffers.empty(SHAPE, np.float32)
    b = _buffers.empty(SHAPE, np.float32)
    del b
    released = fastbn.empty_cache()
    assert released == a.nbytes
    info = fastbn.cache_info()
    assert info["buffers"] == 1 and info["in_use_bytes"] == a.nbytes


def test_shrinking_the_limit_evicts_free_buffers():
    a = _buffers.empty(SHAPE, np.float32)
    del a
    assert fastbn.cache_info()["cached_bytes"] > 0
    fastbn.set_cache_limit(1)
    assert fastbn.cache_info()["cached_bytes"] == 0


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


def test_threads_never_share_a_buffer():
    """Eight threads allocate, fill with their id and check, many times over."""
    errors = []
    barrier = threading.Barrier(8)

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


def test_results_of_earlier_calls_are_not_overwritten():
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((64, 32, 32, 32), dtype=np.float32)  # 8 MiB: cached output
    x2 = rng.standard_normal(x1.shape, dtype=np.float32) * 3 + 1
    y1, m1, i1 = fastbn.batch_norm_forward(x1)
    assert not y1.flags.owndata  # backed by the cache
    keep = y1.copy()
    y2, _, _ = fastbn.batch_norm_forward(x2)
    dx, _, _ = fastbn.batch_norm_backward(x2, x1, m1, i1)
    assert np.array_equal(y1, keep)
    assert _addr(y2) != _addr(y1) and _addr(dx) not in (_addr(y1), _addr(y2))
    del y1
    y3, _, _ = fastbn.batch_norm_forward(x1)  # reuses y1's buffer, same values
    assert np.array_equal(y3, keep)
