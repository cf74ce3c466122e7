"""The CPU row kernels' forward variants, timed against each other in one process.

Layer norm: the two-pass statistics pipelined over rows (the float64 kernel), the one-pass
statistics pipelined, and unfused (each row summed, then normalized); RMS norm: pipelined
(the sum of squares of row r + 1 taken in the loop normalizing row r) and unfused. The
variants that are not the package's choice are defined here from the package's own row
functions. float32, the benchmark suite's shapes and two more; every round times every
variant (the fastest of 2 blocks of 8 calls), the ratio to the two-pass kernel is taken
per round and its median reported. A last check times the pipelined loops with the output
at the same offset in a page as the input and 64 bytes away (4K aliasing)::

    python bench/row_kernels_ab.py [--rounds 12]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from numba import get_num_threads, njit, prange

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import machine  # noqa: E402

from fastbn import _buffers  # noqa: E402
from fastbn.backends.cpu import rownorm as R  # noqa: E402
from fastbn.backends.cpu._half import ld, st  # noqa: E402
from fastbn.backends.cpu._moments import _invstd  # noqa: E402
from fastbn.backends.cpu._plan import _OPTS, _RED, _split  # noqa: E402

SHAPES = [(16384, 1024), (8192, 2048), (4096, 4096), (2048, 12288), (32768, 512), (65536, 128)]


@njit(**_OPTS)
def _ln_unfused(xf, yf, r0, r1, n, w, b, eps, mean, rstd):
    for r in range(r0, r1):
        o = r * n
        mu, m2 = R._one_pass_moments(xf, o, n)
        rs = _invstd(m2 / n, eps)
        mean[r] = mu
        rstd[r] = rs
        R._ln_apply(xf, yf, o, n, mu, rs, w, b)


@njit(**_OPTS)
def _ln_one_pass_pipelined(xf, yf, r0, r1, n, w, b, eps, mean, rstd):
    if r1 <= r0:
        return
    k = R._finite_or_zero(ld(xf[r0 * n]))
    s1, s2 = R._shifted_sums(xf, r0 * n, r0 * n + n, k)
    for r in range(r0, r1):
        o = r * n
        mu, m2 = R._block_moments(k, s1, s2, n)
        rs = _invstd(m2 / n, eps)
        mean[r] = mu
        rstd[r] = rs
        if r + 1 < r1:
            k = R._finite_or_zero(ld(xf[o + n]))
            s1, s2 = R._ln_apply_and_next_sums(xf, yf, o, n, mu, rs, w, b, k)
        else:
            R._ln_apply(xf, yf, o, n, mu, rs, w, b)


@njit(fastmath=_RED, **_OPTS)
def _rms_apply_and_next_sumsq(xf, yf, o, n, rs, w):
    u = np.uint64(o)
    v = np.uint64(o + n)
    q = 0.0
    for j in range(np.uint64(n)):
        yf[u + j] = st(ld(xf[u + j]) * rs * w[j], yf)
        t = np.float64(ld(xf[v + j]))
        q += t * t
    return q


@njit(**_OPTS)
def _rms_pipelined(xf, yf, r0, r1, n, w, b, eps, mean, rstd):
    if r1 <= r0:
        return
    q = R._sumsq(xf, r0 * n, r0 * n + n)
    for r in range(r0, r1):
        o = r * n
        rs = _invstd(q / n, eps)
        rstd[r] = rs
        if r + 1 < r1:
            q = _rms_apply_and_next_sumsq(xf, yf, o, n, rs, w)
        else:
            R._rms_apply(xf, yf, o, n, rs, w)


@njit(**_OPTS)
def _rms_unfused(xf, yf, r0, r1, n, w, b, eps, mean, rstd):
    R._rms_fwd_rows(xf, yf, r0, r1, n, w, eps, rstd)


def _parallel(rows):
    @njit(parallel=True)
    def run(T, x, w, b, eps, y, mean, rstd):
        nr, n = x.shape
        xf = x.reshape(x.size)
        yf = y.reshape(y.size)
        split = _split(nr, 4 * T)
        for p in prange(split.shape[0] - 1):
            rows(xf, yf, split[p], split[p + 1], n, w, b, eps, mean, rstd)
    return run


VARIANTS = {
    "layer norm, two-pass, pipelined": _parallel(R._ln_fwd_rows_two_pass),
    "layer norm, one-pass, pipelined": _parallel(_ln_one_pass_pipelined),
    "layer norm, one-pass, unfused": _parallel(_ln_unfused),
    "RMS norm, pipelined": _parallel(_rms_pipelined),
    "RMS norm, unfused": _parallel(_rms_unfused),
}


def _call(fn, x, w, b, y=None):
    y = _buffers.empty(x.shape, x.dtype) if y is None else y
    m, r = np.empty(x.shape[0], np.float32), np.empty(x.shape[0], np.float32)
    fn(get_num_threads(), x, w, b, 1e-5, y, m, r)
    return y


def _block(fn, x, w, b, reps, y=None):
    t0 = time.perf_counter()
    for _ in range(reps):
        _call(fn, x, w, b, y)
    return (time.perf_counter() - t0) / reps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args(argv)
    info = machine.lscpu()
    print(f"Machine: {info.get('Model name', '?')}, {info.get('CPU(s)', '?')} CPUs, "
          f"{get_num_threads()} threads; float32; {args.rounds} rounds\n")
    print("| shape | " + " | ".join(VARIANTS) + " |")
    print("| --- |" + " --- |" * len(VARIANTS))
    for shape in SHAPES:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) + 3
        n = shape[1]
        w, b = np.ones(n, np.float32), np.zeros(n, np.float32)
        ref = _call(VARIANTS["layer norm, two-pass, pipelined"], x, w, b).copy()
        for name, fn in VARIANTS.items():
            y = _call(fn, x, w, b)
            if name.startswith("layer"):
                assert np.abs(y - ref).max() < 1e-4, name
        times = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name, fn in VARIANTS.items():
                times[name].append(min(_block(fn, x, w, b, 8) for _ in range(2)))
        base = times["layer norm, two-pass, pipelined"]
        cells = [f"{min(t) * 1e3:.2f} ms ({statistics.median(a / c for a, c in zip(t, base)):.2f})"
                 for t in times.values()]
        print(f"| {shape[0]}x{shape[1]} | " + " | ".join(cells) + " |")
    print("\n4K aliasing, (16384, 1024): fastest of 10 calls, y at x's offset in a page or 64 "
          "bytes away\n")
    x = np.random.default_rng(0).standard_normal((16384, 1024)).astype(np.float32) + 3
    w, b = np.ones(1024, np.float32), np.zeros(1024, np.float32)
    for name in ("layer norm, one-pass, pipelined", "layer norm, one-pass, unfused",
                 "RMS norm, pipelined", "RMS norm, unfused"):
        cells = []
        for off in (0, 64):
            buf = np.empty(x.size + 2048, np.float32)
            s0 = ((x.ctypes.data - buf.ctypes.data) % 4096) // 4 + off // 4
            y = buf[s0:s0 + x.size].reshape(x.shape)
            assert (y.ctypes.data - x.ctypes.data) % 4096 == off
            _call(VARIANTS[name], x, w, b, y)
            cells.append(f"offset {off}: {min(_block(VARIANTS[name], x, w, b, 1, y) for _ in range(10)) * 1e3:.2f} ms")
        print(f"- {name}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
