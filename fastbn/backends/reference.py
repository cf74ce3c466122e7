"""The ``"reference"`` backend: the float64 oracle behind the backend contract.

Computes in float64 with plain NumPy on the canonical ``(A, C, B)`` form and rounds the
results to the input's dtype (statistics to :func:`stats_dtype`). Slow; meant for checking
other backends and for machines where Numba cannot run.
"""

from __future__ import annotations

import numpy as np

from . import stats_dtype  # the shared rule: float16 -> float32 statistics

name = "reference"
xp = np
dtypes = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def available():
    """The reference needs only NumPy: always ``(True, "")``."""
    return True, ""


def invstd_of(var, eps):
    """1 / sqrt(var + eps); 0 where var + eps == 0 (torch's rule); NaN stays NaN.

    Shared by both float64 oracles (this backend and :mod:`fastbn.reference`).
    """
    denom = var + eps
    return np.where(denom == 0, 0.0, 1.0 / np.sqrt(np.where(denom == 0, 1.0, denom)))


def shifted_mean(x, axes):
    """The mean of float64 `x` over `axes` as ``k + mean(x - k)``, k a finite value of each
    feature (its first along `axes`; 0 if that is inf or NaN).

    The same number in exact arithmetic; in floating point a constant feature gets its own
    value as mean and a variance of exactly 0 (a float64 sum of n copies of 0.1 is not
    n * 0.1: a plain mean leaves a variance of ~1e-33, which eps = 0 turns into invstd ~1e16
    and y = +-1 noise). Shared by both float64 oracles.
    """
    k = x[tuple(slice(0, 1) if i in axes else slice(None) for i in range(x.ndim))]
    k = np.where(np.isfinite(k), k, 0.0)
    return (k + (x - k).mean(axis=axes, keepdims=True)).squeeze(axis=axes)


@np.errstate(invalid="ignore", divide="ignore", over="ignore")  # NaN, inf: as the kernels
def forward_train(x3, weight, bias, eps):
    """Batch statistics and normalized output (see the backend contract)."""
    sd = stats_dtype(x3.dtype)
    x = x3.astype(np.float64)
    mean = shifted_mean(x, (0, 2))
    centered = x - mean[None, :, None]
    var = (centered * centered).mean(axis=(0, 2))
    invstd = invstd_of(var, eps)
    alpha = invstd * weight.astype(np.float64)
    y = centered * alpha[None, :, None] + bias.astype(np.float64)[None, :, None]
    return y.astype(x3.dtype), mean.astype(sd), var.astype(sd), invstd.astype(sd)


@np.errstate(invalid="ignore", divide="ignore", over="ignore")  # NaN, inf: as the kernels
def forward_eval(x3, mean, var, weight, bias, eps):
    """Normalize with given statistics (see the backend contract)."""
    alpha = invstd_of(var.astype(np.float64), eps) * weight.astype(np.float64)
    beta = bias.astype(np.float64) - mean.astype(np.float64) * alpha
    y = x3.astype(np.float64) * alpha[None, :, None] + beta[None, :, None]
    return y.astype(x3.dtype)


@np.errstate(invalid="ignore", divide="ignore", over="ignore")  # NaN, inf: as the kernels
def backward(dy3, x3, mean, invstd, weight):
    """Gradient of the training-mode forward (see the backend contract)."""
    sd = stats_dtype(x3.dtype)
    m = x3.shape[0] * x3.shape[2]
    inv = invstd.astype(np.float64)[None, :, None]
    xhat = (x3.astype(np.float64) - mean.astype(np.float64)[None, :, None]) * inv
    dy = dy3.astype(np.float64)
    dbias = dy.sum(axis=(0, 2))
    dweight = (dy * xhat).sum(axis=(0, 2))
    scale = weight.astype(np.float64)[None, :, None] * inv / m
    dx = scale * (m * dy - dbias[None, :, None] - xhat * dweight[None, :, None])
    return dx.astype(x3.dtype), dweight.astype(sd), dbias.astype(sd)


@np.errstate(invalid="ignore", divide="ignore", over="ignore")  # NaN, inf: as the kernels
def backward_eval(dy3, x3, mean, var, weight, eps):
    """Gradient of the evaluation-mode forward, statistics constant (see the contract)."""
    sd = stats_dtype(x3.dtype)
    inv = invstd_of(var.astype(np.float64), eps)[None, :, None]
    xhat = (x3.astype(np.float64) - mean.astype(np.float64)[None, :, None]) * inv
    dy = dy3.astype(np.float64)
    dx = dy * (weight.astype(np.float64)[None, :, None] * inv)
    return dx.astype(x3.dtype), (dy * xhat).sum(axis=(0, 2)).astype(sd), dy.sum(axis=(0, 2)).astype(sd)


# ------------------------------------------------------------------ rows: layer and RMS norm
# x2 and dy2 are C-contiguous (R, N): rows of the N values of the normalized dimensions.
@np.errstate(invalid="ignore", divide="ignore", over="ignore")
def layer_norm_forward(x2, weight, bias, eps):
    """Layer norm of each row (see the CPU backend's function of the same name)."""
    sd = stats_dtype(x2.dtype)
    x = x2.astype(np.float64)
    mean = shifted_mean(x, (1,))
    centered = x - mean[:, None]
    rstd = invstd_of((centered * centered).mean(axis=1), eps)
    y = centered * rstd[:, None] * weight.astype(np.float64) + bias.astype(np.float64)
    return y.astype(x2.dtype), mean.astype(sd), rstd.astype(sd)


@np.errstate(invalid="ignore", divide="ignore", over="ignore")
def layer_norm_backward(dy2, x2, mean, rstd, weight):
    """Gradients of :func:`layer_norm_forward`."""
    sd = stats_dtype(x2.dtype)
    rs = rstd.astype(np.float64)[:, None]
    xhat = (x2.astype(np.float64) - mean.astype(np.float64)[:, None]) * rs
    dy = dy2.astype(np.float64)
    g = dy * weight.astype(np.float64)
    dx = rs * (g - g.mean(axis=1, keepdims=True) - xhat * (g * xhat).mean(axis=1, keepdims=True))
    return dx.astype(x2.dtype), (dy * xhat).sum(axis=0).astype(sd), dy.sum(axis=0).astype(sd)


@np.errstate(invalid="ignore", divide="ignore", over="ignore")
def rms_norm_forward(x2, weight, eps):
    """RMS norm of each row (see the CPU backend's function of the same name)."""
    sd = stats_dtype(x2.dtype)
    x = x2.astype(np.float64)
    rstd = invstd_of((x * x).mean(axis=1), eps)
    y = x * rstd[:, None] * weight.astype(np.float64)
    return y.astype(x2.dtype), rstd.astype(sd)


@np.errstate(invalid="ignore", divide="ignore", over="ignore")
def rms_norm_backward(dy2, x2, rstd, weight):
    """Gradients of :func:`rms_norm_forward`."""
    sd = stats_dtype(x2.dtype)
    rs = rstd.astype(np.float64)[:, None]
    x = x2.astype(np.float64)
    dy = dy2.astype(np.float64)
    g = dy * weight.astype(np.float64)
    dx = rs * g - x * rs**3 * (g * x).mean(axis=1, keepdims=True)
    return dx.astype(x2.dtype), (dy * x * rs).sum(axis=0).astype(sd)
