"""Dispatch on array type: lazy framework imports, DLPack objects, threads and fork."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastbn


def test_import_is_lazy():
    """`import fastbn` and a CPU call import no optional framework."""
    code = (
        "import sys, numpy as np, fastbn\n"
        "fastbn.batch_norm_forward(np.ones((4, 3), np.float32))\n"
        "bad = [m for m in ('cupy', 'torch', 'jax', 'numba.cuda', 'matplotlib') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_torch_tensors_through_dlpack():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_normal((8, 3, 5)).astype(np.float32))
    rm, rv = torch.zeros(3), torch.ones(3)
    y = fastbn.batch_norm(x, rm, rv, training=True)
    assert isinstance(y, torch.Tensor) and y.shape == x.shape and y.dtype == torch.float32
    y_ref = torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3), training=True)
    # float32 outputs of two stable implementations on unit data: a few ulps of |y| <= 4
    assert torch.allclose(y, y_ref, rtol=0, atol=64 * 2**-24 * 4)
    # running stats (torch tensors) were updated in place through their DLPack views
    assert torch.allclose(rm, 0.1 * x.mean(dim=(0, 2)), atol=1e-6)
    # channels_last memory format is kept
    x4 = torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    y4 = fastbn.batch_norm(x4, training=True)
    assert y4.is_contiguous(memory_format=torch.channels_last)


def test_unsupported_dlpack_dtype_is_a_type_error():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"x must have a floating dtype|x: NumPy cannot import"):
        fastbn.batch_norm_forward(torch.ones(4, 3, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        fastbn.batch_norm_forward(torch.ones(4, 3, dtype=torch.int32))


def test_concurrent_calls_from_threads():
    """Several Python threads may call the parallel kernels at once (threading layer: tbb)."""
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((4096, 64)).astype(np.float32) + i for i in range(8)]
    expected = [fastbn.batch_norm_forward(x)[0] for x in xs]
    results = [None] * len(xs)
    errors = []

    def work(i):
        try:
            for _ in range(5):
                results[i] = fastbn.batch_norm_forward(xs[i])[0]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r, e in zip(results, expected):
        assert np.array_equal(r, e)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_after_parallel_use():
    """A forked child can still run the parallel kernels after the parent used them."""
    code = (
        "import os, numpy as np, fastbn\n"
        "x = np.random.default_rng(0).standard_normal((65536, 8)).astype(np.float32)\n"
        "y0 = fastbn.batch_norm_forward(x)[0]\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    y1 = fastbn.batch_norm_forward(x)[0]\n"
        "    os._exit(0 if np.array_equal(y0, y1) else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0", out.stdout + out.stderr


def test_threading_layer_is_thread_and_fork_safe():
    """With the tbb wheel installed (a dependency on x86-64), Numba picks the tbb layer."""
    import platform

    import numba

    fastbn.batch_norm_forward(np.ones((65536, 4), np.float32))
    layer = numba.threading_layer()
    if platform.machine() in ("x86_64", "AMD64"):
        assert layer == "tbb"
    else:
        assert layer in ("tbb", "omp", "workqueue")
