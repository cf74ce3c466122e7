"""Layer-norm and RMS-norm benchmarks: every implementation on every (operation, shape),
float32, with the memcpy floor in every group (see ``row_impls.py``).

As in ``test_batchnorm.py``: outputs are checked against float64 before anything is timed
(the same sanity tolerance, derived there: 1e-3 of max(1, max|ref|) for y and dx, 1e-3 of
the sum of |terms| for the weight gradients); ``extra_info`` holds ``gbps`` by the byte
model of ``cases.py`` (forward 2s per element, forward + backward 5s), ``memcpy_gbps`` and
``time_vs_memcpy``.
"""

from __future__ import annotations

import numpy as np
import pytest

from cases import MEMCPY_BYTES_PER_ELEMENT, ROW_BYTES_PER_ELEMENT, row_group_name, row_label
from impls import record_result
from row_impls import RowData, available, build

_TOL = 1e-3
REQUIRED = {"layer-norm": ("y",), "rms-norm": ("y",),
            "layer-norm-fwd-bwd": ("y", "dx", "dweight", "dbias"),
            "rms-norm-fwd-bwd": ("y", "dx", "dweight")}

_data: dict = {}


def _row_data(shape, dtype) -> RowData:
    key = (shape, dtype)
    if key not in _data:
        _data.clear()  # keep one (shape, dtype) in memory
        _data[key] = RowData.make(shape, dtype)
    return _data[key]


def check_row_outputs(op: str, out: dict, d: RowData) -> None:
    exp = d.expected["layer" if op.startswith("layer") else "rms"]
    for key in REQUIRED[op]:
        assert key in out, f"{op} returned no {key}"
        got = np.asarray(out[key]).astype(np.float64)
        ref = exp[key]
        assert got.shape == ref.shape, f"{op} {key}: shape {got.shape}, expected {ref.shape}"
        if key in ("y", "dx"):
            err, bound = float(np.abs(got - ref).max()), _TOL * max(1.0, float(np.abs(ref).max()))
        else:
            err = float((np.abs(got - ref) / np.maximum(exp[key + "_scale"], 1e-300)).max())
            bound = _TOL
        assert np.isfinite(err) and err <= bound, f"{op} {key}: error {err:.3g} > {bound:.3g}"


def test_row_norm(benchmark, row_case, memcpy_floor):
    op, shape, dtype, name = row_case
    why = available(name)
    if why:
        pytest.skip(why)
    d = _row_data(shape, dtype)
    run = build(name, op, d)
    out = run()  # warm-up (compiles) and the outputs to check
    if name == "memcpy":
        assert np.array_equal(out["copy"], d.x)
    else:
        check_row_outputs(op, out, d)
    run()
    group = row_group_name(op, shape, dtype)
    benchmark.group = group
    numel = shape[0] * shape[1]
    size = numel * d.x.itemsize
    info = benchmark.extra_info
    info.update(op=op, shape=row_label(shape), dims=list(shape), layout="rows", family="rows",
                dtype=dtype, impl=name, numel=numel,
                model_bytes=(MEMCPY_BYTES_PER_ELEMENT if name == "memcpy"
                             else ROW_BYTES_PER_ELEMENT[op]) * size)
    benchmark(run)
    if benchmark.stats is None:  # --benchmark-disable
        return
    record_result(benchmark, memcpy_floor, d.x, name == "memcpy")
