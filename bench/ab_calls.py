"""Calls of the public API, timed, and two checkouts compared side by side (A/B).

Two sets of cases: ``small`` (the per-call cost of argument handling, the pipeline's fast
and general paths, shows on small tensors, where the kernel takes a few microseconds) and
``rows`` (layer norm and RMS norm forward and backward on the transformer shapes of the
benchmark suite, float32). Usage::

    python bench/ab_calls.py --cases small           # this checkout: JSON {case: seconds}
    python bench/ab_calls.py --cases small --ab OLD NEW --rounds 10 > bench/results/NAME.md

``--ab`` runs one fresh process per checkout (``PYTHONPATH`` set to it, a Numba cache
folder of its own, warmed by the first round), the two alternating, and reports per case
the fastest time of each and the median and range of the per-round ratios NEW / OLD:
absolute times on a shared machine drift by more than the differences measured. Each case
is timed as the fastest of 5 blocks of back-to-back calls lasting about 0.2 s. The
``rows`` set includes a single-thread ``np.copyto`` of x (the memcpy floor of the
benchmark suite), which does not depend on the checkout: its ratio shows the drift.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _cases(which: str):
    return {"small": _small, "rows": _rows}[which]()


def _rows():
    import numpy as np

    import fastbn

    sys.path.insert(0, str(HERE))
    from cases import ROW_SHAPES

    out = {}
    for shape in ROW_SHAPES:
        if shape[0] * shape[1] < 1 << 20:
            continue
        rng = np.random.default_rng(0)
        tag = "x".join(map(str, shape))
        n = shape[1]
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        w, b = np.ones(n, np.float32), np.zeros(n, np.float32)
        _, m, r = fastbn.layer_norm_forward(x, n, w, b)
        _, r2 = fastbn.rms_norm_forward(x, n, w)
        out[f"layer_norm_forward {tag}"] = (
            lambda x=x, n=n, w=w, b=b: fastbn.layer_norm_forward(x, n, w, b))
        out[f"layer_norm_backward {tag}"] = (
            lambda dy=dy, x=x, m=m, r=r, n=n, w=w: fastbn.layer_norm_backward(dy, x, m, r, n, w))
        out[f"rms_norm_forward {tag}"] = lambda x=x, n=n, w=w: fastbn.rms_norm_forward(x, n, w)
        dst = np.empty_like(x)
        out[f"memcpy (np.copyto) {tag}"] = lambda dst=dst, x=x: np.copyto(dst, x)
    return out


def _small():
    import numpy as np

    import fastbn

    rng = np.random.default_rng(0)
    out = {}
    for shape in [(16, 64, 8, 8), (64, 128)]:
        tag = "x".join(map(str, shape))
        x = rng.standard_normal(shape).astype(np.float32)
        c = shape[1]
        w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
        rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
        _, m, i = fastbn.batch_norm_forward(x, w, b)
        dy = rng.standard_normal(shape).astype(np.float32)
        out[f"batch_norm train {tag}"] = (
            lambda x=x, w=w, b=b, rm=rm, rv=rv: fastbn.batch_norm(x, rm, rv, w, b, True))
        out[f"batch_norm eval {tag}"] = (
            lambda x=x, w=w, b=b, rm=rm, rv=rv: fastbn.batch_norm(x, rm, rv, w, b, False))
        out[f"batch_norm_forward {tag}"] = lambda x=x, w=w, b=b: fastbn.batch_norm_forward(x, w, b)
        out[f"batch_norm_backward {tag}"] = (
            lambda dy=dy, x=x, m=m, i=i, w=w: fastbn.batch_norm_backward(dy, x, m, i, w))
    x = rng.standard_normal((64, 128)).astype(np.float32)
    dy = rng.standard_normal((64, 128)).astype(np.float32)
    w, b = np.ones(128, np.float32), np.zeros(128, np.float32)
    _, m, r = fastbn.layer_norm_forward(x, 128, w, b)
    _, r2 = fastbn.rms_norm_forward(x, 128, w)
    out["layer_norm_forward 64x128"] = lambda: fastbn.layer_norm_forward(x, 128, w, b)
    out["layer_norm_backward 64x128"] = lambda: fastbn.layer_norm_backward(dy, x, m, r, 128, w)
    out["rms_norm_forward 64x128"] = lambda: fastbn.rms_norm_forward(x, 128, w)
    out["rms_norm_backward 64x128"] = lambda: fastbn.rms_norm_backward(dy, x, r2, 128, w)
    xf = np.asfortranarray(x)  # not C-ordered: the general path
    out["batch_norm train 64x128 F-order (general path)"] = (
        lambda: fastbn.batch_norm(xf, None, None, w, b, True))
    return out


def time_cases(which: str) -> dict:
    """``{case: seconds per call}`` for this process's fastbn."""
    sys.path.insert(0, str(HERE))
    from timing import time_block

    import fastbn

    res = {}
    for name, fn in _cases(which).items():
        fn()
        reps = max(1, int(0.2 / max(time_block(fn, 3), 1e-7)))
        res[name] = min(time_block(fn, reps) for _ in range(5))
    res["_file"] = fastbn.__file__
    return res


def compare(old: str, new: str, rounds: int, which: str) -> str:
    """The A/B table (markdown) of checkouts `old` and `new`."""
    runs = {old: [], new: []}
    caches = {tree: tempfile.mkdtemp(prefix="fastbn-ab-cache-") for tree in runs}
    for _ in range(rounds):
        for tree in (old, new):
            env = dict(os.environ, PYTHONPATH=tree, NUMBA_CACHE_DIR=caches[tree])
            out = subprocess.run([sys.executable, __file__, "--cases", which], env=env,
                                 capture_output=True, text=True, check=True).stdout
            runs[tree].append(json.loads(out.strip().splitlines()[-1]))
    sys.path.insert(0, str(HERE))
    import machine

    info = machine.lscpu()
    lines = [f"Machine: {info.get('Model name', '?')}, {info.get('CPU(s)', '?')} CPUs; "
             + ", ".join(f"{k} {v}" for k, v in machine.versions(("numpy", "numba", "tbb")).items()),
             f"old: `{runs[old][0]['_file']}`, new: `{runs[new][0]['_file']}`; {rounds} rounds", "",
             "| case | old (ms, fastest) | new (ms, fastest) | new / old: median (range) |",
             "| --- | --- | --- | --- |"]
    for case in runs[old][0]:
        if case.startswith("_"):
            continue
        a = [r[case] for r in runs[old]]
        b = [r[case] for r in runs[new]]
        ratios = [y / x for x, y in zip(a, b)]
        lines.append(f"| {case} | {min(a) * 1e3:.4g} | {min(b) * 1e3:.4g} | "
                     f"{statistics.median(ratios):.3f} ({min(ratios):.2f}–{max(ratios):.2f}) |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ab", nargs=2, metavar=("OLD", "NEW"), help="two checkouts to compare")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--cases", choices=("small", "rows"), default="small")
    args = ap.parse_args(argv)
    if args.ab:
        print(compare(*(str(Path(t).resolve()) for t in args.ab), args.rounds, args.cases))
    else:
        print(json.dumps(time_cases(args.cases)))


if __name__ == "__main__":
    main()
