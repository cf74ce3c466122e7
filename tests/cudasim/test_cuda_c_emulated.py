"""The CUDA C kernels and the host code of the "cupy" backend, run on the CPU.

No GPU is needed: ``cuda_emulation.cpp`` runs ``fastbn/kernels/batchnorm.cu`` unchanged
(compiled by g++ with a small emulation of threads, blocks, ``__syncthreads``, shared
memory and warp shuffles), and a stand-in for the few CuPy calls the backend makes
(allocation, device, ``RawModule``/``RawKernel`` launches) routes every launch there. So
the backend's real host code (``fastbn.backends.cupy_raw``: launch plan, argument types,
workspaces) and the real kernels are checked together against the float64 oracle with the
bounds of ``_bounds.py``. Each launch also checks the number and byte sizes of the
arguments against the kernel's parameters, as a mismatch would corrupt them on a GPU.

What the emulation cannot show: timing, the memory model between blocks (blocks run one
after the other), and anything specific to the hardware or to NVRTC (the nvcc/NVRTC
tests compile the same file).
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from _bounds import (BF16_PATTERN_CASES, bf16_every_pattern, check_backward, check_bf16_every_pattern,
                     check_forward, check_special, make_case, special_case)
from _fake_cupy import FakeArray, FakeDevice, make_fake_cupy, to_fake

HERE = Path(__file__).resolve().parent
GXX = shutil.which("g++")
#: bfloat16 runs the FASTBN_DTYPE=3 instantiation, with the emulation's __nv_bfloat16
DTYPES = [np.float16, np.float32, np.float64, ml_dtypes.bfloat16]

pytestmark = pytest.mark.skipif(GXX is None, reason="g++ is not on the PATH")
#: runs in the main test run too (see conftest.py): no numba involved
REQUIRES_SIMULATOR = False


# ----------------------------------------------------------------------------------------
# the stand-in for CuPy
# ----------------------------------------------------------------------------------------


class FakeKernel:
    def __init__(self, lib, name):
        self.lib, self.name = lib, name

    def __call__(self, grid, block, args):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        assert isinstance(args, tuple)
        values = []
        for a in args:
            if isinstance(a, FakeArray):
                values.append(ctypes.c_void_p(a.data.ptr))
            elif isinstance(a, np.int64):
                values.append(ctypes.c_longlong(int(a)))
            elif isinstance(a, np.int32):
                values.append(ctypes.c_int(int(a)))
            elif isinstance(a, np.float64):
                values.append(ctypes.c_double(float(a)))
            elif isinstance(a, np.float32):
                values.append(ctypes.c_float(float(a)))
            else:  # CuPy would guess a C type for Python scalars: the backend never relies on it
                raise TypeError(f"{self.name}: argument of type {type(a).__name__}")
        ptrs = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        sizes = (ctypes.c_int * len(values))(*[ctypes.sizeof(v) for v in values])
        rc = self.lib.fastbn_emu_launch(self.name.encode(), (ctypes.c_uint * 3)(*grid),
                                        (ctypes.c_uint * 3)(*block), ptrs, sizes, len(values))
        assert rc == 0, f"launch of {self.name} failed with code {rc} (grid {grid}, block {block})"


class FakeRawModule:
    libs: dict = {}
    build_dir: Path = None

    def __init__(self, code, options=()):
        self.code, self.options = code, options

    def _lib(self):
        (dtype_opt,) = [o for o in self.options if o.startswith("-DFASTBN_DTYPE=")]
        key = (dtype_opt, hash(self.code))
        if key not in self.libs:
            d = self.build_dir / f"build{len(self.libs)}"
            d.mkdir()
            (d / "kernels.cu").write_text(self.code)
            names = re.findall(r'extern "C" __global__ void\s+(?:FASTBN_BOUNDS\s+)?(\w+)\(',
                               self.code)
            assert names, "no kernels in the source"
            (d / "kernel_table.inc").write_text(
                "".join(f"FASTBN_EMU_KERNEL({n}),\n" for n in names))
            out = d / "libemu.so"
            cmd = [GXX, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", dtype_opt,
                   "-DFASTBN_HOST_EMULATION", "-Wall", "-Wno-unused-function",
                   f"-I{d}", str(HERE / "cuda_emulation.cpp"), "-o", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr
            lib = ctypes.CDLL(str(out))
            lib.fastbn_emu_launch.restype = ctypes.c_int
            self.libs[key] = lib
        return self.libs[key]

    def compile(self):
        self._lib()

    def get_function(self, name):
        return FakeKernel(self._lib(), name)


@pytest.fixture(scope="module")
def cupy_raw(tmp_path_factory):
    """fastbn.backends.cupy_raw with the stand-in installed as ``cupy``."""
    from fastbn.backends import cupy_raw as mod

    FakeRawModule.build_dir = tmp_path_factory.mktemp("emu")
    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = make_fake_cupy(raw_module=FakeRawModule)
    mod._kernels.cache_clear()
    mod._num_sms.cache_clear()
    try:
        yield mod
    finally:
        mod._kernels.cache_clear()
        mod._num_sms.cache_clear()
        if saved is None:
            del sys.modules["cupy"]
        else:
            sys.modules["cupy"] = saved


def run_all(be, rng, shape, dtype, eps=1e-5, offset_ratio=3.0, view=to_fake):
    x3, w, b = make_case(rng, shape, dtype, offset_ratio)
    dy3 = rng.standard_normal(shape).astype(dtype)
    gx, gdy, gw, gb = view(x3), view(dy3), to_fake(w), to_fake(b)
    out = be.forward_train(gx, gw, gb, eps)
    assert all(isinstance(a, FakeArray) for a in out)
    check_forward(x3, w, b, eps, tuple(np.asarray(a) for a in out))
    _, mean, var, invstd = out
    ye = be.forward_eval(gx, mean, var, gw, gb, eps)
    check_forward(x3, w, b, eps, (np.asarray(ye),) + tuple(np.asarray(a) for a in out[1:]))
    dx, dw, db = be.backward(gdy, gx, mean, invstd, gw)
    check_backward(dy3, x3, np.asarray(mean), np.asarray(invstd), w,
                   (np.asarray(dx), np.asarray(dw), np.asarray(db)))


SHAPES = {
    "cf": (3, 4, 1000),          # channels-first, vector path, several splits
    "cf-odd": (3, 3, 301),       # odd rows: scalar heads and tails around the vectors
    "cf-tiles": (1, 2, 20000),   # rows longer than 2 * MAX_TILE are cut into tiles
    "cl4": (200, 8, 1),          # channels-last, 4 columns per thread
    "cl1": (37, 3, 1),           # channels-last, C % 4 != 0
    "cl-smallB": (9, 3, 7),      # small spatial size: channels-last kernels with G = 7
    "cl-wide": (40, 300, 1),     # several column blocks
    "M1": (1, 3, 1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", list(SHAPES))
def test_cuda_c_kernels_against_reference(cupy_raw, case, dtype):
    rng = np.random.default_rng(zlib.crc32(f"emu-{case}-{np.dtype(dtype).name}".encode()))
    run_all(cupy_raw, rng, SHAPES[case], dtype)


def test_cases_cover_the_plan(cupy_raw):
    from fastbn.backends import _cuda_shim

    def p(case, ptrs=()):
        return _cuda_shim.plan(*SHAPES[case], 4, FakeDevice.attributes["MultiProcessorCount"],
                               ptrs)

    assert p("cf").family == "cf" and p("cf").vec == 1 and p("cf").S > 1
    assert p("cf-tiles").nbc > 1
    assert p("cl4").family == "cl" and p("cl4").vec == 4 and p("cl4").S > 1
    assert p("cl1").vec == 1
    assert p("cl-smallB").G == 7
    assert p("cl-wide").grid_reduce[0] > 1
    assert p("cf", (16, 20)).vec == 0  # pointers not congruent: no vector path


@pytest.mark.parametrize("shape", [(3, 4, 1000), (200, 8, 1)], ids=["cf", "cl"])
def test_misaligned_views(cupy_raw, shape):
    """Views one element past an aligned allocation: heads/tails (cf), scalar columns (cl)."""

    def view(a):
        buf = np.empty(a.size + 1, a.dtype).view(FakeArray)
        v = buf[1:].reshape(a.shape)
        v[...] = a
        assert v.data.ptr % 16 != 0
        return v

    run_all(cupy_raw, np.random.default_rng(5), shape, np.float32, view=view)


@pytest.mark.parametrize("shape", [(4, 2, 3000), (3000, 4, 1)], ids=["cf", "cl"])
def test_large_offset_float32(cupy_raw, shape):
    run_all(cupy_raw, np.random.default_rng(9), shape, np.float32, offset_ratio=1e4)


def test_constant_channel_eps0(cupy_raw):
    x3 = np.full((4, 2, 1000), 3.5, np.float32)
    x3[:, 1] = np.random.default_rng(1).standard_normal((4, 1000))
    w, b = np.array([2.0, 1.0], np.float32), np.array([0.25, 0.0], np.float32)
    y, mean, var, invstd = cupy_raw.forward_train(to_fake(x3), to_fake(w), to_fake(b), 0.0)
    assert var[0] == 0 and invstd[0] == 0 and mean[0] == 3.5
    assert (np.asarray(y)[:, 0] == np.float32(0.25)).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", [c for c in SHAPES if c != "M1"])
def test_constant_and_infinite_features(cupy_raw, case, dtype):
    """Every launch plan: a constant 0.1 feature is exact, infinities give +-inf or NaN
    means (merging an infinite partial mean once gave NaN: inf - inf)."""
    rng = np.random.default_rng(zlib.crc32(f"special-{case}".encode()))
    x3, w, b = special_case(rng, SHAPES[case], dtype)
    out = cupy_raw.forward_train(to_fake(x3), to_fake(w), to_fake(b), 0.0)
    check_special(x3, w, b, out)



@pytest.mark.parametrize("case", sorted(BF16_PATTERN_CASES))
def test_bfloat16_loads_and_stores_every_pattern(cupy_raw, case):
    """The bfloat16 instantiation converts as cuda_bf16.h does, checked on all 65536 bit
    patterns through the elementwise kernel of eval mode (see check_bf16_every_pattern).
    NaN becomes the canonical NaN 0x7FFF, as on the GPU."""
    alpha, beta = BF16_PATTERN_CASES[case]
    x3 = bf16_every_pattern((256, 256, 1))
    c = x3.shape[1]
    mean, var = np.zeros(c, np.float32), np.ones(c, np.float32)
    w, b = np.full(c, alpha, np.float32), np.full(c, beta, np.float32)
    y = cupy_raw.forward_eval(to_fake(x3), to_fake(mean), to_fake(var), to_fake(w),
                              to_fake(b), 0.0)

    def canonical(y_nan, _y32_nan):
        np.testing.assert_array_equal(y_nan, 0x7FFF)

    check_bf16_every_pattern(x3, y, alpha, beta, canonical)


# ----------------------------------------------------------------------------------------
# layer norm and RMS norm (fastbn/kernels/rownorm.cu, host code fastbn.backends._gpu_rows)
# ----------------------------------------------------------------------------------------

ROW_SHAPES = {
    "warp": (5, 100),        # one warp per row, vector loads, aligned rows
    "odd": (7, 37),          # rows of odd length: per-row scalar heads and tails
    "wide": (3, 3000),       # 256-thread blocks: block merges over several warps
    "N1": (4, 1),            # one value per row: var = 0, rstd = 1/sqrt(eps)
    "rows": (300, 8),        # grid-stride over rows; column partials in several splits
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", list(ROW_SHAPES))
def test_row_kernels_against_reference(cupy_raw, case, dtype):
    from _rowbounds import run_rows

    rng = np.random.default_rng(zlib.crc32(f"emu-rows-{case}-{np.dtype(dtype).name}".encode()))
    run_rows(cupy_raw, rng, ROW_SHAPES[case], dtype, offset_ratio=3.0, view=to_fake,
             param=to_fake)


def test_row_cases_cover_the_plan():
    from fastbn.backends import _gpu_rows

    sms = FakeDevice.attributes["MultiProcessorCount"]

    def p(case, ptrs=()):
        return _gpu_rows.row_plan(*ROW_SHAPES[case], 4, sms, ptrs)

    assert p("warp").threads == 32 and p("wide").threads == 256
    assert p("rows").grid < ROW_SHAPES["rows"][0]  # blocks take several rows each
    assert p("rows").S > 1  # several partial column sums go through the finalize kernel
    assert p("odd", (16, 32)).vec_ok == 1 and p("odd", (16, 20)).vec_ok == 0


def test_row_kernels_misaligned_and_large_offset(cupy_raw):
    """x one element past an aligned allocation (no vector path: its pointer is not
    congruent to y's), and rows with |mean| / std = 1e4 in float32."""
    from _rowbounds import run_rows

    def view(a):
        buf = np.empty(a.size + 1, a.dtype).view(FakeArray)
        v = buf[1:].reshape(a.shape)
        v[...] = a
        return v

    run_rows(cupy_raw, np.random.default_rng(3), (6, 400), np.float32, view=view, param=to_fake)
    run_rows(cupy_raw, np.random.default_rng(4), (6, 400), np.float32, offset_ratio=1e4,
             view=to_fake, param=to_fake)


def test_row_kernels_constant_row_eps0(cupy_raw):
    """A constant row with eps = 0: var = 0, rstd = 0 (the contract), y = bias exactly."""
    x2 = np.full((2, 64), 0.1, np.float32)
    x2[1] = np.random.default_rng(2).standard_normal(64)
    w, b = np.full(64, 2.0, np.float32), np.full(64, 0.25, np.float32)
    y, mean, rstd = cupy_raw.layer_norm_forward(to_fake(x2), to_fake(w), to_fake(b), 0.0)
    assert mean[0] == np.float32(0.1) and rstd[0] == 0 and rstd[1] > 0
    assert (np.asarray(y)[0] == np.float32(0.25)).all()
    y, rstd = cupy_raw.rms_norm_forward(to_fake(np.zeros((1, 8), np.float32)), to_fake(w[:8]), 0.0)
    assert rstd[0] == 0 and (np.asarray(y) == 0).all()
