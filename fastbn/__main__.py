"""Command line: ``python -m fastbn [demo|warmup|info]``.

``demo`` (the default)
    Normalize a ResNet-50-sized NCHW float32 batch with fastbn and with plain NumPy and
    print the timings, the effective bandwidth and the largest difference.
``warmup``
    Compile every CPU kernel for every dtype and layout family (serial and parallel
    variants) so that later processes load them from Numba's on-disk cache, and print
    where that cache lives.
``info``
    Print the usable backends (and why the others are not), the Numba threading layer and
    thread count, and the versions of the optional frameworks.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import numpy as np

__all__ = ["main"]

_EPS = 1e-5


# ------------------------------------------------------------------------------ helpers
def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:8.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:8.2f} ms"
    return f"{seconds:8.2f} s "


def _best_of(fn, repeats: int, budget_s: float = 5.0) -> float:
    """Fastest of `repeats` calls of `fn` after one untimed call (which may compile);
    stops early once `budget_s` is spent."""
    fn()
    best = math.inf
    start = time.perf_counter()
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return best


def _mem_available() -> int | None:
    """Bytes of memory available (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_modules():
    """The modules of the CPU backend package (every one of them defines kernels)."""
    import importlib
    import pkgutil

    from .backends import cpu

    return [importlib.import_module(f"{cpu.__name__}.{info.name}")
            for info in pkgutil.iter_modules(cpu.__path__)]


def _cpu_dispatchers():
    """The cached Numba dispatchers of the CPU backend package, by qualified name (the
    few compiled afresh in every process on purpose, ``cache=False``, are left out)."""
    from numba.core.registry import CPUDispatcher

    return {f"{mod.__name__}.{name}": obj for mod in _cpu_modules()
            for name, obj in vars(mod).items()
            if isinstance(obj, CPUDispatcher) and obj.py_func.__module__ == mod.__name__
            and hasattr(getattr(obj, "_cache", None), "_cache_file")}


def _cache_dir() -> str:
    """Directory of the Numba cache of fastbn's CPU kernels (as Numba computes it)."""
    for disp in _cpu_dispatchers().values():
        cache = getattr(disp, "_cache", None)
        path = getattr(cache, "_cache_path", None)
        if path:
            return path
    env = os.environ.get("NUMBA_CACHE_DIR")
    return env or os.path.join(os.path.dirname(os.path.abspath(__file__)), "backends", "cpu",
                               "__pycache__")


# --------------------------------------------------------------------------------- info
def _threading_lines() -> list[str]:
    """What to print about the threading layer (starts Numba's pool if needed)."""
    import numba

    from . import _threading
    from .backends import cpu  # noqa: F401 - configures the threading layer on import

    try:
        layer = _threading.start()
    except Exception as exc:  # noqa: BLE001 - report, do not fail
        layer = f"unknown ({type(exc).__name__}: {exc})"
    rep = _threading.report()
    lines = [f"numba {numba.__version__}: {numba.get_num_threads()} threads, threading layer "
             f"{layer!r} (setting {rep['setting']!r}"
             + (f", selected by fastbn: {rep['selected']!r})" if rep["selected"] else ")")]
    if rep["tbb_usable"]:
        lines.append(f"  tbb: usable ({rep['tbb_library'] or 'found by the dynamic loader'})")
    else:
        lines.append(f"  tbb: not usable: {rep['tbb_reason']}")
    safety = {"tbb": "safe for concurrent calls and after fork",
              "workqueue": "fork-safe; fastbn runs its parallel kernels one call at a time",
              "omp": "not fork-safe (GNU OpenMP): forked children run fastbn's serial kernels"}
    if layer in safety:
        lines.append(f"  {layer}: {safety[layer]}")
    if rep["serial_only"]:
        lines.append(f"  this process runs serial kernels only: {rep['serial_reason']}")
    return lines


def _cache_lines() -> list[str]:
    """Where the Numba cache of the CPU kernels lives and whether it can be written."""
    path = _cache_dir()
    probe = path
    while probe and not os.path.isdir(probe):  # the nearest existing folder decides
        parent = os.path.dirname(probe)
        probe = parent if parent != probe else ""
    writable = bool(probe) and os.access(probe, os.W_OK)
    return [f"Numba cache of the CPU kernels: {path} ({'writable' if writable else 'NOT writable'})"]


def cmd_info(args) -> int:
    """Print backends, threading and versions."""
    from importlib import metadata

    import fastbn
    from fastbn.backends import backend_report

    print(f"fastbn {fastbn.__version__} ({os.path.dirname(os.path.abspath(fastbn.__file__))})")
    print(f"usable backends: {', '.join(fastbn.backends()) or 'none'}")
    for name, state in backend_report().items():
        print(f"  {name:12s} {state}")
    for line in _threading_lines() + _cache_lines():
        print(line)
    print(f"numpy {np.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    for dist in ("tbb", "cupy-cuda12x", "cupy-cuda13x", "numba-cuda", "torch", "jax", "jaxlib"):
        try:
            print(f"  {dist:13s} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return 0


# ------------------------------------------------------------------------------- warmup
def _warmup_shapes(serial_max: int) -> list[tuple[tuple[int, ...], int]]:
    """(shape, axis) pairs that reach every kernel: both layout families, small and large C,
    at sizes on both sides of the serial/parallel threshold."""
    big = 2 * serial_max  # parallel variants
    return [
        ((2, 3, 5), 1),  # channels-first, serial
        ((7, 3), 1),  # channels-last, serial
        ((4, 4, big // 16), 1),  # channels-first, parallel, C < threads per chunk
        ((2, 256, max(2, big // 512)), 1),  # channels-first, parallel, many channels
        ((big // 2, 2), 1),  # channels-last, parallel, few channels (wide rows)
        ((big // 512, 512), 1),  # channels-last, parallel, many channels
    ]


def _warmup_dtypes(cpu) -> list:
    """The CPU backend's dtypes, and bfloat16 where its conversions compile (ml_dtypes is a
    dependency; a bfloat16 array needs it imported, :func:`fastbn.backends.bfloat16_dtype`)."""
    import ml_dtypes

    from fastbn.backends.cpu import _half

    extra = [np.dtype(ml_dtypes.bfloat16)] if _half.bfloat16_supported()[0] else []
    return [*cpu.dtypes, *extra]


def _selected_dtypes(cpu, args) -> list:
    """The dtypes to warm up: ``--dtypes`` (checked against what the backend takes), or all."""
    every = _warmup_dtypes(cpu)
    names = getattr(args, "dtypes", None)
    if not names:
        return every
    by_name = {str(np.dtype(d)): d for d in every}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(f"fastbn warmup: unknown --dtypes {', '.join(unknown)}; "
                         f"choose from {', '.join(by_name)}")
    return [by_name[n] for n in wanted]


def cmd_warmup(args) -> int:
    """Compile (or load from the cache) every CPU kernel; print where the cache is."""
    import fastbn
    from fastbn.backends import cpu

    t_start = time.perf_counter()
    uncachable: set[str] = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rng = np.random.default_rng(0)
        for dtype in _selected_dtypes(cpu, args):
            sdt = cpu.stats_dtype(dtype)
            for shape, axis in _warmup_shapes(getattr(cpu, "SERIAL_MAX", 1 << 16)):
                x = rng.standard_normal(shape).astype(dtype)
                c = shape[axis]
                w, b = np.ones(c, sdt), np.zeros(c, sdt)
                rm, rv = np.zeros(c, sdt), np.ones(c, sdt)
                y, mean, invstd = fastbn.batch_norm_forward(
                    x, w, b, eps=_EPS, axis=axis, running_mean=rm, running_var=rv, backend="cpu"
                )
                fastbn.batch_norm_forward(x, w, b, eps=_EPS, axis=axis, backend="cpu")
                fastbn.batch_norm(x, rm, rv, w, b, training=False, eps=_EPS, axis=axis, backend="cpu")
                fastbn.batch_norm_backward(y, x, mean, invstd, w, axis=axis, backend="cpu")
            for rows in (8, 4 * cpu.SERIAL_MAX // 256):  # the row norms, serial and parallel
                x = rng.standard_normal((rows, 256)).astype(dtype)
                w = np.ones(256, sdt)
                y, mean, rstd = fastbn.layer_norm_forward(x, 256, w, w, backend="cpu")
                fastbn.layer_norm_backward(y, x, mean, rstd, 256, w, backend="cpu")
                y, rstd = fastbn.rms_norm_forward(x, 256, w, backend="cpu")
                fastbn.rms_norm_backward(y, x, rstd, 256, w, backend="cpu")
    for wrn in caught:
        msg = str(wrn.message)
        if "Cannot cache compiled function" in msg:
            uncachable.add(msg.split('"')[1] if '"' in msg else msg)
    elapsed = time.perf_counter() - t_start

    hits = misses = 0
    for disp in _cpu_dispatchers().values():
        hits += sum(disp.stats.cache_hits.values())
        misses += sum(disp.stats.cache_misses.values())
    cache_dir = _cache_dir()
    where = "NUMBA_CACHE_DIR" if os.environ.get("NUMBA_CACHE_DIR") else "default location"
    n_files = 0
    if os.path.isdir(cache_dir):
        prefixes = tuple(f"{mod.__name__.rpartition('.')[2]}." for mod in _cpu_modules())
        n_files = sum(1 for f in os.listdir(cache_dir)
                      if f.startswith(prefixes) and f.endswith((".nbi", ".nbc")))
    print(f"warmed up fastbn's CPU kernels in {elapsed:.1f} s "
          f"(batch, layer and RMS norm; dtypes {', '.join(str(np.dtype(d)) for d in _selected_dtypes(cpu, args))}; "
          f"channels-first and channels-last; serial and parallel)")
    print(f"  {hits} kernel signatures loaded from the cache, {misses} compiled now")
    print(f"Numba cache ({where}): {cache_dir}  ({n_files} cache files of fastbn's CPU kernels)")
    if uncachable:
        print(f"  not cacheable (compiled again in every process): {', '.join(sorted(uncachable))}")
    if not os.environ.get("NUMBA_CACHE_DIR"):
        print("  set NUMBA_CACHE_DIR to keep the cache elsewhere (e.g. a read-only install); "
              "run `python -m fastbn warmup` with the same setting.")
    return 0


# --------------------------------------------------------------------------------- demo
def _numpy_batch_norm(x, w, b, axis):
    """Training-mode batch norm as one writes it in NumPy (the comparison baseline)."""
    axes = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + _EPS) * w.reshape(shape) + b.reshape(shape)


def cmd_demo(args) -> int:
    """Normalize a real-sized batch with fastbn and NumPy; print timings."""
    import fastbn

    shape = tuple(int(s) for s in args.shape.split(","))
    dtype = np.dtype(args.dtype)
    axis = args.axis % len(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    avail = _mem_available()
    # NumPy's version holds about 4 temporaries of the input's size, plus x and y.
    while avail is not None and 6 * nbytes > 0.8 * avail and shape[0] > 1:
        shape = (shape[0] // 2, *shape[1:])
        nbytes = math.prod(shape) * dtype.itemsize
        print(f"(not enough free memory for the requested size: using batch size {shape[0]})")
    c = shape[axis]
    print(f"batch norm of a {'x'.join(map(str, shape))} {dtype} array "
          f"({nbytes / 1e6:.0f} MB, feature axis {axis}, {c} channels)")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    x += rng.uniform(-2, 2, size=c).astype(np.float32).reshape([c if i == axis else 1 for i in range(len(shape))])
    x = x.astype(dtype, copy=False)
    sdt = np.float32 if dtype == np.float16 else dtype
    w = rng.uniform(0.5, 1.5, c).astype(sdt)
    b = rng.uniform(-0.5, 0.5, c).astype(sdt)
    rm, rv = np.zeros(c, sdt), np.ones(c, sdt)

    t0 = time.perf_counter()
    y = fastbn.batch_norm(x, rm, rv, w, b, training=True, eps=_EPS, axis=axis)
    first = time.perf_counter() - t0
    fwd = _best_of(lambda: fastbn.batch_norm(x, rm, rv, w, b, training=True, eps=_EPS, axis=axis), args.repeat)
    ev = _best_of(lambda: fastbn.batch_norm(x, rm, rv, w, b, training=False, eps=_EPS, axis=axis), args.repeat)
    _, mean, invstd = fastbn.batch_norm_forward(x, w, b, eps=_EPS, axis=axis)
    dy = y  # any gradient of the right shape
    bwd = _best_of(lambda: fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis), args.repeat)
    copy = np.empty_like(x)
    cp = _best_of(lambda: np.copyto(copy, x), args.repeat)

    y_np = _numpy_batch_norm(x, w, b, axis)
    np_fwd = _best_of(lambda: _numpy_batch_norm(x, w, b, axis), max(1, args.repeat // 3), budget_s=10.0)
    diff = float(np.max(np.abs(y.astype(np.float64) - y_np)))
    del y_np

    gbs = lambda k, t: k * nbytes / t / 1e9  # noqa: E731 - bytes model: k * size / time
    print(f"  first training forward (loads or compiles kernels): {_fmt_time(first)}")
    print(f"  {'operation':26s} {'time':>11s} {'GB/s':>7s}")
    print(f"  {'memcpy (np.copyto)':26s} {_fmt_time(cp)} {gbs(2, cp):7.1f}")
    print(f"  {'fastbn forward (training)':26s} {_fmt_time(fwd)} {gbs(2, fwd):7.1f}")
    print(f"  {'fastbn forward (eval)':26s} {_fmt_time(ev)} {gbs(2, ev):7.1f}")
    print(f"  {'fastbn backward':26s} {_fmt_time(bwd)} {gbs(3, bwd):7.1f}")
    print(f"  {'NumPy forward (training)':26s} {_fmt_time(np_fwd)} {gbs(2, np_fwd):7.1f}")
    print(f"fastbn's training forward is {np_fwd / fwd:.1f}x faster than NumPy's and takes "
          f"{fwd / cp:.2f}x the time of a memcpy; max |difference| = {diff:.2e}")
    return 0


# --------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    """Entry point of ``python -m fastbn``.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m fastbn", description="fastbn command line tools")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="normalize a ResNet-sized batch with fastbn and NumPy (default)")
    demo.add_argument("--shape", default="256,64,56,56", help="array shape (default: 256,64,56,56)")
    demo.add_argument("--dtype", default="float32", choices=["float16", "float32", "float64"])
    demo.add_argument("--axis", type=int, default=1, help="feature axis (default 1; -1 for NHWC)")
    demo.add_argument("--repeat", type=int, default=10, help="timed repetitions (best is shown)")
    warm = sub.add_parser("warmup", help="compile all CPU kernels into the Numba cache; print where it is")
    warm.add_argument("--dtypes", default=None,
                      help="comma-separated data dtypes to compile for (default: all the CPU "
                           "backend takes, e.g. float16,float32,float64,bfloat16)")
    sub.add_parser("info", help="backends, threading layer, versions")
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
    return {"demo": cmd_demo, "warmup": cmd_warmup, "info": cmd_info}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
