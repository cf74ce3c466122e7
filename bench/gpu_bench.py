"""GPU benchmark of the "cupy" and "numba-cuda" backends against PyTorch and a copy.

Run on a machine with a CUDA GPU and CuPy (PyTorch optional: its rows are skipped
without it)::

    python bench/gpu_bench.py                     # the three float32 cases below
    python bench/gpu_bench.py --quick             # small shapes, a smoke test
    python bench/gpu_bench.py --out bench/results/gpu-H100.json

What is timed, per case (float32):

* NCHW ``(256, 64, 56, 56)``, feature axis 1 (ResNet-50 stage 1),
* NHWC ``(256, 56, 56, 64)``, feature axis -1 (channels-last storage; PyTorch gets the
  same data as an NCHW tensor in ``torch.channels_last`` memory format),
* ``(65536, 1024)``, feature axis 1 (a wide MLP layer),

and per operation, forward-training (batch statistics + normalize) and backward (dx,
dweight, dbias), for: each fastbn GPU backend called on the canonical ``(A, C, B)``
view (the kernels), the public ``fastbn`` API on the user's array, PyTorch's CUDA batch
norm (cuDNN where PyTorch picks it; the backward through autograd), and a
device-to-device copy of the input (the bandwidth ceiling).

How: every repetition first overwrites a buffer of twice the L2 size (so no input is
cache-resident), then times the call with CUDA events recorded on the current stream
around it and synchronizes before reading them (host wall time with a synchronize
inside the timed region is recorded too). The median over the repetitions is reported.

Effective bandwidth uses the byte model of the design notes: forward-training moves
2 s bytes per element at best (read x once, write y once), backward 3 s (read x and dy,
write dx), a copy 2 s. ``fraction_of_copy`` = effective GB/s / copy GB/s.

Before timing, each fastbn result is compared with PyTorch's (or, without PyTorch, with
the float64 reference on a slice) and the largest differences are stored in the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BYTES_PER_ELEMENT = {"forward-train": 2, "backward": 3, "copy": 2}

CASES = [
    # name, stored shape, feature axis
    ("NCHW", (256, 64, 56, 56), 1),
    ("NHWC", (256, 56, 56, 64), -1),
    ("NC", (65536, 1024), 1),
]
QUICK_CASES = [
    ("NCHW", (8, 16, 28, 28), 1),
    ("NHWC", (8, 28, 28, 16), -1),
    ("NC", (2048, 256), 1),
]


def canonical(shape, axis):
    axis = axis % len(shape)
    A = int(np.prod(shape[:axis], dtype=np.int64))
    B = int(np.prod(shape[axis + 1:], dtype=np.int64))
    return A, shape[axis], B


class Timer:
    """CUDA-event timing with an L2 flush before every repetition."""

    def __init__(self, cupy, reps, warmup):
        self.cp = cupy
        self.reps = reps
        self.warmup = warmup
        dev = cupy.cuda.Device()
        l2 = int(dev.attributes.get("L2CacheSize", 50 * 2**20))
        self.flush_buf = cupy.empty(max(2 * l2, 2**20) // 4, dtype=np.float32)

    def __call__(self, fn):
        cp = self.cp
        stream = cp.cuda.get_current_stream()
        for _ in range(self.warmup):
            fn()
        stream.synchronize()
        gpu_ms, wall_ms = [], []
        for i in range(self.reps):
            self.flush_buf.fill(float(i))
            stream.synchronize()
            start, end = cp.cuda.Event(), cp.cuda.Event()
            t0 = time.perf_counter()
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            wall_ms.append((time.perf_counter() - t0) * 1e3)
            gpu_ms.append(cp.cuda.get_elapsed_time(start, end))
        return {"median_ms": statistics.median(gpu_ms), "min_ms": min(gpu_ms),
                "wall_median_ms": statistics.median(wall_ms), "reps": self.reps}


def gbps(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e9


def max_abs_diff(cp, a, b):
    return float(cp.max(cp.abs(cp.asarray(a, dtype=np.float64) - cp.asarray(b, dtype=np.float64))))


def run_case(cp, torch, timer, name, shape, axis, dtype):
    import fastbn
    from fastbn.backends import get_backend

    rng = cp.random.default_rng(0)
    x = (rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5).astype(dtype)
    dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    A, C, B = canonical(shape, axis)
    x3, dy3 = x.reshape(A, C, B), dy.reshape(A, C, B)
    w = cp.asarray(np.linspace(0.5, 1.5, C), dtype=np.float32)
    b = cp.asarray(np.linspace(-1, 1, C), dtype=np.float32)
    n = x.size
    item = x.dtype.itemsize
    rows = []

    def add(impl, op, t, **extra):
        nbytes = BYTES_PER_ELEMENT[op] * n * item
        rows.append(dict(case=name, shape=list(shape), axis=axis, dtype=np.dtype(dtype).name,
                         impl=impl, op=op, bytes_model=nbytes, gbps=gbps(nbytes, t["median_ms"]),
                         **t, **extra))

    # the ceiling: a device-to-device copy of the input
    dst = cp.empty_like(x)

    def copy():
        cp.cuda.runtime.memcpyAsync(dst.data.ptr, x.data.ptr, x.nbytes,
                                    cp.cuda.runtime.memcpyDeviceToDevice,
                                    cp.cuda.get_current_stream().ptr)

    add("copy", "copy", timer(copy))

    # PyTorch (cuDNN where it picks it)
    t_ref = None
    if torch is not None:
        tx = torch.as_tensor(x, device="cuda")
        tdy = torch.as_tensor(dy, device="cuda")
        if name == "NHWC":  # the same memory seen as an NCHW tensor in channels_last format
            tx = tx.permute(0, 3, 1, 2)
            tdy = tdy.permute(0, 3, 1, 2)
            assert tx.is_contiguous(memory_format=torch.channels_last)
        tw = torch.as_tensor(w, device="cuda").clone().requires_grad_(True)
        tb = torch.as_tensor(b, device="cuda").clone().requires_grad_(True)
        rm = torch.zeros(C, device="cuda")
        rv = torch.ones(C, device="cuda")
        F = torch.nn.functional
        add("torch", "forward-train",
            timer(lambda: F.batch_norm(tx, rm, rv, tw, tb, training=True, momentum=0.1, eps=1e-5)))
        txg = tx.detach().requires_grad_(True)
        ty = F.batch_norm(txg, rm, rv, tw, tb, training=True, momentum=0.1, eps=1e-5)
        grads = torch.autograd.grad(ty, (txg, tw, tb), tdy, retain_graph=True)
        add("torch", "backward",
            timer(lambda: torch.autograd.grad(ty, (txg, tw, tb), tdy, retain_graph=True)),
            grad_fn=type(ty.grad_fn).__name__)
        t_ref = dict(y=cp.asarray(ty.detach()), dx=cp.asarray(grads[0]), dw=cp.asarray(grads[1]),
                     db=cp.asarray(grads[2]))
        if name == "NHWC":  # back to the stored (N, H, W, C) order for comparisons
            t_ref["y"] = cp.asarray(ty.detach().permute(0, 2, 3, 1))
            t_ref["dx"] = cp.asarray(grads[0].permute(0, 2, 3, 1))

    for backend in ("cupy", "numba-cuda"):
        try:
            be = get_backend(backend)
        except RuntimeError as exc:
            rows.append(dict(case=name, impl=backend, skipped=str(exc)))
            continue
        y3, mean, var, invstd = be.forward_train(x3, w, b, 1e-5)
        dx3, dw, db = be.backward(dy3, x3, mean, invstd, w)
        check = {}
        if t_ref is not None:
            check = dict(y=max_abs_diff(cp, y3.reshape(shape), t_ref["y"]),
                         dx=max_abs_diff(cp, dx3.reshape(shape), t_ref["dx"]),
                         dw=max_abs_diff(cp, dw, t_ref["dw"]), db=max_abs_diff(cp, db, t_ref["db"]))
        add(f"fastbn-{backend}-kernels", "forward-train",
            timer(lambda: be.forward_train(x3, w, b, 1e-5)), max_abs_diff_vs_torch=check)
        add(f"fastbn-{backend}-kernels", "backward",
            timer(lambda: be.backward(dy3, x3, mean, invstd, w)))
        # through the public API (validation, canonicalization, running-stat update)
        rm, rv = cp.zeros(C, np.float32), cp.ones(C, np.float32)
        add(f"fastbn-{backend}-api", "forward-train",
            timer(lambda: fastbn.batch_norm_forward(x, w, b, eps=1e-5, axis=axis, running_mean=rm,
                                                    running_var=rv, backend=backend)))
        _, sm, si = fastbn.batch_norm_forward(x, w, b, eps=1e-5, axis=axis, backend=backend)
        add(f"fastbn-{backend}-api", "backward",
            timer(lambda: fastbn.batch_norm_backward(dy, x, sm, si, w, axis=axis, backend=backend)))

    copy_gbps = rows[0]["gbps"]
    for r in rows:
        if "gbps" in r:
            r["fraction_of_copy"] = r["gbps"] / copy_gbps
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default: stdout only)")
    args = ap.parse_args(argv)

    import cupy as cp

    try:
        import torch

        if not torch.cuda.is_available():
            torch = None
    except ImportError:
        torch = None
    timer = Timer(cp, args.reps, args.warmup)
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    devname = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    rows = []
    for name, shape, axis in (QUICK_CASES if args.quick else CASES):
        rows += run_case(cp, torch, timer, name, shape, axis, np.float32)
    result = dict(
        device=devname, sms=dev.attributes["MultiProcessorCount"],
        cupy=cp.__version__, torch=getattr(torch, "__version__", None),
        cudnn=(torch.backends.cudnn.version() if torch is not None else None),
        python=platform.python_version(), when=datetime.datetime.now(datetime.UTC).isoformat(),
        command=" ".join(sys.argv), byte_model=BYTES_PER_ELEMENT, rows=rows,
    )
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    for r in rows:
        if "gbps" in r:
            print(f"{r['case']:5s} {r['op']:14s} {r['impl']:28s} {r['median_ms']:8.3f} ms "
                  f"{r['gbps']:8.1f} GB/s  {r['fraction_of_copy']:5.2f} x copy")
        else:
            print(f"{r['case']:5s} {r['impl']:28s} skipped: {r['skipped']}")
    return result


if __name__ == "__main__":
    main()
