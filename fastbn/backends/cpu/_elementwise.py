"""Elementwise passes of the CPU kernels: ``y = x * alpha + beta`` and the backward's
``dx = g * dy + c2 * x + c3``, over runs of a channel and over row tiles."""

from __future__ import annotations

import numpy as np
from numba import njit

from .. import _jitcache
from ._half import cf, ld, st
from ._plan import _EW, _OPTS, _tile


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


# A cache entry that cannot be read is compiled again and rewritten, not an error forever.
_jitcache.harden(globals())
