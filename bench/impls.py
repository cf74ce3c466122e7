"""The implementations the suite times, each behind the same small interface.

Every implementation turns an operation and a :class:`BenchData` into a zero-argument
callable that runs the operation once, to completion (JAX results are blocked on), and
returns its outputs as a dict of arrays (``y``, ``dx``, ``dweight``, ``dbias``) so the
suite can check them against a float64 computation before it times anything.

All of them see the same tensors in the same memory layout: fastbn and NumPy get the
NumPy array, PyTorch gets a zero-copy view of it (an NHWC case is a ``channels_last``
NCHW tensor, which is what PyTorch's channels-last kernels take), JAX gets a device copy.
"""

from __future__ import annotations

import functools
import importlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from cases import MEMCPY_BYTES_PER_ELEMENT, SMALL_NUMEL, Shape

MOMENTUM = 0.1
EPS = 1e-5

Outputs = dict


def stats_dtype(dtype: str) -> np.dtype:
    """float16 keeps float32 statistics and weights (fastbn's and PyTorch's convention)."""
    return np.dtype(np.float32) if np.dtype(dtype) == np.float16 else np.dtype(dtype)


@dataclass
class BenchData:
    """Inputs for one (shape, dtype): x and dy in the shape's layout, per-channel params."""

    shape: Shape
    dtype: str
    x: np.ndarray
    dy: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    _expected: dict = field(default_factory=dict, repr=False)

    @classmethod
    def make(cls, shape: Shape, dtype: str, seed: int = 0) -> "BenchData":
        rng = np.random.default_rng(seed)
        c = shape.num_features
        sdt = stats_dtype(dtype)
        # Activations with a per-channel offset, as after a convolution; the offset stays
        # well inside the range where a stable float32 kernel is accurate.
        bshape = [1] * len(shape.dims)
        bshape[shape.axis] = c
        offset = rng.uniform(-2.0, 2.0, size=c).reshape(bshape).astype(np.float32)
        x = rng.standard_normal(shape.dims, dtype=np.float32)
        x += offset
        dy = rng.standard_normal(shape.dims, dtype=np.float32)
        return cls(
            shape=shape,
            dtype=dtype,
            x=x.astype(dtype, copy=False),
            dy=dy.astype(dtype, copy=False),
            weight=rng.uniform(0.5, 1.5, size=c).astype(sdt),
            bias=rng.uniform(-0.5, 0.5, size=c).astype(sdt),
            running_mean=np.zeros(c, dtype=sdt),
            running_var=np.ones(c, dtype=sdt),
        )

    def fresh_running_stats(self) -> tuple[np.ndarray, np.ndarray]:
        return self.running_mean.copy(), self.running_var.copy()

    def expected(self) -> dict:
        """float64 results of every operation, computed once per (shape, dtype)."""
        if not self._expected:
            a, c, b = self.shape.canonical
            x = self.x.reshape(a, c, b).astype(np.float64)
            dy = self.dy.reshape(a, c, b).astype(np.float64)
            w = self.weight.astype(np.float64)[None, :, None]
            bias = self.bias.astype(np.float64)[None, :, None]
            m = a * b
            mean = x.mean(axis=(0, 2), keepdims=True)
            xc = x - mean
            var = np.square(xc).mean(axis=(0, 2), keepdims=True)
            invstd = 1.0 / np.sqrt(var + EPS)
            xhat = xc * invstd
            db = dy.sum(axis=(0, 2))
            dw = (dy * xhat).sum(axis=(0, 2))
            dx = (w * invstd / m) * (m * dy - db[None, :, None] - xhat * dw[None, :, None])
            rm = self.running_mean.astype(np.float64)[None, :, None]
            rv = self.running_var.astype(np.float64)[None, :, None]
            self._expected = {
                "y": xhat * w + bias,
                "y_eval": (x - rm) / np.sqrt(rv + EPS) * w + bias,
                "dx": dx,
                "dweight": dw,
                "dbias": db,
                # scales for the checks: sum(|dy * xhat|) and sum(|dy|) bound the
                # magnitude of every partial sum in dweight and dbias.
                "dweight_scale": np.abs(dy * xhat).sum(axis=(0, 2)),
                "dbias_scale": np.abs(dy).sum(axis=(0, 2)),
            }
        return self._expected


class Impl:
    """One implementation: a name, whether it runs here, and the callables it builds."""

    name: str = ""
    #: run only on tensors up to SMALL_NUMEL elements (too slow beyond).
    small_only: bool = False

    def available(self) -> tuple[bool, str]:
        return True, ""

    def skip_reason(self, op: str, shape: Shape, dtype: str) -> str | None:
        ok, why = self.available()
        if not ok:
            return f"{self.name} unavailable: {why}"
        if self.small_only and shape.numel > SMALL_NUMEL:
            return f"{self.name} runs only on tensors up to {SMALL_NUMEL} elements"
        return None

    def build(self, op: str, d: BenchData) -> Callable[[], Outputs]:
        raise NotImplementedError


# --------------------------------------------------------------------------- memcpy
class Memcpy(Impl):
    """``np.copyto`` of the input into a preallocated array: the bandwidth floor."""

    name = "memcpy"

    def build(self, op, d):
        dst = np.empty_like(d.x)
        src = d.x

        def run():
            np.copyto(dst, src)
            return {"copy": dst}

        return run


# --------------------------------------------------------------------------- fastbn
class Fastbn(Impl):
    """fastbn's public API with ``backend=`` pinned (so the dispatch cost is included)."""

    def __init__(self, backend: str, small_only: bool = False):
        self.backend = backend
        self.name = f"fastbn-{backend}"
        self.small_only = small_only

    def build(self, op, d):
        import fastbn

        be, ax = self.backend, d.shape.axis
        x, dy, w, b = d.x, d.dy, d.weight, d.bias
        rm, rv = d.fresh_running_stats()
        if op == "forward-train":
            return lambda: {
                "y": fastbn.batch_norm(
                    x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS, axis=ax, backend=be
                )
            }
        if op == "forward-eval":
            erm, erv = d.fresh_running_stats()
            return lambda: {
                "y": fastbn.batch_norm(
                    x, erm, erv, w, b, training=False, momentum=MOMENTUM, eps=EPS, axis=ax, backend=be
                )
            }
        if op == "backward":
            _, save_mean, save_invstd = fastbn.batch_norm_forward(x, w, b, eps=EPS, axis=ax, backend=be)

            def run():
                dx, dw, db = fastbn.batch_norm_backward(dy, x, save_mean, save_invstd, w, axis=ax, backend=be)
                return {"dx": dx, "dweight": dw, "dbias": db}

            return run
        if op == "forward-backward":

            def run():
                y, sm, si = fastbn.batch_norm_forward(
                    x, w, b, eps=EPS, axis=ax, running_mean=rm, running_var=rv, momentum=MOMENTUM, backend=be
                )
                dx, dw, db = fastbn.batch_norm_backward(dy, x, sm, si, w, axis=ax, backend=be)
                return {"y": y, "dx": dx, "dweight": dw, "dbias": db}

            return run
        raise ValueError(op)


class FastbnKernel(Impl):
    """The backend's functions called directly on the canonical ``(A, C, B)`` view.

    No validation, no dispatch, no running-statistics update: the difference to
    :class:`Fastbn` is the public API's per-call overhead (it matters on small tensors).
    """

    small_only = True

    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"fastbn-{backend}-kernel"

    def build(self, op, d):
        from fastbn.backends import get_backend

        be = get_backend(self.backend)
        a, c, b_ = d.shape.canonical
        x3 = np.ascontiguousarray(d.x.reshape(a, c, b_))
        dy3 = np.ascontiguousarray(d.dy.reshape(a, c, b_))
        w, b = d.weight, d.bias
        if op == "forward-train":
            return lambda: {"y": be.forward_train(x3, w, b, EPS)[0]}
        if op == "forward-eval":
            rm, rv = d.fresh_running_stats()
            return lambda: {"y": be.forward_eval(x3, rm, rv, w, b, EPS)}
        if op == "backward":
            _, mean, _, invstd = be.forward_train(x3, w, b, EPS)

            def run():
                dx, dw, db = be.backward(dy3, x3, mean, invstd, w)
                return {"dx": dx, "dweight": dw, "dbias": db}

            return run
        if op == "forward-backward":

            def run():
                y, mean, _, invstd = be.forward_train(x3, w, b, EPS)
                dx, dw, db = be.backward(dy3, x3, mean, invstd, w)
                return {"y": y, "dx": dx, "dweight": dw, "dbias": db}

            return run
        raise ValueError(op)


def fastbn_impls() -> list[Impl]:
    """One implementation per usable fastbn backend that takes NumPy arrays."""
    try:
        import fastbn
        from fastbn.backends import get_backend

        names = list(fastbn.backends())
    except Exception as exc:  # noqa: BLE001 - report, do not crash collection
        return [_Broken("fastbn", f"{type(exc).__name__}: {exc}")]
    impls: list[Impl] = []
    for name in names:
        try:
            if get_backend(name).xp is not np:
                continue  # a GPU backend: it takes device arrays, not NumPy arrays
        except Exception:  # noqa: BLE001
            continue
        impls.append(Fastbn(name, small_only=(name == "reference")))
        if name == "cpu":
            impls.append(FastbnKernel(name))
    return impls


class _Broken(Impl):
    def __init__(self, name, why):
        self.name, self._why = name, why

    def available(self):
        return False, self._why


# --------------------------------------------------------------------------- NumPy
class Numpy(Impl):
    """Batch norm as a NumPy user writes it: vectorized, in the input's dtype.

    It works on the free ``(A, C, B)`` reshape so every layout reduces over axes (0, 2);
    float16 statistics accumulate in float32 (float16 sums overflow and lose digits).
    """

    name = "numpy"

    def build(self, op, d):
        a, c, b_ = d.shape.canonical
        x3 = d.x.reshape(a, c, b_)
        dy3 = d.dy.reshape(a, c, b_)
        out_shape = d.x.shape
        dt = d.x.dtype
        acc = np.float32 if dt == np.float16 else dt.type
        w = d.weight.astype(acc)[None, :, None]
        bias = d.bias.astype(acc)[None, :, None]
        m = a * b_
        rm, rv = d.fresh_running_stats()

        def train():
            mean = x3.mean(axis=(0, 2), keepdims=True, dtype=acc)
            var = x3.var(axis=(0, 2), keepdims=True, dtype=acc)
            invstd = 1.0 / np.sqrt(var + acc(EPS))
            scale = invstd * w
            y = (x3 * scale + (bias - mean * scale)).astype(dt, copy=False)
            rm[...] = (1 - MOMENTUM) * rm + MOMENTUM * mean.ravel()
            rv[...] = (1 - MOMENTUM) * rv + MOMENTUM * var.ravel() * (m / max(m - 1, 1))
            return y.reshape(out_shape), mean, invstd

        def backward(mean, invstd):
            xhat = (x3 - mean) * invstd
            db = dy3.sum(axis=(0, 2), dtype=acc)
            dw = (dy3 * xhat).sum(axis=(0, 2), dtype=acc)
            # the contract's formula divided through by M (M * dy would overflow float16)
            dx = (w * invstd) * (dy3 - (db / m)[None, :, None] - xhat * (dw / m)[None, :, None])
            return dx.astype(dt, copy=False).reshape(out_shape), dw, db

        if op == "forward-train":
            return lambda: {"y": train()[0]}
        if op == "forward-eval":
            erm, erv = d.fresh_running_stats()

            def ev():
                scale = (1.0 / np.sqrt(erv.astype(acc) + acc(EPS)))[None, :, None] * w
                shift = bias - erm.astype(acc)[None, :, None] * scale
                return {"y": (x3 * scale + shift).astype(dt, copy=False).reshape(out_shape)}

            return ev
        if op == "backward":
            _, mean, invstd = train()

            def bw():
                dx, dw, db = backward(mean, invstd)
                return {"dx": dx, "dweight": dw, "dbias": db}

            return bw
        if op == "forward-backward":

            def fb():
                y, mean, invstd = train()
                dx, dw, db = backward(mean, invstd)
                return {"y": y, "dx": dx, "dweight": dw, "dbias": db}

            return fb
        raise ValueError(op)


# --------------------------------------------------------------------------- PyTorch
def _optional(module: str) -> tuple[bool, str]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - installed but broken counts as missing
        return False, f"{module} not importable ({type(exc).__name__}: {exc})"
    return True, ""


class Torch(Impl):
    """``torch.nn.functional.batch_norm``; backward through autograd (``torch.autograd.grad``)."""

    name = "torch"

    @functools.cache
    def available(self):
        return _optional("torch")

    def build(self, op, d):
        import torch
        import torch.nn.functional as F

        def to_torch(arr):
            t = torch.from_numpy(arr)
            # NHWC storage -> a channels_last NCHW tensor (PyTorch's channels-last path)
            return t.permute(0, 3, 1, 2) if d.shape.layout == "NHWC" else t

        def to_numpy(t):
            t = t.detach()
            return (t.permute(0, 2, 3, 1) if d.shape.layout == "NHWC" else t).numpy()

        x, dy = to_torch(d.x), to_torch(d.dy)
        w, b = torch.from_numpy(d.weight.copy()), torch.from_numpy(d.bias.copy())
        rm, rv = (torch.from_numpy(a) for a in d.fresh_running_stats())

        if op == "forward-train":

            def run():
                with torch.no_grad():
                    y = F.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS)
                return {"y": to_numpy(y)}

            return run
        if op == "forward-eval":
            erm, erv = (torch.from_numpy(a) for a in d.fresh_running_stats())

            def run():
                with torch.no_grad():
                    y = F.batch_norm(x, erm, erv, w, b, training=False, momentum=MOMENTUM, eps=EPS)
                return {"y": to_numpy(y)}

            return run
        xg = x.detach().requires_grad_(True)
        wg = w.detach().requires_grad_(True)
        bg = b.detach().requires_grad_(True)
        if op == "backward":
            y = F.batch_norm(xg, rm, rv, wg, bg, training=True, momentum=MOMENTUM, eps=EPS)

            def run():
                dx, dw, db = torch.autograd.grad(y, (xg, wg, bg), dy, retain_graph=True)
                return {"dx": to_numpy(dx), "dweight": dw.numpy(), "dbias": db.numpy()}

            return run
        if op == "forward-backward":

            def run():
                y = F.batch_norm(xg, rm, rv, wg, bg, training=True, momentum=MOMENTUM, eps=EPS)
                dx, dw, db = torch.autograd.grad(y, (xg, wg, bg), dy)
                return {"y": to_numpy(y), "dx": to_numpy(dx), "dweight": dw.numpy(), "dbias": db.numpy()}

            return run
        raise ValueError(op)


# --------------------------------------------------------------------------- JAX
class Jax(Impl):
    """A ``jax.jit`` batch norm; gradients with ``jax.vjp`` (what ``jax.grad`` uses), jitted.

    The backward alone is the jitted VJP closure applied to dy, with the forward's
    residuals already computed (the analogue of PyTorch's saved tensors).
    """

    name = "jax"

    @functools.cache
    def available(self):
        ok, why = _optional("jax")
        if ok:
            import jax

            # float64 cases need x64; it changes defaults only inside this process.
            jax.config.update("jax_enable_x64", True)
        return ok, why

    def build(self, op, d):
        import jax
        import jax.numpy as jnp

        ax = d.shape.axis % len(d.shape.dims)
        axes = tuple(i for i in range(len(d.shape.dims)) if i != ax)
        bshape = tuple(d.shape.num_features if i == ax else 1 for i in range(len(d.shape.dims)))
        m = d.shape.numel // d.shape.num_features
        dt = d.x.dtype
        acc = jnp.float32 if dt == np.float16 else dt

        def bn_train(x, w, b, rm, rv):
            mean = jnp.mean(x, axis=axes, dtype=acc)
            var = jnp.var(x, axis=axes, dtype=acc)
            scale = (jax.lax.rsqrt(var + EPS) * w).reshape(bshape)
            shift = b.reshape(bshape) - mean.reshape(bshape) * scale
            y = (x.astype(acc) * scale + shift).astype(dt)
            new_rm = (1 - MOMENTUM) * rm + MOMENTUM * mean
            new_rv = (1 - MOMENTUM) * rv + MOMENTUM * var * (m / max(m - 1, 1))
            return y, (new_rm, new_rv)

        def bn_eval(x, w, b, rm, rv):
            scale = (jax.lax.rsqrt(rv + EPS) * w).reshape(bshape)
            shift = b.reshape(bshape) - rm.reshape(bshape) * scale
            return (x.astype(acc) * scale + shift).astype(dt)

        put = jax.device_put
        x, dy = put(d.x), put(d.dy)
        w, b = put(d.weight), put(d.bias)
        rm, rv = (put(a) for a in d.fresh_running_stats())
        block = jax.block_until_ready

        if op == "forward-train":
            f = jax.jit(bn_train)
            return lambda: {"y": block(f(x, w, b, rm, rv))[0]}
        if op == "forward-eval":
            f = jax.jit(bn_eval)
            return lambda: {"y": block(f(x, w, b, rm, rv))}

        def fwd_vjp(x, w, b):
            return jax.vjp(lambda x, w, b: bn_train(x, w, b, rm, rv), x, w, b, has_aux=True)

        if op == "backward":
            _, vjp_fn, _ = jax.jit(fwd_vjp)(x, w, b)
            bwd = jax.jit(lambda vjp_fn, dy: vjp_fn(dy))

            def run():
                dx, dw, db = block(bwd(vjp_fn, dy))
                return {"dx": dx, "dweight": dw, "dbias": db}

            return run
        if op == "forward-backward":

            def fb(x, w, b, dy):
                y, vjp_fn, _ = fwd_vjp(x, w, b)
                return (y, *vjp_fn(dy))

            f = jax.jit(fb)

            def run():
                y, dx, dw, db = block(f(x, w, b, dy))
                return {"y": y, "dx": dx, "dweight": dw, "dbias": db}

            return run
        raise ValueError(op)


def all_impls(only: set[str] | None = None) -> list[Impl]:
    """Every implementation, memcpy first (its time is the floor the others are compared to).

    `only`, if given, keeps those names (memcpy is always kept).
    """
    impls: list[Impl] = [Memcpy(), *fastbn_impls(), Numpy(), Torch(), Jax()]
    if only:
        impls = [i for i in impls if i.name in only or i.name == "memcpy"]
    return impls


def time_memcpy(src: np.ndarray, budget_s: float = 0.2, repeats: int = 50) -> float:
    """Fastest of up to `repeats` ``np.copyto`` calls within `budget_s` (fallback floor)."""
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return best


def record_result(benchmark, memcpy_floor: dict, x: np.ndarray, is_memcpy: bool) -> float:
    """After ``benchmark(run)``: the fastest time, and into ``extra_info`` the figures every
    group reports (``time_stat``, ``loadavg_1min``, ``gbps`` by ``extra_info["model_bytes"]``,
    ``memcpy_time_s``, ``memcpy_gbps``, ``time_vs_memcpy``). The group's memcpy time is
    taken from `memcpy_floor` (filled by the memcpy case, which runs first), or measured here
    when memcpy was filtered out of the run."""
    best = benchmark.stats.stats.min
    info = benchmark.extra_info
    info["time_stat"] = "min"
    # other processes competing for the cores distort the timings (most of all thread
    # pools that wait on a barrier): the 1-minute load average is kept with each result
    info["loadavg_1min"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    info["gbps"] = info["model_bytes"] / best / 1e9
    group = benchmark.group
    if is_memcpy:
        memcpy_floor[group] = best
    floor = memcpy_floor.get(group)
    if floor is None:
        floor = memcpy_floor[group] = time_memcpy(x)
    info["memcpy_time_s"] = floor
    info["memcpy_gbps"] = MEMCPY_BYTES_PER_ELEMENT * x.size * x.itemsize / floor / 1e9
    info["time_vs_memcpy"] = best / floor
    return best
