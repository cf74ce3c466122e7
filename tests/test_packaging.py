"""The built wheel carries the CUDA sources the GPU backend loads at run time."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_kernel_sources(tmp_path):
    pytest.importorskip("setuptools", minversion="77")
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("not running from a source checkout")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    wheel = next(tmp_path.glob("fastbn-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    kernels = ROOT / "fastbn" / "kernels"
    sources = sorted(p.name for p in [*kernels.glob("*.cu"), *kernels.glob("*.cuh")])
    assert any(s.endswith(".cu") for s in sources), "no .cu sources in the tree"
    assert any(s.endswith(".cuh") for s in sources), "no .cuh headers in the tree"
    for name in sources:
        assert f"fastbn/kernels/{name}" in names
    for module in ("__init__", "_plan", "_moments", "_elementwise", "_half", "batchnorm"):
        assert f"fastbn/backends/cpu/{module}.py" in names
