"""Tests of the numba.cuda kernels under Numba's CUDA simulator.

The simulator must be switched on before Numba is first imported, so these tests run in
their own pytest process::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cudasim -q

In any other run (the main suite imports Numba without the simulator) the tests that
need it are skipped with that instruction as the reason. A test module that does not need
the simulator (the CPU emulation of the CUDA C kernels) sets ``REQUIRES_SIMULATOR = False``
and runs in the main suite only: the simulator run skips it (it would test the same thing
twice).
"""

import os

import pytest

SIMULATOR_ON = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
REASON = ("needs the CUDA simulator: run `NUMBA_ENABLE_CUDASIM=1 python -m pytest "
          "tests/cudasim` in a separate process")


@pytest.fixture(autouse=True, scope="module")
def _require_simulator(request):
    if not getattr(request.module, "REQUIRES_SIMULATOR", True):
        if SIMULATOR_ON:
            pytest.skip("does not need the CUDA simulator: runs in the main suite")
        return
    if not SIMULATOR_ON:
        pytest.skip(REASON)
    import numba

    try:
        import numba.cuda  # noqa: F401 - provided by the numba-cuda package
    except ImportError as exc:
        pytest.skip(f"numba.cuda cannot be imported (pip install numba-cuda): {exc}")
    # the environment variable only works if it was set before numba was imported
    if not getattr(numba.config, "ENABLE_CUDASIM", 0):
        pytest.skip("NUMBA_ENABLE_CUDASIM=1 is set but numba.cuda is not the simulator "
                    "(numba was imported before the variable was set)")
