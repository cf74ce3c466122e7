"""Backend registry: which kernels run a given array.

Every backend is a module exposing the same small set of functions. They work on the
*canonical* form of the data and never validate: the pipeline behind the public API
(:func:`fastbn._pipeline.run`) validates once, canonicalizes, and calls them.

Backend contract
----------------
``x3`` and ``dy3`` are C-contiguous 3-d arrays of shape ``(A, C, B)``: ``A`` is the
product of the axes before the feature axis (in memory order), ``C`` the number of
features, ``B`` the product of the axes after it. ``B > 1`` is the *channels-first*
family (each channel is ``A`` runs of ``B`` contiguous values), ``B == 1`` the
*channels-last* family (rows of ``C`` contiguous values). ``A * B >= 1`` always: the
public API handles empty batches itself. ``weight`` and ``bias`` are never ``None``
(the API passes ones and zeros), are 1-d, contiguous, length ``C`` and of dtype
``stats_dtype(x3.dtype)``; so are ``mean``, ``var`` and ``invstd``.

``name`` : str
    The backend's name, as accepted by ``backend=``.
``xp`` : module
    The array namespace of the arrays it takes and returns (numpy, cupy).
``available() -> (bool, str)``
    Whether the backend can run here, and if not, why.
``dtypes`` : tuple of numpy dtypes
    The input dtypes it supports. A backend that lists float16 takes ``ml_dtypes.bfloat16``
    too (the API accepts bfloat16 wherever it accepts float16); bfloat16 is not listed, so
    that no module imports ml_dtypes before a bfloat16 array exists (:func:`bfloat16_dtype`).
    bfloat16 data arrive as bfloat16 arrays (``x3.view(numpy.uint16)`` gives their bits).
``stats_dtype(dtype) -> numpy.dtype``
    dtype of the statistics, weight, bias and running stats for input ``dtype``
    (float16 and bfloat16 -> float32, otherwise ``dtype``).
``forward_train(x3, weight, bias, eps) -> (y3, mean, var, invstd)``
    Batch statistics over axes 0 and 2 (``var`` is the *biased* variance),
    ``invstd = 1 / sqrt(var + eps)`` (0 where ``var + eps == 0``), and
    ``y3 = (x3 - mean) * invstd * weight + bias`` in ``x3.dtype``. A constant channel has
    ``mean`` its value and ``var`` exactly 0; infinities give the mean a sum of the values
    gives (+-inf, NaN for both signs) and a NaN ``var`` (see docs/numerics.md).
``forward_eval(x3, mean, var, weight, bias, eps) -> y3``
    Normalize with given statistics (the running ones).
``backward(dy3, x3, mean, invstd, weight) -> (dx3, dweight, dbias)``
    Gradient of the training-mode forward: with ``xhat = (x - mean) * invstd`` and
    ``M = A * B``: ``dbias = sum(dy)``, ``dweight = sum(dy * xhat)``,
    ``dx = weight * invstd / M * (M * dy - dbias - xhat * dweight)``.
``backward_eval(dy3, x3, mean, var, weight, eps) -> (dx3, dweight, dbias)`` (optional)
    Gradient of ``forward_eval`` (constant statistics): with
    ``invstd = 1 / sqrt(var + eps)`` (0 where ``var + eps == 0``, as in the forward),
    ``dbias = sum(dy)``, ``dweight = sum(dy * (x - mean) * invstd)``,
    ``dx = dy * weight * invstd``. Callers without it compose it from the others.
``layer_norm_forward(x2, weight, bias, eps) -> (y2, mean, rstd)`` (optional)
    Layer norm of each row of the C-contiguous ``(R, N)`` array ``x2`` (``R, N >= 1``):
    ``y2 = (x2 - mean) * rstd * weight + bias`` with the row's mean and
    ``rstd = 1 / sqrt(var + eps)`` (biased variance; 0 where ``var + eps == 0``);
    ``weight`` and ``bias`` have length ``N``, ``mean`` and ``rstd`` length ``R``.
``layer_norm_backward(dy2, x2, mean, rstd, weight) -> (dx2, dweight, dbias)`` (optional)
    Its gradients; ``dweight``, ``dbias`` of length ``N``.
``rms_norm_forward(x2, weight, eps) -> (y2, rstd)``, ``rms_norm_backward(dy2, x2, rstd, weight) -> (dx2, dweight)`` (optional)
    Likewise for RMS norm: ``rstd = 1 / sqrt(mean(x2**2) + eps)``, ``y2 = x2 * rstd * weight``.
    A backend without these functions has no row normalizations: the API raises a
    ``TypeError`` naming the backend (:func:`fastbn._pipeline.kernel`).
``update_running_stats(running_mean, running_var, mean, var, momentum, M)`` (optional)
    torch's running-statistics update in place, called by the API after ``forward_train``
    succeeded: ``r = (1 - momentum) * r + momentum * stat`` with the unbiased variance
    ``var * M / (M - 1)``. The running statistics are float32 or float64 in native byte
    order and need not be contiguous; the API updates others (float16, bfloat16, non-native
    byte order), and those of backends without this function, itself: in float64, rounded once.
``forward_train_update(x3, weight, bias, eps, running_mean, running_var, momentum)`` (optional)
    ``forward_train`` followed by that update, in one call (saves a dispatch on small
    tensors); returns what ``forward_train`` returns. Used by the API when present, for
    running statistics as ``update_running_stats`` takes them.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import numpy as np

__all__ = ["BACKEND_MODULES", "available_backends", "get_backend", "backend_for", "backend_report",
           "bfloat16_dtype", "is_bfloat16", "stats_dtype"]

_F32 = np.dtype(np.float32)
_bf16: list = []  # the bfloat16 dtype, once ml_dtypes has been imported


def bfloat16_dtype():
    """The NumPy dtype of ``ml_dtypes.bfloat16``, if ml_dtypes has been imported.

    Never imports ml_dtypes (importing it takes about a second): a bfloat16 array cannot
    exist before it is imported, so until then no dtype is bfloat16.

    Returns
    -------
    numpy.dtype or None
        ``numpy.dtype(ml_dtypes.bfloat16)``, or None while ml_dtypes is not imported.
    """
    if _bf16:
        return _bf16[0]
    t = getattr(sys.modules.get("ml_dtypes"), "bfloat16", None)
    if t is None:
        return None
    _bf16.append(np.dtype(t))
    return _bf16[0]


def is_bfloat16(dtype) -> bool:
    """Whether `dtype` is ``ml_dtypes.bfloat16`` in native byte order.

    Parameters
    ----------
    dtype : numpy.dtype
        Any dtype (kind ``"V"`` for ml_dtypes' types; ml_dtypes' ``uint1`` shares bfloat16's
        type character ``"E"``, so the character alone does not identify it).

    Returns
    -------
    bool
    """
    if dtype.kind != "V":
        return False
    bf = bfloat16_dtype()
    return bf is not None and dtype == bf


def stats_dtype(dtype) -> np.dtype:
    """dtype of the statistics, parameters and running stats for input `dtype`.

    Every backend uses this rule (and re-exports it as its own ``stats_dtype``): float16 and
    bfloat16 data keep float32 statistics, as in torch's mixed precision; other dtypes keep
    their own.

    Parameters
    ----------
    dtype : numpy dtype-like
        The input's dtype.

    Returns
    -------
    numpy.dtype
        float32 for float16 and bfloat16 input, otherwise `dtype`.
    """
    dtype = np.dtype(dtype)
    return _F32 if dtype == np.float16 or is_bfloat16(dtype) else dtype

#: backend name -> module path. Modules are imported only when first needed.
BACKEND_MODULES = {
    "cpu": "fastbn.backends.cpu",
    "reference": "fastbn.backends.reference",
    "cupy": "fastbn.backends.cupy_raw",
    "numba-cuda": "fastbn.backends.numba_cuda",
}

#: the default backend for arrays of each library, by the top-level module of the type.
DEFAULT_FOR_LIBRARY = {
    "numpy": "cpu",
    "cupy": "cupy",
}

_loaded: dict[str, ModuleType] = {}
_failed: dict[str, str] = {}


def _load(name: str) -> ModuleType:
    if name in _loaded:
        return _loaded[name]
    if name in _failed:
        raise RuntimeError(f"backend {name!r} is not usable here: {_failed[name]}")
    try:
        mod = importlib.import_module(BACKEND_MODULES[name])
        ok, why = mod.available()
    except Exception as exc:  # noqa: BLE001 - a broken optional dependency must not break fastbn
        ok, why = False, f"{type(exc).__name__}: {exc}"
    if not ok:
        _failed[name] = why
        raise RuntimeError(f"backend {name!r} is not usable here: {why}")
    _loaded[name] = mod
    return mod


def get_backend(name: str) -> ModuleType:
    """Return the backend module called `name`.

    Parameters
    ----------
    name : str
        One of ``"cpu"``, ``"reference"``, ``"cupy"``, ``"numba-cuda"``.

    Returns
    -------
    module
        The backend module (see the module docstring for its contract).

    Raises
    ------
    ValueError
        If `name` is not a known backend.
    RuntimeError
        If the backend is known but cannot run on this machine; the message says why.
    """
    if not isinstance(name, str) or name not in BACKEND_MODULES:
        raise ValueError(f"backend must be one of {sorted(BACKEND_MODULES)} or None, got {name!r}")
    return _load(name)


def backend_report() -> dict[str, str]:
    """Return ``{backend name: "ok" or the reason it is unusable}`` for every backend."""
    report = {}
    for name in BACKEND_MODULES:
        try:
            _load(name)
            report[name] = "ok"
        except RuntimeError:
            report[name] = _failed[name]
    return report


def available_backends() -> list[str]:
    """Return the names of the backends usable on this machine, e.g. ``["cpu", "reference"]``."""
    return [name for name, state in backend_report().items() if state == "ok"]


def library_of(obj) -> str:
    """Top-level module name of ``type(obj)``, e.g. ``"numpy"`` or ``"cupy"``."""
    return type(obj).__module__.partition(".")[0]


def backend_for(library: str) -> ModuleType:
    """Default backend module for arrays of `library` (``"numpy"``, ``"cupy"``)."""
    name = DEFAULT_FOR_LIBRARY[library]
    if library == "cupy":
        # The faster GPU backend is the default (measured: see bench/results); fall back
        # to the other one if it is not usable here.
        for candidate in (name, "numba-cuda"):
            try:
                return _load(candidate)
            except RuntimeError:
                continue
    return _load(name)



class _CallableModule(ModuleType):
    """This package, callable: ``fastbn.backends()`` is :func:`available_backends`."""

    def __call__(self) -> list[str]:
        """Return the names of the backends usable on this machine."""
        return available_backends()


sys.modules[__name__].__class__ = _CallableModule
