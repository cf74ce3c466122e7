"""pytest configuration of the benchmark suite: options, case generation, shared data.

Run it from the repository root::

    python -m pytest bench/                       # full sizes (minutes)
    python -m pytest bench/ --quick               # small shapes: a smoke test (< 1 min)
    python -m pytest bench/ --benchmark-json bench/results/cpu-DATE.json
    python bench/render.py bench/results/cpu-DATE.json   # -> docs/performance.md, docs/bench.png

Cases run shape by shape (then dtype, operation, implementation) so the inputs of one
shape are generated once; memcpy runs first in every group and its time is the floor
the other implementations of the group are compared with.
"""

from __future__ import annotations

import os
import platform

import pytest

from fastbn.backends import _jitcache  # imports neither Numba nor the kernels

# As in tests/conftest.py: a Numba cache folder per digest of the CPU backend's sources.
if "NUMBA_CACHE_DIR" not in os.environ:
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".numba-cache",
        _jitcache.source_digest())

import machine
from cases import OPS, ROW_OPS, dtypes_for, row_label, row_shapes_for, shapes_for
from impls import BenchData, all_impls
from row_impls import ROW_IMPLS

# pytest-benchmark's defaults, which --quick replaces unless given on the command line.
_QUICK_TIMING = {
    # option: (pytest-benchmark default, quick value)
    "benchmark_max_time": (1.0, 0.002),
    "benchmark_min_rounds": (5, 3),
}


def pytest_addoption(parser):
    group = parser.getgroup("fastbn benchmarks")
    group.addoption(
        "--quick",
        action="store_true",
        default=False,
        help="small shapes and short timing loops: a smoke test of the suite (no timing asserts)",
    )
    group.addoption(
        "--bench-dtypes",
        default=None,
        help="comma-separated dtypes to run on every shape (default: float32 everywhere, "
        "float16 and float64 on a few shapes)",
    )
    group.addoption(
        "--bench-impls",
        default=None,
        help="comma-separated implementations to run, e.g. fastbn-cpu,torch (memcpy always runs)",
    )
    group.addoption(
        "--bench-ops",
        default=None,
        help=f"comma-separated operations to run (default: all of {', '.join(OPS)})",
    )


def _csv(value):
    return None if not value else tuple(s.strip() for s in value.split(",") if s.strip())


def pytest_configure(config):
    if config.getoption("--quick"):
        for opt, (default, quick) in _QUICK_TIMING.items():
            current = getattr(config.option, opt, None)
            # the plugin keeps unparsed defaults as strings ('1.0'): compare as numbers
            if current is not None and float(current) == default:
                setattr(config.option, opt, type(current)(quick) if isinstance(current, str) else quick)
    ops = _csv(config.getoption("--bench-ops"))
    if ops:
        bad = sorted(set(ops) - set(OPS) - set(ROW_OPS))
        if bad:
            raise pytest.UsageError(f"--bench-ops: unknown operation(s) {bad}; expected some of "
                                    f"{list(OPS) + list(ROW_OPS)}")
    dtypes = _csv(config.getoption("--bench-dtypes"))
    if dtypes:
        bad = sorted(set(dtypes) - {"float16", "float32", "float64"})
        if bad:
            raise pytest.UsageError(f"--bench-dtypes: unknown dtype(s) {bad}; expected float16, float32, float64")


_LOAD_AT_START: list[float] = []


def pytest_sessionstart(session):
    # the machine's load when the run starts and ends is recorded with the results: other
    # processes competing for the cores distort the timings (thread pools that wait on a
    # barrier suffer most)
    if hasattr(os, "getloadavg"):
        _LOAD_AT_START[:] = os.getloadavg()


def pytest_generate_tests(metafunc):
    if "row_case" in metafunc.fixturenames:
        _generate_row_cases(metafunc)
    if "case" not in metafunc.fixturenames:
        return
    cfg = metafunc.config
    quick = cfg.getoption("--quick")
    requested_dtypes = _csv(cfg.getoption("--bench-dtypes"))
    ops = _csv(cfg.getoption("--bench-ops")) or OPS
    only = _csv(cfg.getoption("--bench-impls"))
    impls = all_impls(set(only) if only else None)
    cases, ids = [], []
    for shape in shapes_for(quick):
        for dtype in dtypes_for(shape, quick, requested_dtypes):
            for op in OPS:
                if op not in ops:
                    continue
                for impl in impls:
                    cases.append((op, shape, dtype, impl))
                    ids.append(f"{op}-{shape.label}-{dtype}-{impl.name}")
    metafunc.parametrize("case", cases, ids=ids)


def _generate_row_cases(metafunc):
    """Layer-norm and RMS-norm cases (``test_rownorm.py``): float32 on the row shapes,
    memcpy first in every group; ``--bench-impls`` and ``--bench-ops`` filter them too
    (``--bench-ops`` with batch-norm operations only leaves no row cases)."""
    cfg = metafunc.config
    only = _csv(cfg.getoption("--bench-impls"))
    names = [n for n in ROW_IMPLS if n == "memcpy" or not only or n in only]
    requested = _csv(cfg.getoption("--bench-ops"))
    ops = [o for o in ROW_OPS if not requested or o in requested]
    cases, ids = [], []
    for shape in row_shapes_for(cfg.getoption("--quick")):
        for op in ops:
            for name in names:
                cases.append((op, shape, "float32", name))
                ids.append(f"{op}-{row_label(shape)}-float32-{name}")
    metafunc.parametrize("row_case", cases, ids=ids)


class _DataCache:
    """Keeps the inputs of the current (shape, dtype) only: the large ones are 100+ MB."""

    def __init__(self):
        self._key = None
        self._data = None

    def __call__(self, shape, dtype) -> BenchData:
        key = (shape, dtype)
        if key != self._key:
            self._key, self._data = None, None  # free the previous arrays first
            self._data = BenchData.make(shape, dtype)
            self._key = key
        return self._data


@pytest.fixture(scope="session")
def bench_data():
    return _DataCache()


@pytest.fixture(scope="session")
def memcpy_floor():
    """Fastest memcpy time per (op, shape, dtype) group, filled by the memcpy benchmarks."""
    return {}


# ----------------------------------------------------------------- machine description
def pytest_benchmark_update_machine_info(config, machine_info):
    extra = {
        "lscpu": machine.lscpu(),
        "memory_gib": machine.mem_total_gib(),
        "os_cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": machine.versions(
            ("numpy", "numba", "tbb", "torch", "jax", "jaxlib", "pytest-benchmark")),
        "quick": bool(config.getoption("--quick")),
        "loadavg_1_5_15min_at_start": list(_LOAD_AT_START) or None,
        "loadavg_1_5_15min_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import numba

        extra["numba_num_threads"] = numba.config.NUMBA_NUM_THREADS
        try:
            extra["numba_threading_layer"] = numba.threading_layer()
        except ValueError:  # no parallel kernel ran in this process
            extra["numba_threading_layer"] = None
    except Exception:
        pass
    try:
        import sys

        if "torch" in sys.modules:
            extra["torch_num_threads"] = sys.modules["torch"].get_num_threads()
    except Exception:
        pass
    machine_info["fastbn_bench"] = extra


def pytest_benchmark_update_json(config, benchmarks, output_json):
    # Keep the JSON small enough to commit: drop the per-round timings (hundreds of
    # thousands of floats for the microsecond cases) unless --benchmark-save-data asks
    # for them; the summary statistics stay.
    if not getattr(config.option, "benchmark_save_data", False):
        for bench in output_json.get("benchmarks", []):
            bench.get("stats", {}).pop("data", None)
