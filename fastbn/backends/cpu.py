"""CPU backend: batch-normalization kernels compiled with Numba.

Implements the backend contract of :mod:`fastbn.backends` on C-contiguous NumPy arrays
of shape ``(A, C, B)``.

Design
------
Every tensor is seen two ways at once: channel ``c`` of ``(A, C, B)`` is ``A`` runs of
``B`` contiguous values, and the buffer is ``A`` rows of ``C * B`` values in which column
``J`` belongs to channel ``J // B``. Three paths, chosen by shape:

* **runs** (``B >= _RUN``, long runs; e.g. NCHW activations): per channel, statistics
  with register reductions over its runs, then normalization of the same channel while
  it is still in L2 (one read from memory). Parallel over channels, or over ranges of a
  channel's values merged afterwards when there are fewer channels than threads.
* **channel groups** (short runs or channels-last, when all rows of a group of channels
  fit in L2; e.g. (32, 2048, 7, 7) or (64, 65536)): per-column statistics over row tiles,
  folded into channels, then normalization of the group while it is cached.
* **row ranges** (everything else; e.g. NHWC, (8192, 1024), (1_000_000, 4)): each thread
  computes per-column partial statistics of a range of rows; the partials are merged
  into channels; a second parallel pass normalizes. Rows of fewer than ``_WIDE`` values
  are regrouped into *wide rows* of ``k`` consecutive rows (a free reinterpretation of
  the buffer) so inner loops are long and vectorize; ``A % k`` rows left over are a
  short tail.

Elementwise passes over runs of at least ``_SHORT`` values go run by run with
per-channel scalars; shorter runs use per-column coefficients laid out along a row.

Numerics: statistics are accumulated in float64 with a *blocked two-pass* scheme: a
cache-resident block (at most ``_BLOCK`` values of a channel, or a tile of at most
``_TILE`` values for per-column statistics) is summed for its mean, then its squared
deviations from that mean are summed, and blocks are merged with Chan's formula (so
are per-thread partials and the columns of a channel). This reads the data from memory
once and has the accuracy of the two-pass algorithm: the error does not grow with
``(|mean| / std)**2`` as ``E[x**2] - E[x]**2`` does (merging rounded block means
leaves a relative error of order ``G * |mean| / std``, with ``G`` the relative error
of the float64 sums: at most ``M * u64``, typically ``~sqrt(M) * u64``). Small tensors (the serial kernels, cache resident) use the plain two-pass
algorithm over each whole channel, without merges. float64 data are summed shifted,
``sum(x - k)`` with ``k`` a value of the block (see :func:`_shift`), so that a constant
feature has its value as mean and a variance of exactly 0 (float32, float16 and bfloat16
sums of a constant are exact in float64 already). Merges of partial means keep infinite means:
where the difference of two means is not finite, Chan's ``mean_a + d * f`` would give
inf - inf, and the weighted average is used instead (see :func:`_chan`). Normalization is one multiply-add
per value, ``y = x * alpha + beta`` with ``alpha = weight * invstd`` and
``beta = bias - mean * alpha`` computed and applied in float64, so that the
cancellation between ``x * alpha`` and ``beta`` for data far from zero costs float64,
not float32, precision (measured: as fast as float32 arithmetic, the passes are
memory-bound). Backward accumulates ``sum(dy)`` and ``sum(dy * (x - mean))`` in one
pass, then applies ``dx = g * dy + c2 * x + c3`` (the contract's formula expanded per
channel, coefficients in float64).

Parallelism: partial results are per work item and merged afterwards (never a shared
accumulator). The number of threads is read with :func:`numba.get_num_threads` at
call time, so :func:`numba.set_num_threads` is respected. Tensors of at most
``SERIAL_MAX`` values use serial kernels: starting threads costs microseconds. The
parallel kernels write into outputs allocated in Python by :mod:`fastbn._buffers`, which
reuses large buffers no array refers to any more: a fresh 51 MB output costs about 4 ms
of page faults (the operating system maps and zeroes it on first touch), more than the
kernel (a fresh 32 MiB output from Numba's own allocator, without transparent huge
pages, measured 35 ms against 9 ms for ``np.empty``). The kernels release
the GIL and are safe to call from several Python threads at once with the ``tbb`` or
``omp`` threading layer (``workqueue`` is not).

Only reductions are compiled with ``fastmath={"reassoc", "contract"}`` (reassociation
lets LLVM vectorize them); elementwise kernels use ``{"contract"}`` (multiply-add
fusion) only. Neither changes NaN/inf semantics: NaN in the input gives NaN statistics.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .. import _buffers, _threading
from . import (
    _half,
    _jitcache,
    stats_dtype,  # the shared rule: float16, bfloat16 -> float32 statistics
)
from ._half import cf, ld, st

# Before any parallel kernel runs: a thread- and fork-safe threading layer (tbb loaded from
# the installed wheel, or a fork-safe fallback); see fastbn._threading.
_threading.configure()

# Read at every parallel call (not cached), so numba.set_num_threads is respected; the
# kernels take it as an argument because reading it inside compiled code prevents caching.
_nthreads = numba.get_num_threads

__all__ = [
    "SERIAL_MAX",
    "available",
    "backward",
    "backward_eval",
    "dtypes",
    "forward_eval",
    "forward_train",
    "forward_train_update",
    "name",
    "stats_dtype",
    "update_running_stats",
    "xp",
]

#: The backend's name, as accepted by ``backend=``.
name = "cpu"
#: Array namespace of the arrays this backend takes and returns.
xp = np
#: Input dtypes supported (float16 is read and written as float16, statistics in float64;
#: ml_dtypes.bfloat16 likewise, not listed: see the contract in :mod:`fastbn.backends`).
dtypes = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

#: Tensors with at most this many values use the serial forward kernels.
SERIAL_MAX = 1 << 16
#: ... and the serial backward kernels on channels-first data (runs of at least _SHORT
#: values): two passes over two inputs, so threads pay sooner (2 cores: crossover near
#: 2**15 values). Channels-last data keep SERIAL_MAX.
BACKWARD_SERIAL_MAX = 1 << 15

_F32 = np.dtype(np.float32)
_U16 = np.dtype(np.uint16)  # float16 data as seen by the kernels
_I16 = np.dtype(np.int16)  # bfloat16 data as seen by the kernels (see _half)

# Values per block of the blocked two-pass statistics: 4096 float64-converted values
# stay in L1/L2 between the two passes over the block.
_BLOCK = 4096
# Rows of fewer than _WIDE values are regrouped into wide rows of >= _WIDE values for the
# statistics of the training forward, of >= _WIDE_EW values for the elementwise passes and
# the backward. Measured (float32, time / memcpy, 2 cores): _WIDE_EW = 512 instead of 64
# took the eval forward of (1024, 64) from 3.3 to 2.2 and of (16384, 16) from 1.75 to 1.24,
# the backward of (100000, 8) from 2.4 to 1.8; the statistics of (64, 128) and (2000, 64)
# got slower with it (6.2 to 9.6, 5.3 to 6.3), so they keep 64.
_WIDE = 64
_WIDE_EW = 512
# Row tiles: chunks of _COLS columns, blocks of _TILE values (16 rows of 2048 values),
# whose two statistics passes and per-column accumulators stay in L1/L2. Measured
# (float32, time / memcpy): chunks of 2048 instead of 512 columns took the backward of
# (6272, 2048) from 2.34 to 2.16 and of (64, 65536) from 2.21 to 2.09. Elementwise passes
# over rows of up to 2048 values therefore go row after row (one chunk): cutting rows into
# 512-column chunks slowed the normalization of (4096, 1024) from 0.97 to 1.8 ms.
_COLS = 2048
_TILE = 1 << 15
# Channels-first runs of at least _RUN values use the per-run kernels (register
# reductions); shorter runs are handled as row tiles.
_RUN = 512
# Fused groups of channels (short runs): about _GROUP values per row, at most _FUSE
# values in all, so the group is still in L2 (or at worst L3) when it is normalized.
# Measured (float32, 2 threads, time / memcpy): raising _FUSE from 2**16 to 2**18 took
# (256, 256, 196) from 1.57 to 1.49 forward and 2.32 to 1.86 backward, and
# (128, 2048, 49) from 1.34 to 1.24 and 1.72 to 1.56; 2**19 was no better.
_GROUP = 1024
_FUSE = 1 << 18
# Row reductions take four rows at a time for rows of <= _FOUR_LO or >= _FOUR_HI bytes
# (see _four), else one.
_FOUR_LO = 256
_FOUR_HI = 4096
# Elementwise passes over runs of at least _SHORT values go run by run with per-channel
# scalars (measured as fast as a copy for runs of 49); shorter runs use row tiles.
_SHORT = 32
# Forward-eval over rows of at least _SPLIT_COLS values splits the columns between
# threads (so each thread's per-column coefficients stay in L2), not the rows. Shorter
# rows are split by rows: reading 2 KiB pieces of 8 KiB rows made (6272, 2048) take 1.39
# memcpys instead of 0.93.
_SPLIT_COLS = 16384
# Minimum number of values per parallel work item (smaller items cost more to schedule
# than they save).
_MIN_ITEM = 1 << 14

def _probe():
    """A plain function of this file: Numba caches the kernels where it would cache this."""


# Cached on disk when Numba finds a writable place for this file's cache (else compiled in
# every process, with one warning); see _jitcache.
_OPTS = {"cache": _jitcache.can_cache(_probe), "error_model": "numpy", "nogil": True}
_RED = {"reassoc", "contract"}  # reductions only
_EW = {"contract"}  # elementwise: multiply-add fusion only


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


@njit(**_OPTS)
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, M2) summaries with Chan's formula.

    Equal means merge exactly (a constant feature keeps its value). When the difference
    of the means is not finite (an infinite mean, or finite means whose difference
    overflows), ``mean_a + d * f`` would give inf - inf = NaN for an infinite ``mean_a``:
    the weighted average is used instead, which gives +-inf, or NaN for opposite
    infinities, as a sum over all the values would."""
    if n_a == 0:
        return n_b, mean_b, m2_b
    if n_b == 0:
        return n_a, mean_a, m2_a
    n = n_a + n_b
    f = n_b / n
    d = mean_b - mean_a
    if abs(d) < np.inf:
        mean = mean_a + d * f
    else:
        mean = mean_a * (n_a / n) + mean_b * f
    return n, mean, m2_a + m2_b + d * d * n_a * f


@njit(**_OPTS)
def _finite_or_zero(v):
    v = np.float64(v)
    return v if abs(v) < np.inf else 0.0


def _shift(xf, v):
    """The shift K of the shifted-data sums of data `xf`, given a value `v` of the data.

    Statistics of float64 data sum ``x - K`` with ``K`` one of the values summed: a
    constant feature then sums exact zeros, so its mean is ``K`` and its variance 0
    exactly (a float64 sum of n copies of 0.1 is not n * 0.1, and would leave a variance
    of about 1e-33 that eps = 0 turns into invstd 1e16). The sums of deviations are also
    smaller than the sums of the values, so their rounding no longer grows with |mean|.
    An infinite or NaN ``v`` gives K = 0 (the plain sum): x - inf would be NaN for every x,
    while the plain sum gives NumPy's and torch's results (+-inf means for infinities of
    one sign, NaN otherwise). For float32, float16 and bfloat16 data K is the constant 0 and the
    subtractions compile away: their float64 sums of up to 2**29 copies of a value are
    exact, so a constant feature is exact there without a shift. (``@njit`` only.)"""
    raise NotImplementedError("_shift is only usable inside Numba-compiled code")


def _kat(xf, kw, j):
    """``kw[j]``, the shift of column j, for float64 data; the constant 0 otherwise (see
    :func:`_shift`). (``@njit`` only.)"""
    raise NotImplementedError("_kat is only usable inside Numba-compiled code")


def _k(xf, k):
    """`k` for float64 data, the constant 0 otherwise (see :func:`_shift`)."""
    raise NotImplementedError("_k is only usable inside Numba-compiled code")


def _float64_data(xf):
    return isinstance(xf, types.Array) and xf.dtype == types.float64


@overload(_shift)
def _shift_impl(xf, v):
    if _float64_data(xf):
        return lambda xf, v: _finite_or_zero(v)
    return lambda xf, v: 0.0


@overload(_kat)
def _kat_impl(xf, kw, j):
    if _float64_data(xf):
        return lambda xf, kw, j: kw[j]
    return lambda xf, kw, j: 0.0


@overload(_k)
def _k_impl(xf, k):
    if _float64_data(xf):
        return lambda xf, k: k
    return lambda xf, k: 0.0


@njit(**_OPTS)
def _invstd(var, eps):
    ve = var + eps
    if ve == 0.0:
        return 0.0
    return 1.0 / math.sqrt(ve)


@njit(**_OPTS)
def _finish(mean64, m2, n, w, b, eps, mean_out, var_out, invstd_out, alpha, beta):
    """From per-channel mean and M2 over n values: write the statistics and alpha/beta."""
    inn = 1.0 / n
    for c in range(mean64.shape[0]):
        mu = mean64[c]
        var = m2[c] * inn
        ve = var + eps
        r = 1.0 / math.sqrt(ve)  # branch-free, so the loop vectorizes
        inv = r if ve != 0.0 else 0.0
        mean_out[c] = mu
        var_out[c] = var
        invstd_out[c] = inv
        a = np.float64(w[c]) * inv
        alpha[c] = a
        beta[c] = np.float64(b[c]) - mu * a


# Innermost loops index with unsigned integers: an index Numba knows is non-negative
# skips the negative-index wraparound, which otherwise blocks vectorization
# (``for i in range(i0, i1): x[i]`` with signed i0 measured 15-25x slower). Slicing
# would avoid it too, but every slice is a reference-counted view (an atomic update of
# a counter shared by all threads), too costly per short run.


@njit(fastmath=_RED, **_OPTS)
def _sum(xf, i0, i1, k):
    """sum(x[i0:i1] - k) (see :func:`_shift`)."""
    k = _k(xf, k)
    s = 0.0
    for i in range(np.uint64(i0), np.uint64(i1)):
        s += ld(xf[i]) - k
    return s


@njit(fastmath=_RED, **_OPTS)
def _sqdev(xf, i0, i1, mu):
    q = 0.0
    for i in range(np.uint64(i0), np.uint64(i1)):
        d = ld(xf[i]) - mu
        q += d * d
    return q


@njit(fastmath=_RED, **_OPTS)
def _bsums(dyf, xf, i0, i1, mu):
    s = 0.0
    t = 0.0
    for i in range(np.uint64(i0), np.uint64(i1)):
        g = np.float64(ld(dyf[i]))
        s += g
        t += g * (ld(xf[i]) - mu)
    return s, t


@njit(fastmath=_EW, **_OPTS)
def _affine(xf, yf, i0, i1, alpha, beta):
    a = cf(alpha, yf)
    b = cf(beta, yf)
    for i in range(np.uint64(i0), np.uint64(i1)):
        yf[i] = st(ld(xf[i]) * a + b, yf)


@njit(fastmath=_EW, **_OPTS)
def _bapply(dyf, xf, dxf, i0, i1, g, c2, c3):
    gg = cf(g, dxf)
    d2 = cf(c2, dxf)
    d3 = cf(c3, dxf)
    for i in range(np.uint64(i0), np.uint64(i1)):
        dxf[i] = st(ld(dyf[i]) * gg + (ld(xf[i]) * d2 + d3), dxf)


# --------------------------------------------------------------------------------------
# Channels-first (B > 1): ranges [m0, m1) of one channel's M = A * B values
# --------------------------------------------------------------------------------------


@njit(**_OPTS)
def _cf_block(B):
    """Block length in channel values: whole runs when runs are short."""
    if B >= _BLOCK:
        return _BLOCK
    return (_BLOCK // B) * B


@njit(**_OPTS)
def _cf_stats(xf, C, B, c, m0, m1):
    """(mean, M2) of values [m0, m1) of channel c, blocked two-pass + Chan merges."""
    blk = _cf_block(B)
    n = 0.0
    mean = 0.0
    m2 = 0.0
    b0 = m0
    while b0 < m1:
        b1 = min(b0 + blk, m1)
        a = b0 // B
        k = _shift(xf, ld(xf[(a * C + c) * B + b0 - a * B]))  # the block's first value
        s = 0.0
        m = b0
        while m < b1:
            a = m // B
            j = m - a * B
            e = min(b1 - m, B - j)
            base = (a * C + c) * B + j
            s += _sum(xf, base, base + e, k)
            m += e
        nb = np.float64(b1 - b0)
        bm = k + s / nb
        q = 0.0
        m = b0
        while m < b1:
            a = m // B
            j = m - a * B
            e = min(b1 - m, B - j)
            base = (a * C + c) * B + j
            q += _sqdev(xf, base, base + e, bm)
            m += e
        n, mean, m2 = _chan(n, mean, m2, nb, bm, q)
        b0 = b1
    return mean, m2


@njit(**_OPTS)
def _cf_affine(xf, yf, C, B, c, m0, m1, alpha, beta):
    m = m0
    while m < m1:
        a = m // B
        j = m - a * B
        e = min(m1 - m, B - j)
        base = (a * C + c) * B + j
        _affine(xf, yf, base, base + e, alpha, beta)
        m += e


@njit(**_OPTS)
def _cf_bsums(dyf, xf, C, B, c, m0, m1, mu):
    s = 0.0
    t = 0.0
    m = m0
    while m < m1:
        a = m // B
        j = m - a * B
        e = min(m1 - m, B - j)
        base = (a * C + c) * B + j
        s1, t1 = _bsums(dyf, xf, base, base + e, mu)
        s += s1
        t += t1
        m += e
    return s, t


@njit(**_OPTS)
def _cf_bapply(dyf, xf, dxf, C, B, c, m0, m1, g, c2, c3):
    m = m0
    while m < m1:
        a = m // B
        j = m - a * B
        e = min(m1 - m, B - j)
        base = (a * C + c) * B + j
        _bapply(dyf, xf, dxf, base, base + e, g, c2, c3)
        m += e


@njit(**_OPTS)
def _runs_affine(xf, yf, C, B, a0, a1, c0, c1, alpha, beta):
    """Normalize the runs of channels [c0, c1) in rows [a0, a1), in memory order."""
    for a in range(a0, a1):
        for c in range(c0, c1):
            o = (a * C + c) * B
            _affine(xf, yf, o, o + B, alpha[c], beta[c])


@njit(**_OPTS)
def _runs_bapply(dyf, xf, dxf, C, B, a0, a1, c0, c1, g, c2, c3):
    for a in range(a0, a1):
        for c in range(c0, c1):
            o = (a * C + c) * B
            _bapply(dyf, xf, dxf, o, o + B, g[c], c2[c], c3[c])


@njit(**_OPTS)
def _bcoef(sdy, sdyx, mu, inv, w, M):
    """Per-channel backward coefficients: dx = g * dy + c2 * x + c3."""
    dw = inv * sdyx
    g = np.float64(w) * inv
    c2 = -g * inv * dw / M
    c3 = g * (inv * dw * mu - sdy) / M
    return dw, g, c2, c3


# --------------------------------------------------------------------------------------
# Row tiles: a 2-d view of R rows of `wd` contiguous values, row r starting at flat
# offset base + r * stride. Column J of the view belongs to channel (J % (C*B)) // B.
# Loops run over blocks of rows and chunks of at most _COLS columns, so a block
# (at most _BLOCK values) and its per-column accumulators stay in L1 while memory is
# read row after row.
# --------------------------------------------------------------------------------------


@njit(fastmath=_EW, **_OPTS)
def _acc_row(xf, o, kw, s, n):
    """s[:n] += xf[o:o + n] - kw[:n] (per-column shifts, see :func:`_shift`)"""
    u = np.uint64(o)
    for j in range(np.uint64(n)):
        s[j] += ld(xf[u + j]) - _kat(xf, kw, j)


@njit(fastmath=_EW, **_OPTS)
def _acc_rows4(xf, o, st, kw, s, n):
    """s[:n] += the n values at o, o + st, o + 2 st, o + 3 st, each minus kw[:n] (four
    rows per load of s)."""
    u0 = np.uint64(o)
    u1 = np.uint64(o + st)
    u2 = np.uint64(o + 2 * st)
    u3 = np.uint64(o + 3 * st)
    for j in range(np.uint64(n)):
        # (x0 + x1) + (x2 + x3) - 4k: exact zero for a constant column (2v, 4v and 4k are
        # exact), one subtraction per four values
        s[j] += (
            (np.float64(ld(xf[u0 + j])) + np.float64(ld(xf[u1 + j])))
            + (np.float64(ld(xf[u2 + j])) + np.float64(ld(xf[u3 + j])))
        ) - 4.0 * _kat(xf, kw, j)


@njit(fastmath=_EW, **_OPTS)
def _sqdev_row(xf, o, bm, q, n):
    """q[:n] += (xf[o:o + n] - bm[:n]) ** 2"""
    u = np.uint64(o)
    for j in range(np.uint64(n)):
        d = ld(xf[u + j]) - bm[j]
        q[j] += d * d


@njit(fastmath=_EW, **_OPTS)
def _sqdev_rows4(xf, o, st, bm, q, n):
    u0 = np.uint64(o)
    u1 = np.uint64(o + st)
    u2 = np.uint64(o + 2 * st)
    u3 = np.uint64(o + 3 * st)
    for j in range(np.uint64(n)):
        m = bm[j]
        d0 = ld(xf[u0 + j]) - m
        d1 = ld(xf[u1 + j]) - m
        d2 = ld(xf[u2 + j]) - m
        d3 = ld(xf[u3 + j]) - m
        q[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)


@njit(fastmath=_EW, **_OPTS)
def _merge_cols(mo, qo, j0, s, q, n, f, h):
    """Chan merge of a block's column (mean s, M2 q) into (mo, qo)[j0:j0 + n]."""
    u = np.uint64(j0)
    for j in range(np.uint64(n)):
        m = mo[u + j]
        d = s[j] - m
        # as _chan: the weighted average where d is not finite (a branch-free select)
        mo[u + j] = m + d * f if abs(d) < np.inf else m * (1.0 - f) + s[j] * f
        qo[u + j] += q[j] + d * d * h


@njit(**_OPTS)
def _four(xf, stride):
    """Whether reductions over rows `stride` values apart go four rows at a time (one load
    and store of the per-column accumulators per four rows) or one. Measured (Zen 4,
    float32 column sums over 32 MiB, one thread): four rows are 1.6x faster than one for
    rows of 256 bytes, 1.3-1.6x slower for rows of 512 bytes to 2 KiB (stores to the
    accumulators falsely alias loads a multiple of 4 KiB apart, which four rows spanning
    2-8 KiB hit all the time), and about even from 4 KiB up. Small (serial,
    cache-resident) tensors: four rows (measured 1.15x faster on (256, 128))."""
    sb = stride * xf.itemsize
    return sb <= _FOUR_LO or sb >= _FOUR_HI or xf.size <= SERIAL_MAX


@njit(**_OPTS)
def _tile(wd):
    """(columns per chunk, rows per block) of a row tile."""
    cwm = min(wd, _COLS)
    return cwm, max(4, _TILE // cwm)


@njit(**_OPTS)
def _rows_stats(xf, base, stride, wd, r0, r1, mo, qo):
    """Per-column (mean, M2) over rows [r0, r1) of the view, into mo[:wd], qo[:wd]:
    two passes over each cache-resident block of rows, blocks merged with Chan's formula."""
    four = _four(xf, stride)
    cwm, rb = _tile(wd)
    s = np.empty(cwm)
    q = np.empty(cwm)
    kw = np.empty(cwm)
    n = 0.0
    for b0 in range(r0, r1, rb):
        b1 = min(b0 + rb, r1)
        nb = np.float64(b1 - b0)
        f = nb / (n + nb)
        h = n * f
        for j0 in range(0, wd, cwm):
            cw = min(cwm, wd - j0)
            o0 = base + b0 * stride + j0
            for j in range(cw):
                s[j] = 0.0
                q[j] = 0.0
                kw[j] = _shift(xf, ld(xf[o0 + j]))  # the column's value in the first row
            r = b0
            while four and r + 4 <= b1:
                _acc_rows4(xf, base + r * stride + j0, stride, kw, s, cw)
                r += 4
            while r < b1:
                _acc_row(xf, base + r * stride + j0, kw, s, cw)
                r += 1
            for j in range(cw):
                s[j] = kw[j] + s[j] / nb
            r = b0
            while four and r + 4 <= b1:
                _sqdev_rows4(xf, base + r * stride + j0, stride, s, q, cw)
                r += 4
            while r < b1:
                _sqdev_row(xf, base + r * stride + j0, s, q, cw)
                r += 1
            if n == 0.0:
                for j in range(cw):
                    mo[j0 + j] = s[j]
                    qo[j0 + j] = q[j]
            else:
                _merge_cols(mo, qo, j0, s, q, cw, f, h)
        n += nb


@njit(fastmath=_EW, **_OPTS)
def _affine_row(xf, yf, o, aw, bw, j0, n):
    u = np.uint64(o)
    v = np.uint64(j0)
    for j in range(np.uint64(n)):
        yf[u + j] = st(ld(xf[u + j]) * cf(aw[v + j], yf) + cf(bw[v + j], yf), yf)


@njit(**_OPTS)
def _rows_affine(xf, yf, base, stride, wd, r0, r1, aw, bw):
    """y = x * aw[J] + bw[J] over rows [r0, r1) of the view."""
    cwm, rb = _tile(wd)
    for b0 in range(r0, r1, rb):
        b1 = min(b0 + rb, r1)
        for j0 in range(0, wd, cwm):
            cw = min(cwm, wd - j0)
            # one row at a time: stores to several rows a power-of-two stride apart
            # would alias the loads (measured 1.8x slower with four rows at once)
            for r in range(b0, b1):
                _affine_row(xf, yf, base + r * stride + j0, aw, bw, j0, cw)


@njit(fastmath=_EW, **_OPTS)
def _bsums_row(dyf, xf, o, mw, so, to, j0, n):
    u = np.uint64(o)
    v = np.uint64(j0)
    for j in range(np.uint64(n)):
        g = np.float64(ld(dyf[u + j]))
        so[v + j] += g
        to[v + j] += g * (ld(xf[u + j]) - mw[v + j])


@njit(fastmath=_EW, **_OPTS)
def _bsums_rows4(dyf, xf, o, st, mw, so, to, j0, n):
    u0 = np.uint64(o)
    u1 = np.uint64(o + st)
    u2 = np.uint64(o + 2 * st)
    u3 = np.uint64(o + 3 * st)
    v = np.uint64(j0)
    for j in range(np.uint64(n)):
        m = mw[v + j]
        g0 = np.float64(ld(dyf[u0 + j]))
        g1 = np.float64(ld(dyf[u1 + j]))
        g2 = np.float64(ld(dyf[u2 + j]))
        g3 = np.float64(ld(dyf[u3 + j]))
        so[v + j] += (g0 + g1) + (g2 + g3)
        to[v + j] += (g0 * (ld(xf[u0 + j]) - m) + g1 * (ld(xf[u1 + j]) - m)) + (
            g2 * (ld(xf[u2 + j]) - m) + g3 * (ld(xf[u3 + j]) - m)
        )


@njit(**_OPTS)
def _rows_bsums(dyf, xf, base, stride, wd, r0, r1, mw, so, to):
    """Per-column sum(dy), sum(dy * (x - mw[J])) over rows [r0, r1), added to so, to."""
    four = _four(xf, stride)
    cwm, rb = _tile(wd)
    for b0 in range(r0, r1, rb):
        b1 = min(b0 + rb, r1)
        for j0 in range(0, wd, cwm):
            cw = min(cwm, wd - j0)
            r = b0
            while four and r + 4 <= b1:
                _bsums_rows4(
                    dyf, xf, base + r * stride + j0, stride, mw, so, to, j0, cw
                )
                r += 4
            while r < b1:
                _bsums_row(dyf, xf, base + r * stride + j0, mw, so, to, j0, cw)
                r += 1


@njit(fastmath=_EW, **_OPTS)
def _bapply_row(dyf, xf, dxf, o, gw, c2w, c3w, j0, n):
    u = np.uint64(o)
    v = np.uint64(j0)
    for j in range(np.uint64(n)):
        dxf[u + j] = st(
            ld(dyf[u + j]) * cf(gw[v + j], dxf)
            + (ld(xf[u + j]) * cf(c2w[v + j], dxf) + cf(c3w[v + j], dxf)),
            dxf,
        )


@njit(**_OPTS)
def _rows_bapply(dyf, xf, dxf, base, stride, wd, r0, r1, gw, c2w, c3w):
    cwm, rb = _tile(wd)
    for b0 in range(r0, r1, rb):
        b1 = min(b0 + rb, r1)
        for j0 in range(0, wd, cwm):
            cw = min(cwm, wd - j0)
            for r in range(b0, b1):
                _bapply_row(dyf, xf, dxf, base + r * stride + j0, gw, c2w, c3w, j0, cw)


@njit(**_OPTS)
def _fold(mo, qo, CB, B, k, c, n):
    """(mean, M2) of channel c from its k*B columns J = g*CB + c*B + j of a view, each
    column summarizing n values: mean of means, M2 = sum(M2) + n * sum((mean_J - mean)**2)."""
    cnt = k * B
    sh = _finite_or_zero(mo[c * B])  # shifted like the data sums: equal means stay exact
    s = 0.0
    for g in range(k):
        o = g * CB + c * B
        for j in range(B):
            s += mo[o + j] - sh
    mu = sh + s / cnt
    q = 0.0
    d2 = 0.0
    for g in range(k):
        o = g * CB + c * B
        for j in range(B):
            d = mo[o + j] - mu
            d2 += d * d
            q += qo[o + j]
    return mu, q + n * d2


@njit(**_OPTS)
def _fold_sum(so, CB, B, k, c):
    s = 0.0
    for g in range(k):
        o = g * CB + c * B
        for j in range(B):
            s += so[o + j]
    return s


@njit(**_OPTS)
def _expand(v, CB, B, W):
    """out[J] = v[(J % CB) // B] for J < W (W a multiple of CB): per-channel values
    laid out per column, written without integer divisions (measured: a division per
    column dominated small calls)."""
    out = np.empty(W)
    idx = 0
    for _ in range(W // CB):
        for c in range(v.shape[0]):
            val = v[c]
            for _j in range(B):
                out[idx] = val
                idx += 1
    return out


@njit(**_OPTS)
def _spread(v, c0, c1, B, out):
    """out[(c - c0) * B + j] = v[c] for c in [c0, c1), j < B."""
    idx = 0
    for c in range(c0, c1):
        val = v[c]
        for _j in range(B):
            out[idx] = val
            idx += 1


@njit(**_OPTS)
def _wide_k(CB, wide):
    """Rows per wide row: rows of fewer than `wide` values are regrouped into wide rows
    of at least `wide` values and a multiple of 16 (whole vectors, no scalar remainder)."""
    if CB >= wide:
        return 1
    k = 16
    while k > 1 and (CB * (k // 2)) % 16 == 0:
        k //= 2
    while k * CB < wide:
        k *= 2
    return k


@njit(**_OPTS)
def _split(R, n):
    """Boundaries of min(R, n) (at least 1) nearly equal ranges of [0, R)."""
    P = max(1, min(R, n))
    rows = np.empty(P + 1, np.int64)
    for p in range(P + 1):
        rows[p] = (p * R) // P
    return rows


@njit(**_OPTS)
def _group(A, C, B, T):
    """Channels per fused group for short runs (B < _RUN): all A rows of a group of
    channels (A * g * B values) fit in L2, so statistics, then normalization, read it
    from memory once. 0 if no grouping gives rows of >= 256 values and >= 2T groups."""
    g = min(C, max(1, _GROUP // B))
    if A * B * g > _FUSE:
        g = _FUSE // (A * B)
    if g * B < 256 or g < 1:
        return 0
    if (C + g - 1) // g < 2 * T:
        g = C // (2 * T)
        if g * B < 256 or g < 1:
            return 0
    return g


@njit(**_OPTS)
def _col_chunks(W, T):
    """Column ranges for elementwise passes over wide rows: per-column coefficients of
    one range (<= 1024 values) stay in L1 for all rows."""
    Q = max(2 * T, (W + 1023) // 1024)
    return Q


@njit(**_OPTS)
def _cf_chunks(C, M, T):
    """Number of ranges per channel for the split (two-phase) channels-first path."""
    want = (4 * T + C - 1) // C
    most = max(1, M // _MIN_ITEM)
    return max(1, min(want, most))


@njit(**_OPTS)
def _cf_fused(C, T):
    """Whole channels per thread (stats + normalize while the channel is in cache)."""
    return C >= 2 * T or (C >= T and C % T == 0)


@njit(**_OPTS)
def _merge_parts(pm, pq, rows, tm, tq, Rt, C, B, k, mean64, m2):
    """Per-channel (mean, M2) from per-(row range, column) partials and the tail rows."""
    CB = C * B
    cnt = np.zeros(C)
    for p in range(rows.shape[0] - 1):
        nr = rows[p + 1] - rows[p]
        if nr > 0:
            mo = pm[p]  # one view per range, not per channel
            qo = pq[p]
            for c in range(C):
                m1, q1 = _fold(mo, qo, CB, B, k, c, np.float64(nr))
                cnt[c], mean64[c], m2[c] = _chan(
                    cnt[c], mean64[c], m2[c], np.float64(nr * k * B), m1, q1
                )
    if Rt > 0:
        for c in range(C):
            m1, q1 = _fold(tm, tq, CB, B, 1, c, np.float64(Rt))
            cnt[c], mean64[c], m2[c] = _chan(
                cnt[c], mean64[c], m2[c], np.float64(Rt * B), m1, q1
            )


# --------------------------------------------------------------------------------------
# Top-level kernels: forward training
# --------------------------------------------------------------------------------------


@njit(**_OPTS)
def _rows_sum(xf, base, stride, wd, r0, r1, kw, s):
    """s[:wd] += column sums of (x - kw[J]) over rows [r0, r1) of the view."""
    four = _four(xf, stride)
    r = r0
    while four and r + 4 <= r1:
        _acc_rows4(xf, base + r * stride, stride, kw, s, wd)
        r += 4
    while r < r1:
        _acc_row(xf, base + r * stride, kw, s, wd)
        r += 1


@njit(**_OPTS)
def _rows_sqdev(xf, base, stride, wd, r0, r1, mw, q):
    """q[:wd] += column sums of (x - mw[J])**2 over rows [r0, r1) of the view."""
    four = _four(xf, stride)
    r = r0
    while four and r + 4 <= r1:
        _sqdev_rows4(xf, base + r * stride, stride, mw, q, wd)
        r += 4
    while r < r1:
        _sqdev_row(xf, base + r * stride, mw, q, wd)
        r += 1


@njit(**_OPTS)
def _serial_stats(xf, A, C, B, mean64, m2):
    """Per-channel mean and M2 of a small (cache-resident) tensor by the plain two-pass
    algorithm: channel sums, then squared deviations from the channel means. Without
    merges of partial means, the error does not grow with |mean| / std at all."""
    M = A * B
    if B >= _SHORT:
        for c in range(C):
            k = _shift(xf, ld(xf[c * B]))  # the channel's first value
            s = 0.0
            for a in range(A):
                o = (a * C + c) * B
                s += _sum(xf, o, o + B, k)
            mu = k + s / M
            q = 0.0
            for a in range(A):
                o = (a * C + c) * B
                q += _sqdev(xf, o, o + B, mu)
            mean64[c] = mu
            m2[c] = q
        return
    CB = C * B
    k = _wide_k(CB, _WIDE)
    W = k * CB
    R = A // k
    Rt = A - R * k
    ks = np.empty(C)  # per-channel shifts: each channel's first value
    for c in range(C):
        ks[c] = _shift(xf, ld(xf[c * B]))
    if W == C:  # plain rows of channels: columns are channels
        mean64[:] = 0.0
        _rows_sum(xf, 0, C, C, 0, A, ks, mean64)
        for c in range(C):
            mean64[c] = ks[c] + mean64[c] / M
        m2[:] = 0.0
        _rows_sqdev(xf, 0, C, C, 0, A, mean64, m2)
        return
    kw = _expand(ks, CB, B, W)
    acc = np.zeros(W)
    _rows_sum(xf, 0, W, W, 0, R, kw, acc)
    _rows_sum(xf, R * W, CB, CB, 0, Rt, kw, acc)  # tail rows: columns [0, CB) map alike
    for c in range(C):
        mean64[c] = ks[c] + _fold_sum(acc, CB, B, k, c) / M
    mw = _expand(mean64, CB, B, W)
    acc[:] = 0.0
    _rows_sqdev(xf, 0, W, W, 0, R, mw, acc)
    _rows_sqdev(xf, R * W, CB, CB, 0, Rt, mw, acc)
    for c in range(C):
        m2[c] = _fold_sum(acc, CB, B, k, c)


@njit(**_OPTS)
def _ft_serial(x, w, b, eps, y, mean_out, var_out, inv_out):
    """Serial training forward into preallocated outputs (allocating them in Python and
    returning nothing is cheaper than boxing four arrays made by Numba)."""
    A, C, B = x.shape
    M = A * B
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    scratch = np.empty(4 * C)  # one allocation for the four float64 work arrays
    mean64 = scratch[:C]
    m2 = scratch[C : 2 * C]
    alpha = scratch[2 * C : 3 * C]
    beta = scratch[3 * C :]
    _serial_stats(xf, A, C, B, mean64, m2)
    _finish(
        mean64, m2, np.float64(M), w, b, eps, mean_out, var_out, inv_out, alpha, beta
    )
    if B >= _SHORT:
        _runs_affine(xf, yf, C, B, 0, A, 0, C, alpha, beta)
        return
    CB = C * B
    k = _wide_k(CB, _WIDE_EW)
    W = k * CB
    R = A // k
    if W == C:  # rows of channels: the per-column coefficients are alpha and beta
        _rows_affine(xf, yf, 0, C, C, 0, A, alpha, beta)
        return
    aw = _expand(alpha, CB, B, W)
    bw = _expand(beta, CB, B, W)
    _rows_affine(xf, yf, 0, W, W, 0, R, aw, bw)
    _rows_affine(xf, yf, R * W, CB, CB, 0, A - R * k, aw, bw)


@njit(**_OPTS)
def _ft_serial_update(x, w, b, eps, y, mean_out, var_out, inv_out, rm, rv, momentum):
    """:func:`_ft_serial`, then the running-statistics update (one call from Python)."""
    _ft_serial(x, w, b, eps, y, mean_out, var_out, inv_out)
    A, _, B = x.shape
    update_running_stats(rm, rv, mean_out, var_out, momentum, A * B)


@njit(parallel=True, **_OPTS)
def _ft_parallel(x, w, b, eps, T, y):
    A, C, B = x.shape
    M = A * B
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    mean_out = np.empty(C, w.dtype)
    var_out = np.empty(C, w.dtype)
    inv_out = np.empty(C, w.dtype)
    mean64 = np.empty(C)
    m2 = np.empty(C)
    alpha = np.empty(C)
    beta = np.empty(C)
    if B >= _RUN:
        if _cf_fused(C, T):
            for c in prange(C):
                mu, q = _cf_stats(xf, C, B, c, 0, M)
                inv = _invstd(q / M, eps)
                a = np.float64(w[c]) * inv
                mean_out[c] = mu
                var_out[c] = q / M
                inv_out[c] = inv
                _cf_affine(xf, yf, C, B, c, 0, M, a, np.float64(b[c]) - mu * a)
            return y, mean_out, var_out, inv_out
        P = _cf_chunks(C, M, T)
        pmean = np.empty(C * P)
        pm2 = np.empty(C * P)
        for it in prange(C * P):
            c = it // P
            p = it - c * P
            mu, q = _cf_stats(xf, C, B, c, (p * M) // P, ((p + 1) * M) // P)
            pmean[it] = mu
            pm2[it] = q
        for ch in range(C):
            tn = 0.0
            tmu = 0.0
            tq = 0.0
            for pp in range(P):
                nb = np.float64(((pp + 1) * M) // P - (pp * M) // P)
                tn, tmu, tq = _chan(
                    tn, tmu, tq, nb, pmean[ch * P + pp], pm2[ch * P + pp]
                )
            mean64[ch] = tmu
            m2[ch] = tq
        _finish(
            mean64,
            m2,
            np.float64(M),
            w,
            b,
            eps,
            mean_out,
            var_out,
            inv_out,
            alpha,
            beta,
        )
        for it in prange(C * P):
            c = it // P
            p = it - c * P
            _cf_affine(
                xf, yf, C, B, c, (p * M) // P, ((p + 1) * M) // P, alpha[c], beta[c]
            )
        return y, mean_out, var_out, inv_out
    CB = C * B
    k = _wide_k(CB, _WIDE)
    g = _group(A, C, B, T) if k == 1 else 0
    if g > 0:
        for grp in prange((C + g - 1) // g):
            c0 = grp * g
            c1 = min(C, c0 + g)
            cw = (c1 - c0) * B
            mo = np.empty(cw)
            qo = np.empty(cw)
            _rows_stats(xf, c0 * B, CB, cw, 0, A, mo, qo)
            for c in range(c0, c1):
                mu, q = _fold(mo, qo, cw, B, 1, c - c0, np.float64(A))
                var = q / M
                inv = _invstd(var, eps)
                a = np.float64(w[c]) * inv
                mean_out[c] = mu
                var_out[c] = var
                inv_out[c] = inv
                alpha[c] = a
                beta[c] = np.float64(b[c]) - mu * a
            if B >= _SHORT:
                _runs_affine(xf, yf, C, B, 0, A, c0, c1, alpha, beta)
            else:
                _spread(alpha, c0, c1, B, mo)
                _spread(beta, c0, c1, B, qo)
                _rows_affine(xf, yf, c0 * B, CB, cw, 0, A, mo, qo)
        return y, mean_out, var_out, inv_out
    W = k * CB
    R = A // k
    Rt = A - R * k
    rows = _split(R, 2 * T)
    P = rows.shape[0] - 1
    pm = np.empty((P, W))
    pq = np.empty((P, W))
    for p in prange(P):
        _rows_stats(xf, 0, W, W, rows[p], rows[p + 1], pm[p], pq[p])
    tm = np.empty(CB)
    tq = np.empty(CB)
    _rows_stats(xf, R * W, CB, CB, 0, Rt, tm, tq)
    _merge_parts(pm, pq, rows, tm, tq, Rt, C, B, k, mean64, m2)
    _finish(
        mean64, m2, np.float64(M), w, b, eps, mean_out, var_out, inv_out, alpha, beta
    )
    if B >= _SHORT and k == 1:
        for p in prange(P):
            _runs_affine(xf, yf, C, B, rows[p], rows[p + 1], 0, C, alpha, beta)
        return y, mean_out, var_out, inv_out
    # the normalization regroups rows for itself (_WIDE_EW)
    k = _wide_k(CB, _WIDE_EW)
    W = k * CB
    R = A // k
    rows = _split(R, 2 * T)
    aw = _expand(alpha, CB, B, W)
    bw = _expand(beta, CB, B, W)
    for p in prange(rows.shape[0] - 1):
        _rows_affine(xf, yf, 0, W, W, rows[p], rows[p + 1], aw, bw)
    _rows_affine(xf, yf, R * W, CB, CB, 0, A - R * k, aw, bw)
    return y, mean_out, var_out, inv_out


# --------------------------------------------------------------------------------------
# Forward evaluation (given statistics)
# --------------------------------------------------------------------------------------


@njit(**_OPTS)
def _eval_coef(mean, var, w, b, eps):
    C = mean.shape[0]
    alpha = np.empty(C)
    beta = np.empty(C)
    for c in range(C):
        a = np.float64(w[c]) * _invstd(np.float64(var[c]), eps)
        alpha[c] = a
        beta[c] = np.float64(b[c]) - np.float64(mean[c]) * a
    return alpha, beta


@njit(**_OPTS)
def _fe_serial(x, mean, var, w, b, eps):
    A, C, B = x.shape
    xf = x.reshape(x.size)
    y = np.empty_like(x)
    yf = y.reshape(y.size)
    alpha, beta = _eval_coef(mean, var, w, b, eps)
    if B >= _SHORT:
        _runs_affine(xf, yf, C, B, 0, A, 0, C, alpha, beta)
        return y
    CB = C * B
    k = _wide_k(CB, _WIDE_EW)
    W = k * CB
    R = A // k
    aw = _expand(alpha, CB, B, W)
    bw = _expand(beta, CB, B, W)
    _rows_affine(xf, yf, 0, W, W, 0, R, aw, bw)
    _rows_affine(xf, yf, R * W, CB, CB, 0, A - R * k, aw, bw)
    return y


@njit(parallel=True, **_OPTS)
def _fe_parallel(x, mean, var, w, b, eps, T, y):
    A, C, B = x.shape
    M = A * B
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    alpha, beta = _eval_coef(mean, var, w, b, eps)
    if B >= _SHORT:
        if A >= 2 * T:
            rows = _split(A, 2 * T)
            for p in prange(rows.shape[0] - 1):
                _runs_affine(xf, yf, C, B, rows[p], rows[p + 1], 0, C, alpha, beta)
            return y
        P = _cf_chunks(C, M, T)
        for it in prange(C * P):
            c = it // P
            p = it - c * P
            _cf_affine(
                xf, yf, C, B, c, (p * M) // P, ((p + 1) * M) // P, alpha[c], beta[c]
            )
        return y
    CB = C * B
    k = _wide_k(CB, _WIDE_EW)
    W = k * CB
    R = A // k
    aw = _expand(alpha, CB, B, W)
    bw = _expand(beta, CB, B, W)
    if W >= _SPLIT_COLS or R < 2 * T:
        Q = _col_chunks(W, T)
        for qq in prange(Q):
            j0 = (qq * W) // Q
            j1 = ((qq + 1) * W) // Q
            _rows_affine(xf, yf, j0, W, j1 - j0, 0, R, aw[j0:j1], bw[j0:j1])
    else:
        rows = _split(R, 2 * T)
        for p in prange(rows.shape[0] - 1):
            _rows_affine(xf, yf, 0, W, W, rows[p], rows[p + 1], aw, bw)
    _rows_affine(xf, yf, R * W, CB, CB, 0, A - R * k, aw, bw)
    return y


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------


@njit(**_OPTS)
def _bw_rows_finish(
    so, to, tso, tto, Rt, C, B, k, mean, invstd, w, M, dw_out, db_out, g, c2, c3
):
    CB = C * B
    s = np.zeros(C)
    t = np.zeros(C)
    for p in range(so.shape[0]):
        sp = so[p]  # one view per range, not per channel
        tp = to[p]
        for c in range(C):
            s[c] += _fold_sum(sp, CB, B, k, c)
            t[c] += _fold_sum(tp, CB, B, k, c)
    if Rt > 0:
        for c in range(C):
            s[c] += _fold_sum(tso, CB, B, 1, c)
            t[c] += _fold_sum(tto, CB, B, 1, c)
    for c in range(C):
        dwc, g[c], c2[c], c3[c] = _bcoef(
            s[c], t[c], np.float64(mean[c]), np.float64(invstd[c]), w[c], M
        )
        dw_out[c] = dwc
        db_out[c] = s[c]


@njit(**_OPTS)
def _bw_serial(dy, x, mean, invstd, w, dx, dw_out, db_out, reduce_only):
    """Serial backward into preallocated outputs; `reduce_only`: dweight and dbias only
    (`dx` is not written)."""
    A, C, B = x.shape
    M = np.float64(A * B)
    Mi = A * B
    dyf = dy.reshape(dy.size)
    xf = x.reshape(x.size)
    dxf = dx.reshape(dx.size)
    if B >= _RUN:
        for c in range(C):
            mu = np.float64(mean[c])
            inv = np.float64(invstd[c])
            sdy, sdyx = _cf_bsums(dyf, xf, C, B, c, 0, Mi, mu)
            dwc, g, c2, c3 = _bcoef(sdy, sdyx, mu, inv, w[c], M)
            dw_out[c] = dwc
            db_out[c] = sdy
            if not reduce_only:
                _cf_bapply(dyf, xf, dxf, C, B, c, 0, Mi, g, c2, c3)
        return
    CB = C * B
    k = _wide_k(CB, _WIDE_EW)
    W = k * CB
    R = A // k
    Rt = A - R * k
    mw = _expand(mean.astype(np.float64), CB, B, W)
    so = np.zeros((1, W))
    to = np.zeros((1, W))
    _rows_bsums(dyf, xf, 0, W, W, 0, R, mw, so[0], to[0])
    tso = np.zeros(CB)
    tto = np.zeros(CB)
    _rows_bsums(dyf, xf, R * W, CB, CB, 0, Rt, mw, tso, tto)
    g = np.empty(C)
    c2 = np.empty(C)
    c3 = np.empty(C)
    _bw_rows_finish(
        so, to, tso, tto, Rt, C, B, k, mean, invstd, w, M, dw_out, db_out, g, c2, c3
    )
    if reduce_only:
        return
    if B >= _SHORT:
        _runs_bapply(dyf, xf, dxf, C, B, 0, A, 0, C, g, c2, c3)
        return
    gw = _expand(g, CB, B, W)
    c2w = _expand(c2, CB, B, W)
    c3w = _expand(c3, CB, B, W)
    _rows_bapply(dyf, xf, dxf, 0, W, W, 0, R, gw, c2w, c3w)
    _rows_bapply(dyf, xf, dxf, R * W, CB, CB, 0, Rt, gw, c2w, c3w)


@njit(parallel=True, **_OPTS)
def _bw_parallel(dy, x, mean, invstd, w, T, dx, reduce_only):
    """Parallel backward; `reduce_only`: see :func:`_bw_serial`."""
    A, C, B = x.shape
    M = np.float64(A * B)
    Mi = A * B
    dyf = dy.reshape(dy.size)
    xf = x.reshape(x.size)
    dxf = dx.reshape(dx.size)
    dw_out = np.empty(C, w.dtype)
    db_out = np.empty(C, w.dtype)
    g = np.empty(C)
    c2 = np.empty(C)
    c3 = np.empty(C)
    if B >= _RUN:
        if _cf_fused(C, T):
            for c in prange(C):
                mu = np.float64(mean[c])
                inv = np.float64(invstd[c])
                sdy, sdyx = _cf_bsums(dyf, xf, C, B, c, 0, Mi, mu)
                dwc, gc, c2c, c3c = _bcoef(sdy, sdyx, mu, inv, w[c], M)
                dw_out[c] = dwc
                db_out[c] = sdy
                if not reduce_only:
                    _cf_bapply(dyf, xf, dxf, C, B, c, 0, Mi, gc, c2c, c3c)
            return dx, dw_out, db_out
        P = _cf_chunks(C, Mi, T)
        ps = np.empty(C * P)
        pt = np.empty(C * P)
        for it in prange(C * P):
            c = it // P
            p = it - c * P
            s1, t1 = _cf_bsums(
                dyf,
                xf,
                C,
                B,
                c,
                (p * Mi) // P,
                ((p + 1) * Mi) // P,
                np.float64(mean[c]),
            )
            ps[it] = s1
            pt[it] = t1
        for ch in range(C):
            s = 0.0
            t = 0.0
            for pp in range(P):
                s += ps[ch * P + pp]
                t += pt[ch * P + pp]
            dwc, g[ch], c2[ch], c3[ch] = _bcoef(
                s, t, np.float64(mean[ch]), np.float64(invstd[ch]), w[ch], M
            )
            dw_out[ch] = dwc
            db_out[ch] = s
        if reduce_only:
            return dx, dw_out, db_out
        for it in prange(C * P):
            c = it // P
            p = it - c * P
            _cf_bapply(
                dyf,
                xf,
                dxf,
                C,
                B,
                c,
                (p * Mi) // P,
                ((p + 1) * Mi) // P,
                g[c],
                c2[c],
                c3[c],
            )
        return dx, dw_out, db_out
    CB = C * B
    k = _wide_k(CB, _WIDE_EW)
    gsz = _group(A, C, B, T) if k == 1 else 0
    if gsz > 0:
        for grp in prange((C + gsz - 1) // gsz):
            c0 = grp * gsz
            c1 = min(C, c0 + gsz)
            cw = (c1 - c0) * B
            mw = np.empty(cw)
            _spread(mean, c0, c1, B, mw)
            so = np.zeros(cw)
            to = np.zeros(cw)
            _rows_bsums(dyf, xf, c0 * B, CB, cw, 0, A, mw, so, to)
            for c in range(c0, c1):
                s = _fold_sum(so, cw, B, 1, c - c0)
                t = _fold_sum(to, cw, B, 1, c - c0)
                dwc, g[c], c2[c], c3[c] = _bcoef(
                    s, t, np.float64(mean[c]), np.float64(invstd[c]), w[c], M
                )
                dw_out[c] = dwc
                db_out[c] = s
            if reduce_only:
                pass
            elif B >= _SHORT:
                _runs_bapply(dyf, xf, dxf, C, B, 0, A, c0, c1, g, c2, c3)
            else:
                _spread(g, c0, c1, B, so)
                _spread(c2, c0, c1, B, to)
                _spread(c3, c0, c1, B, mw)
                _rows_bapply(dyf, xf, dxf, c0 * B, CB, cw, 0, A, so, to, mw)
        return dx, dw_out, db_out
    W = k * CB
    R = A // k
    Rt = A - R * k
    mw = _expand(mean.astype(np.float64), CB, B, W)
    rows = _split(R, 2 * T)
    P = rows.shape[0] - 1
    so = np.zeros((P, W))
    to = np.zeros((P, W))
    for p in prange(P):
        _rows_bsums(dyf, xf, 0, W, W, rows[p], rows[p + 1], mw, so[p], to[p])
    tso = np.zeros(CB)
    tto = np.zeros(CB)
    _rows_bsums(dyf, xf, R * W, CB, CB, 0, Rt, mw, tso, tto)
    _bw_rows_finish(
        so, to, tso, tto, Rt, C, B, k, mean, invstd, w, M, dw_out, db_out, g, c2, c3
    )
    if reduce_only:
        return dx, dw_out, db_out
    if B >= _SHORT and k == 1:
        for p in prange(P):
            _runs_bapply(dyf, xf, dxf, C, B, rows[p], rows[p + 1], 0, C, g, c2, c3)
        return dx, dw_out, db_out
    gw = _expand(g, CB, B, W)
    c2w = _expand(c2, CB, B, W)
    c3w = _expand(c3, CB, B, W)
    for p in prange(P):
        _rows_bapply(dyf, xf, dxf, 0, W, W, rows[p], rows[p + 1], gw, c2w, c3w)
    _rows_bapply(dyf, xf, dxf, R * W, CB, CB, 0, Rt, gw, c2w, c3w)
    return dx, dw_out, db_out


# --------------------------------------------------------------------------------------
# Running statistics (optional backend function, used by the public API when present)
# --------------------------------------------------------------------------------------


@njit(**_OPTS)
def update_running_stats(running_mean, running_var, mean, var, momentum, n):
    """Update running statistics in place, as torch does in training.

    ``running_mean = (1 - momentum) * running_mean + momentum * mean`` and
    ``running_var = (1 - momentum) * running_var + momentum * var * n / (n - 1)``
    (the unbiased batch variance), computed in float64 and stored in the running
    statistics' dtype. One compiled call instead of several small NumPy operations.

    Parameters
    ----------
    running_mean, running_var : numpy.ndarray
        Length-``C`` running statistics, updated in place.
    mean, var : numpy.ndarray
        Batch mean and biased batch variance from :func:`forward_train`.
    momentum : float
        Weight of the batch statistics.
    n : int
        Values per channel in the batch (``A * B``), at least 2.
    """
    keep = 1.0 - momentum
    unbias = momentum * n / (n - 1.0)
    for c in range(running_mean.shape[0]):
        running_mean[c] = keep * running_mean[c] + momentum * np.float64(mean[c])
        running_var[c] = keep * running_var[c] + unbias * np.float64(var[c])


# --------------------------------------------------------------------------------------
# The backend contract
# --------------------------------------------------------------------------------------


def available():
    """Whether this backend can run here.

    Returns
    -------
    tuple of (bool, str)
        ``(True, "")``: the backend needs only NumPy and Numba, which fastbn requires.
    """
    return True, ""


# 16-bit float types by type character: the integer dtype the kernels read their bits as
# (see :mod:`fastbn.backends._half`) and the check that the conversions work here.
# bfloat16 is recognized by its character "E" (one test on the float32 path): the API lets
# no other "E" dtype through (ml_dtypes' uint1 shares it).
_HALF_TYPES = {"e": (_U16, _half.supported), "E": (_I16, _half.bfloat16_supported)}
_half_native: dict[str, bool] = {}  # type character -> whether the kernels take it natively


def _bits(ch):
    """For a 16-bit float type character: the dtype the kernels read its bits as, or None
    where the conversions are unusable (then it is converted around float32 kernels)."""
    native = _half_native.get(ch)
    if native is None:
        native = _half_native[ch] = _HALF_TYPES[ch][1]()[0]
    return _HALF_TYPES[ch][0] if native else None


def _outputs(x3, sd):
    """Outputs of the serial kernels (also used for large tensors in a forked child that
    must not use the threading layer, see :mod:`fastbn._threading`)."""
    c = x3.shape[1]
    small = x3.size <= SERIAL_MAX
    y = np.empty(x3.shape, x3.dtype) if small else _buffers.empty(x3.shape, x3.dtype)
    return y, np.empty(c, sd), np.empty(c, sd), np.empty(c, sd)


def forward_train(x3, weight, bias, eps):
    """Training-mode forward: batch statistics and normalized output.

    Parameters
    ----------
    x3 : numpy.ndarray
        C-contiguous input of shape ``(A, C, B)``, ``A * B >= 1``.
    weight, bias : numpy.ndarray
        Length-``C`` arrays of dtype ``stats_dtype(x3.dtype)``.
    eps : float
        Added to the variance before the square root.

    Returns
    -------
    y3 : numpy.ndarray
        ``(x3 - mean) * invstd * weight + bias`` in ``x3.dtype``.
    mean, var, invstd : numpy.ndarray
        Per-channel batch mean, biased variance and ``1 / sqrt(var + eps)`` (0 where
        ``var + eps == 0``), in ``stats_dtype(x3.dtype)``.
    """
    if x3.dtype.char in _HALF_TYPES:
        bits = _bits(x3.dtype.char)
        y, m, v, i = forward_train(x3.astype(_F32) if bits is None else x3.view(bits),
                                   weight, bias, eps)
        return (y.astype(x3.dtype) if bits is None else y.view(x3.dtype)), m, v, i
    if x3.size <= SERIAL_MAX or not _threading.begin():
        y, mean, var, invstd = _outputs(x3, weight.dtype)
        _ft_serial(x3, weight, bias, eps, y, mean, var, invstd)
        return y, mean, var, invstd
    try:
        return _ft_parallel(
            x3, weight, bias, eps, _nthreads(), _buffers.empty(x3.shape, x3.dtype)
        )
    finally:
        _threading.end()


def forward_train_update(x3, weight, bias, eps, running_mean, running_var, momentum):
    """:func:`forward_train`, then :func:`update_running_stats` (optional contract function).

    Small tensors run both in one compiled call.

    Parameters
    ----------
    x3, weight, bias, eps
        As for :func:`forward_train`.
    running_mean, running_var : numpy.ndarray
        Length-``C`` running statistics (any floating dtype, any stride), updated in place
        after the statistics are computed.
    momentum : float
        Weight of the batch statistics.

    Returns
    -------
    tuple
        ``(y3, mean, var, invstd)`` as :func:`forward_train` returns them.
    """
    if x3.size <= SERIAL_MAX and x3.dtype.char not in ("e", "E"):  # not float16, bfloat16
        y, mean, var, invstd = _outputs(x3, weight.dtype)
        _ft_serial_update(
            x3, weight, bias, eps, y, mean, var, invstd, running_mean, running_var, momentum
        )
        return y, mean, var, invstd
    out = forward_train(x3, weight, bias, eps)
    update_running_stats(
        running_mean, running_var, out[1], out[2], momentum, x3.shape[0] * x3.shape[2]
    )
    return out


def forward_eval(x3, mean, var, weight, bias, eps):
    """Evaluation-mode forward: normalize with given (running) statistics.

    Parameters
    ----------
    x3 : numpy.ndarray
        C-contiguous input of shape ``(A, C, B)``.
    mean, var : numpy.ndarray
        Length-``C`` statistics of dtype ``stats_dtype(x3.dtype)``.
    weight, bias : numpy.ndarray
        Length-``C`` affine parameters of the same dtype.
    eps : float
        Added to the variance before the square root.

    Returns
    -------
    numpy.ndarray
        ``(x3 - mean) / sqrt(var + eps) * weight + bias`` in ``x3.dtype``.
    """
    if x3.dtype.char in _HALF_TYPES:
        bits = _bits(x3.dtype.char)
        if bits is None:
            return forward_eval(x3.astype(_F32), mean, var, weight, bias, eps).astype(x3.dtype)
        return forward_eval(x3.view(bits), mean, var, weight, bias, eps).view(x3.dtype)
    if x3.size <= SERIAL_MAX or not _threading.begin():
        return _fe_serial(x3, mean, var, weight, bias, eps)
    try:
        return _fe_parallel(
            x3, mean, var, weight, bias, eps, _nthreads(), _buffers.empty(x3.shape, x3.dtype)
        )
    finally:
        _threading.end()


def backward(dy3, x3, mean, invstd, weight):
    """Gradient of the training-mode forward.

    Parameters
    ----------
    dy3 : numpy.ndarray
        Gradient of the output, same shape and dtype as `x3`, C-contiguous.
    x3 : numpy.ndarray
        The forward input, C-contiguous ``(A, C, B)``.
    mean, invstd : numpy.ndarray
        The statistics returned by :func:`forward_train`.
    weight : numpy.ndarray
        Length-``C`` weight of dtype ``stats_dtype(x3.dtype)``.

    Returns
    -------
    dx3 : numpy.ndarray
        Gradient of the input, in ``x3.dtype``.
    dweight, dbias : numpy.ndarray
        ``sum(dy * xhat)`` and ``sum(dy)`` per channel, in ``stats_dtype(x3.dtype)``.
    """
    return _backward(dy3, x3, mean, invstd, weight, False)


def backward_eval(dy3, x3, mean, var, weight, eps):
    """Gradient of :func:`forward_eval` (the statistics are constants; optional contract
    function).

    Parameters
    ----------
    dy3, x3, weight
        As for :func:`backward`.
    mean, var : numpy.ndarray
        The statistics the forward normalized with (the running ones).
    eps : float
        As given to the forward.

    Returns
    -------
    dx3 : numpy.ndarray
        ``dy * weight * invstd`` in ``x3.dtype``, with ``invstd = 1 / sqrt(var + eps)``
        (0 where ``var + eps == 0``, as in the forward): the forward's elementwise pass
        applied to `dy3` (it reads `dy3` only, so an infinite `x3` leaves it finite).
    dweight, dbias : numpy.ndarray
        ``sum(dy * (x - mean) * invstd)`` and ``sum(dy)`` per channel, in
        ``stats_dtype(x3.dtype)``: the backward's reduction pass, without its dx pass.
    """
    _, dw, db = _backward(dy3, x3, mean, _invstd_array(var, eps, weight), weight, True)
    zero = np.zeros_like(weight)
    return forward_eval(dy3, zero, var, weight, zero, eps), dw, db


@njit(**_OPTS)
def _invstd_array(var, eps, like):
    """``1 / sqrt(var + eps)`` (0 where ``var + eps == 0``) in the dtype of `like`."""
    out = np.empty(var.shape[0], like.dtype)
    for c in range(var.shape[0]):
        out[c] = _invstd(np.float64(var[c]), eps)
    return out


def _backward(dy3, x3, mean, invstd, weight, reduce_only):
    """:func:`backward`; with `reduce_only`, dx3 is None and only the reductions run."""
    if x3.dtype.char in _HALF_TYPES:
        bits = _bits(x3.dtype.char)
        if bits is None:
            dx, dw, db = _backward(dy3.astype(_F32), x3.astype(_F32), mean, invstd, weight,
                                   reduce_only)
            return (None if reduce_only else dx.astype(x3.dtype)), dw, db
        dx, dw, db = _backward(dy3.view(bits), x3.view(bits), mean, invstd, weight, reduce_only)
        return (None if reduce_only else dx.view(x3.dtype)), dw, db
    limit = BACKWARD_SERIAL_MAX if x3.shape[2] >= _SHORT else SERIAL_MAX
    if x3.size <= limit or not _threading.begin():
        c = x3.shape[1]
        if reduce_only:
            dx = np.empty((0, 0, 0), x3.dtype)
        else:  # (a large x3 runs serially in a forked child, see _outputs)
            dx = _outputs(x3, weight.dtype)[0]
        dw, db = np.empty(c, weight.dtype), np.empty(c, weight.dtype)
        _bw_serial(dy3, x3, mean, invstd, weight, dx, dw, db, reduce_only)
        return (None if reduce_only else dx), dw, db
    try:
        dx = (np.empty((0, 0, 0), x3.dtype) if reduce_only
              else _buffers.empty(x3.shape, x3.dtype))
        dx, dw, db = _bw_parallel(dy3, x3, mean, invstd, weight, _nthreads(), dx, reduce_only)
        return (None if reduce_only else dx), dw, db
    finally:
        _threading.end()


# A cache entry that cannot be read is compiled again and rewritten, not an error forever.
_jitcache.harden(globals())
