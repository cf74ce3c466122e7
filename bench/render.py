"""Render saved benchmark results as Markdown tables and a PNG chart.

Usage::

    python bench/render.py bench/results/cpu-DATE.json \\
        [--first-call bench/results/first-call-DATE.json] \\
        [--notes NOTES.md] [--markdown docs/performance.md] [--png docs/bench.png] \\
        [--rows bench/results/rows-DATE.json [--rows-notes ROWS.md]]

Reads the JSON that ``pytest bench/ --benchmark-json FILE`` writes and produces:

* ``docs/performance.md``: the machine, the checks of the performance targets, the
  speed-up of fastbn over each peer per shape, the effective bandwidth of every
  implementation, and the first-call latency if a ``first_call.py`` JSON is given;
* ``docs/bench.png``: speed-up over each peer and effective bandwidth, per operation;
* ``FILE.md`` next to the JSON: the same tables, kept with the raw results.

``--rows`` adds the layer-norm and RMS-norm groups of a run of ``bench/test_rownorm.py``
(a JSON of its own, so that the row benchmarks can be rerun without the batch-norm suite),
with ``--rows-notes`` (Markdown) after their tables; ``ROWS.md`` is written next to that
JSON too.

Times are the minimum over the benchmark's rounds (the least disturbed run on a shared
machine); effective bandwidth is the byte model of ``bench/cases.py`` divided by it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import BYTES_PER_ELEMENT, OPS, ROW_BYTES_PER_ELEMENT, ROW_OPS  # noqa: E402

PRIMARY = "fastbn-cpu"
KERNEL = PRIMARY + "-kernel"  # the backend called without the public API (small shapes)
PEERS = ("numpy", "torch", "jax", "fastbn-reference")


# ----------------------------------------------------------------------------- loading
def load(path: Path) -> tuple[dict, dict]:
    """Return (machine_info, results) with results[(op, shape, dtype)][impl] = record."""
    raw = json.loads(path.read_text())
    results: dict = defaultdict(dict)
    for bench in raw["benchmarks"]:
        info = bench.get("extra_info") or {}
        if "op" not in info or "gbps" not in info:
            continue  # not one of ours, or run with --benchmark-disable
        rec = dict(info)
        rec["min"] = bench["stats"]["min"]
        rec["median"] = bench["stats"]["median"]
        rec["rounds"] = bench["stats"]["rounds"]
        results[(info["op"], info["shape"], info["dtype"])][info["impl"]] = rec
    meta = dict(raw.get("machine_info") or {})
    meta["datetime"] = raw.get("datetime")
    opts = [b.get("options") or {} for b in raw["benchmarks"]]
    meta["options"] = opts[0] if opts else {}
    return meta, results


def case_order(results: dict, op: str) -> list[tuple[str, str]]:
    """(shape, dtype) rows of `op`, in the order the suite ran them."""
    seen = []
    for o, shape, dtype in results:
        if o == op and (shape, dtype) not in seen:
            seen.append((shape, dtype))
    return seen


def impl_order(results: dict) -> list[str]:
    names = []
    for recs in results.values():
        for name in recs:
            if name not in names:
                names.append(name)
    first = [n for n in ("memcpy", PRIMARY) if n in names]
    return first + [n for n in names if n not in first]


# ---------------------------------------------------------------------------- formatting
def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_ratio(r: float | None) -> str:
    if r is None or not math.isfinite(r):
        return "–"
    return f"{r:.2f}×" if r < 10 else f"{r:.1f}×"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine_lines(meta: dict) -> list[str]:
    ext = meta.get("fastbn_bench", {})
    lscpu = ext.get("lscpu", {})
    versions = ext.get("versions", {})
    out = [
        f"- CPU: {lscpu.get('Model name', meta.get('cpu', {}).get('brand_raw', '?'))}, "
        f"{lscpu.get('CPU(s)', ext.get('os_cpu_count', '?'))} cores "
        f"({lscpu.get('Thread(s) per core', '?')} thread per core), "
        f"L2 {lscpu.get('L2 cache', '?')}, L3 {lscpu.get('L3 cache', '?')}",
        f"- Memory: {ext.get('memory_gib', '?')} GiB; {ext.get('platform', meta.get('system', '?'))}",
        "- Software: Python " + str(ext.get("python", meta.get("python_version", "?"))) + ", "
        + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- Threads: Numba {ext.get('numba_num_threads', '?')} "
        f"(threading layer `{ext.get('numba_threading_layer')}`), "
        f"PyTorch {ext.get('torch_num_threads', '?')}",
        f"- Run: {meta.get('datetime', '?')}" + (" (`--quick` sizes)" if ext.get("quick") else ""),
    ]
    start, end = ext.get("loadavg_1_5_15min_at_start"), ext.get("loadavg_1_5_15min_at_end")
    if start and end:
        out.append(f"- Load average (1 min) at start / end of the run: {start[0]:.2f} / {end[0]:.2f} "
                   f"(the run itself adds about 1 to 2; more means other processes competed for the cores)")
    return out


def llc_bytes(meta: dict) -> float | None:
    text = meta.get("fastbn_bench", {}).get("lscpu", {}).get("L3 cache", "")
    m = re.match(r"([\d.]+)\s*([KMG])i?B", text)
    if not m:
        return None
    return float(m.group(1)) * {"K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)]


# ---------------------------------------------------------------------------- sections
def speedup_section(results: dict, op: str) -> str:
    rows = []
    peers = [p for p in PEERS if any(p in results[k] for k in results if k[0] == op)]
    has_kernel = any(KERNEL in results[k] for k in results if k[0] == op)
    for shape, dtype in case_order(results, op):
        recs = results[(op, shape, dtype)]
        mine = recs.get(PRIMARY)
        if mine is None:
            continue
        row = [f"`{shape}`", dtype, fmt_time(mine["min"]), f"{mine['gbps']:.1f}", fmt_ratio(mine["time_vs_memcpy"])]
        if has_kernel:
            row.append(fmt_time(recs[KERNEL]["min"]) if KERNEL in recs else "–")
        for peer in peers:
            row.append(fmt_ratio(recs[peer]["min"] / mine["min"]) if peer in recs else "–")
        rows.append(row)
    header = ["shape", "dtype", f"{PRIMARY} time", "GB/s", "time / memcpy"]
    header += ["kernel only"] if has_kernel else []
    header += [f"vs {p}" for p in peers]
    return table(header, rows)


def bandwidth_section(results: dict, op: str, impls: list[str]) -> str:
    rows = []
    cols = [i for i in impls if any(i in results[k] for k in results if k[0] == op)]
    for shape, dtype in case_order(results, op):
        recs = results[(op, shape, dtype)]
        rows.append([f"`{shape}`", dtype] + [f"{recs[i]['gbps']:.1f}" if i in recs else "–" for i in cols])
    return table(["shape", "dtype"] + cols, rows)


def targets_section(results: dict, meta: dict) -> str:
    """The CPU performance targets, evaluated on the float32 results."""
    llc = llc_bytes(meta)
    rows = []

    def per_shape(op, fn):
        for shape, dtype in case_order(results, op):
            if dtype != "float32":
                continue
            recs = results[(op, shape, dtype)]
            if PRIMARY in recs:
                fn(shape, recs, recs[PRIMARY])

    def vs_torch(op, need):
        def fn(shape, recs, mine):
            if "torch" in recs:
                r = recs["torch"]["min"] / mine["min"]
                rows.append([f"{op}: ≥ {need}× faster than PyTorch", f"`{shape}`", fmt_ratio(r), "yes" if r >= need else "**no**"])

        per_shape(op, fn)

    def vs_memcpy(op, limit):
        def fn(shape, recs, mine):
            nbytes = mine["numel"] * np.dtype(mine["dtype"]).itemsize
            if llc is None or nbytes <= llc:
                return  # the target applies to tensors larger than the last-level cache
            r = mine["time_vs_memcpy"]
            rows.append([f"{op}: ≤ {limit}× a memcpy (tensor > LLC)", f"`{shape}`", fmt_ratio(r), "yes" if r <= limit else "**no**"])

        per_shape(op, fn)

    vs_torch("forward-train", 5)
    vs_memcpy("forward-train", 1.3)
    vs_torch("backward", 4)
    vs_memcpy("forward-backward", 2.5)
    for op, what in (("forward-train", "training, running stats updated"), ("forward-eval", "eval")):
        small = results.get((op, "64x128-NC", "float32"), {})
        if PRIMARY in small:
            t = small[PRIMARY]["min"]
            torch_t = small.get("torch", {}).get("min")
            kern_t = small.get(KERNEL, {}).get("min")
            extra = f" (kernel alone {fmt_time(kern_t)})" if kern_t else ""
            extra += f" (PyTorch {fmt_time(torch_t)})" if torch_t else ""
            rows.append([f"public `batch_norm` call ≤ 8 µs ({what})", "`64x128-NC`", fmt_time(t) + extra,
                         "yes" if t <= 8e-6 else "**no**"])
    for op in OPS:
        for shape in ("1000000x4-NC", "64x65536-NC"):
            rec = results.get((op, shape, "float32"), {}).get(PRIMARY)
            if rec and rec.get("cpu_utilization") is not None:
                u = rec["cpu_utilization"]
                rows.append([f"{op}: uses both cores", f"`{shape}`", f"CPU time / wall time {u:.2f}", "yes" if u >= 1.5 else "**no**"])
    return table(["target", "shape", "measured", "met"], rows)


def first_call_section(path: Path | None) -> str:
    if path is None or not path.exists():
        return "Not measured in this run: `python bench/first_call.py --json FILE` measures it.\n"
    data = json.loads(path.read_text())
    keys = ("import_numpy_s", "import_fastbn_s", "first_forward_s", "first_backward_s", "second_forward_s", "total_s")
    rows = [[f"`{r['shape']}`", r["cache"]] + [fmt_time(r[k]) for k in keys] for r in data["runs"]]
    head = ["shape", "Numba cache", "import numpy", "import fastbn", "first forward", "first backward",
            "second forward", "import fastbn + 3 calls"]
    return (
        f"Fresh Python processes, {data.get('dtype', 'float32')}, median of {data['repeats']} processes "
        f"per row, {data.get('date', '')} (`{path.name}`).\n\n" + table(head, rows) + "\n"
    )


# ---------------------------------------------------------------------------- chart
def chart(results: dict, impls: list[str], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in OPS if any(k[0] == op for k in results)]
    fig, axes = plt.subplots(
        2, len(ops), figsize=(4.6 * len(ops) + 1.6, 2.5 + 0.55 * len(results) / max(1, len(ops))),
        sharey="row", squeeze=False, layout="constrained",
    )
    colors = dict(zip(["memcpy", PRIMARY, "numpy", "torch", "jax", "fastbn-reference", KERNEL], plt.cm.tab10.colors))
    spare = iter(plt.cm.tab10.colors[len(colors):])
    for name in impls:  # any other implementation gets an unused colour
        if name not in colors:
            colors[name] = next(spare, "grey")
    rows: list[tuple[str, str]] = []  # the same rows in every column (the y axes are shared)
    for op in ops:
        rows += [r for r in case_order(results, op) if r not in rows]
    for j, op in enumerate(ops):
        res = {r: results.get((op, *r), {}) for r in rows}
        labels = [f"{s} {d}" for s, d in rows]
        ys = range(len(rows))
        # speed-up of fastbn over each peer
        ax = axes[0][j]
        peers = [p for p in PEERS if any(p in res[r] for r in rows)]
        h = 0.8 / max(1, len(peers))
        for k, peer in enumerate(peers):
            vals = [
                res[r][peer]["min"] / res[r][PRIMARY]["min"] if peer in res[r] and PRIMARY in res[r] else float("nan")
                for r in rows
            ]
            ax.barh([y + k * h for y in ys], vals, height=h, label=f"vs {peer}", color=colors.get(peer))
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{op}: {PRIMARY} speed-up")
        ax.set_yticks([y + 0.4 - h / 2 for y in ys])
        ax.set_yticklabels(labels, fontsize=8)
        if j == 0:
            ax.invert_yaxis()  # first case on top (the axis is shared by the row)
        if j == len(ops) - 1:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        ax.grid(axis="x", which="both", alpha=0.3)
        # effective bandwidth of every implementation
        ax = axes[1][j]
        names = [i for i in impls if any(i in res[r] for r in rows)]
        h = 0.8 / max(1, len(names))
        for k, name in enumerate(names):
            vals = [res[r][name]["gbps"] if name in res[r] else float("nan") for r in rows]
            ax.barh([y + k * h for y in ys], vals, height=h, label=name, color=colors.get(name))
        ax.set_xscale("log")
        ax.set_title(f"{op}: effective GB/s ({BYTES_PER_ELEMENT[op]}s bytes/elem)")
        ax.set_yticks([y + 0.4 - h / 2 for y in ys])
        ax.set_yticklabels(labels, fontsize=8)
        if j == 0:
            ax.invert_yaxis()
        if j == len(ops) - 1:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        ax.grid(axis="x", which="both", alpha=0.3)
    fig.suptitle("fastbn CPU benchmarks (minimum time; memcpy: 2s bytes/elem)")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------- document
INTRO = """\
# Performance

How fast fastbn's CPU kernels run next to NumPy, PyTorch and JAX, and next to the
memory-bandwidth floor (a memcpy of the same tensor measured in the same run).

## Method

- Suite: `python -m pytest bench/ --benchmark-json bench/results/cpu-DATE.json`
  (`bench/cases.py` lists the shapes, `bench/impls.py` the implementations), rendered
  with `python bench/render.py bench/results/cpu-DATE.json`.
- Every implementation's outputs are checked against a float64 computation before it is
  timed. fastbn is called through its public API (`fastbn.batch_norm`,
  `batch_norm_forward`, `batch_norm_backward`), PyTorch through
  `torch.nn.functional.batch_norm` and `torch.autograd.grad`, JAX through `jax.jit` and
  `jax.vjp`; NumPy is a plain vectorized implementation. Forward-training updates the
  running statistics in every implementation.
- Time: the minimum over the rounds ({timing}).
- The memcpy is `np.copyto` into a preallocated array: one thread. A kernel that uses
  both cores can therefore come close to it, or beat it, on a machine where one core
  cannot saturate memory bandwidth.
- Every implementation returns new arrays, as its users get them. fastbn's large outputs
  come from its buffer cache (the default; `FASTBN_CACHE_BYTES=0` turns it off, and then
  every call pays the page faults of a fresh array); PyTorch, JAX and NumPy allocate
  with their own allocators.
- Effective bandwidth = ideal bytes / time, with `s` bytes per element: forward-training
  2s (read x, write y), forward-eval 2s, backward 3s (read x and dy, write dx),
  forward+backward 5s. A memcpy moves 2s, so "time / memcpy" of 1.0 for a forward pass
  means it runs at the speed of copying its input.
- ResNet-50 shapes use batch sizes that make each float32 tensor 51 MB, larger than the
  last-level cache, so the numbers measure DRAM traffic.
"""

CACHE_DOC = """\
## First-call latency and the Numba cache

fastbn's CPU kernels are compiled by Numba on first use and cached on disk
(`cache=True`). The cache lives in `$NUMBA_CACHE_DIR` if that is set, otherwise in
`__pycache__` of `fastbn/backends/cpu/` (or, where that folder is not writable,
in a per-user cache directory). `python -m fastbn warmup` compiles every kernel for every
dtype and layout and prints where the cache is; run it once after installing (e.g. in a
Docker build step) so the first call of a process does not compile.
`bench/first_call.py` measures `import fastbn` plus the first calls in a fresh process
with an empty cache (a temporary `NUMBA_CACHE_DIR`) and with a warm one.
"""


def rows_section(rows_json: Path, notes: Path | None) -> str:
    """The layer-norm and RMS-norm tables of a ``bench/test_rownorm.py`` run."""
    meta, results = load(rows_json)
    if not results:
        raise SystemExit(f"{rows_json}: no timed row-norm benchmarks")
    impls = impl_order(results)
    rel = rows_json.relative_to(ROOT) if rows_json.is_relative_to(ROOT) else rows_json
    parts = ["## Layer norm and RMS norm (pytest-benchmark suite, float32)\n",
             f"Results: `{rel}` (`python -m pytest bench/test_rownorm.py --benchmark-json "
             "FILE`), on this machine:\n", "\n".join(machine_lines(meta)), "",
             "Speed-up of fastbn over each peer (peer time / fastbn time; minimum over the "
             "rounds) and fastbn's time over a single-thread memcpy (`np.copyto`) of x:\n"]
    for op in ROW_OPS:
        if any(k[0] == op for k in results):
            parts += [f"### {op}\n", speedup_section(results, op), ""]
    parts += ["Effective bandwidth (GB/s) by the byte model (forward 2s per element, forward + "
              "backward 5s; memcpy 2s):\n"]
    for op in ROW_OPS:
        if any(k[0] == op for k in results):
            parts += [f"#### {op} ({ROW_BYTES_PER_ELEMENT[op]}s)\n",
                      bandwidth_section(results, op, impls), ""]
    if notes is not None:
        parts += [notes.read_text().strip(), ""]
    text = "\n".join(parts)
    rows_json.with_suffix(".md").write_text(f"# Row-norm benchmark results: {rows_json.name}\n\n"
                                            + text)
    return text


def render(json_path: Path, first_call: Path | None, md_path: Path, png_path: Path,
           notes: Path | None = None, rows: Path | None = None,
           rows_notes: Path | None = None) -> str:
    meta, results = load(json_path)
    if not results:
        raise SystemExit(f"{json_path}: no timed fastbn benchmarks (was it run with --benchmark-disable?)")
    impls = impl_order(results)
    parts = ["## Machine\n", "\n".join(machine_lines(meta)), ""]
    parts += ["## Targets (float32)\n", targets_section(results, meta), ""]
    if notes is not None:
        parts += [notes.read_text().strip(), ""]
    parts += ["## Speed-up of fastbn over each peer\n",
              "Ratio of the peer's time to fastbn's (higher is better for fastbn); "
              "\"time / memcpy\" is fastbn's time over a memcpy of the input; \"kernel only\" "
              "is the backend called on the canonical view without the public API (small shapes).\n"]
    for op in OPS:
        if any(k[0] == op for k in results):
            parts += [f"### {op}\n", speedup_section(results, op), ""]
    parts += ["## Effective bandwidth (GB/s) of every implementation\n"]
    for op in OPS:
        if any(k[0] == op for k in results):
            parts += [f"### {op} ({BYTES_PER_ELEMENT[op]}s bytes per element; memcpy: 2s)\n",
                      bandwidth_section(results, op, impls), ""]
    tables = "\n".join(parts)  # the batch-norm tables, kept next to their JSON
    doc_tables = tables if rows is None else tables + "\n" + rows_section(rows, rows_notes) + "\n"
    rel_png = Path("bench.png") if png_path.parent == md_path.parent else png_path
    o = meta.get("options", {})
    timing = (f"at least {o['min_rounds']} rounds and about {float(o['max_time']):g} s per benchmark"
              if "min_rounds" in o and "max_time" in o else "pytest-benchmark's defaults")
    doc = "\n".join(
        [
            INTRO.format(timing=timing),
            f"Results: `{json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path}`.\n",
            f"![fastbn benchmarks]({rel_png.as_posix()})\n",
            doc_tables,
            CACHE_DOC,
            "### Measured\n",
            first_call_section(first_call),
        ]
    )
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(doc)
    json_path.with_suffix(".md").write_text(
        f"# Benchmark results: {json_path.name}\n\n" + tables + "\n## First call\n\n" + first_call_section(first_call)
    )
    chart(results, impls, png_path)
    return doc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    p.add_argument("--first-call", type=Path, default=None, help="JSON written by bench/first_call.py --json")
    p.add_argument("--markdown", type=Path, default=ROOT / "docs" / "performance.md")
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "bench.png")
    p.add_argument("--notes", type=Path, default=None,
                   help="Markdown inserted after the targets (the analysis of the run)")
    p.add_argument("--rows", type=Path, default=None,
                   help="pytest-benchmark JSON of bench/test_rownorm.py: adds the row-norm tables")
    p.add_argument("--rows-notes", type=Path, default=None,
                   help="Markdown inserted after the row-norm tables")
    args = p.parse_args(argv)
    render(args.json.resolve(), args.first_call, args.markdown.resolve(), args.png.resolve(),
           args.notes, args.rows.resolve() if args.rows else None, args.rows_notes)
    print(f"wrote {args.markdown}, {args.png} and {args.json.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
