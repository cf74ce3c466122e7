"""Layer norm and RMS norm implementations for the benchmark suite (``test_rownorm.py``)
and ``rownorm_bench.py``: one ``build(name, op, data) -> callable`` per implementation; the
callable returns a dict of outputs (``y``; with the backward also ``dx``, ``dweight`` and,
for layer norm, ``dbias``).

* ``memcpy``: ``np.copyto`` of x into a preallocated array (the floor).
* ``fastbn-cpu``: ``fastbn.layer_norm``/``rms_norm`` and their forward/backward functions.
* ``numpy``: the formulas with NumPy in the data dtype (two-pass variance).
* ``torch``: ``torch.nn.functional.layer_norm``/``rms_norm`` on the same memory
  (``torch.from_numpy``), backward by ``torch.autograd.grad``.
* ``jax``: the formulas under ``jax.jit``, backward by ``jax.vjp`` (CPU device).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from cases import ROW_OPS

EPS = {"layer": 1e-5, "rms": 1e-6}
ROW_IMPLS = ("memcpy", "fastbn-cpu", "numpy", "torch", "jax")


@dataclass
class RowData:
    """Inputs of one (shape, dtype): x, dy, weight and bias of the hidden size."""

    x: np.ndarray
    dy: np.ndarray
    w: np.ndarray
    b: np.ndarray

    @classmethod
    def make(cls, shape, dtype, seed=0):
        rng = np.random.default_rng(seed)
        n = shape[1]
        x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        w = rng.uniform(0.5, 1.5, n).astype(dtype)
        b = rng.standard_normal(n).astype(dtype)
        return cls(x, dy, w, b)

    @cached_property
    def expected(self) -> dict:
        """float64 results of every op, and the scale of each weight gradient's terms."""
        x, dy = self.x.astype(np.float64), self.dy.astype(np.float64)
        w, b = self.w.astype(np.float64), self.b.astype(np.float64)
        n = x.shape[1]
        out = {}
        for kind in ("layer", "rms"):
            m = x.mean(1, keepdims=True) if kind == "layer" else 0.0
            d = x - m
            rs = 1.0 / np.sqrt((d * d).mean(1, keepdims=True) + EPS[kind])
            xh = d * rs
            g = dy * w
            s1 = g.sum(1, keepdims=True) if kind == "layer" else 0.0
            dx = rs * (g - s1 / n - xh * (g * xh).sum(1, keepdims=True) / n)
            e = {"y": xh * w + (b if kind == "layer" else 0.0), "dx": dx,
                 "dweight": (dy * xh).sum(0), "dweight_scale": np.abs(dy * xh).sum(0)}
            if kind == "layer":
                e["dbias"], e["dbias_scale"] = dy.sum(0), np.abs(dy).sum(0)
            out[kind] = e
        return out


def _kind(op):
    return "layer" if op.startswith("layer") else "rms"


def _fastbn(op, d):
    import fastbn

    x, dy, w, b, n = d.x, d.dy, d.w, d.b, d.x.shape[1]
    if op == "layer-norm":
        return lambda: {"y": fastbn.layer_norm(x, n, w, b)}
    if op == "rms-norm":
        return lambda: {"y": fastbn.rms_norm(x, n, w, EPS["rms"])}
    if op == "layer-norm-fwd-bwd":
        def run():
            y, mean, rstd = fastbn.layer_norm_forward(x, n, w, b)
            dx, dw, db = fastbn.layer_norm_backward(dy, x, mean, rstd, n, w)
            return {"y": y, "dx": dx, "dweight": dw, "dbias": db}
        return run

    def run():
        y, rstd = fastbn.rms_norm_forward(x, n, w, EPS["rms"])
        dx, dw = fastbn.rms_norm_backward(dy, x, rstd, n, w)
        return {"y": y, "dx": dx, "dweight": dw}
    return run


def _numpy(op, d):
    x, dy, w, b = d.x, d.dy, d.w, d.b
    kind = _kind(op)

    def fwd():
        m = x.mean(1, keepdims=True) if kind == "layer" else 0
        dd = x - m
        rs = 1 / np.sqrt((dd * dd).mean(1, keepdims=True) + x.dtype.type(EPS[kind]))
        xh = dd * rs
        return xh, rs, xh * w + b if kind == "layer" else xh * w

    if not op.endswith("fwd-bwd"):
        return lambda: {"y": fwd()[2]}

    def run():
        xh, rs, y = fwd()
        g = dy * w
        s1 = g.mean(1, keepdims=True) if kind == "layer" else 0
        dx = rs * (g - s1 - xh * (g * xh).mean(1, keepdims=True))
        out = {"y": y, "dx": dx, "dweight": (dy * xh).sum(0)}
        if kind == "layer":
            out["dbias"] = dy.sum(0)
        return out
    return run


def _torch(op, d):
    import torch

    F = torch.nn.functional
    xt, dyt, wt, bt = (torch.from_numpy(a) for a in (d.x, d.dy, d.w, d.b))
    n = d.x.shape[1]
    kind = _kind(op)

    def f(x, w, b):
        return F.layer_norm(x, (n,), w, b, EPS[kind]) if kind == "layer" else \
            F.rms_norm(x, (n,), w, EPS[kind])

    if not op.endswith("fwd-bwd"):
        return lambda: {"y": f(xt, wt, bt).numpy()}
    xg, wg, bg = (t.clone().requires_grad_(True) for t in (xt, wt, bt))
    inputs = (xg, wg, bg) if kind == "layer" else (xg, wg)

    def run():
        y = f(xg, wg, bg)
        grads = torch.autograd.grad(y, inputs, dyt)
        out = {"y": y.detach().numpy(), "dx": grads[0].numpy(), "dweight": grads[1].numpy()}
        if kind == "layer":
            out["dbias"] = grads[2].numpy()
        return out
    return run


def _jax(op, d):
    import jax

    kind = _kind(op)
    eps = EPS[kind]

    def f(x, w, b):
        m = x.mean(1, keepdims=True) if kind == "layer" else 0.0
        dd = x - m
        xh = dd * jax.lax.rsqrt((dd * dd).mean(1, keepdims=True) + eps)
        return xh * w + b if kind == "layer" else xh * w

    cpu = jax.devices("cpu")[0]
    x, dy, w, b = (jax.device_put(a, cpu) for a in (d.x, d.dy, d.w, d.b))
    if not op.endswith("fwd-bwd"):
        fj = jax.jit(f)
        return lambda: {"y": np.asarray(fj(x, w, b).block_until_ready())}

    @jax.jit
    def fb(x, w, b, dy):
        y, vjp = jax.vjp(f, x, w, b)
        return (y, *vjp(dy))

    def run():
        y, dx, dw, db = jax.block_until_ready(fb(x, w, b, dy))
        out = {"y": np.asarray(y), "dx": np.asarray(dx), "dweight": np.asarray(dw)}
        if kind == "layer":
            out["dbias"] = np.asarray(db)
        return out
    return run


def _memcpy(op, d):
    dst = np.empty_like(d.x)

    def run():
        np.copyto(dst, d.x)
        return {"copy": dst}
    return run


_BUILDERS = {"memcpy": _memcpy, "fastbn-cpu": _fastbn, "numpy": _numpy, "torch": _torch,
             "jax": _jax}


def available(name: str) -> str | None:
    """None if implementation `name` can run here, else why not."""
    module = {"torch": "torch", "jax": "jax"}.get(name)
    if module is None:
        return None
    try:
        __import__(module)
    except Exception as exc:  # noqa: BLE001 - not installed, or broken
        return f"{module} is not importable ({type(exc).__name__}: {exc})"
    return None


def build(name: str, op: str, d: RowData):
    """The callable of implementation `name` for `op` on the inputs `d`."""
    assert op in ROW_OPS, op
    return _BUILDERS[name](op, d)
