"""The threading layer: tbb loaded in every install, a fork-safe fallback, and fork/thread
guarantees (see fastbn/_threading.py). Each scenario runs in a fresh interpreter, since the
layer is chosen once per process."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

X86 = platform.machine() in ("x86_64", "AMD64")

# A parallel-size input (above SERIAL_MAX), its result computed before any fork, and a
# check that a child reproduces it bit for bit (same kernels, same thread count).
PRELUDE = """
import os, sys, threading, time, warnings
import numpy as np
import numba
import fastbn
from fastbn import _threading
x = np.random.default_rng(0).standard_normal((200_000, 8)).astype(np.float32) + 3
y0 = fastbn.batch_norm_forward(x)[0].copy()

def child_check(expect_serial=None):
    serial = _threading.report()["serial_only"]
    if expect_serial is not None and serial != expect_serial:
        os._exit(4)
    y1 = fastbn.batch_norm_forward(x)[0]
    if serial:
        # serial kernels: the same result within float32 rounding of |y| <~ 5
        ok = np.allclose(y1, y0, rtol=0, atol=64 * 2.0**-24 * 8)
    else:
        ok = np.array_equal(y1, y0)
    os._exit(0 if ok else 3)

def threads_then_fork(rounds):
    # four threads call the parallel kernels at once, then a fork after that parallel use:
    # returns (number of errors in the threads, exit codes of the child)
    errors = []
    def work():
        try:
            for _ in range(rounds):
                assert np.array_equal(fastbn.batch_norm_forward(x)[0], y0)
        except Exception as exc:
            errors.append(exc)
    ts = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    pid = os.fork()
    if pid == 0:
        child_check()
    return len(errors), wait_all([pid])

def wait_all(pids, timeout=60):
    deadline = time.time() + timeout
    codes = []
    for pid in pids:
        while True:
            r, st = os.waitpid(pid, os.WNOHANG)
            if r:
                codes.append(os.waitstatus_to_exitcode(st))
                break
            if time.time() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                codes.append("hung")
                break
            time.sleep(0.02)
    return codes
"""


def run(body, env=None, timeout=240):
    """Run PRELUDE + body in a fresh interpreter; return the CompletedProcess."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING")}
    full_env.update(env or {})
    code = PRELUDE + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def _layer_loads(name):
    """Whether Numba can load threading layer `name` here (probe in a fresh process)."""
    code = ("import numba, numpy as np\n"
            f"numba.config.THREADING_LAYER = {name!r}\n"
            "f = numba.njit(parallel=True)(lambda a: a.sum())\n"
            "f(np.ones(10)); print(numba.threading_layer())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return out.returncode == 0 and out.stdout.strip() == name


@pytest.mark.skipif(not X86, reason="tbb is a dependency on x86-64 only")
def test_tbb_is_loaded_from_the_installed_wheel():
    """In a virtual environment Numba cannot find libtbb by itself; fastbn loads it."""
    out = run("""
        rep = _threading.report()
        print(numba.threading_layer(), rep["tbb_usable"], rep["selected"])
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().split() == ["tbb", "True", "None"], out.stdout + out.stderr


@pytest.mark.parametrize("layer", ["workqueue", "omp"])
def test_user_choice_is_kept(layer):
    if not _layer_loads(layer):
        pytest.skip(f"Numba's {layer} layer does not load here")
    out = run("""
        print(numba.threading_layer(), _threading.report()["selected"])
    """, env={"NUMBA_THREADING_LAYER": layer})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().split() == [layer, "None"]
    assert "fastbn:" not in out.stderr  # no warning: the user chose


def test_broken_tbb_falls_back_to_a_fork_safe_layer(tmp_path):
    """A tbb distribution whose library is missing: one warning, and not omp."""
    info = tmp_path / "tbb-2099.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tbb\nVersion: 2099.0\n")
    (info / "RECORD").write_text("../../libtbb.so.12,,\n")
    out = run("""
        rep = _threading.report()
        layer = numba.threading_layer()
        # concurrent calls from threads and a fork after parallel use must both work
        nerr, codes = threads_then_fork(3)
        print(layer, rep["tbb_usable"], rep["selected"], nerr, codes)
    """, env={"PYTHONPATH": str(tmp_path), "PYTHONWARNINGS": "always::RuntimeWarning"})
    assert out.returncode == 0, out.stderr
    layer, usable, selected, nerr, codes = out.stdout.strip().split(maxsplit=4)
    assert layer != "omp"
    if usable == "False":  # Numba could not find libtbb on its own either
        assert (layer, selected) == ("workqueue", "forksafe")
        assert out.stderr.count("fastbn: Numba's 'tbb' threading layer is not usable") == 1
        assert "2099.0" in out.stderr  # the reason names what was found
    assert nerr == "0" and codes.strip() == "[0]", out.stdout + out.stderr


def test_fork_while_another_thread_runs_kernels():
    """Forks while another thread runs parallel kernels: TBB cannot shut its workers down
    for the fork, so each child runs the serial kernels, and finishes."""
    out = run("""
        stop = []
        def busy():
            while not stop:
                fastbn.batch_norm_forward(x)
        t = threading.Thread(target=busy)
        t.start()
        time.sleep(0.3)
        pids = []
        for _ in range(6):
            pid = os.fork()
            if pid == 0:
                child_check(expect_serial=numba.threading_layer() == "tbb")
            pids.append(pid)
            time.sleep(0.05)
        stop.append(1)
        t.join()
        print(wait_all(pids))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[0, 0, 0, 0, 0, 0]", out.stdout + out.stderr


def test_fork_from_another_thread_runs_serial_kernels_in_the_child():
    """A fork from a thread that did not start TBB's pool leaves TBB unusable in the
    child: the child runs the serial kernels, and finishes."""
    out = run("""
        res = {}
        def forker():
            pid = os.fork()
            if pid == 0:
                child_check(expect_serial=numba.threading_layer() == "tbb")
            res["pid"] = pid
        t = threading.Thread(target=forker)
        t.start()
        t.join()
        print(numba.threading_layer(), wait_all([res["pid"]]))
    """)
    assert out.returncode == 0, out.stderr
    layer, codes = out.stdout.strip().split(maxsplit=1)
    assert codes.strip() == "[0]", out.stdout + out.stderr


def test_fork_from_the_main_thread_keeps_parallel_kernels():
    """The common case (a DataLoader forking from the training thread): the child runs
    the parallel kernels, with bit-identical results."""
    out = run("""
        pid = os.fork()
        if pid == 0:
            child_check(expect_serial=False)
        print(wait_all([pid]))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[0]", out.stdout + out.stderr


def test_fork_after_parallel_use_with_gnu_openmp():
    """Numba terminates a forked child that enters a GNU OpenMP region; fastbn's kernels
    in the child run serially instead."""
    if not _layer_loads("omp"):
        pytest.skip("Numba's omp layer does not load here")
    out = run("""
        pid = os.fork()
        if pid == 0:
            child_check(expect_serial=True)
        print(numba.threading_layer(), wait_all([pid]))
    """, env={"NUMBA_THREADING_LAYER": "omp"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().split(maxsplit=1) == ["omp", "[0]"], out.stdout + out.stderr
    assert "Terminating" not in out.stderr


def test_workqueue_calls_from_threads_and_fork():
    """workqueue aborts when two threads launch at once: fastbn serializes its calls."""
    if not _layer_loads("workqueue"):
        pytest.skip("Numba's workqueue layer does not load here")
    out = run("""
        nerr, codes = threads_then_fork(4)
        print(numba.threading_layer(), nerr, codes)
    """, env={"NUMBA_THREADING_LAYER": "workqueue"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().split(maxsplit=2) == ["workqueue", "0", "[0]"], out.stdout + out.stderr


def test_info_reports_the_layer():
    out = subprocess.run([sys.executable, "-m", "fastbn", "info"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "threading layer '" in out.stdout
    assert "tbb: " in out.stdout
    assert "Numba cache of the CPU kernels:" in out.stdout
    assert "writable" in out.stdout


def test_dataloader_workers_after_parallel_use():
    """torch DataLoader workers (forked) that call fastbn after the parent used the
    parallel kernels: every batch arrives, with the parent's results."""
    pytest.importorskip("torch")
    out = run("""
        import torch

        class Data(torch.utils.data.Dataset):
            def __len__(self):
                return 4
            def __getitem__(self, i):
                return torch.from_numpy(fastbn.batch_norm_forward(x)[0][:2].copy())

        loader = torch.utils.data.DataLoader(Data(), batch_size=2, num_workers=2,
                                             multiprocessing_context="fork", timeout=120)
        batches = list(loader)
        ok = all(np.allclose(b.numpy(), y0[:2], rtol=0, atol=64 * 2.0**-24 * 8)
                 for batch in batches for b in batch)
        print(len(batches), ok)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "2 True", out.stdout + out.stderr
