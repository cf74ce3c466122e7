"""Planning for the CPU kernels: size thresholds, work splits, the layout of per-channel
values along rows, and how 16-bit data reach the kernels.

Every kernel of the package takes its Numba options (``_OPTS``) from here, so that all are
cached, or none (see :mod:`fastbn.backends._jitcache`). Numba caches a kernel keyed on its
own source file only: after editing a module that kernels of another module call, clear
the cache (the tests and benchmarks key ``NUMBA_CACHE_DIR`` on a hash of the package).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit

from ... import _buffers
from .. import _jitcache
from . import _half

# Read at every parallel call (not cached), so numba.set_num_threads is respected; the
# kernels take it as an argument because reading it inside compiled code prevents caching.
_nthreads = numba.get_num_threads

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
# Channels-first (B > 1): ranges [m0, m1) of one channel's M = A * B values
# --------------------------------------------------------------------------------------


@njit(**_OPTS)
def _cf_block(B):
    """Block length in channel values: whole runs when runs are short."""
    if B >= _BLOCK:
        return _BLOCK
    return (_BLOCK // B) * B


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


# 16-bit float types by type character: the integer dtype the kernels read their bits as
# (see :mod:`fastbn.backends.cpu._half`) and the check that the conversions work here.
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


# A cache entry that cannot be read is compiled again and rewritten, not an error forever.
_jitcache.harden(globals())
