"""float16 and bfloat16 conversions for the Numba CPU kernels (``fastbn.backends.cpu._half``).

The conversions must equal NumPy's bit for bit: ``h2f`` is exact (every float16 is a
float32), and ``f2h`` rounds to nearest, ties to even, once, also from float64. So
there are no tolerances here: every comparison is of bit patterns, except for NaN,
whose payload the hardware may change (documented per test).

bfloat16 likewise: ``b2f`` is exact and ``f2b`` rounds once to nearest even. Its oracles
are the bit patterns themselves (``b2f``), ml_dtypes for float32 inputs (a float32 has
one correctly rounded bfloat16), and for float64 inputs an exact oracle built here from
the sorted table of bfloat16 values (:func:`exact_f2b`), independent of ml_dtypes,
which may round a float64 through float32.

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

import ml_dtypes
import numba
import numpy as np
import pytest
from numba import njit, prange
from numba.core.errors import TypingError

from fastbn.backends.cpu import _half
from fastbn.backends.cpu._half import b2f, cf, f2b, f2h, h2f, ld, st

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
    from fastbn.backends.cpu import _half
    from fastbn.backends.cpu._half import ld, st

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


# ----------------------------------------------------------------------------------
# bfloat16: b2f / f2b
# ----------------------------------------------------------------------------------

BF16 = np.dtype(ml_dtypes.bfloat16)


# Compiled afresh in every run (no on-disk cache): Numba keys a cached kernel on its own
# source file only, so a cached copy would go on testing an old b2f/f2b after _half changes.
@njit(cache=False)
def _b2f(u):
    out = np.empty(u.size, np.float32)
    for i in range(u.size):
        out[i] = b2f(u[i])
    return out


@njit(cache=False)
def _f2b(v):
    out = np.empty(v.size, np.int16)
    for i in range(v.size):
        out[i] = f2b(v[i])
    return out


@njit(cache=False)
def _ld_copy(u):
    out = np.empty(u.size, np.float32)
    for i in range(u.size):
        out[i] = ld(u[i])
    return out


@njit(cache=False)
def _st_copy(v, out):
    for i in range(v.size):
        out[i] = st(v[i], out)


@njit(cache=False)
def _st_literals(out):
    out[0] = st(3, out)
    out[1] = st(True, out)
    out[2] = st(np.uint8(255), out)
    out[3] = st(np.int64(-257), out)


@njit(cache=False)
def _cf(v, like):
    return cf(v, like)


def f2b_bits(v):
    """bfloat16 bits (uint16) that f2b gives for the float32 or float64 array `v`."""
    return _f2b(v).view(np.uint16)


def ml_f2b(v):
    """ml_dtypes' conversion to bfloat16, as bits (the oracle for float32 inputs only)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return v.astype(BF16).view(np.uint16)


# The finite non-negative bfloat16 values: patterns 0x0000..0x7F7F, whose values increase
# with the pattern, then 2**128 at index 0x7F80 (inf's pattern: where the next binade would
# start). Midpoints of neighbours are exact in float64 (8-bit significands, no underflow);
# the last one is the overflow threshold (2 - 2**-8) * 2**127.
_BF_POS = np.append((np.arange(0x7F80, dtype=np.uint32) << 16).view(np.float32).astype(np.float64),
                    2.0**128)
_BF_MIDS = (_BF_POS[:-1] + _BF_POS[1:]) / 2
BF_OVERFLOW = (2 - 2.0**-8) * 2.0**127


def exact_f2b(d):
    """bfloat16 bits (uint16) of the float64 values `d`, correctly rounded: to the nearer
    neighbour in the table of values, ties to the even pattern, inf from BF_OVERFLOW on,
    sign applied symmetrically. The oracle for f2b of float64 (not for NaN)."""
    d = np.asarray(d, np.float64)
    assert not np.any(np.isnan(d))
    a = np.abs(d)
    lo = np.searchsorted(_BF_POS, a, side="right") - 1  # _BF_POS[lo] <= a < _BF_POS[lo + 1]
    fin = lo < 0x7F80  # else a >= 2**128 (inf included): lo is inf's pattern
    mid = _BF_MIDS[np.minimum(lo, 0x7F7F)]
    up = fin & ((a > mid) | ((a == mid) & (lo % 2 == 1)))
    return (lo + up).astype(np.uint16) | (np.signbit(d).astype(np.uint16) << 15)


def f2b_cases32():
    """float32 inputs for f2b: every exponent and sign; every tie, exact value and their
    neighbours; float32 subnormals; the edges of overflow; NaNs (some whose payload lies
    only in the discarded bits, which rounding would turn into infinity)."""
    hi = np.arange(1 << 16, dtype=np.uint32) << 16
    sub = np.arange(0, 1 << 23, 61, dtype=np.uint32)
    parts = [
        np.arange(0, 1 << 32, 4093, dtype=np.uint64).astype(np.uint32),  # every exponent
        hi, hi | 0x8000, hi | 0x7FFF, hi | 0x8001, hi | 0x0001, hi | 0xFFFF,
        sub, sub | 0x80000000,
        np.array([0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF,
                  0x7F7F7FFF, 0x7F7F8000, 0x7F7F8001, 0xFF7F8000, 0x00000001, 0x00008000,
                  0x00018000, 0x007FFFFF, 0x00800000, 0x7F800001, 0x7FBFFFFF, 0x7FC00000,
                  0xFF800001, 0xFFFFFFFF, 0x7F808000], np.uint32),
    ]
    return np.concatenate(parts).view(np.float32)


def f2b_cases64():
    """float64 inputs for f2b (no NaN): random values from below bfloat16's smallest
    subnormal (2**-133) to overflow, random bit patterns, every bfloat16 value and midpoint
    with their float64 neighbours, and values 2**-30 (relative) off each midpoint, which
    round to the midpoint in float32: rounding through float32 to nearest gets them wrong."""
    rng = np.random.default_rng(11)
    n = 1 << 18
    rand = rng.choice([-1.0, 1.0], n) * np.ldexp(rng.uniform(1, 2, n), rng.integers(-141, 129, n))
    bits = _random_bits(np.float64, 1 << 16, 12)
    fin, mids = _BF_POS[:-1], _BF_MIDS
    off = mids * 2.0**-30
    pos = np.concatenate([fin, np.nextafter(fin, 0), np.nextafter(fin, np.inf),
                          mids, np.nextafter(mids, 0), np.nextafter(mids, np.inf), mids + off, mids - off,
                          [np.inf, 2.0**128, 1e300, 1e-300, 5e-324, 2.0**-149, 2.0**-150, 3 * 2.0**-150,
                           2.0**-126, np.nextafter(2.0**-126, 0), np.finfo(np.float32).max]])
    return np.concatenate([pos, -pos, rand, bits[~np.isnan(bits)]])


def test_b2f_every_bit_pattern():
    got = _b2f(ALL16.view(np.int16))
    # exact: the bits are the upper half of the float32, NaN payloads and signalling bit kept
    np.testing.assert_array_equal(got.view(np.uint32), ALL16.astype(np.uint32) << 16)
    want = ALL16.view(BF16).astype(np.float32)
    nan = np.isnan(want)
    assert nan.sum() == 2 * 127  # 2 signs x 127 nonzero 7-bit mantissas
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
    assert np.all(np.isnan(got[nan]))


def test_exact_f2b_oracle():
    """The float64 oracle on values worked out by hand, on the bfloat16 values themselves,
    and against ml_dtypes on float32 inputs (a float32 has one correctly rounded bfloat16,
    and float32 -> float64 is exact, so the two must agree)."""
    cases = [
        (0.0, 0x0000), (-0.0, 0x8000), (1.0, 0x3F80), (-(1 + 2.0**-7), 0xBF81),
        (1 + 2.0**-8, 0x3F80),  # tie: down to even
        (1 + 3 * 2.0**-8, 0x3F82),  # tie: up to even
        (1 + 2.0**-8 + 2.0**-40, 0x3F81),  # above the tie (through float32: the tie, then 0x3F80)
        (1 + 2.0**-8 - 2.0**-40, 0x3F80),
        (257.0, 0x4380), (259.0, 0x4382),  # ties between 256, 258, 260
        (2.0**-133, 0x0001),  # smallest subnormal
        (2.0**-134, 0x0000),  # tie between 0 and 2**-133: even
        (2.0**-134 + 2.0**-160, 0x0001),
        (3 * 2.0**-134, 0x0002),  # tie between 0x0001 and 0x0002
        (2.0**-126, 0x0080), (2.0**-126 - 2.0**-133, 0x007F),
        ((2 - 2.0**-7) * 2.0**127, 0x7F7F),  # largest finite
        (-(2 - 2.0**-7) * 2.0**127, 0xFF7F),
        (BF_OVERFLOW, 0x7F80), (np.nextafter(BF_OVERFLOW, 0), 0x7F7F), (-BF_OVERFLOW, 0xFF80),
        (1e300, 0x7F80), (-1e-300, 0x8000), (np.inf, 0x7F80), (-np.inf, 0xFF80),
    ]
    d = np.array([c[0] for c in cases], np.float64)
    np.testing.assert_array_equal(exact_f2b(d), np.array([c[1] for c in cases], np.uint16))
    assert BF_OVERFLOW == _BF_MIDS[-1]
    assert np.all(np.diff(_BF_POS) > 0)
    np.testing.assert_array_equal(exact_f2b(_BF_POS[:-1]), np.arange(0x7F80, dtype=np.uint16))
    np.testing.assert_array_equal(exact_f2b(-_BF_POS[:-1]), np.arange(0x7F80, dtype=np.uint16) | 0x8000)
    v = f2b_cases32()
    keep = ~np.isnan(v)
    np.testing.assert_array_equal(exact_f2b(v[keep].astype(np.float64)), ml_f2b(v[keep]))


def _check_f2b_nan(got, v):
    """NaN: a quiet NaN (exponent all ones and the quiet bit 0x40) of the same sign."""
    nan = np.isnan(v)
    gn = got[nan]
    assert gn.size > 0
    assert np.all((gn & 0x7FC0) == 0x7FC0)
    np.testing.assert_array_equal(gn >> 15, np.signbit(v[nan]).astype(np.uint16))
    return nan


def test_f2b_float32_matches_ml_dtypes():
    v = f2b_cases32()
    got = f2b_bits(v)
    want = ml_f2b(v)
    nan = _check_f2b_nan(got, v)
    bad = np.flatnonzero((got != want) & ~nan)
    assert bad.size == 0, f"{bad.size} mismatches, e.g. {v.view(np.uint32)[bad[:5]]}: {got[bad[:5]]} != {want[bad[:5]]}"
    # NaN keeps its sign and leading payload bits: (bits >> 16) | 0x40
    fb = v.view(np.uint32)[nan]
    np.testing.assert_array_equal(got[nan], ((fb >> 16) | 0x40).astype(np.uint16))


def test_f2b_float32_cases_are_discriminating():
    v = f2b_cases32()
    fb = v.view(np.uint32)
    want = ml_f2b(v)
    fin = np.isfinite(v)
    r = want.view(BF16).astype(np.float64)
    tie = fin & ((fb & 0xFFFF) == 0x8000)
    assert np.count_nonzero(tie & (np.abs(r) > np.abs(v))) > 1000  # ties rounded up to even
    assert np.count_nonzero(tie & (np.abs(r) < np.abs(v))) > 1000  # ties rounded down to even
    assert np.count_nonzero(fin & np.isinf(r)) >= 4  # overflow from 0x7F7F8000 on
    assert np.count_nonzero(fin & (v != 0) & (r == 0)) > 100  # underflow to signed zero
    assert np.count_nonzero(((want & 0x7F80) == 0) & ((want & 0x7F) != 0)) > 1000  # subnormals
    # mantissa carries into the exponent
    assert np.count_nonzero(fin & ((fb >> 16) & 0x7F == 0x7F) & ((fb & 0xFFFF) > 0x8000)) > 1000
    # NaNs whose payload is only in the 16 discarded bits: rounding would make them inf
    assert np.count_nonzero(np.isnan(v) & ((fb & 0x7FFF0000) == 0x7F800000)) >= 8


def test_f2b_float64_correctly_rounded():
    v = f2b_cases64()
    got = f2b_bits(v)
    want = exact_f2b(v)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{bad.size} mismatches, e.g. {v[bad[:5]]!r}: {got[bad[:5]]} != {want[bad[:5]]}"


def test_f2b_float64_cases_are_discriminating():
    v = f2b_cases64()
    want = exact_f2b(v)
    r = want.view(BF16).astype(np.float64)
    tie = np.isin(np.abs(v), _BF_MIDS)
    assert np.count_nonzero(tie & (np.abs(r) > np.abs(v))) > 1000
    assert np.count_nonzero(tie & (np.abs(r) < np.abs(v))) > 1000
    fin = np.isfinite(v)
    assert np.count_nonzero(fin & np.isinf(r) & (np.abs(v) < 2.0**128)) >= 2  # overflow at the midpoint
    assert np.count_nonzero(fin & (v != 0) & (r == 0)) > 1000  # underflow to signed zero
    assert np.count_nonzero(((want & 0x7F80) == 0) & ((want & 0x7F) != 0)) > 1000  # subnormals
    assert np.count_nonzero(np.abs(v) < 2.0**-126) > 10000  # float32's subnormal range
    # Rounding through float32 to nearest would get many of them wrong.
    with np.errstate(over="ignore"):
        twice = ml_f2b(v.astype(np.float32))
    assert np.count_nonzero(twice != want) > 10000


def test_f2b_float64_nan():
    d = np.array([np.nan, -np.nan, 0x7FF0000000000001, 0xFFF0000000000001, 0x7FF8000000000000,
                  0x7FFFFFFFFFFFFFFF, 0x7FF0000020000000], np.float64)
    d[2:] = np.array([0x7FF0000000000001, 0xFFF0000000000001, 0x7FF8000000000000,
                      0x7FFFFFFFFFFFFFFF, 0x7FF0000020000000], np.uint64).view(np.float64)
    assert np.all(np.isnan(d))
    _check_f2b_nan(f2b_bits(d), d)


def test_bfloat16_roundtrip_every_value():
    """f2b(b2f(u)) == u for every non-NaN pattern, from float32 and from float64."""
    u = ALL16.view(np.int16)
    keep = ~np.isnan(ALL16.view(BF16))
    f = _b2f(u)
    np.testing.assert_array_equal(_f2b(f)[keep], u[keep])
    with np.errstate(invalid="ignore"):  # NumPy warns on signalling NaNs
        f64 = f.astype(np.float64)
    np.testing.assert_array_equal(_f2b(f64)[keep], u[keep])


# ----------------------------------------------------------------------------------
# bfloat16: ld / st / cf in kernels
# ----------------------------------------------------------------------------------


def test_ld_st_int16_are_the_bfloat16_conversions():
    """On int16 arrays ld is b2f and st is f2b (float32 and float64 values)."""
    got = _ld_copy(ALL16.view(np.int16))
    np.testing.assert_array_equal(got.view(np.uint32), ALL16.astype(np.uint32) << 16)
    v32 = f2b_cases32()
    out = np.empty(v32.size, np.int16)
    _st_copy(v32, out)
    np.testing.assert_array_equal(out, _f2b(v32))
    keep = ~np.isnan(v32)
    np.testing.assert_array_equal(out.view(np.uint16)[keep], ml_f2b(v32[keep]))
    v64 = f2b_cases64()
    out = np.empty(v64.size, np.int16)
    _st_copy(v64, out)
    np.testing.assert_array_equal(out.view(np.uint16), exact_f2b(v64))


def test_st_int16_of_integers():
    """Integers are converted to float64, then rounded once to bfloat16: 2**33 + 2**25 + 1
    is just above a tie (through float32 it would become the tie and round down)."""
    k = np.array([0, 1, -3, 257, 259, 2**33 + 2**25, 2**33 + 2**25 + 1, -(2**62 + 2**54 + 1), 2**63 - 1],
                 np.int64)
    out = np.empty(k.size, np.int16)
    _st_copy(k, out)
    want = exact_f2b(k.astype(np.float64))
    np.testing.assert_array_equal(out.view(np.uint16), want)
    assert want[6] == want[5] + 1  # the rounding above the tie is exercised
    k32 = np.array([7, -65535, 2**31 - 1], np.int32)
    out = np.empty(k32.size, np.int16)
    _st_copy(k32, out)
    np.testing.assert_array_equal(out.view(np.uint16), exact_f2b(k32.astype(np.float64)))
    out = np.zeros(4, np.int16)
    _st_literals(out)
    np.testing.assert_array_equal(out.view(np.uint16), exact_f2b([3.0, 1.0, 255.0, -257.0]))


with np.errstate(over="ignore"):  # includes values that overflow to inf
    _rng_b = np.random.default_rng(13)
    _XB = np.concatenate([np.ldexp(_rng_b.uniform(-2, 2, 5000), _rng_b.integers(-136, 129, 5000)),
                          _BF_POS[:-1:7], -_BF_POS[:-1:11]]).astype(BF16)


@pytest.mark.parametrize("kernel", [affine, affine_par], ids=["serial", "parallel"])
@pytest.mark.parametrize("ab", [np.float32, np.float64])
def test_ld_st_kernel_bfloat16(kernel, ab):
    """The generic kernels on bfloat16 data (int16 views): x * a + b with a = -2 (exact
    product, so fusing changes nothing) computed in the coefficients' precision, then
    rounded once to bfloat16."""
    x = _XB
    y = np.empty_like(x)
    kernel(x.view(np.int16), y.view(np.int16), ab(_A), ab(_B))
    if ab == np.float32:  # ld gives float32: float32 arithmetic, then float32 -> bfloat16
        with np.errstate(over="ignore"):
            want = ml_f2b(x.astype(np.float32) * np.float32(_A) + np.float32(_B))
    else:  # float64 arithmetic, then float64 -> bfloat16
        want = exact_f2b(x.astype(np.float64) * _A + _B)
    assert np.count_nonzero(np.isinf(x)) > 10
    np.testing.assert_array_equal(y.view(np.uint16), want)


def test_ld_reduction_bfloat16():
    x = np.array([1.0, 2.5, -0.25, 65280.0, 2.0**-133], BF16)
    assert total(x.view(np.int16)) == 1.0 + 2.5 - 0.25 + 65280.0 + 2.0**-133


def test_cf_int16_is_float32():
    assert _cf(1 / 3, np.zeros(1, np.int16)) == float(np.float32(1 / 3)) != 1 / 3
    assert _cf(1 / 3, np.zeros(1, np.float64)) == 1 / 3


def test_bfloat16_typing_errors():
    @njit
    def b(v):
        return b2f(v)

    @njit
    def f(v):
        return f2b(v)

    @njit
    def s(v, out):
        out[0] = st(v, out)

    with pytest.raises(TypingError, match="b2f expects an int16"):
        b(np.uint16(1))
    with pytest.raises(TypingError, match="f2b expects a float32 or float64"):
        f(np.int16(1))
    with pytest.raises(TypingError, match="st expects a real number"):
        s(1j, np.zeros(1, np.int16))


# ----------------------------------------------------------------------------------
# bfloat16: capability check
# ----------------------------------------------------------------------------------


def test_bfloat16_supported():
    ok, reason = _half.bfloat16_supported()
    assert ok, reason
    assert reason == "bfloat16 conversions use integer code"
    assert _half.bfloat16_supported() == (ok, reason)


def test_bfloat16_check_detects_wrong_conversions(monkeypatch):
    """The check itself can fail: wrong values, or conversions that fail to run."""
    right = _half._bf_roundtrip

    def off_by_one(u, f, d):
        a, b, c = right(u, f, d)
        c[0] += 1  # 1 + 2**-8 + 2**-40 rounded as if through float32
        return a, b, c

    monkeypatch.setattr(_half, "_bf_roundtrip", off_by_one)
    assert _half._bf_check() == (False, "bfloat16 conversions give wrong values on this target")

    def broken(u, f, d):
        raise RuntimeError("no")

    monkeypatch.setattr(_half, "_bf_roundtrip", broken)
    ok, reason = _half._bf_check()
    assert not ok and "failed to compile or run" in reason
    monkeypatch.setattr(_half, "_bf_roundtrip", right)
    assert _half._bf_check() == (True, "bfloat16 conversions use integer code")
