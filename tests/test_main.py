"""Tests of the command line, ``python -m fastbn`` (fastbn/__main__.py)."""

import subprocess
import sys

import pytest

from fastbn.__main__ import main


def test_info_lists_backends_and_threading(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "usable backends: cpu" in out
    assert "threading layer" in out
    assert "Numba cache of the CPU kernels:" in out


def test_demo_small_shape_reports_a_small_difference(capsys):
    assert main(["demo", "--shape", "4,8,16,16", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "fastbn forward (training)" in out and "NumPy forward (training)" in out
    # float32 outputs of two stable implementations differ by a few ulps of |y| <= ~10
    diff = float(out.rsplit("max |difference| = ", 1)[1].split()[0])
    assert diff < 1e-4


def test_demo_is_the_default_command():
    # no subcommand -> demo; run as a real module invocation on a tiny array
    proc = subprocess.run(
        [sys.executable, "-m", "fastbn", "demo", "--shape", "8,4", "--repeat", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "batch norm of a 8x4 float32 array" in proc.stdout


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_warmup_fills_the_cache(tmp_path):
    # one dtype keeps this test to a quarter of a full warmup's compile time; every
    # kernel family and layout is still compiled (the dtype is a signature, not a path)
    env_cmd = [sys.executable, "-m", "fastbn", "warmup", "--dtypes", "float32"]
    import os

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    first = subprocess.run(env_cmd, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stderr
    assert str(tmp_path) in first.stdout
    second = subprocess.run(env_cmd, capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0, second.stderr
    assert " 0 compiled now" in second.stdout  # everything came from the cache


def test_warmup_rejects_unknown_dtypes():
    out = subprocess.run([sys.executable, "-m", "fastbn", "warmup", "--dtypes", "int8"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "unknown --dtypes int8" in out.stderr
