"""Every CUDA source of the package compiles, warning-free, for the GPUs we target.

The "cupy" backend compiles ``fastbn/kernels/*.cu`` at run time with NVRTC, once per
(device, dtype), with ``-DFASTBN_DTYPE=0|1|2|3`` (float16, float32, float64, bfloat16). These tests
compile the same sources ahead of time, so a syntax or type error, a register spill or a
warning shows up on machines without a GPU:

* with ``nvcc`` for sm_80 (A100) and sm_90 (H100), warnings (including ptxas's, and
  register spills) as errors; skipped where nvcc is not on the PATH;
* with NVRTC itself (the compiler CuPy uses) through ``cuda.bindings``, where installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib import resources

import pytest

ARCHS = ["sm_80", "sm_90"]
DTYPE_CODES = {"float16": 0, "float32": 1, "float64": 2, "bfloat16": 3}
#: kernels the "cupy" backend looks up by name, per source file
from fastbn.backends.cupy_raw import KERNELS  # noqa: E402


def cu_sources():
    root = resources.files("fastbn").joinpath("kernels")
    return sorted((p for p in root.iterdir() if p.name.endswith(".cu")), key=lambda p: p.name)


def test_kernel_sources_are_package_resources():
    names = [p.name for p in cu_sources()]
    assert sorted(KERNELS) == names  # every .cu file is compiled by the backend, and only those
    from fastbn.backends.cupy_raw import kernel_source

    for source, kernels in KERNELS.items():
        src = kernel_source(source)
        assert not re.search(r"^#include \"", src, re.MULTILINE)  # headers inlined: no include path needed
        for k in kernels:
            assert f" {k}(" in src, f"kernel {k} is looked up by the backend but not defined"
        # the names the emulation and the backend find are the same
        found = set(re.findall(r'extern "C" __global__ void\s+(?:FASTBN_BOUNDS\s+)?(\w+)\(', src))
        assert found == set(kernels), (source, found ^ set(kernels))


NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH (install the CUDA toolkit)")
@pytest.mark.parametrize("dtype", list(DTYPE_CODES))
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", [p.name for p in cu_sources()])
def test_nvcc_compiles_without_warnings(source, arch, dtype, tmp_path):
    src = resources.files("fastbn").joinpath("kernels", source)
    with resources.as_file(src) as path:
        cmd = [NVCC, "-std=c++17", f"-arch={arch}", f"-DFASTBN_DTYPE={DTYPE_CODES[dtype]}",
               "-Werror", "all-warnings", "-Xptxas=-warn-spills,-Werror", "-cubin",
               "-o", str(tmp_path / "out.cubin"), str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "out.cubin").stat().st_size > 0


def _nvrtc():
    try:
        from cuda.bindings import nvrtc

        err, _, _ = nvrtc.nvrtcVersion()
    except Exception as exc:  # noqa: BLE001 - bindings or libnvrtc missing
        pytest.skip(f"NVRTC is not usable here ({type(exc).__name__}: {exc})")
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        pytest.skip(f"NVRTC is not usable here ({err})")
    return nvrtc


@pytest.mark.parametrize("dtype", list(DTYPE_CODES))
@pytest.mark.parametrize("source", sorted(KERNELS))
def test_nvrtc_compiles_like_cupy(source, dtype):
    """The run-time path: NVRTC, no include directories, the backend's options."""
    nvrtc = _nvrtc()
    from fastbn.backends.cupy_raw import kernel_source

    src = kernel_source(source).encode()
    err, prog = nvrtc.nvrtcCreateProgram(src, source.encode(), 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    opts = [b"-std=c++17", f"-DFASTBN_DTYPE={DTYPE_CODES[dtype]}".encode(),
            b"-arch=compute_80"]
    (res,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    err, size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, log)
    text = log.decode(errors="replace").strip("\x00 \n")
    assert res == nvrtc.nvrtcResult.NVRTC_SUCCESS, text
    assert "warning" not in text.lower(), text
    err, ptx_size = nvrtc.nvrtcGetPTXSize(prog)
    ptx = b" " * ptx_size
    nvrtc.nvrtcGetPTX(prog, ptx)
    nvrtc.nvrtcDestroyProgram(prog)
    text = ptx.decode(errors="replace")
    for k in KERNELS[source]:  # extern "C": unmangled entry points CuPy can look up
        assert f".entry {k}(" in text, k
    if dtype != "float64":
        # float16/float32 data kernels accumulate in float32: no float64 arithmetic may
        # creep in (only the per-channel finalize/prep kernels use double on purpose)
        for body in text.split(".entry ")[1:]:
            kname = body.split("(", 1)[0]
            if "finalize" in kname or kname == "bn_eval_prep":
                continue
            f64 = sorted(set(re.findall(r"\b[a-z]+(?:\.[a-z0-9]+)*\.f64\b", body)))
            assert not f64, f"{kname} uses float64 instructions {f64}"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH (install the CUDA toolkit)")
@pytest.mark.parametrize("arch", ARCHS)
def test_nvcc_compiles_bfloat16_without_cuda_bf16_h(arch, tmp_path):
    """bfloat16 with the kernel's own 2-byte type and conversions, as NVRTC compiles it when
    cuda_bf16.h is not on its include path (FASTBN_BF16_OWN forces that path under nvcc)."""
    src = resources.files("fastbn").joinpath("kernels", "batchnorm.cu")
    with resources.as_file(src) as path:
        cmd = [NVCC, "-std=c++17", f"-arch={arch}", "-DFASTBN_DTYPE=3", "-DFASTBN_BF16_OWN",
               "-Werror", "all-warnings", "-Xptxas=-warn-spills,-Werror", "-ptx",
               "-o", str(tmp_path / "out.ptx"), str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    ptx = (tmp_path / "out.ptx").read_text()
    assert "cvt.rn.bf16.f32" in ptx  # the sm_80+ rounding instruction, as in cuda_bf16.h
    for k in KERNELS["batchnorm.cu"]:
        assert f".entry {k}(" in ptx, k
