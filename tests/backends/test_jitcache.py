"""Numba's on-disk cache of the CPU kernels: corrupt files and no writable location are
recovered from, with one warning (fastbn/backends/_jitcache.py). Each case runs in fresh
interpreters with a cache directory of its own."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastbn

PACKAGE = Path(fastbn.__file__).resolve().parent

# An eval-mode call on a small array: it compiles (or loads) only a few kernels.
SNIPPET = """
import warnings
warnings.simplefilter("always")
import numpy as np, fastbn
x = np.arange(24, dtype=np.float32).reshape(8, 3)
y = fastbn.batch_norm(x, np.zeros(3, np.float32), np.ones(3, np.float32), backend="cpu")
print(fastbn.backends(), repr(float(y[1, 1])))
"""
# y[1, 1] = x[1, 1] / sqrt(1 + eps) in float32
EXPECTED = repr(float(__import__("numpy").float32(4.0 / (1.0 + 1e-5) ** 0.5)))
CORRUPT_MSG = "could not be loaded from Numba's cache"


def run(env):
    full = dict(os.environ)
    full.update(env)
    return subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True,
                          timeout=300, env=full)


def check_ok(out):
    assert out.returncode == 0, out.stderr
    backends, value = out.stdout.strip().rsplit(" ", 1)
    assert "'cpu'" in backends and value == EXPECTED, out.stdout + out.stderr
    assert "falling back to the slow 'reference'" not in out.stderr


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("warm")
    out = run({"NUMBA_CACHE_DIR": str(path)})
    check_ok(out)
    assert list(path.rglob("*.nbc")), "the first run wrote no cache files"
    return path


def _truncate_data(path):
    for f in path.rglob("*.nbc"):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])


def _garbage_index(path):
    for f in path.rglob("*.nbi"):
        f.write_bytes(b"\x80\x04garbage" * 7)


@pytest.mark.parametrize("corrupt", [_truncate_data, _garbage_index], ids=["truncated-nbc", "garbage-nbi"])
def test_corrupt_cache_is_recompiled_and_rewritten(warm_cache, tmp_path, corrupt):
    cache = tmp_path / "cache"
    shutil.copytree(warm_cache, cache)
    corrupt(cache)
    env = {"NUMBA_CACHE_DIR": str(cache)}
    out = run(env)
    check_ok(out)
    assert out.stderr.count(CORRUPT_MSG) == 1, out.stderr  # one warning, however many files
    again = run(env)  # the entries were rewritten: loads cleanly now
    check_ok(again)
    assert CORRUPT_MSG not in again.stderr, again.stderr


def test_no_writable_cache_location(tmp_path):
    """A read-only install without a usable cache directory: the CPU kernels still run
    (compiled without a cache), with one warning, instead of the slow reference."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / "fastbn", ignore=shutil.ignore_patterns("__pycache__"))
    # Numba's in-tree cache goes to fastbn/backends/cpu/__pycache__: make it impossible.
    (site / "fastbn" / "backends" / "cpu" / "__pycache__").write_text("not a directory")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    env = {"PYTHONPATH": str(site), "XDG_CACHE_HOME": str(blocker), "HOME": str(blocker),
           "PYTHONDONTWRITEBYTECODE": "1"}
    full = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", "import fastbn; print(fastbn.__file__)\n" + SNIPPET],
                         capture_output=True, text=True, timeout=300, env=full, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    first, rest = out.stdout.split("\n", 1)
    assert first.startswith(str(site)), "the copy under test was not the one imported"
    out.stdout = rest
    check_ok(out)
    assert out.stderr.count("no writable cache location") == 1, out.stderr
