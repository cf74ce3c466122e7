"""float16 and bfloat16 loads and stores inside Numba CPU kernels.

Numba has no float16 type on the CPU. Kernels therefore take float16 arrays viewed as
``uint16`` (``x.view(np.uint16)``: the IEEE binary16 bit patterns) and convert each value
to float32 when they load it and back to float16 when they store it, so float16 data is
read and written once, at memory speed, with no ``astype`` passes around the kernel.
bfloat16 (``ml_dtypes.bfloat16``) is handled the same way, viewed as ``int16``: the
signedness is only the marker that tells the two 16-bit formats apart (see bfloat16 below).

Conversions
-----------
:func:`h2f` (``uint16`` bits -> float32) and :func:`f2h` (float32 or float64 -> ``uint16``
bits) are Numba intrinsics that emit LLVM IR directly:

* ``h2f`` is ``fpext half -> float``, exact for every bit pattern. On x86-64 with F16C
  LLVM lowers it to ``vcvtph2ps``, which vectorizes in loops.
* ``f2h`` of a float32 is ``fptrunc float -> half``: round to nearest, ties to even, with
  IEEE overflow to infinity and gradual underflow (subnormals). With F16C: ``vcvtps2ph``.
* ``f2h`` of a float64 must round *once*, directly to float16. LLVM has no instruction
  for that on x86-64 (only AVX512-FP16 has one) and lowers ``fptrunc double -> half`` to
  a call of ``__truncdfhf2``, a compiler-rt/libgcc routine that Numba's JIT does not
  resolve (the call jumps to address 0). Rounding through float32 with round to nearest
  twice would be wrong for values just off a float16 midpoint, so the float64 value is
  first rounded to float32 *to odd* (if inexact, truncated toward zero with the last bit
  set), then to float16 to nearest even. Rounding to odd with at least two extra
  bits (float32 keeps 13 bits more than float16) followed by rounding to nearest gives
  the correctly rounded result (Boldo and Melquiond, "Emulation of FMA and correctly
  rounded sums: proved algorithms using rounding to odd", IEEE TC 2008). Rounding to
  odd is three integer operations on the float64 bits before an exact conversion to
  float32; it vectorizes too.

Where the target cannot convert half precision with instructions (x86-64 without F16C:
LLVM would emit calls of ``__extendhfsf2`` / ``__truncsfhf2``, which the JIT cannot
resolve either), the intrinsics emit an equivalent branch-free integer sequence instead
(F. Giesen's conversions), which also vectorizes but is slower. Which form is used is
decided once per process by compiling a probe with Numba's own target machine; see
:func:`native` and :func:`supported`.

NaN: every NaN converts to a NaN of the same sign. Payloads follow the hardware:
``vcvtph2ps`` and ``vcvtps2ph`` quiet signalling NaNs and keep the leading payload bits;
the integer code keeps the payload from float16 to float32 and gives the canonical quiet
NaN (``0x7E00`` with the sign) from float32 to float16. NumPy keeps payloads and leaves
signalling NaNs signalling.

Speed (one thread, 12.8 M values, ``y[i] = st(ld(x[i]) * a + b, y)``, measured on a
Zen 4 EPYC with F16C/AVX-512): float16 with float32 arithmetic 1.15 ms, as fast as
``np.copyto`` of the float16 arrays (1.08 ms), and twice as fast as float32 (2.5 ms; it
moves half the bytes); with float64 arithmetic, 3.4 ms (the float64 widening and
narrowing cost, not the rounding to odd: rounding twice through float32 takes 2.9 ms).
The ``astype`` round trip around a float32 kernel takes 61 ms. The integer code on the
same machine (compiled for a generic x86-64 without F16C, SSE2 only): 15 ms and 24 ms.

bfloat16
--------
bfloat16 is the upper half of a float32: sign, the same 8-bit exponent, 7 mantissa bits.
:func:`b2f` (``int16`` bits -> float32) shifts the bits into the upper half of a float32,
exact for every pattern (NaN payloads kept, signalling NaNs stay signalling, as in
ml_dtypes). :func:`f2b` rounds to nearest, ties to even, on the float32 bits:
``(bits + 0x7FFF + ((bits >> 16) & 1)) >> 16``; that carries into the exponent where the
mantissa overflows, so values of magnitude at least ``2**128 * (1 - 2**-9)`` become
infinity and the subnormals (float32's, at a coarser spacing) come out right too. A NaN
would become infinity if its payload were only in the discarded bits, so NaNs are quieted
instead (``(bits >> 16) | 0x40``: sign and leading payload kept). A float64 is first rounded
to float32 *to odd* (float32 has 16 more bits than bfloat16; as above) and then to
bfloat16, which rounds once. bfloat16 and float32 share the exponent range, so rounding to
odd must cover float32's subnormals as well: below ``2**-126`` the float64 is scaled by
``2**149`` (exact), truncated to an integer with the sticky bit set, and that integer is the
float32 subnormal's bit pattern. The conversions are integer code on every target (there is
no x86-64 instruction for them before AVX512-BF16); they vectorize.

Generic helpers
---------------
:func:`ld` and :func:`st` let one kernel source serve float32, float64 and
float16-as-``uint16`` arrays::

    @njit(fastmath={"contract"}, cache=True)
    def affine(xf, yf, a, b):
        for i in range(np.uint64(xf.size)):
            yf[i] = st(ld(xf[i]) * a + b, yf)

``ld(v)`` is ``v`` for floats, ``h2f(v)`` for ``uint16`` and ``b2f(v)`` for ``int16``;
``st(v, yf)`` is ``v`` when ``yf`` is a float array (the assignment casts), ``f2h(v)`` when
it is a ``uint16`` array and ``f2b(v)`` when it is an ``int16`` array. Both vanish in the
float specializations: the machine code is that of the loop written without them.

By convention, a ``uint16`` array passed to a kernel built on these helpers *is* float16
data and an ``int16`` array bfloat16 data (``x.view(np.int16)``). Numba's on-disk cache keys a kernel on its own source file only: after changing
this module, clear the cache of the kernels that use it.
"""

from __future__ import annotations

import functools
import re

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import errors
from numba.extending import intrinsic, overload

__all__ = ["b2f", "bfloat16_supported", "cf", "f2b", "f2h", "h2f", "ld", "native", "st",
           "supported"]

_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()
_F64 = ir.DoubleType()
_HALF = ir.HalfType()


def _c32(v):
    return ir.Constant(_I32, v & 0xFFFFFFFF)


# --------------------------------------------------------------------------------------
# Does the target convert half precision with instructions?
# --------------------------------------------------------------------------------------

# Library routines LLVM calls for half conversions it cannot do inline (compiler-rt and
# libgcc names, old and new).
_LIBCALL = re.compile(r"extendhfsf2|truncsfhf2|truncdfhf2|h2f_ieee|f2h_ieee|aeabi_h2f|aeabi_f2h")

_PROBE_IR = """
define float @fastbn_h2f_probe(i16 %u) {
  %h = bitcast i16 %u to half
  %f = fpext half %h to float
  ret float %f
}
define i16 @fastbn_f2h_probe(float %v) {
  %h = fptrunc float %v to half
  %u = bitcast half %h to i16
  ret i16 %u
}
"""

_native_cache: dict = {}


def _target_machine():
    """The LLVM target machine Numba's CPU JIT compiles with."""
    from numba.core.registry import cpu_target

    return cpu_target.target_context.codegen()._tm


def _probe(tm) -> tuple[bool, str]:
    """Compile the probe for `tm`: (True, '') if no library call is needed."""
    key = id(tm)
    if key not in _native_cache:
        import llvmlite.binding as ll

        try:
            mod = ll.parse_assembly(_PROBE_IR)
            mod.verify()
            asm = tm.emit_assembly(mod)
            found = sorted(set(_LIBCALL.findall(asm)))
            if found:
                res = (False, "LLVM lowers half conversions to library calls (" + ", ".join(found) + ")")
            else:
                res = (True, "")
        except Exception as exc:
            res = (False, f"half-precision probe failed to compile: {exc!r}")
        _native_cache[key] = res
    return _native_cache[key]


def native() -> bool:
    """Whether float16 conversions compile to instructions on this target.

    Returns
    -------
    bool
        True if LLVM lowers ``half <-> float`` conversions for Numba's CPU target without
        library calls (x86-64 with F16C, AArch64, ...). When False, :func:`h2f` and
        :func:`f2h` use an integer implementation instead: correct, but slower.
    """
    return _probe(_target_machine())[0]


# --------------------------------------------------------------------------------------
# IR emitters
# --------------------------------------------------------------------------------------


def _emit_h2f(builder, u, hw):
    """float32 value of the float16 bits `u` (i16)."""
    if hw:
        return builder.fpext(builder.bitcast(u, _HALF), _F32)
    # Integer form (F. Giesen, half_to_float): move exponent and mantissa into place,
    # rebias; inf/NaN get the maximal exponent (payload kept); subnormals are made exact
    # by adding an implicit bit and subtracting 2**-14 in float arithmetic.
    h = builder.zext(u, _I32)
    o = builder.shl(builder.and_(h, _c32(0x7FFF)), _c32(13))
    exp = builder.and_(o, _c32(0x0F800000))
    o = builder.add(o, _c32(112 << 23))
    infnan = builder.icmp_unsigned("==", exp, _c32(0x0F800000))
    o = builder.select(infnan, builder.add(o, _c32(112 << 23)), o)
    sub = builder.icmp_unsigned("==", exp, _c32(0))
    fs = builder.fsub(builder.bitcast(builder.add(o, _c32(1 << 23)), _F32), ir.Constant(_F32, 2.0**-14))
    o = builder.select(sub, builder.bitcast(fs, _I32), o)
    o = builder.or_(o, builder.shl(builder.and_(h, _c32(0x8000)), _c32(16)))
    return builder.bitcast(o, _F32)


def _emit_f2h32(builder, v, hw):
    """float16 bits (i16) of the float32 `v`, rounded to nearest even."""
    if hw:
        return builder.bitcast(builder.fptrunc(v, _HALF), _I16)
    # Integer form (F. Giesen, float_to_half_fast3_rtne).
    f = builder.bitcast(v, _I32)
    sign = builder.and_(f, _c32(0x80000000))
    a = builder.xor(f, sign)
    big = builder.icmp_unsigned(">=", a, _c32(143 << 23))  # >= 65536: inf (or NaN)
    o_big = builder.select(builder.icmp_unsigned(">", a, _c32(0x7F800000)), _c32(0x7E00), _c32(0x7C00))
    small = builder.icmp_unsigned("<", a, _c32(113 << 23))  # < 2**-14: subnormal or zero
    # Adding 0.5 puts the value's multiples of 2**-24 in the low mantissa bits, rounded
    # to nearest even by the float addition itself.
    t = builder.fadd(builder.bitcast(a, _F32), ir.Constant(_F32, 0.5))
    o_small = builder.sub(builder.bitcast(t, _I32), _c32(126 << 23))
    odd = builder.and_(builder.lshr(a, _c32(13)), _c32(1))
    n = builder.add(builder.add(a, _c32(((15 - 127) << 23) + 0xFFF)), odd)
    o_norm = builder.lshr(n, _c32(13))
    o = builder.select(big, o_big, builder.select(small, o_small, o_norm))
    o = builder.or_(o, builder.lshr(sign, _c32(16)))
    return builder.trunc(o, _I16)


def _emit_d2f_odd(builder, d):
    """float32 of the float64 `d` rounded to odd, for the conversion to float16.

    Done in the float64 encoding: clearing the 29 low mantissa bits truncates `d` toward
    zero to float32 precision (24 bits), and setting the lowest kept bit when a cleared
    bit was set makes it round to odd. The result converts to float32 exactly whenever
    |d| is in float32's normal range. Elsewhere it does not matter: below 2**-126 the
    float16 result is a signed zero anyway, at or above 2**128 it is infinity (the
    conversion overflows), and a NaN stays a NaN (a payload in the cleared bits sets the
    kept bit, so the mantissa stays nonzero).
    """
    low = ir.Constant(_I64, (1 << 29) - 1)
    db = builder.bitcast(d, _I64)
    sticky = builder.icmp_unsigned("!=", builder.and_(db, low), ir.Constant(_I64, 0))
    hi = builder.and_(db, ir.Constant(_I64, ~((1 << 29) - 1) & 0xFFFFFFFFFFFFFFFF))
    t = builder.select(sticky, builder.or_(hi, ir.Constant(_I64, 1 << 29)), hi)
    return builder.fptrunc(builder.bitcast(t, _F64), _F32)


def _emit_b2f(builder, u):
    """float32 value of the bfloat16 bits `u` (i16): the upper half of a float32."""
    return builder.bitcast(builder.shl(builder.zext(u, _I32), _c32(16)), _F32)


def _emit_f2b_bits(builder, f):
    """bfloat16 bits (i16) of the float32 with bits `f` (i32), rounded to nearest even; a
    NaN is quieted (sign and leading payload kept) rather than rounded."""
    hi = builder.lshr(f, _c32(16))
    rne = builder.lshr(builder.add(builder.add(f, _c32(0x7FFF)), builder.and_(hi, _c32(1))), _c32(16))
    nan = builder.icmp_unsigned(">", builder.and_(f, _c32(0x7FFFFFFF)), _c32(0x7F800000))
    return builder.trunc(builder.select(nan, builder.or_(hi, _c32(0x0040)), rne), _I16)


def _emit_d2f_odd_bits(builder, d):
    """float32 bits (i32) of the float64 `d` rounded to odd in float32's format, subnormals
    included (:func:`_emit_d2f_odd` covers |d| >= 2**-126, infinities and NaN)."""
    db = builder.bitcast(d, _I64)
    normal = builder.bitcast(_emit_d2f_odd(builder, d), _I32)
    ad = builder.bitcast(builder.and_(db, ir.Constant(_I64, (1 << 63) - 1)), _F64)
    sub = builder.fcmp_ordered("<", ad, ir.Constant(_F64, 2.0**-126))  # false for NaN
    # |d| * 2**149 < 2**23 is exact; its integer part is the float32 subnormal's bits
    t = builder.fmul(builder.select(sub, ad, ir.Constant(_F64, 0.0)), ir.Constant(_F64, 2.0**149))
    n = builder.fptoui(t, _I32)
    sticky = builder.fcmp_ordered("!=", builder.uitofp(n, _F64), t)
    n = builder.or_(n, builder.zext(sticky, _I32))
    sign = builder.trunc(builder.lshr(db, ir.Constant(_I64, 32)), _I32)
    n = builder.or_(n, builder.and_(sign, _c32(0x80000000)))
    return builder.select(sub, n, normal)


def _emit_f2b(builder, v, vty):
    if vty == types.float64:
        return _emit_f2b_bits(builder, _emit_d2f_odd_bits(builder, v))
    return _emit_f2b_bits(builder, builder.bitcast(v, _I32))


def _emit_f2h(builder, v, vty, hw):
    if vty == types.float64:
        v = _emit_d2f_odd(builder, v)
    return _emit_f2h32(builder, v, hw)


def _hw(context):
    tm = getattr(context.codegen(), "_tm", None)
    return _probe(tm if tm is not None else _target_machine())[0]


# --------------------------------------------------------------------------------------
# Intrinsics
# --------------------------------------------------------------------------------------


def _h2f_typer(u, force_sw):
    if u != types.uint16:
        raise errors.TypingError(f"h2f expects a uint16 (float16 bits), got {u}")

    def codegen(context, builder, sig, args):
        return _emit_h2f(builder, args[0], (not force_sw) and _hw(context))

    return types.float32(u), codegen


def _f2h_typer(v, force_sw):
    if v not in (types.float32, types.float64):
        raise errors.TypingError(f"f2h expects a float32 or float64, got {v}")

    def codegen(context, builder, sig, args):
        return _emit_f2h(builder, args[0], sig.args[0], (not force_sw) and _hw(context))

    return types.uint16(v), codegen


@intrinsic
def h2f(typingctx, u):
    """float32 value of float16 bits (use inside ``@njit`` code).

    Parameters
    ----------
    u : uint16
        IEEE binary16 bit pattern, e.g. an element of ``x.view(np.uint16)``.

    Returns
    -------
    float32
        The value, exactly (every float16 is a float32). A NaN keeps its sign and
        payload; F16C's ``vcvtph2ps`` also sets the quiet bit of a signalling NaN
        (NumPy's conversion and the integer code leave it signalling).
    """
    return _h2f_typer(u, False)


@intrinsic
def f2h(typingctx, v):
    """float16 bits of a float32 or float64 value (use inside ``@njit`` code).

    Parameters
    ----------
    v : float32 or float64
        The value. A float64 is rounded once, directly to float16 (see the module
        docstring), never through a float32 rounded to nearest.

    Returns
    -------
    uint16
        IEEE binary16 bits of `v` rounded to nearest, ties to even: values of magnitude
        at least 65520 become infinity, tiny values round to subnormals or signed zero,
        NaN stays NaN (quiet).
    """
    return _f2h_typer(v, False)


@intrinsic
def b2f(typingctx, u):
    """float32 value of bfloat16 bits (use inside ``@njit`` code).

    Parameters
    ----------
    u : int16
        bfloat16 bit pattern, e.g. an element of ``x.view(np.int16)`` for an
        ``ml_dtypes.bfloat16`` array `x`.

    Returns
    -------
    float32
        The value, exactly (the bits shifted into the upper half of a float32). A NaN keeps
        its sign and payload (a signalling NaN stays signalling, as in ml_dtypes).
    """
    if u != types.int16:
        raise errors.TypingError(f"b2f expects an int16 (bfloat16 bits), got {u}")

    def codegen(context, builder, sig, args):
        return _emit_b2f(builder, args[0])

    return types.float32(u), codegen


@intrinsic
def f2b(typingctx, v):
    """bfloat16 bits of a float32 or float64 value (use inside ``@njit`` code).

    Parameters
    ----------
    v : float32 or float64
        The value. A float64 is rounded once, directly to bfloat16 (see the module
        docstring), never through a float32 rounded to nearest.

    Returns
    -------
    int16
        bfloat16 bits of `v` rounded to nearest, ties to even: values of magnitude at least
        ``(2 - 2**-8) * 2**127`` become infinity, tiny values round to subnormals or signed
        zero, NaN stays NaN (quiet, same sign).
    """
    if v not in (types.float32, types.float64):
        raise errors.TypingError(f"f2b expects a float32 or float64, got {v}")

    def codegen(context, builder, sig, args):
        return _emit_f2b(builder, args[0], sig.args[0])

    return types.int16(v), codegen


@intrinsic
def _h2f_sw(typingctx, u):
    """h2f, always the integer implementation (tested on every target)."""
    return _h2f_typer(u, True)


@intrinsic
def _f2h_sw(typingctx, v):
    """f2h, always the integer implementation (tested on every target)."""
    return _f2h_typer(v, True)


# --------------------------------------------------------------------------------------
# Generic helpers
# --------------------------------------------------------------------------------------


def ld(v):
    """Load an array element as a float (use inside ``@njit`` code).

    Parameters
    ----------
    v : float32, float64, uint16 or int16
        An element of a float array, of a float16 array viewed as ``uint16`` or of a
        bfloat16 array viewed as ``int16``.

    Returns
    -------
    float32 or float64
        `v` itself for floats, :func:`h2f` ``(v)`` (float32) for ``uint16``, :func:`b2f`
        ``(v)`` (float32) for ``int16``.
    """
    raise NotImplementedError("ld is only usable inside Numba-compiled code")


def st(v, like):
    """A value ready to be stored into an array (use inside ``@njit`` code).

    Parameters
    ----------
    v : float or int
        The value to store.
    like : array
        The destination array (only its dtype is used): a float array, a float16 array
        viewed as ``uint16`` or a bfloat16 array viewed as ``int16``.

    Returns
    -------
    float, uint16 or int16
        `v` itself for float arrays (the assignment converts it, rounding to nearest),
        :func:`f2h` ``(v)`` for ``uint16`` and :func:`f2b` ``(v)`` for ``int16`` arrays
        (float32 and float64 values rounded once to float16 or bfloat16; other numbers
        are converted to float64 first).
    """
    raise NotImplementedError("st is only usable inside Numba-compiled code")


def cf(v, like):
    """A coefficient in the arithmetic precision used for an output array (``@njit`` only).

    Parameters
    ----------
    v : float
        A coefficient (for example a per-channel scale computed in float64).
    like : array
        The destination array.

    Returns
    -------
    float
        ``float32(v)`` for float16 and bfloat16 data (``uint16`` and ``int16`` arrays):
        their outputs are computed in float32, whose rounding error (``2**-24``) is 8192
        times smaller than float16's (65536 times bfloat16's), so the result rounds the
        same almost always and at worst differs by one ulp of the output; float64
        arithmetic would cost a widening and a narrowing per value. `v` itself for float
        arrays.
    """
    raise NotImplementedError("cf is only usable inside Numba-compiled code")


@overload(cf)
def _cf_impl(v, like):
    dt = like.dtype if isinstance(like, types.Array) else None
    if dt is None:
        raise errors.TypingError(f"cf expects the destination array as 'like', got {like}")
    if dt in (types.uint16, types.int16):
        return lambda v, like: np.float32(v)
    return lambda v, like: v


@overload(ld)
def _ld_impl(v):
    if v == types.uint16:
        return lambda v: h2f(v)
    if v == types.int16:
        return lambda v: b2f(v)
    if isinstance(v, types.Float):
        return lambda v: v
    raise errors.TypingError(f"ld expects a float or uint16 (float16 bits) or int16 (bfloat16 "
                             f"bits) element, got {v}")


@overload(st)
def _st_impl(v, like):
    dt = like.dtype if isinstance(like, types.Array) else None
    if dt is None:
        raise errors.TypingError(f"st expects the destination array as 'like', got {like}")
    if dt == types.uint16:
        if v in (types.float32, types.float64):
            return lambda v, like: f2h(v)
        if isinstance(v, (types.Float, types.Integer, types.Boolean)):
            return lambda v, like: f2h(np.float64(v))
        raise errors.TypingError(f"st expects a real number to store, got {v}")
    if dt == types.int16:
        if v in (types.float32, types.float64):
            return lambda v, like: f2b(v)
        if isinstance(v, (types.Float, types.Integer, types.Boolean)):
            return lambda v, like: f2b(np.float64(v))
        raise errors.TypingError(f"st expects a real number to store, got {v}")
    if isinstance(dt, types.Float):
        return lambda v, like: v
    raise errors.TypingError(f"st expects a float or uint16 (float16 bits) or int16 (bfloat16 "
                             f"bits) array, got {like}")


# --------------------------------------------------------------------------------------
# Capability check
# --------------------------------------------------------------------------------------


@njit(cache=False)  # compiled afresh: its assembly is inspected
def _roundtrip(u, f, d):
    a = np.empty(u.size, np.float32)
    b = np.empty(f.size, np.uint16)
    c = np.empty(d.size, np.uint16)
    for i in range(u.size):
        a[i] = h2f(u[i])
    for i in range(f.size):
        b[i] = f2h(f[i])
    for i in range(d.size):
        c[i] = f2h(d[i])
    return a, b, c


@functools.cache
def supported() -> tuple[bool, str]:
    """Whether the float16 conversions compile and give correct values here.

    Compiles the conversions once (first call only; later calls return the cached
    answer) and checks known values: ±0, the smallest subnormal, 1, the largest float16,
    infinity, NaN, a tie rounded to even, overflow to infinity, and a float64 that
    rounding twice (through float32) would get wrong.

    Returns
    -------
    ok : bool
        True if kernels may use :func:`h2f`, :func:`f2h`, :func:`ld` and :func:`st`.
    reason : str
        How the conversions are done (instructions, or the slower integer code when the
        target has no half-precision conversions), or why they cannot be used.
    """
    return _check()


def _check() -> tuple[bool, str]:
    try:
        hw, why = _probe(_target_machine())
        u = np.array([0x0000, 0x8000, 0x0001, 0x3C00, 0x7BFF, 0x7C00, 0xFC00, 0x7E00], np.uint16)
        f = np.array([0.0, -0.0, 2.0**-24, 1.0, 65504.0, 65520.0, np.inf, np.nan, 1.0 + 2.0**-11, -2.0**-26],
                     np.float32)
        # 1 + 2**-11 + 2**-40: rounds up in one step; through float32 it becomes the tie
        # 1 + 2**-11, which rounds down to 1.
        d = np.array([1.0 + 2.0**-11 + 2.0**-40, -65519.99, 3.0e-8, 1e300], np.float64)
        sig = (types.uint16[::1], types.float32[::1], types.float64[::1])
        _roundtrip.compile(sig)
        # A call of a conversion routine the JIT cannot resolve would crash: look first.
        calls = sorted(set(_LIBCALL.findall(_roundtrip.inspect_asm(sig))))
        if calls:
            return False, "compiled float16 conversions call " + ", ".join(calls)
        a, b, c = _roundtrip(u, f, d)
        want_a = u.view(np.float16).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            want_b = f.astype(np.float16).view(np.uint16)
            want_c = d.astype(np.float16).view(np.uint16)
        ok_a = np.array_equal(a, want_a, equal_nan=True)
        nan_b = np.isnan(f)
        ok_b = np.array_equal(b[~nan_b], want_b[~nan_b]) and bool(np.all((b[nan_b] & 0x7C00) == 0x7C00)
                                                                  & np.all((b[nan_b] & 0x03FF) != 0))
        ok_c = np.array_equal(c, want_c)
    except Exception as exc:
        return False, f"float16 conversions failed to compile or run: {exc!r}"
    if not (ok_a and ok_b and ok_c):
        return False, "float16 conversions give wrong values on this target"
    if hw:
        return True, "float16 conversions compile to instructions"
    return True, f"float16 conversions use integer code (slower): {why}"


@njit(cache=False)
def _bf_roundtrip(u, f, d):
    a = np.empty(u.size, np.float32)
    b = np.empty(f.size, np.int16)
    c = np.empty(d.size, np.int16)
    for i in range(u.size):
        a[i] = b2f(u[i])
    for i in range(f.size):
        b[i] = f2b(f[i])
    for i in range(d.size):
        c[i] = f2b(d[i])
    return a, b, c


@functools.cache
def bfloat16_supported() -> tuple[bool, str]:
    """Whether the bfloat16 conversions compile and give correct values here.

    Compiles :func:`b2f` and :func:`f2b` once (later calls return the cached answer) and
    checks known bit patterns worked out by hand: ±0, 1, the largest finite value and
    infinity, NaN, subnormals, ties rounded to even, overflow to infinity, and float64
    values that rounding twice (through float32) would get wrong. No ml_dtypes needed.

    Returns
    -------
    ok : bool
        True if kernels may use :func:`b2f`, :func:`f2b` and :func:`ld`/:func:`st` on
        ``int16`` arrays.
    reason : str
        Why not, if they may not.
    """
    return _bf_check()


def _bf_check() -> tuple[bool, str]:
    u = np.array([0x0000, 0x8000, 0x3F80, 0x7F7F, 0x7F80, 0x0001, 0x7FC1], np.uint16)
    f = np.array([0x00000000, 0x80000000, 0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF,
                  0x7F7F7FFF, 0x00008000, 0x00018000, 0x7F800001, 0xFFFFFFFF], np.uint32)
    want_f = np.array([0x0000, 0x8000, 0x3F80, 0x3F82, 0x3F81, 0x7F80, 0x7F7F, 0x0000,
                       0x0002, 0x7FC0, 0xFFFF], np.uint16)
    # 1 + 2**-8 + 2**-40 rounds up to 1 + 2**-7 once; through float32 it would become the
    # tie 1 + 2**-8 and round down to 1. Likewise for the subnormal 2**-133 + 2**-134 + tiny.
    d = np.array([1.0 + 2.0**-8 + 2.0**-40, -(1.0 + 2.0**-8 - 2.0**-40), 2.0**-134 + 2.0**-160,
                  2.0**-134, 3 * 2.0**-134, 1e300, -1e-300], np.float64)
    want_d = np.array([0x3F81, 0xBF80, 0x0001, 0x0000, 0x0002, 0x7F80, 0x8000], np.uint16)
    try:
        a, b, c = _bf_roundtrip(u.view(np.int16), f.view(np.float32), d)
    except Exception as exc:
        return False, f"bfloat16 conversions failed to compile or run: {exc!r}"
    ok = (np.array_equal(a.view(np.uint32), u.astype(np.uint32) << 16)
          and np.array_equal(b.view(np.uint16), want_f) and np.array_equal(c.view(np.uint16), want_d))
    if not ok:
        return False, "bfloat16 conversions give wrong values on this target"
    return True, "bfloat16 conversions use integer code"
