"""Layer norm and RMS norm: fastbn against PyTorch and NumPy, with the memcpy floor.

Usage::

    python bench/rownorm_bench.py --out bench/results/rownorm-DATE.json --markdown bench/results/rownorm-DATE.md
    python bench/rownorm_bench.py --out /tmp/rownorm.json --quick      # smoke test

Float32 transformer shapes (rows x normalized size). For each shape and pass (forward;
forward + backward) the implementations run interleaved, round after round, so that drift
of a shared machine hits all of them alike; the ratios are taken within each round and the
median over rounds is reported. Outputs are preallocated nowhere: each call allocates as
a user's call does (fastbn reuses large output buffers through its cache, torch through its
allocator). The memcpy floor is ``np.copyto`` of x into a preallocated array: one read and
one write of x, the least any forward pass moves.

The implementations and inputs are those of the pytest-benchmark suite
(``bench/row_impls.py``): ``torch`` is ``torch.nn.functional.layer_norm`` / ``rms_norm`` on
the same memory (``torch.from_numpy``), backward by ``torch.autograd.grad``; ``numpy`` the
float32 formulas written with NumPy (two-pass variance), forward only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import machine
import row_impls
from cases import ROW_QUICK_SHAPES, ROW_SHAPES
from render import fmt_time
from timing import time_block

SHAPES, QUICK_SHAPES = ROW_SHAPES, ROW_QUICK_SHAPES


def _block(fn, target_s):
    """Seconds per call of `fn`: enough back-to-back calls to last about `target_s`."""
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    return time_block(fn, max(1, int(target_s / one)))


def compare(fns, rounds, target_s):
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(_block(fn, target_s))
    out = {k: {"median_s": statistics.median(v), "min_s": min(v)} for k, v in times.items()}
    for k in fns:
        if k == "fastbn":
            continue
        ratios = [f / t for f, t in zip(times["fastbn"], times[k])]
        out[k]["fastbn_over_this"] = statistics.median(ratios)
    return out


#: (op, pass) -> the operation of row_impls (the implementations of the benchmark suite)
_OPS = {("layer_norm", "forward"): "layer-norm", ("layer_norm", "forward+backward"): "layer-norm-fwd-bwd",
        ("rms_norm", "forward"): "rms-norm", ("rms_norm", "forward+backward"): "rms-norm-fwd-bwd"}


def _impls(op, d, passes):
    """memcpy, fastbn, torch (and numpy for the forward) on the inputs `d`; the backward
    of the NumPy formulas is left out (it is not a library's implementation)."""
    names = {"memcpy": "memcpy", "fastbn": "fastbn-cpu", "torch": "torch"}
    if passes == "forward":
        names["numpy"] = "numpy"
    return {k: row_impls.build(v, _OPS[op, passes], d) for k, v in names.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--markdown")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)
    import torch

    rounds = args.rounds or (3 if args.quick else 9)
    target = 0.01 if args.quick else 0.1
    results = []
    load0 = os.getloadavg()
    for shape in QUICK_SHAPES if args.quick else SHAPES:
        d = row_impls.RowData.make(shape, "float32")
        for op in ("layer_norm", "rms_norm"):
            for passes in ("forward", "forward+backward"):
                res = compare(_impls(op, d, passes), rounds, target)
                row = {"op": op, "shape": list(shape), "pass": passes, "impls": res,
                       "bytes_x": d.x.nbytes}
                results.append(row)
                t = res["fastbn"]["median_s"]
                print(f"{op} {shape} {passes}: fastbn {fmt_time(t)}, torch "
                      f"{fmt_time(res['torch']['median_s'])} (torch / fastbn "
                      f"{1 / res['torch']['fastbn_over_this']:.2f}), memcpy "
                      f"{fmt_time(res['memcpy']['median_s'])}", file=sys.stderr, flush=True)
    report = {
        "schema": "fastbn-rownorm-bench/1",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu_model": machine.cpu_model(), "lscpu": machine.lscpu(),
                    "memory_gib": machine.mem_total_gib(),
                    "versions": machine.versions(("numpy", "numba", "torch")),
                    "torch_num_threads": torch.get_num_threads(),
                    "loadavg_start": list(load0), "loadavg_end": list(os.getloadavg())},
        "quick": args.quick, "rounds": rounds, "results": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown(report))
    return 0


def markdown(report) -> str:
    m = report["machine"]
    lines = [f"# Layer norm and RMS norm: fastbn vs torch ({report['date']})", "",
             f"CPU: {m['cpu_model']}, {m['lscpu'].get('CPU(s)', '?')} CPUs; "
             f"{', '.join(f'{k} {v}' for k, v in m['versions'].items())}; torch threads "
             f"{m['torch_num_threads']}; load average at start / end "
             f"{m['loadavg_start'][0]:.2f} / {m['loadavg_end'][0]:.2f}.", "",
             "float32. Medians over rounds; speedup = torch / fastbn (median of per-round "
             "ratios); memcpy: `np.copyto` of x (one read, one write).", "",
             "| op | shape | pass | fastbn | torch | numpy | memcpy | speedup vs torch | fastbn / memcpy |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        im = r["impls"]
        f = im["fastbn"]["median_s"]
        lines.append(
            f"| {r['op']} | {tuple(r['shape'])} | {r['pass']} | {fmt_time(f)} | "
            f"{fmt_time(im['torch']['median_s'])} | "
            f"{fmt_time(im['numpy']['median_s']) if 'numpy' in im else '–'} | "
            f"{fmt_time(im['memcpy']['median_s'])} | {1 / im['torch']['fastbn_over_this']:.2f}× | "
            f"{f / im['memcpy']['median_s']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
