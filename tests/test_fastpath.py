"""The small-call fast path of the public API computes what the general path computes.

An ``eps`` that is a NumPy scalar rather than a Python float forces the general path (the
fast path takes only Python floats), so each case runs both and compares bit for bit,
including the running statistics.
"""

import contextlib

import numpy as np
import pytest

import fastbn
from fastbn import _pipeline


class _Sub(np.ndarray):
    """An ndarray subclass: accepted by the API, but not by the fast path."""


@contextlib.contextmanager
def _general_path_calls(monkeypatch):
    """Count the calls that take the general path (which starts with _pipeline.prepare)."""
    calls = []
    real = _pipeline.prepare

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(_pipeline, "prepare", counting)
        yield calls


GENERAL_EPS = np.float64(1e-5)  # same value as the default eps, but not a Python float
SHAPES = [((64, 128), 1), ((8, 3, 5, 5), 1), ((6, 5, 4), -1), ((300, 7), 0), ((2, 70000), 1)]


def _args(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    c = shape[axis]
    sd = np.float32 if dtype == np.float16 else dtype
    w = rng.uniform(0.5, 2, c).astype(sd)
    b = rng.standard_normal(c).astype(sd)
    rm = rng.standard_normal(c).astype(sd)
    rv = rng.uniform(0.5, 2, c).astype(sd)
    return x, w, b, rm, rv


@pytest.fixture(autouse=True)
def _warm_dispatch():
    # the fast path uses the default backend once the general path has resolved it
    fastbn.batch_norm(np.ones((2, 2), np.float32), training=True)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize(("shape", "axis"), SHAPES, ids=str)
def test_fast_equals_general(shape, axis, dtype, monkeypatch):
    x, w, b, rm, rv = _args(shape, axis, dtype)
    with _general_path_calls(monkeypatch) as general:  # this input takes the fast path
        fastbn.batch_norm(x, rm.copy(), rv.copy(), w, b, training=True, axis=axis)
    assert general == []
    rm1, rv1, rm2, rv2 = rm.copy(), rv.copy(), rm.copy(), rv.copy()
    y1 = fastbn.batch_norm(x, rm1, rv1, w, b, training=True, axis=axis)
    y2 = fastbn.batch_norm(x, rm2, rv2, w, b, training=True, axis=axis, eps=GENERAL_EPS)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(rm1, rm2)
    np.testing.assert_array_equal(rv1, rv2)
    assert y1.shape == x.shape and y1.dtype == x.dtype

    e1 = fastbn.batch_norm(x, rm, rv, w, b, axis=axis)
    e2 = fastbn.batch_norm(x, rm, rv, w, b, axis=axis, eps=GENERAL_EPS)
    np.testing.assert_array_equal(e1, e2)

    f1 = fastbn.batch_norm_forward(x, w, b, axis=axis)
    f2 = fastbn.batch_norm_forward(x, w, b, axis=axis, eps=GENERAL_EPS)
    for a1, a2 in zip(f1, f2):
        np.testing.assert_array_equal(a1, a2)

    dy = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    _, mean, invstd = f1
    g1 = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    g2 = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, backend="cpu")
    g3 = fastbn.batch_norm_backward(dy, x, mean.view(_Sub), invstd, w, axis=axis)  # general
    for a1, a2, a3 in zip(g1, g2, g3):
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_array_equal(a1, a3)


ROW_CASES = [((64, 128), 128), ((3, 4, 5), (4, 5)), ((7,), 7), ((2, 70000), 70000)]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize(("shape", "ns"), ROW_CASES, ids=str)
def test_row_norms_fast_equals_general(shape, ns, dtype, affine, monkeypatch):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    pshape = (ns,) if isinstance(ns, int) else ns
    sd = np.float32 if dtype == np.float16 else dtype
    w = rng.uniform(0.5, 2, pshape).astype(sd) if affine else None
    b = rng.standard_normal(pshape).astype(sd) if affine else None

    def calls(x, dy):
        out = fastbn.layer_norm_forward(x, ns, w, b)
        lb = fastbn.layer_norm_backward(dy, x, out[1], out[2], ns, w)
        r = fastbn.rms_norm_forward(x, ns, w)
        rb = fastbn.rms_norm_backward(dy, x, r[1], ns, w)
        return (*out, *lb, *r, *rb)

    with _general_path_calls(monkeypatch) as general:
        fast = calls(x, dy)
    assert general == []  # every call took the fast path
    slow = calls(x.view(_Sub), dy.view(_Sub))  # ndarray subclasses: the general path
    assert len(fast) == len(slow) == 10
    for a, g in zip(fast, slow):
        if a is None:
            assert g is None and not affine
            continue
        assert type(a) is np.ndarray and a.shape == g.shape and a.dtype == g.dtype
        np.testing.assert_array_equal(a, g)


def test_running_stats_views_take_the_general_path_and_still_update(monkeypatch):
    x, w, b, rm, rv = _args((32, 6), 1, np.float32)
    stats = np.stack([rm, rv])  # rows are views: they do not own their memory
    expect_rm, expect_rv = rm.copy(), rv.copy()
    fastbn.batch_norm(x, expect_rm, expect_rv, w, b, training=True)
    with _general_path_calls(monkeypatch) as general:
        fastbn.batch_norm(x, stats[0], stats[1], w, b, training=True)
    assert len(general) == 1
    np.testing.assert_array_equal(stats[0], expect_rm)
    np.testing.assert_array_equal(stats[1], expect_rv)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"eps": -1.0}, ValueError, "eps"),
        ({"momentum": 1.5}, ValueError, "momentum"),
        ({"training": 1}, TypeError, "training"),
        ({"axis": 2}, ValueError, "axis"),
    ],
)
def test_invalid_scalars_still_raise(kwargs, exc, match):
    x, w, b, rm, rv = _args((64, 128), 1, np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    call = {"training": True, **kwargs}
    with pytest.raises(exc, match=match):
        fastbn.batch_norm(x, rm, rv, w, b, **call)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)


def test_read_only_running_stats_rejected_in_training_only():
    x, w, b, rm, rv = _args((64, 128), 1, np.float32)
    rm.flags.writeable = False
    rv0 = rv.copy()
    with pytest.raises(ValueError, match="running_mean is read-only"):
        fastbn.batch_norm(x, rm, rv, w, b, training=True)
    np.testing.assert_array_equal(rv, rv0)
    fastbn.batch_norm(x, rm, rv, w, b, training=False)  # eval does not write them


def test_explicit_backend_takes_the_fast_path_once_resolved(monkeypatch):
    x, w, b, rm, rv = _args((64, 128), 1, np.float32)
    monkeypatch.setattr(_pipeline, "_numpy_backends", {})  # no backend= name resolved yet
    with _general_path_calls(monkeypatch) as general:
        fastbn.batch_norm(x, rm, rv, w, b, training=True, backend="cpu")  # resolves "cpu"
        fastbn.batch_norm(x, rm, rv, w, b, training=True, backend="cpu")
        assert len(general) == 1
        with pytest.raises(ValueError, match="no-such-backend"):
            fastbn.batch_norm(x, rm, rv, w, b, training=True, backend="no-such-backend")
        assert len(general) == 2
    with pytest.raises(ValueError, match="no-such-backend"):
        fastbn.batch_norm(x, rm, rv, w, b, training=True, backend="no-such-backend")


def test_backward_invalid_arguments_still_raise():
    x, w, b, _, _ = _args((64, 128), 1, np.float32)
    _, mean, invstd = fastbn.batch_norm_forward(x, w, b)
    with pytest.raises(ValueError, match="dy must have the shape of x"):
        fastbn.batch_norm_backward(x[:10], x, mean, invstd, w)
    with pytest.raises(TypeError, match="save_mean must be the array batch_norm_forward returned"):
        fastbn.batch_norm_backward(x, x, None, invstd, w)
    with pytest.raises(ValueError, match="weight must have shape"):
        fastbn.batch_norm_backward(x, x, mean, invstd, w[:3])


def test_same_array_as_both_running_stats_rejected():
    x, w, b, rm, _ = _args((64, 128), 1, np.float32)
    with pytest.raises(ValueError, match="must not share memory"):
        fastbn.batch_norm(x, rm, rm, w, b, training=True)


def test_overlapping_running_stats_views_rejected():
    x, w, b, _, _ = _args((64, 10), 1, np.float32)
    buf = np.zeros(20, np.float32)
    before = buf.copy()
    with pytest.raises(ValueError, match="must not share memory"):
        fastbn.batch_norm(x, buf[:10], buf[5:15], w, b, training=True)
    np.testing.assert_array_equal(buf, before)
