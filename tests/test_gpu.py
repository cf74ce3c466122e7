"""The GPU backends ("cupy", "numba-cuda") on a real CUDA device.

Everything here is marked ``gpu`` and skipped, with the reason, where CuPy or a CUDA
device is missing. On a GPU machine::

    python -m pytest tests/test_gpu.py -q

The kernels are checked against the float64 oracle with the error bounds derived in
``tests/cudasim/_bounds.py`` (the same bounds the simulator tests use), on shapes that
take every path of the launch plan: both kernel families, rows cut into tiles, small
spatial sizes, vector and scalar paths (odd sizes and misaligned views), and
``|mean| / std = 1e4``. Then the public API on CuPy arrays: results like the CPU
backend's, running statistics, streams, other ``__cuda_array_interface__`` objects,
and parity with ``torch.nn.functional.batch_norm`` on CUDA where PyTorch has CUDA.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cudasim._bounds import (acc_u, assert_within, backward_bounds, check_backward,
                             check_forward, forward_bounds, make_case, ref_backward)


def _gpu_unavailable_reason():
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001 - not installed, or installed but broken
        return f"cupy is not importable ({type(exc).__name__}: {exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001
        return f"no CUDA device ({type(exc).__name__}: {exc})"
    return None if n > 0 else "no CUDA device"


REASON = _gpu_unavailable_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=str(REASON))]

GPU_BACKENDS = ["cupy", "numba-cuda"]
DTYPES = [np.float16, np.float32, np.float64]


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


def backend(name):
    from fastbn.backends import get_backend

    return get_backend(name)  # a GPU backend that fails to load fails the test


def run_backend(cp, be, x3, w, b, dy3, eps=1e-5, *, view=None):
    """Run forward_train, forward_eval and backward on the GPU; check them on the host."""
    g = (lambda a: cp.asarray(a)) if view is None else view
    gx, gdy = g(x3), g(dy3)
    gw, gb = cp.asarray(w), cp.asarray(b)
    y, mean, var, invstd = be.forward_train(gx, gw, gb, eps)
    for a in (y, mean, var, invstd):
        assert isinstance(a, cp.ndarray)
    out = tuple(a.get() for a in (y, mean, var, invstd))
    check_forward(x3, w, b, eps, out)
    ye = be.forward_eval(gx, mean, var, gw, gb, eps)
    check_forward(x3, w, b, eps, (ye.get(),) + out[1:])
    dx, dw, db = be.backward(gdy, gx, mean, invstd, gw)
    check_backward(dy3, x3, out[1], out[3], w, (dx.get(), dw.get(), db.get()))


SHAPES = {
    "cf": (16, 64, 3136),        # NCHW 56x56: channels-first, several splits per channel
    "cf-odd": (6, 5, 301),       # odd rows: scalar heads/tails around the vector loads
    "cf-tiles": (2, 3, 40000),   # rows longer than 2 * MAX_TILE are cut into tiles
    "cf-A1": (1, 2, 100003),     # one row per channel
    "cl": (4096, 256, 1),        # (N, C) / NHWC: channels-last with 4-wide vectors
    "cl-odd": (999, 7, 1),       # channels-last, C % 4 != 0: scalar columns
    "cl-smallB": (64, 32, 49),   # 7x7 spatial: channels-last kernels with G = 49
    "cl-C1": (5000, 1, 1),
    "M1": (1, 3, 1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", list(SHAPES))
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_backend_against_reference(cp, name, case, dtype):
    rng = np.random.default_rng(zlib.crc32(f"{name}-{case}".encode()))
    shape = SHAPES[case]
    x3, w, b = make_case(rng, shape, dtype, offset_ratio=3.0)
    dy3 = rng.standard_normal(shape).astype(dtype)
    run_backend(cp, backend(name), x3, w, b, dy3)


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [(7, 3, 301), (333, 12, 1)], ids=["cf", "cl"])
def test_misaligned_views(cp, name, shape):
    """Contiguous views that start one element past an allocation: no vector path may
    assume alignment."""
    rng = np.random.default_rng(5)
    x3, w, b = make_case(rng, shape, np.float32, offset_ratio=2.0)
    dy3 = rng.standard_normal(shape).astype(np.float32)

    def view(a):
        buf = cp.empty(a.size + 1, a.dtype)
        v = buf[1:].reshape(a.shape)
        v[...] = cp.asarray(a)
        assert v.data.ptr % 16 != 0
        return v

    run_backend(cp, backend(name), x3, w, b, dy3, view=view)


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [(64, 8, 4096), (65536, 16, 1)], ids=["cf", "cl"])
def test_large_offset_float32(cp, name, shape):
    """|mean| / std = 1e4 in float32 (the naive formula's error would be about 600 %)."""
    rng = np.random.default_rng(9)
    x3, w, b = make_case(rng, shape, np.float32, offset_ratio=1e4)
    dy3 = rng.standard_normal(shape).astype(np.float32)
    run_backend(cp, backend(name), x3, w, b, dy3)


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_constant_channel_eps0(cp, name):
    x3 = np.full((4, 2, 1000), 3.5, np.float32)
    x3[:, 1] = np.random.default_rng(1).standard_normal((4, 1000))
    w = np.array([2.0, 1.0], np.float32)
    b = np.array([0.25, 0.0], np.float32)
    y, mean, var, invstd = backend(name).forward_train(cp.asarray(x3), cp.asarray(w),
                                                       cp.asarray(b), 0.0)
    assert float(var[0]) == 0 and float(invstd[0]) == 0 and float(mean[0]) == 3.5
    assert bool((y[:, 0] == np.float32(0.25)).all())


# at most ~2 M values per example, so the float64 oracle on the host stays quick
shapes = st.one_of(
    st.tuples(st.integers(1, 6), st.integers(1, 40), st.integers(256, 5000)),   # cf
    st.tuples(st.integers(1, 3000), st.integers(1, 40), st.integers(1, 16)),    # cl
)


@pytest.mark.parametrize("name", GPU_BACKENDS)
@settings(deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES),
       offset=st.sampled_from([0.0, 10.0, 1e3, 1e4]), eps=st.sampled_from([1e-5, 1e-2]),
       seed=st.integers(0, 2**32 - 1))
def test_property_backend_matches_reference(cp, name, shape, dtype, offset, eps, seed):
    rng = np.random.default_rng(seed)
    x3, w, b = make_case(rng, shape, dtype, offset_ratio=offset)
    dy3 = rng.standard_normal(shape).astype(dtype)
    run_backend(cp, backend(name), x3, w, b, dy3, eps)


# ----------------------------------------------------------------------------------------
# the public API on CuPy arrays
# ----------------------------------------------------------------------------------------


LAYOUTS = {"NCHW": ((8, 6, 10, 12), 1), "NHWC": ((8, 10, 12, 6), -1), "NC": ((300, 6), 1)}


def to3(a, axis):
    """The (A, C, B) view of a C-ordered array with feature axis `axis`."""
    axis = axis % a.ndim
    return a.reshape(int(np.prod(a.shape[:axis])), a.shape[axis], -1)


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_public_api_on_cupy_arrays(cp, name, layout):
    """fastbn's public functions on CuPy arrays: results within the bounds of the exact
    ones (the CPU backend is held to the same bounds by its own tests), running
    statistics updated in place like torch's."""
    import fastbn

    rng = np.random.default_rng(21)
    shape, axis = LAYOUTS[layout]
    x = (rng.standard_normal(shape) * 2 + 5).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = rng.uniform(0.5, 1.5, 6).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    rm, rv = cp.zeros(6, np.float32), cp.ones(6, np.float32)
    y, m, i = fastbn.batch_norm_forward(cp.asarray(x), cp.asarray(w), cp.asarray(b), axis=axis,
                                        running_mean=rm, running_var=rv, momentum=0.1,
                                        backend=name)
    assert isinstance(y, cp.ndarray) and y.shape == shape and y.dtype == np.float32
    fb = forward_bounds(to3(x, axis), w, b, 1e-5)
    assert_within("y", to3(y.get(), axis), *fb["y"])
    assert_within("save_mean", m.get(), *fb["mean"])
    assert_within("save_invstd", i.get(), *fb["invstd"])
    # running stats: 0.9 * old + 0.1 * batch stat (unbiased variance), one more rounding
    M = x.size // 6
    mr, tol_m = fb["mean"]
    vr, tol_v = fb["var"]
    u = acc_u(np.float32)
    assert_within("running_mean", rm.get(), 0.1 * mr, 0.1 * tol_m + 2 * u * np.abs(mr))
    rv_exact = 0.9 + 0.1 * vr * M / (M - 1)
    assert_within("running_var", rv.get(), rv_exact, 0.1 * tol_v * M / (M - 1) + 4 * u * rv_exact)
    dx, dw, db = fastbn.batch_norm_backward(cp.asarray(dy), cp.asarray(x), m, i, cp.asarray(w),
                                            axis=axis, backend=name)
    bb = backward_bounds(to3(dy, axis), to3(x, axis), m.get(), i.get(), w)
    assert_within("dx", to3(dx.get(), axis), *bb["dx"])
    assert_within("dweight", dw.get(), *bb["dweight"])
    assert_within("dbias", db.get(), *bb["dbias"])


def test_default_backend_for_cupy(cp):
    import fastbn

    x = cp.asarray(np.random.default_rng(0).standard_normal((16, 3, 5)).astype(np.float32))
    y = fastbn.batch_norm(x, training=True)
    assert isinstance(y, cp.ndarray)
    assert "cupy" in fastbn.backends() and "numba-cuda" in fastbn.backends()


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_runs_on_the_current_stream(cp, name):
    """Launches go to cupy's current stream: results are complete once that stream is."""
    rng = np.random.default_rng(2)
    x3, w, b = make_case(rng, (32, 16, 4096), np.float32, offset_ratio=1.0)
    be = backend(name)
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        gx, gw, gb = cp.asarray(x3), cp.asarray(w), cp.asarray(b)
        y, mean, var, invstd = be.forward_train(gx, gw, gb, 1e-5)
        y2 = y * 1  # ordered after the kernels on the same stream
    s.synchronize()
    check_forward(x3, w, b, 1e-5, (y2.get(), mean.get(), var.get(), invstd.get()))


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_cuda_array_interface_input(cp, name):
    """A numba device array (``__cuda_array_interface__``) is accepted without a copy."""
    import fastbn
    from fastbn.backends import _cuda_shim

    cuda = _cuda_shim.numba_cuda_module()
    x = np.random.default_rng(4).standard_normal((64, 5)).astype(np.float32)
    dx = cuda.to_device(x)
    y = fastbn.batch_norm(dx, training=True, backend=name)
    got = cp.asnumpy(cp.asarray(y))
    fb = forward_bounds(x.reshape(64, 5, 1), np.ones(5, np.float32), np.zeros(5, np.float32), 1e-5)
    assert_within("y", got.reshape(64, 5, 1), *fb["y"])


def test_mixing_host_and_device_arrays_is_an_error(cp):
    import fastbn

    x = cp.ones((4, 3), np.float32)
    with pytest.raises((TypeError, ValueError), match="weight"):
        fastbn.batch_norm(x, weight=np.ones(3, np.float32), training=True)


# ----------------------------------------------------------------------------------------
# parity with PyTorch on CUDA
# ----------------------------------------------------------------------------------------


def _torch_cuda():
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    return torch


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NC"])
def test_parity_with_torch(cp, name, dtype, layout):
    """fastbn and torch.nn.functional.batch_norm on CUDA agree to within the sum of their
    error bounds (torch's CUDA kernels are also Welford-based, so the same bound is used
    for both: |fastbn - torch| <= 2 * bound)."""
    torch = _torch_cuda()
    import fastbn

    rng = np.random.default_rng(33)
    C = 16
    shape = {"NCHW": (8, C, 14, 14), "NHWC": (8, 14, 14, C), "NC": (512, C)}[layout]
    axis = -1 if layout == "NHWC" else 1
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, C).astype(np.float32 if dtype == "float16" else dtype)
    b = rng.standard_normal(C).astype(w.dtype)

    tx = torch.tensor(x, device="cuda", requires_grad=True)
    tdy = torch.tensor(dy, device="cuda")
    if layout == "NHWC":  # torch sees the same memory as NCHW in channels_last format
        txp, tdyp = tx.permute(0, 3, 1, 2), tdy.permute(0, 3, 1, 2)
    else:
        txp, tdyp = tx, tdy
    tw = torch.tensor(w, device="cuda", requires_grad=True)
    tb = torch.tensor(b, device="cuda", requires_grad=True)
    ty = torch.nn.functional.batch_norm(txp, None, None, tw, tb, training=True, eps=1e-5)
    ty.backward(tdyp)
    back = (lambda t: t.permute(0, 2, 3, 1)) if layout == "NHWC" else (lambda t: t)
    ty_n = back(ty).detach().cpu().numpy()
    gx_t = tx.grad.cpu().numpy()

    gx, gw, gb = cp.asarray(x), cp.asarray(w), cp.asarray(b)
    y, sm, si = fastbn.batch_norm_forward(gx, gw, gb, eps=1e-5, axis=axis, backend=name)
    dx, dw, db = fastbn.batch_norm_backward(cp.asarray(dy), gx, sm, si, gw, axis=axis,
                                            backend=name)
    fb = forward_bounds(to3(x, axis), w, b, 1e-5)
    yr, tol_y = fb["y"]
    assert_within("y vs torch", to3(y.get(), axis), to3(ty_n, axis).astype(np.float64), 2 * tol_y)
    mr, tol_m = fb["mean"]
    ir, tol_i = fb["invstd"]
    x3, dy3 = to3(x, axis), to3(dy, axis)
    bb = backward_bounds(dy3, x3, mr, ir, w)
    # Each implementation's statistics are within (tol_m, tol_i) of the exact ones, and
    # its gradients within the bounds for its own statistics; the first-order effect of
    # the statistics' errors is measured by perturbing them in the float64 oracle.
    base = ref_backward(dy3, x3, mr, ir, w)
    sens = [np.zeros_like(a) for a in base]
    for sm_ in (-1, 1):
        for si_ in (-1, 1):
            pert = ref_backward(dy3, x3, mr + sm_ * tol_m, ir + si_ * tol_i, w)
            sens = [np.maximum(s_, np.abs(p_ - b_)) for s_, p_, b_ in zip(sens, pert, base)]
    assert_within("dx vs torch", to3(dx.get(), axis), to3(gx_t, axis).astype(np.float64),
                  2 * (bb["dx"][1] + sens[0]))
    assert_within("dweight vs torch", dw.get(), tw.grad.cpu().numpy().astype(np.float64),
                  2 * (bb["dweight"][1] + sens[1]))
    assert_within("dbias vs torch", db.get(), tb.grad.cpu().numpy().astype(np.float64),
                  2 * (bb["dbias"][1] + sens[2]))


# ----------------------------------------------------------------------------------------
# layer norm and RMS norm
# ----------------------------------------------------------------------------------------

ROW_SHAPES = {
    "llm": (2048, 4096),     # a transformer hidden size: 256-thread blocks, vector loads
    "odd": (999, 37),        # odd rows: per-row scalar heads and tails
    "short": (65536, 128),   # one warp per row, many rows per block (grid-stride)
    "wide": (16, 70001),     # long rows, few rows
    "N1": (7, 1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", list(ROW_SHAPES))
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_row_kernels_against_reference(cp, name, case, dtype):
    from cudasim._rowbounds import run_rows

    rng = np.random.default_rng(zlib.crc32(f"rows-{name}-{case}".encode()))
    run_rows(backend(name), rng, ROW_SHAPES[case], dtype, offset_ratio=3.0, view=cp.asarray,
             param=cp.asarray)


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_row_norms_public_api_on_cupy(cp, name):
    """fastbn.layer_norm/rms_norm and their backward on CuPy arrays give CuPy arrays, and
    agree with the CPU backend to the float32 bounds (both are checked against the oracle
    above; here the API's dispatch, views and defaults)."""
    import fastbn

    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6, 64)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, 64).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    gx, gw, gb = cp.asarray(x), cp.asarray(w), cp.asarray(b)
    y, mean, rstd = fastbn.layer_norm_forward(gx, 64, gw, gb, backend=name)
    assert all(isinstance(a, cp.ndarray) for a in (y, mean, rstd)) and mean.shape == (4, 6)
    yc = fastbn.layer_norm(x, 64, w, b)
    np.testing.assert_allclose(y.get(), yc, rtol=1e-5, atol=1e-5)
    dx, dw, db = fastbn.layer_norm_backward(gx, gx, mean, rstd, 64, gw, backend=name)
    dxc, dwc, dbc = fastbn.layer_norm_backward(x, x, mean.get(), rstd.get(), 64, w)
    for g, c in ((dx, dxc), (dw, dwc), (db, dbc)):
        np.testing.assert_allclose(g.get(), c, rtol=1e-4, atol=1e-4)
    yr = fastbn.rms_norm(gx, (6, 64), backend=name)
    np.testing.assert_allclose(yr.get(), fastbn.rms_norm(x, (6, 64)), rtol=1e-5, atol=1e-5)
