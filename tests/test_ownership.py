"""Results and inputs are never overwritten.

A large CPU result is a view of a buffer of the output cache, which reuses a buffer once its
reference count says no array refers to it. Every way of holding a result (the array, a view,
a ctypes object, a DLPack consumer, a Numba container, another thread) must keep its data
unchanged while later calls of the same size run; and no public function writes its inputs.
"""

import ctypes
import gc
import queue
import threading

import numpy as np
import pytest

import fastbn
from fastbn import _buffers
from fastbn.backends import cpu

# 4 MiB of float32 (at least MIN_BYTES: the result comes from the cache), over SERIAL_MAX
# values (the parallel kernels, whose outputs the cache allocates).
SHAPE = (32, 8, 64, 64)
assert np.prod(SHAPE) * 4 >= _buffers.MIN_BYTES and np.prod(SHAPE) > cpu.SERIAL_MAX

_rng = np.random.default_rng(0)
X1 = _rng.standard_normal(SHAPE, dtype=np.float32)
X2 = _rng.standard_normal(SHAPE, dtype=np.float32) * 3 + 1  # other values, same size
DY = _rng.standard_normal(SHAPE, dtype=np.float32)


# a 1 GiB limit and an empty cache and size history for every test (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("fresh_buffer_cache")


def _addr(a):
    return a.__array_interface__["data"][0]


def _root(a):
    """The array at the end of `a`'s chain of NumPy bases (the one owning the memory, or
    one over memory that another library owns)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _is_cached(a):
    root = _root(a)
    return any(root is b for b in _buffers._bufs)


def _cached_result():
    """``batch_norm_forward(X1)[0]``, asserted to be backed by a tracked buffer (the size is
    requested until the cache admits it)."""
    for _ in range(_buffers.ADMIT_AFTER):
        fastbn.batch_norm_forward(X1)
    y = fastbn.batch_norm_forward(X1)[0]
    assert _is_cached(y)
    return y


def _same_size_calls():
    """Calls that take a free buffer of SHAPE's size and fill it with other values; returns
    the addresses they wrote to."""
    written = []
    for _ in range(2):
        y, mean, invstd = fastbn.batch_norm_forward(X2)
        written.append(_addr(y))
        del y
        dx = fastbn.batch_norm_backward(DY, X2, mean, invstd)[0]
        written.append(_addr(dx))
        del dx
    return written


def test_a_dropped_result_is_reused():
    """The control: with no reference left, the next same-size call writes into the result's
    buffer, so the routes below would see their data overwritten if they held none."""
    y = _cached_result()
    addr = _addr(y)
    del y
    assert _same_size_calls()[0] == addr


def _torch():
    return pytest.importorskip("torch")


def _jnp():
    return pytest.importorskip("jax.numpy")


def _typed_list(y):
    from numba.typed import List

    held = List()
    held.append(y)
    return held


_tail = None


def _njit_view(y):
    global _tail
    if _tail is None:
        from numba import njit

        _tail = njit(lambda a: a[1:])
    return _tail(y)


_FLOAT_P = ctypes.POINTER(ctypes.c_float)


def _jax_pointer(a):
    return a.unsafe_buffer_pointer()


# id -> (hold, read, part, pointer): hold(result) is the only object kept; read(held) gives a
# NumPy array of the data it sees, which is result[part]; pointer(held) is the address of
# the memory it reads, or None where it always reads the result's memory. A JAX import
# copies when the address is not aligned as XLA requires (then the buffer is rightly free
# once the copy is done; only the data must be right).
ROUTES = {
    "as_ctypes": (np.ctypeslib.as_ctypes, np.ctypeslib.as_array, slice(None), None),
    "ctypes-object": (
        lambda y: y.ctypes,
        lambda c: np.ctypeslib.as_array(c.data_as(_FLOAT_P), SHAPE),
        slice(None),
        None,
    ),
    "ctypes-data_as": (
        lambda y: y.ctypes.data_as(_FLOAT_P),
        lambda p: np.ctypeslib.as_array(p, SHAPE),
        slice(None),
        None,
    ),
    "jax-from_dlpack": (lambda y: _jnp().from_dlpack(y), np.asarray, slice(None), _jax_pointer),
    "jax.dlpack": (
        lambda y: pytest.importorskip("jax.dlpack").from_dlpack(y),
        np.asarray,
        slice(None),
        _jax_pointer,
    ),
    "jnp.asarray": (lambda y: _jnp().asarray(y), np.asarray, slice(None), _jax_pointer),
    "torch-from_dlpack": (
        lambda y: _torch().from_dlpack(y), lambda t: t.numpy(), slice(None), None
    ),
    "dlpack-capsule": (  # a capsule not consumed yet; reading consumes it
        lambda y: (_torch(), y.__dlpack__())[1],
        lambda c: _torch().utils.dlpack.from_dlpack(c).numpy(),
        slice(None),
        None,
    ),
    "np.from_dlpack": (np.from_dlpack, np.asarray, slice(None), None),
    "numba-typed-List": (_typed_list, lambda lst: lst[0], slice(None), None),
    "njit-view": (_njit_view, np.asarray, slice(1, None), None),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_result_held_through_route_is_not_overwritten(route):
    hold, read, part, pointer = ROUTES[route]
    y = _cached_result()
    expected = y[part].copy()
    addr = _addr(y)  # where the buffer starts, as the same-size calls' outputs do
    held = hold(y)
    shared = pointer is None or pointer(held) == _addr(y[part])
    del y
    gc.collect()
    hits = fastbn.cache_info()["hits"]
    written = _same_size_calls()
    assert fastbn.cache_info()["hits"] > hits  # free buffers of this size were reused
    if shared:
        assert addr not in written
    got = np.asarray(read(held))
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)


def test_result_held_by_another_thread_is_not_overwritten():
    y = _cached_result()
    expected = y.copy()
    addr = _addr(y)
    handoff, verdict = queue.Queue(), queue.Queue()
    taken, calls_done = threading.Event(), threading.Event()

    def holder():
        mine = handoff.get()
        taken.set()
        calls_done.wait(60)
        verdict.put(np.array_equal(mine, expected))

    t = threading.Thread(target=holder)
    t.start()
    handoff.put(y)
    del y
    assert taken.wait(60)  # the thread holds the only reference left
    written = _same_size_calls()
    calls_done.set()
    t.join(60)
    assert addr not in written
    assert verdict.get(timeout=1) is True


def test_torch_result_is_not_overwritten():
    """A torch input gives a torch result that shares the cached buffer's memory."""
    torch = _torch()
    for _ in range(_buffers.ADMIT_AFTER):
        fastbn.batch_norm_forward(torch.from_numpy(X1))
    yt = fastbn.batch_norm_forward(torch.from_numpy(X1))[0]
    expected = yt.clone()
    addr = yt.data_ptr()
    assert any(b.ctypes.data == addr for b in _buffers._bufs)  # zero-copy from the cache
    written = _same_size_calls()
    assert addr not in written
    assert torch.equal(yt, expected)


# --------------------------------------------------------------------------- inputs

# Representative shapes on both sides of the serial/parallel threshold; the large one is at
# least MIN_BYTES in float32 and float64, so its outputs come from the cache.
SMALL = (4, 3, 8, 8)
LARGE = (16, 4, 64, 64)
assert np.prod(SMALL) <= cpu.SERIAL_MAX < np.prod(LARGE)
assert np.prod(LARGE) * 4 >= _buffers.MIN_BYTES


def _layout(a, layout):
    """`a` in the given memory layout: C order, Fortran order, or a strided slice (every
    other feature of an array twice as wide; the gaps hold other values)."""
    if layout == "C":
        return np.ascontiguousarray(a)
    if layout == "F":
        return np.asfortranarray(a)
    wide = np.full(a.shape[:1] + (2 * a.shape[1],) + a.shape[2:], 7.0, a.dtype)
    wide[:, ::2] = a
    return wide[:, ::2]


def _vector(v, layout):
    if layout != "strided":
        return np.ascontiguousarray(v)
    wide = np.full(2 * v.size, 7.0, v.dtype)
    wide[::2] = v
    return wide[::2]


class _Snapshots:
    """Bytes of the whole memory behind each input (a strided slice's gaps included)."""

    def __init__(self, **arrays):
        self.arrays = arrays
        self.saved = {k: _root(a).tobytes(order="A") for k, a in arrays.items()}

    def check(self, what):
        changed = [k for k, a in self.arrays.items()
                   if _root(a).tobytes(order="A") != self.saved[k]]
        assert not changed, f"{what} wrote its inputs {changed}"


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
@pytest.mark.parametrize("shape", [SMALL, LARGE], ids=["small", "large"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_inputs_are_never_written(dtype, shape, layout, backend):
    rng = np.random.default_rng(1)
    c = shape[1]
    sd = np.float32 if dtype == np.float16 else dtype
    x = _layout(rng.normal(2.0, 3.0, shape).astype(dtype), layout)
    dy = _layout(rng.standard_normal(shape).astype(dtype), layout)
    w = _vector(rng.uniform(0.5, 2.0, c).astype(sd), layout)
    b = _vector(rng.standard_normal(c).astype(sd), layout)
    rm = _vector(rng.standard_normal(c).astype(sd), layout)
    rv = _vector(rng.uniform(0.5, 2.0, c).astype(sd), layout)
    params = dict(x=x, weight=w, bias=b)

    for _ in range(_buffers.ADMIT_AFTER + 1):  # the last round's outputs come from the cache
        snap = _Snapshots(**params)
        fastbn.batch_norm_forward(x, w, b, backend=backend)
        snap.check("batch_norm_forward")

        snap = _Snapshots(**params)
        fastbn.batch_norm_forward(x, w, b, running_mean=rm.copy(), running_var=rv.copy(),
                                  backend=backend)
        snap.check("batch_norm_forward with running statistics")

        snap = _Snapshots(**params)
        fastbn.batch_norm(x, rm.copy(), rv.copy(), w, b, training=True, backend=backend)
        snap.check("batch_norm(training=True)")

        snap = _Snapshots(running_mean=rm, running_var=rv, **params)
        fastbn.batch_norm(x, rm, rv, w, b, training=False, backend=backend)
        snap.check("batch_norm(training=False)")

        _, mean, invstd = fastbn.batch_norm_forward(x, w, b, backend=backend)
        mean, invstd = _vector(mean, layout), _vector(invstd, layout)
        snap = _Snapshots(dy=dy, save_mean=mean, save_invstd=invstd, **params)
        fastbn.batch_norm_backward(dy, x, mean, invstd, w, backend=backend)
        snap.check("batch_norm_backward")

    if backend != "cpu":
        return  # the layer runs on the default backend
    for training in (True, False):
        bn = fastbn.BatchNorm(c, dtype=sd).train(training)
        bn.running_mean[...] = rm
        bn.running_var[...] = rv
        inputs = dict(x=x, dy=dy)
        if not training:
            inputs.update(running_mean=bn.running_mean, running_var=bn.running_var)
        snap = _Snapshots(**inputs)
        for _ in range(_buffers.ADMIT_AFTER + 1):
            bn(x)
            bn.backward(dy)
        snap.check(f"BatchNorm (training={training}) forward/backward")


def test_input_referenced_only_by_the_call_is_not_its_output():
    """Chained layers: a cached result passed straight on (the call's argument is its only
    reference) is not handed out again as that call's output buffer."""
    inner = fastbn.batch_norm_forward(X1)[0]
    expected = fastbn.batch_norm_forward(inner.copy())[0].copy()
    del inner
    fastbn.empty_cache()
    box = [_cached_result()]
    assert fastbn.cache_info()["buffers"] == 1  # the input's buffer is the only one
    addr = _addr(box[0])
    outer = fastbn.batch_norm_forward(box.pop())[0]
    assert _addr(outer) != addr
    assert np.array_equal(outer, expected)
