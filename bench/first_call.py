"""First-call latency: ``import fastbn`` plus the first calls, in a fresh Python process.

Usage::

    python bench/first_call.py [--shape 64,128 --shape 8,64,56,56] [--repeats 3] [--json FILE]

For each shape it starts new Python processes that import NumPy, import fastbn, and run
a training forward, a backward and a second forward on a float32 array, timing each
step. "cold" processes get an empty temporary ``NUMBA_CACHE_DIR`` (every kernel is
compiled); "warm" processes share a temporary cache filled by one untimed process first
(kernels are loaded from disk). The medians over ``--repeats`` processes are printed as
a Markdown table and, with ``--json``, saved for ``bench/render.py --first-call``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
shape = tuple(int(s) for s in sys.argv[1].split(","))
t0 = time.perf_counter()
import numpy as np
t1 = time.perf_counter()
import fastbn
t2 = time.perf_counter()
x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
w = np.ones(shape[1], np.float32)
b = np.zeros(shape[1], np.float32)
t3 = time.perf_counter()
y, mean, invstd = fastbn.batch_norm_forward(x, w, b)
t4 = time.perf_counter()
dx, dw, db = fastbn.batch_norm_backward(y, x, mean, invstd, w)
t5 = time.perf_counter()
fastbn.batch_norm_forward(x, w, b)
t6 = time.perf_counter()
print(json.dumps({
    "import_numpy_s": t1 - t0,
    "import_fastbn_s": t2 - t1,
    "first_forward_s": t4 - t3,
    "first_backward_s": t5 - t4,
    "second_forward_s": t6 - t5,
    "total_s": (t2 - t1) + (t6 - t3),
}))
"""

KEYS = ("import_numpy_s", "import_fastbn_s", "first_forward_s", "first_backward_s", "second_forward_s", "total_s")


def run_child(shape: str, cache_dir: str) -> dict:
    env = dict(os.environ)
    env["NUMBA_CACHE_DIR"] = cache_dir
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, shape], env=env, capture_output=True, text=True, cwd=tempfile.gettempdir()
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child process failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_run(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in KEYS}


def fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", help="comma-separated NC... shape (repeatable)")
    p.add_argument("--repeats", type=int, default=3, help="processes per (shape, cache state)")
    p.add_argument("--json", type=Path, default=None, help="save the results here")
    args = p.parse_args(argv)
    shapes = args.shape or ["64,128", "8,64,56,56"]

    runs = []
    for shape in shapes:
        cold = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="fastbn-cold-") as tmp:
                cold.append(run_child(shape, tmp))
        with tempfile.TemporaryDirectory(prefix="fastbn-warm-") as tmp:
            run_child(shape, tmp)  # fills the cache, untimed
            warm = [run_child(shape, tmp) for _ in range(args.repeats)]
        for state, rs in (("cold (empty cache)", cold), ("warm (cache filled)", warm)):
            runs.append({"shape": shape.replace(",", "x"), "cache": state, **median_run(rs)})

    head = ["shape", "Numba cache", "import numpy", "import fastbn", "first forward", "first backward",
            "second forward", "import + first calls"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(" --- " for _ in head) + "|")
    for r in runs:
        print("| " + " | ".join([f"`{r['shape']}`", r["cache"]] + [fmt(r[k]) for k in KEYS]) + " |")

    if args.json:
        data = {
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(),
            "repeats": args.repeats,
            "dtype": "float32",
            "runs": runs,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
