"""float16 conversions for the Numba CPU kernels (``fastbn.backends._half``).

The conversions must equal NumPy's bit for bit: ``h2f`` is exact (every float16 is a
float32), and ``f2h`` rounds to nearest, ties to even, once, also from float64. So
there are no tolerances here: every comparison is of bit patterns, except for NaN,
whose payload the hardware may change (documented per test).

Both implementations are tested on every machine: the one the target compiles to
(F16C instructions on x86-64) and the integer code used where the target has no half
conversions (forced with ``_h2f_sw`` / ``_f2h_sw``; a subprocess test also runs the
automatic choice on a generic x86-64 CPU model without F16C).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
from numba import njit, prange
from numba.core.errors import TypingError

from fastbn.backends import _half
from fastbn.backends._half import f2h, h2f, ld, st

# ----------------------------------------------------------------------------------
# Kernels under test
# ----------------------------------------------------------------------------------


@njit(cache=True)
def _h2f_hw(u):
    out = np.empty(u.size, np.float32)
    for i in range(u.size):
        out[i] = h2f(u[i])
    return out


@njit(cache=True)
def _h2f_soft(u):
    out = np.empty(u.size, np.float32)
    for i in range(u.size):
        out[i] = _half._h2f_sw(u[i])
    return out


@njit(cache=True)
def _f2h_hw(v):
    out = np.empty(v.size, np.uint16)
    for i in range(v.size):
        out[i] = f2h(v[i])
    return out


@njit(cache=True)
def _f2h_soft(v):
    out = np.empty(v.size, np.uint16)
    for i in range(v.size):
        out[i] = _half._f2h_sw(v[i])
    return out


IMPLS = {"native": (_h2f_hw, _f2h_hw), "integer": (_h2f_soft, _f2h_soft)}


@njit(fastmath={"contract"}, cache=True, nogil=True)
def affine(xf, yf, a, b):
    for i in range(np.uint64(xf.size)):
        yf[i] = st(ld(xf[i]) * a + b, yf)


@njit(fastmath={"contract"}, cache=True, nogil=True)
def affine_plain(xf, yf, a, b):
    for i in range(np.uint64(xf.size)):
        yf[i] = xf[i] * a + b


@njit(fastmath={"contract"}, cache=True, nogil=True, parallel=True)
def affine_par(xf, yf, a, b):
    for i in prange(xf.size):
        yf[i] = st(ld(xf[i]) * a + b, yf)


@njit(fastmath={"reassoc", "contract"}, cache=True, nogil=True)
def total(xf):
    s = 0.0
    for i in range(np.uint64(xf.size)):
        s += ld(xf[i])
    return s


# ----------------------------------------------------------------------------------
# Test values
# ----------------------------------------------------------------------------------

ALL16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
_H = ALL16.view(np.float16).astype(np.float64)
FINITE16 = np.unique(_H[np.isfinite(_H)])  # sorted; -0 and +0 collapse to one 0
# Ties: midpoints of consecutive float16 values, and 65520, the midpoint between the
# largest float16 and 2**16 (where the next binade would start), which rounds to inf.
MIDS = np.concatenate([(FINITE16[:-1] + FINITE16[1:]) / 2, [65520.0, -65520.0]])
SPECIAL = np.array([0.0, -0.0, np.inf, -np.inf, 65504.0, 65519.0, 65520.0, 65536.0, 1e5,
                    2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-26, 2.0**-14, 2.0**-14 - 2.0**-25,
                    6.1e-5, 1.0, -1.0, 3.0e38, -3.0e38, 1e-40, -1e-45])


def _neighbours(v, dtype):
    """v and its neighbours one ulp of `dtype` below and above."""
    v = v.astype(dtype)
    return np.concatenate([v, np.nextafter(v, dtype(np.inf)), np.nextafter(v, dtype(-np.inf))])


def _random_bits(dtype, n, seed):
    """Random bit patterns: every exponent, sign and mantissa (NaN and inf included)."""
    ui = np.uint32 if dtype == np.float32 else np.uint64
    rng = np.random.default_rng(seed)
    return rng.integers(0, np.iinfo(ui).max, n, dtype=ui, endpoint=True).view(dtype)


def _random_half_range(dtype, n, seed):
    """Random values of magnitude 2**-30 to 2**17: float16's subnormals to overflow."""
    rng = np.random.default_rng(seed)
    return np.ldexp(rng.uniform(-2, 2, n), rng.integers(-30, 18, n)).astype(dtype)


def f2h_cases(dtype):
    """Everything f2h is tested on, for inputs of `dtype`."""
    parts = [
        FINITE16.astype(dtype), -FINITE16.astype(dtype),  # exact: must come back unchanged
        _neighbours(MIDS, dtype), _neighbours(-MIDS, dtype),  # ties, one ulp either side
        SPECIAL.astype(dtype), -SPECIAL.astype(dtype),
        _random_bits(dtype, 1 << 18, 1),
        _random_half_range(dtype, 1 << 18, 2),
        np.array([np.nan, -np.nan], dtype),
    ]
    if dtype == np.float64:
        # Values that round to a float16 tie when rounded to float32 first, but are not
        # ties: rounding through float32 to nearest would get them wrong.
        off = MIDS * 2.0**-30
        parts += [MIDS + off, MIDS - off]
    return np.concatenate(parts)


def numpy_h2f(u):
    return u.view(np.float16).astype(np.float32)


def numpy_f2h(v):
    with np.errstate(over="ignore", invalid="ignore"):
        return v.astype(np.float16).view(np.uint16)


def _bits32(a):
    return np.asarray(a, np.float32).view(np.uint32)


# ----------------------------------------------------------------------------------
# h2f
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_h2f_every_bit_pattern(impl):
    got = IMPLS[impl][0](ALL16)
    want = numpy_h2f(ALL16)
    nan = np.isnan(want)
    assert nan.sum() == 2 * 1023 - 2 * 1 + 2  # 2 signs x 1023 nonzero mantissas, less none
    # Every non-NaN value (zeros with their sign, subnormals, inf) bit for bit.
    np.testing.assert_array_equal(_bits32(got)[~nan], _bits32(want)[~nan])
    # NaN: the sign and the payload are kept (shifted into place). NumPy keeps a
    # signalling NaN signalling; F16C's vcvtph2ps quiets it (sets the quiet bit 0x400000),
    # the integer code does not. So the only allowed difference is that bit.
    g, w = _bits32(got)[nan], _bits32(want)[nan]
    assert np.all(np.isnan(got[nan]))
    assert np.all((g == w) | (g == (w | 0x00400000)))
    if impl == "integer":
        np.testing.assert_array_equal(g, w)


# ----------------------------------------------------------------------------------
# f2h
# ----------------------------------------------------------------------------------


def _check_f2h(got, v):
    want = numpy_f2h(v)
    nan = np.isnan(v)
    bad = np.flatnonzero((got != want) & ~nan)
    assert bad.size == 0, f"{bad.size} mismatches, e.g. {v[bad[:5]]!r}: {got[bad[:5]]} != {want[bad[:5]]}"
    # NaN: a quiet float16 NaN (exponent all ones, quiet bit 0x200 set) of the same sign.
    # The payload is not specified: vcvtps2ph keeps its leading bits, the integer code
    # drops it (NumPy keeps it and leaves a signalling NaN signalling).
    gn = got[nan]
    assert np.all((gn & 0x7E00) == 0x7E00)
    assert np.array_equal(gn >> 15, (np.signbit(v[nan])).astype(np.uint16))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_f2h_matches_numpy(impl, dtype):
    v = f2h_cases(dtype)
    _check_f2h(IMPLS[impl][1](v), v)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_f2h_cases_are_discriminating(dtype):
    """The cases exercise every rounding situation, so a wrong rounding would be caught."""
    v = f2h_cases(dtype)
    want = numpy_f2h(v)
    with np.errstate(over="ignore", invalid="ignore"):
        r = want.view(np.float16).astype(np.float64)
        vv = v.astype(np.float64)
        twice = numpy_f2h(v.astype(np.float32))
    tie = np.isin(np.abs(vv), np.abs(MIDS))
    assert np.count_nonzero(tie & (np.abs(r) > np.abs(vv))) > 1000  # ties rounded up to even
    assert np.count_nonzero(tie & (np.abs(r) < np.abs(vv))) > 1000  # ties rounded down to even
    fin = np.isfinite(vv)
    assert np.count_nonzero(fin & np.isinf(r) & (np.abs(vv) < 65536)) >= 4  # overflow at 65520
    assert np.count_nonzero(fin & (vv != 0) & (r == 0)) > 100  # underflow to signed zero
    assert np.count_nonzero(((want & 0x7C00) == 0) & ((want & 0x3FF) != 0)) > 1000  # subnormals
    if dtype == np.float64:
        # Rounding through float32 to nearest would get some of them wrong.
        assert np.count_nonzero((twice != want) & ~np.isnan(v)) > 1000


def test_f2h_scalar_values():
    """A few values worked out by hand."""
    v32 = np.array([1.0, 65504.0, 65519.996, 65520.0, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25,
                    1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, -0.0], np.float32)
    want = np.array([0x3C00, 0x7BFF, 0x7BFF, 0x7C00, 0x0001, 0x0000, 0x0001,
                     0x3C00, 0x3C02, 0x8000], np.uint16)
    for f in (_f2h_hw, _f2h_soft):
        np.testing.assert_array_equal(f(v32), want)
    # 1 + 2**-11 + 2**-40 rounds up to 1 + 2**-10 in one step; rounded to float32 first
    # it would become the tie 1 + 2**-11 and then round down to 1.
    v64 = np.array([1.0 + 2.0**-11 + 2.0**-40, 1.0 + 2.0**-11 - 2.0**-40, 1e300, -1e-300], np.float64)
    want64 = np.array([0x3C01, 0x3C00, 0x7C00, 0x8000], np.uint16)
    for f in (_f2h_hw, _f2h_soft):
        np.testing.assert_array_equal(f(v64), want64)


def test_roundtrip_every_value():
    """f2h(h2f(u)) == u for every non-NaN pattern, for both implementations."""
    keep = ~np.isnan(numpy_h2f(ALL16))
    for hf, fh in IMPLS.values():
        np.testing.assert_array_equal(fh(hf(ALL16))[keep], ALL16[keep])


# ----------------------------------------------------------------------------------
# ld / st in kernels
# ----------------------------------------------------------------------------------

# Data and coefficients for which x * a + b rounds once in every variant (a is a power of
# two, so the product is exact and fusing the multiply-add changes nothing): the results
# are then NumPy's, bit for bit.
with np.errstate(over="ignore"):  # includes values that overflow to inf
    _X = np.concatenate([_random_half_range(np.float64, 5000, 3), FINITE16[::7]]).astype(np.float16)
_A, _B = -2.0, 0.375


def _expected(dtype, ab):
    x = _X.astype(dtype)
    work = np.float64 if (ab == np.float64 or dtype == np.float64) else np.float32
    with np.errstate(over="ignore"):
        y = x.astype(work) * work(_A) + work(_B)
        return y.astype(dtype)


@pytest.mark.parametrize("kernel", [affine, affine_par], ids=["serial", "parallel"])
@pytest.mark.parametrize("ab", [np.float32, np.float64])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_ld_st_kernel(kernel, dtype, ab):
    x = _X.astype(dtype)
    y = np.empty_like(x)
    view = (lambda a: a.view(np.uint16)) if dtype == np.float16 else (lambda a: a)
    kernel(view(x), view(y), ab(_A), ab(_B))
    want = _expected(dtype, ab)
    np.testing.assert_array_equal(y.view(f"u{y.itemsize}"), want.view(f"u{y.itemsize}"))


def test_cached_kernel_reloads():
    """The uint16 specialization of a ``cache=True`` kernel is written to Numba's cache and
    loads back from it (the object code has no unresolved symbols) with the same results."""
    x = _X.view(np.uint16)
    y = np.empty_like(x)
    affine(x, y, np.float32(_A), np.float32(_B))
    sig = next(s for s in affine.signatures if s[0].dtype == numba.uint16 and s[2] == numba.float32)
    cres = affine._cache.load_overload(sig, affine.targetctx)
    assert cres is not None, "not found in the cache"
    y2 = np.zeros_like(y)
    cres.entry_point(x, y2, np.float32(_A), np.float32(_B))
    np.testing.assert_array_equal(y2, y)


def test_ld_reduction():
    x = np.array([1.0, 2.5, -0.25, 65504.0], np.float16)
    assert total(x.view(np.uint16)) == 1.0 + 2.5 - 0.25 + 65504.0
    assert total(x.astype(np.float32)) == 1.0 + 2.5 - 0.25 + 65504.0


def _main_asm(disp, sig, pyname):
    """Instructions of the compiled function `pyname` (not the CPython wrapper), with
    symbol and label names replaced, so two functions can be compared. `disp` is
    compiled afresh without the on-disk cache (a cached function has no assembly)."""
    fresh = njit(**{k: v for k, v in disp.targetoptions.items() if k not in ("cache", "nopython")})(disp.py_func)
    fresh.compile(sig)
    out, on = [], False
    for line in fresh.inspect_asm(sig).splitlines():
        if re.match(rf"^_ZN\S*\d{pyname}\w*:", line) and "cpython" not in line:
            on, out = True, []
        if on:
            if line.startswith(".Lfunc_end"):
                break
            if line.startswith("\t") and not line.startswith("\t."):
                out.append(re.sub(r"_ZN\S+|\.LBB\w+|\.LCPI\w+", "SYM", line))
    return out


@pytest.mark.parametrize("ab", [np.float32, np.float64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_helpers_vanish_for_floats(dtype, ab):
    """For float arrays the loop with ld/st compiles to the same machine code as the loop
    written without them."""
    t = numba.typeof
    x = np.ones(8, dtype)
    sig = (t(x), t(x), t(ab(1)), t(ab(0)))
    a = _main_asm(affine, sig, "affine")
    b = _main_asm(affine_plain, sig, "affine_plain")
    assert len(a) > 20
    assert a == b


@pytest.mark.skipif(not (platform.machine() in ("x86_64", "AMD64") and _half.native()),
                    reason="needs x86-64 with F16C")
def test_native_loop_uses_f16c():
    """h2f/f2h compile to vcvtph2ps/vcvtps2ph, vectorized, with no library calls."""
    u16 = numba.uint16[::1]
    for ab in (numba.float32, numba.float64):
        sig = (u16, u16, ab, ab)
        asm = "\n".join(_main_asm(affine, sig, "affine"))
        # packed conversion from memory: F16C, or AVX512-FP16 (vcvtph2psx, vcvtph2pd)
        assert re.search(r"vcvtph2p[sd]x?\s+\S*\(", asm)
        assert "vcvtps2ph" in asm
        assert "call" not in asm


def test_typing_errors():
    @njit
    def h(v):
        return h2f(v)

    @njit
    def f(v):
        return f2h(v)

    @njit
    def s(v, out):
        out[0] = st(v, out)

    @njit
    def lo(v):
        return ld(v)

    with pytest.raises(TypingError, match="h2f expects a uint16"):
        h(np.float32(1))
    with pytest.raises(TypingError, match="f2h expects a float32 or float64"):
        f(np.int32(1))
    with pytest.raises(TypingError, match="st expects a float or uint16"):
        s(1.0, np.zeros(1, np.int32))
    with pytest.raises(TypingError, match="ld expects a float or uint16"):
        lo(np.int64(3))
    with pytest.raises(NotImplementedError, match="only usable inside Numba"):
        ld(np.float32(1))


# ----------------------------------------------------------------------------------
# Capability check
# ----------------------------------------------------------------------------------


def test_supported():
    ok, reason = _half.supported()
    assert ok, reason
    assert ("instructions" in reason) == _half.native()
    assert _half.supported() == (ok, reason)


_GENERIC_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from numba import njit
    from fastbn.backends import _half
    from fastbn.backends._half import ld, st

    if sys.argv[1] == "forced":
        # Pretend the target converts natively: the compiled code then calls library
        # routines the JIT cannot resolve, and supported() must say so without running it.
        _half._probe = lambda tm: (True, "")
        print(*_half.supported())
        sys.exit(0)

    @njit
    def affine(xf, yf, a, b):
        for i in range(np.uint64(xf.size)):
            yf[i] = st(ld(xf[i]) * a + b, yf)

    ok, reason = _half.supported()
    u = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    y = np.empty_like(u)
    affine(u, y, 1.0, -0.0)  # x * 1 + (-0) == x, also for x = -0
    keep = ~np.isnan(u.view(np.float16))
    print(_half.native(), ok, bool(np.array_equal(y[keep], u[keep])), reason)
""")


def _run_generic(mode):
    env = dict(os.environ, NUMBA_CPU_NAME="x86-64", NUMBA_CPU_FEATURES="+64bit,+cmov,+cx8,+fxsr,+mmx,+sse,+sse2")
    out = subprocess.run([sys.executable, "-c", _GENERIC_SCRIPT, mode], check=False, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 CPU models")
def test_generic_cpu_without_f16c():
    """On an x86-64 without F16C LLVM would call __extendhfsf2/__truncsfhf2, which the
    JIT cannot resolve (the call would crash): the integer code is used instead."""
    native, ok, roundtrip, reason = _run_generic("auto").split(" ", 3)
    assert (native, ok, roundtrip) == ("False", "True", "True")
    assert "integer code" in reason and "extendhfsf2" in reason


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 CPU models")
def test_supported_detects_library_calls():
    ok, reason = _run_generic("forced").split(" ", 1)
    assert ok == "False"
    assert "call" in reason and "extendhfsf2" in reason and "truncsfhf2" in reason
