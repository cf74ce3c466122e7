"""Batch-norm benchmarks: every implementation on every (operation, shape, layout, dtype).

Before an implementation is timed its outputs are checked against a float64 computation,
so a benchmark never reports the speed of a wrong result (precision itself is tested in
``tests/``; the tolerances here are loose sanity bounds, derived below). Each result
records in ``extra_info`` the effective bandwidth by the byte model of ``cases.py`` and
its time relative to a memcpy of the input measured in the same run.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from cases import group_name, ideal_bytes, memcpy_bytes
from impls import record_result

#: outputs each operation must return, so the check below is never vacuous.
REQUIRED = {
    "forward-train": ("y",),
    "forward-eval": ("y",),
    "backward": ("dx", "dweight", "dbias"),
    "forward-backward": ("y", "dx", "dweight", "dbias"),
}

# Sanity tolerances. An implementation that sums in the input precision (float32) with
# recursive summation has a statistics error of about u * sqrt(M) relative (random-walk
# rounding), i.e. 6e-8 * sqrt(12.8e6) = 2e-4 on the largest shapes here; the outputs y
# and dx are O(1) (|y| <= ~8 for these inputs), so a bound of 1e-3 * max(1, max|ref|)
# holds for every correct float32/float64 implementation and still fails for any real
# mistake (wrong axis, wrong variance, missing term), whose error is O(1). dweight and
# dbias are compared relative to sum(|terms|), which bounds every partial sum: the same
# 1e-3. float16 outputs are rounded to 11 bits: 2**-11 * 8 = 4e-3 absolute, so 2e-2.
_TOL = {"float16": 2e-2, "float32": 1e-3, "float64": 1e-3}


def check_outputs(op: str, out: dict, data) -> None:
    missing = [k for k in REQUIRED[op] if k not in out]
    assert not missing, f"{op} returned no {missing}"
    exp = data.expected()
    tol = _TOL[data.dtype]
    a, c, b = data.shape.canonical
    for key in REQUIRED[op]:
        got = np.asarray(out[key])
        if key in ("y", "dx"):
            assert got.dtype == data.x.dtype, f"{key}: dtype {got.dtype}, expected {data.x.dtype}"
            ref = exp["y_eval" if op == "forward-eval" else key]
            got = got.reshape(a, c, b).astype(np.float64)
            bound = tol * max(1.0, float(np.abs(ref).max()))
            err = float(np.abs(got - ref).max())
        else:
            ref = exp[key]
            got = got.astype(np.float64)
            err = float((np.abs(got - ref) / np.maximum(exp[key + "_scale"], 1e-300)).max())
            bound = tol
        assert np.isfinite(err) and err <= bound, f"{op} {key}: error {err:.3g} > {bound:.3g}"


def test_batch_norm(benchmark, case, bench_data, memcpy_floor):
    op, shape, dtype, impl = case
    reason = impl.skip_reason(op, shape, dtype)
    if reason:
        pytest.skip(reason)
    data = bench_data(shape, dtype)
    run = impl.build(op, data)

    # Warm-up outside the timing: compiles (Numba, XLA), allocates, and yields the outputs
    # to check.
    out = run()
    if impl.name == "memcpy":
        assert np.array_equal(out["copy"], data.x)
    else:
        check_outputs(op, out, data)
    run()

    group = group_name(op, shape, dtype)
    benchmark.group = group
    info = benchmark.extra_info
    info.update(
        op=op,
        shape=shape.label,
        dims=list(shape.dims),
        layout=shape.layout,
        family=shape.family,
        dtype=dtype,
        impl=impl.name,
        numel=shape.numel,
        model_bytes=memcpy_bytes(shape, dtype) if impl.name == "memcpy" else ideal_bytes(op, shape, dtype),
    )

    wall0, cpu0 = time.perf_counter(), time.process_time()
    benchmark(run)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0

    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    record_result(benchmark, memcpy_floor, data.x, impl.name == "memcpy")
    # process CPU time / wall time over the timing loop: about 1 on one busy core, about
    # the core count when all are busy (thread pools that spin while waiting count too).
    info["cpu_utilization"] = cpu / wall if wall > 0 else None
