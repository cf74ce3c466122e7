"""Argument canonicalization: ndarray subclasses, array libraries, byte order, DLPack objects."""

import subprocess
import sys
import warnings

import numpy as np
import pytest

import fastbn
from fastbn import _validation as v
from _helpers import NUMPY_BACKENDS

C = 3


class Tagged(np.ndarray):
    """An ndarray subclass that changes nothing about the array's meaning."""


def _tagged(a):
    return np.array(a, copy=True).view(Tagged)


def _matrix(a):
    """``numpy.matrix(a)``, without its PendingDeprecationWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.matrix(a)


def _data(seed=0, shape=(6, C, 5)):
    rng = np.random.default_rng(seed)
    x = (1.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)
    w = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    return x, w, b


def _swapped(a):
    """The same values in non-native byte order."""
    return a.astype(a.dtype.newbyteorder("S"))


# ----------------------------------------------------------------------------- subclasses
def test_masked_arrays_are_rejected_whatever_their_layout():
    x = np.ma.masked_array(np.ones((8, C, 5), np.float32))
    x[0, 0, 0] = np.ma.masked
    for arr in (x, x[::2], np.ma.masked_array(np.ones((8, C), np.float32))):
        with pytest.raises(TypeError, match=r"x is a numpy\.ma\.MaskedArray.*x\.filled\("):
            v.as_array("x", arr)
    with pytest.raises(TypeError, match=r"running_var is a numpy\.ma\.MaskedArray"):
        v.as_array("running_var", np.ma.ones(C))


def test_matrix_is_rejected():
    with pytest.raises(TypeError, match=r"weight is a numpy\.matrix.*np\.asarray\(weight\)"):
        v.as_array("weight", _matrix(np.ones((1, C), np.float32)))


def test_other_subclasses_are_viewed_as_ndarray():
    a = _tagged(np.arange(6.0).reshape(2, 3))
    arr, lib, wrap = v.as_array("x", a)
    assert type(arr) is np.ndarray and lib == "numpy" and wrap is None
    assert np.shares_memory(arr, a)


def test_validation_does_not_import_numpy_ma():
    """Without numpy.ma in sys.modules nothing can be a masked array: no need to import it.

    (Numba's typing of ndarray arguments imports it when a kernel runs, so this checks the
    import of fastbn and its argument checks only.)
    """
    code = ("import sys, numpy as np, fastbn\n"
            "from fastbn import _validation as v\n"
            "class T(np.ndarray): pass\n"
            "x = np.ones((4, 3), np.float32).view(T)\n"
            "arr, lib, _ = v.as_array('x', x)\n"
            "assert type(arr) is np.ndarray and lib == 'numpy'\n"
            "v.check_per_channel('weight', np.ones(3).view(T), 3, 'numpy', arr)\n"
            "v.check_backward_args(x, arr, 'numpy', 3, np.ones(3).view(T), np.ones(3), None)\n"
            "assert 'numpy.ma' not in sys.modules, 'numpy.ma was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
def test_subclass_arguments_work_as_their_ndarray(backend):
    x, w, b = _data()
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, mean, invstd = fastbn.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv,
                                                backend=backend)
    srm, srv = _tagged(np.zeros(C, np.float32)), _tagged(np.ones(C, np.float32))
    ys, means, invstds = fastbn.batch_norm_forward(_tagged(x), _tagged(w), _tagged(b),
                                                   running_mean=srm, running_var=srv,
                                                   backend=backend)
    for got, want in ((ys, y), (means, mean), (invstds, invstd)):
        assert type(got) is np.ndarray
        np.testing.assert_array_equal(got, want)
    # the running statistics, given as a subclass, were updated in place
    assert type(srm) is Tagged and type(srv) is Tagged
    np.testing.assert_array_equal(srm.view(np.ndarray), rm)
    np.testing.assert_array_equal(srv.view(np.ndarray), rv)
    assert not np.array_equal(rm, np.zeros(C))

    ye = fastbn.batch_norm(_tagged(x), srm, srv, _tagged(w), _tagged(b), backend=backend)
    assert type(ye) is np.ndarray
    np.testing.assert_array_equal(ye, fastbn.batch_norm(x, rm, rv, w, b, backend=backend))

    dy = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    got = fastbn.batch_norm_backward(_tagged(dy), _tagged(x), _tagged(mean), _tagged(invstd),
                                     _tagged(w), backend=backend)
    want = fastbn.batch_norm_backward(dy, x, mean, invstd, w, backend=backend)
    for g, e in zip(got, want):
        assert type(g) is np.ndarray
        np.testing.assert_array_equal(g, e)


# ----------------------------------------------------------------------------- libraries
def test_source_library():
    assert v.source_library(np.ones(2)) == "numpy"
    assert v.source_library(_tagged(np.ones(2))) == "numpy"
    torch = pytest.importorskip("torch")
    assert v.source_library(torch.ones(2)) == "torch"
    assert v.source_library(torch.nn.Parameter(torch.ones(2))) == "torch"


def test_source_library_jax():
    jnp = pytest.importorskip("jax.numpy")
    assert v.source_library(jnp.ones(2)) == "jax"


def test_one_library_per_call_is_accepted():
    """torch tensors for every argument still work (mixing is the error, not torch)."""
    torch = pytest.importorskip("torch")
    x, w, b = _data()
    rm, rv = torch.zeros(C), torch.ones(C)
    y, mean, invstd = fastbn.batch_norm_forward(torch.tensor(x), torch.tensor(w), torch.tensor(b),
                                                running_mean=rm, running_var=rv)
    assert isinstance(y, torch.Tensor) and isinstance(mean, torch.Tensor)
    assert not torch.equal(rm, torch.zeros(C))
    dx, dw, db = fastbn.batch_norm_backward(torch.ones_like(y), torch.tensor(x), mean, invstd,
                                            torch.tensor(w))
    assert isinstance(dx, torch.Tensor) and isinstance(dw, torch.Tensor)


# ----------------------------------------------------------------------------- byte order
@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
def test_non_native_byte_order_inputs(backend):
    x, w, b = _data(2)
    rm, rv = np.zeros(C, np.float64), np.ones(C, np.float64)
    y, mean, invstd = fastbn.batch_norm_forward(x, w, b, backend=backend)
    ys, means, invstds = fastbn.batch_norm_forward(_swapped(x), _swapped(w), _swapped(b),
                                                   backend=backend)
    for got, want in ((ys, y), (means, mean), (invstds, invstd)):
        assert got.dtype.isnative and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)

    # eval mode: the running statistics are only read, so any byte order is fine
    srm, srv = _swapped(rm), _swapped(rv)
    ye = fastbn.batch_norm(_swapped(x), srm, srv, _swapped(w), _swapped(b), backend=backend)
    assert ye.dtype == np.float32 and ye.dtype.isnative
    np.testing.assert_array_equal(ye, fastbn.batch_norm(x, rm, rv, w, b, backend=backend))
    assert not srm.dtype.isnative  # left as they were

    dy = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    got = fastbn.batch_norm_backward(_swapped(dy), _swapped(x), _swapped(mean), _swapped(invstd),
                                     _swapped(w), backend=backend)
    want = fastbn.batch_norm_backward(dy, x, mean, invstd, w, backend=backend)
    for g, e in zip(got, want):
        assert g.dtype.isnative and g.dtype == e.dtype
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
def test_training_updates_non_native_running_stats_in_place(backend):
    x = _data(4)[0]
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float64)
    srm, srv = _swapped(rm), _swapped(rv)
    for a, b in ((rm, rv), (srm, srv)):
        fastbn.batch_norm(x, a, b, training=True, backend=backend)
    assert not srm.dtype.isnative and not srv.dtype.isnative
    np.testing.assert_array_equal(srm, rm)
    np.testing.assert_array_equal(srv, rv)


def test_writable_stats_are_returned_as_given():
    """In training the running statistics are updated in place: never a converted copy."""
    x = np.ones((4, C), np.float32)
    rm = _swapped(np.zeros(C))
    assert v.check_per_channel("running_mean", rm, C, "numpy", x, writable=True) is rm
    rm_plain = np.zeros(C, np.float32)
    assert v.check_per_channel("running_mean", rm_plain, C, "numpy", x, writable=True) is rm_plain
    tagged = _tagged(np.zeros(C))
    out = v.check_per_channel("running_mean", tagged, C, "numpy", x, writable=True)
    assert type(out) is np.ndarray and np.shares_memory(out, tagged)
    a, b = v.check_running_stats(_swapped(np.zeros(C)), _swapped(np.ones(C)), C, "numpy", x,
                                 training=True)
    assert not a.dtype.isnative and not b.dtype.isnative


def test_read_only_stats_are_converted_to_native_order():
    x = np.ones((4, C), np.float32)
    for name in ("weight", "bias", "save_mean"):
        src = _swapped(np.arange(C, dtype=np.float32))
        out = v.check_per_channel(name, src, C, "numpy", x)
        assert out.dtype == np.float32 and out.dtype.isnative
        np.testing.assert_array_equal(out, np.arange(C))
    rm, rv = v.check_running_stats(_swapped(np.zeros(C)), _swapped(np.ones(C)), C, "numpy", x,
                                   training=False)
    assert rm.dtype.isnative and rv.dtype.isnative and rv.dtype == np.float64


def test_check_x_converts_byte_order():
    x = _swapped(np.arange(12, dtype=np.float64).reshape(4, 3))
    out = v.check_x("x", x, v.FLOAT_DTYPES)
    assert out.dtype == np.float64 and out.dtype.isnative
    np.testing.assert_array_equal(out, np.arange(12).reshape(4, 3))
    native = np.ones((4, 3), np.float32)
    assert v.check_x("x", native, v.FLOAT_DTYPES) is native


@pytest.mark.parametrize("dtype", [">i4", ">c16", ">u2"])
def test_non_float_dtypes_in_any_byte_order_are_rejected(dtype):
    x = np.ones((4, C), np.float32)
    with pytest.raises(TypeError, match=rf"x must have a floating dtype .*got {dtype}"):
        fastbn.batch_norm_forward(np.ones((4, C), dtype))
    with pytest.raises(TypeError, match=rf"weight must have a floating dtype .*got {dtype}"):
        fastbn.batch_norm_forward(x, np.ones(C, dtype))


# ----------------------------------------------------------------------------- DLPack objects
class _OddDevice:
    """A DLPack producer whose ``__dlpack_device__`` is not a pair of integers."""

    def __init__(self, device):
        self.device = device

    def __dlpack__(self, **kwargs):
        raise AssertionError("never called")

    def __dlpack_device__(self):
        return self.device


class _Raising:
    """A DLPack producer whose protocol methods raise (like torch tensors on the meta device)."""

    def __init__(self, where):
        self.where = where

    def __dlpack__(self, **kwargs):
        raise BufferError("cannot pack")

    def __dlpack_device__(self):
        if self.where == "device":
            raise ValueError("Unknown device type")
        return (1, 0)


@pytest.mark.parametrize("device", ["cpu", (1,), (1, 0, 0), ("1", 0), (1.0, 0), None, [1, 0]],
                         ids=repr)
def test_malformed_dlpack_device(device):
    with pytest.raises(TypeError, match=r"x must be .*__dlpack_device__\(\)"):
        v.as_array("x", _OddDevice(device))


def test_raising_dlpack_device():
    with pytest.raises(TypeError, match=r"dy must be .*__dlpack_device__\(\) raised ValueError: "
                                        r"Unknown device type"):
        v.as_array("dy", _Raising("device"))


def test_raising_dlpack_export():
    with pytest.raises(TypeError, match=r"x: NumPy cannot import this _Raising through DLPack "
                                        r"\(cannot pack\)"):
        v.as_array("x", _Raising("export"))


def test_torch_meta_tensor():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"x must be .*Unknown device type meta"):
        fastbn.batch_norm_forward(torch.empty(4, C, device="meta"))
