"""PyTorch embedding: fastbn's kernels as drop-in PyTorch batch-norm modules and function.

Importing this module imports PyTorch (an optional dependency: ``pip install
"fastbn[torch]"``); ``import fastbn`` alone never does.

Contents, in reading order:

1. Errors and argument checks with torch 2.13's rules, order and messages.
2. The bridge between tensors and the arrays fastbn's backends take: CPU tensors are
   viewed as NumPy arrays (``Tensor.numpy``, zero-copy), CUDA tensors as CuPy arrays
   (DLPack, on torch's current stream); bfloat16 goes through ``ml_dtypes.bfloat16``. A
   tensor whose memory is a permutation of a contiguous block (``channels_last``,
   ``channels_last_3d``, a transposed 2-d batch) is handed over as that block with the
   matching feature axis; other strided tensors are copied once.
3. The kernels' entry points for tensors (``_train``, ``_eval``, ``_backward``): they
   call the backend functions of :mod:`fastbn.backends` directly (the torch layer has
   validated) and return *fresh* tensors (never views) in the input's memory format.
4. Autograd in eager mode: :class:`torch.autograd.Function` subclasses with a backward
   that runs fastbn's backward kernel, a forward-mode (``jvp``) formula and a ``vmap``
   rule, so ``torch.func`` (``grad``, ``jacrev``, ``jacfwd``, ``jvp``, ``vmap``,
   ``hessian``) and ``torch.autograd.forward_ad`` work. When the backward itself must be
   differentiable (``create_graph=True``, gradient penalties, ``gradgradcheck``) or runs
   under a ``torch.func`` transform, it is computed from torch operations instead, whose
   own derivatives give the higher orders.
5. ``torch.compile``: three functional custom operators in the ``fastbn`` namespace
   (``torch.ops.fastbn.batch_norm_train``, ``batch_norm_eval``, ``batch_norm_backward``)
   with fake implementations and autograd formulas, which Dynamo traces as single graph
   nodes (a Python ``autograd.Function`` with a custom ``jvp`` would break the graph).
6. :func:`batch_norm`, the drop-in for :func:`torch.nn.functional.batch_norm`;
   :class:`BatchNorm1d`/``2d``/``3d`` and :func:`convert`; integration with
   ``torch.fx`` (the modules are leaves), ``torch.ao.quantization.fuse_modules`` and
   TorchScript.

Requires PyTorch >= 2.4 (``torch.library.custom_op``).
"""

import functools
import math
import numbers
import warnings
import weakref as _weakref
from typing import Optional

import numpy as np
import torch
from torch import Tensor
from torch.autograd import forward_ad as _fwad
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _validation
from . import backends as _backends
from . import _pipeline
from . import batchnorm as _bn
from ._layout import restore as _restore

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormError", "BatchNormTypeError",
           "LayerNorm", "RMSNorm", "batch_norm", "convert", "layer_norm", "rms_norm"]

_REDUCED = (torch.float16, torch.bfloat16)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SUPPORTED_DEVICES = ("cpu", "cuda")


# ---------------------------------------------------------------------------------------
# 1. Errors and checks
# ---------------------------------------------------------------------------------------
class BatchNormError(ValueError, RuntimeError):
    """A bad argument value or shape for fastbn.torch's batch norm.

    Derives from both :class:`ValueError` (fastbn's convention) and :class:`RuntimeError`
    (what ``torch.nn.functional.batch_norm`` raises for the same mistakes), so code
    written for either catches it.
    """


class BatchNormTypeError(TypeError, RuntimeError):
    """A bad dtype for fastbn.torch's batch norm: a :class:`TypeError` that is also the
    :class:`RuntimeError` torch raises for mixed or unsupported dtypes."""


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the statistics for input `dtype` (float16, bfloat16 -> float32): fastbn's
    one rule, :func:`fastbn.backends.stats_dtype`, translated once per dtype."""
    sd = _STATS_DTYPE.get(dtype)
    if sd is None:
        numpy_of = {torch.float16: np.float16, torch.float32: np.float32,
                    torch.float64: np.float64}
        if dtype is torch.bfloat16:  # ml_dtypes is imported only when bfloat16 shows up
            numpy_of[dtype] = _np_bfloat16()
        if dtype not in numpy_of:
            return dtype  # not a dtype fastbn computes in (rejected by the checks)
        torch_of = {np.dtype(v): k for k, v in numpy_of.items()}
        sd = _STATS_DTYPE[dtype] = torch_of[_backends.stats_dtype(np.dtype(numpy_of[dtype]))]
    return sd


_STATS_DTYPE: dict = {}


def _check_tensor_arg(name: str, t, device: torch.device, c: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.layout is not torch.strided:
        raise TypeError(f"{name} has layout {t.layout}; fastbn takes dense (strided) tensors")
    if t.device != device:
        raise BatchNormError(
            f"{name} is on device {t.device} but input is on {device}: "
            "all tensors must be on the same device"
        )
    if t.dim() != 1 or t.shape[0] != c:
        # torch's message for the same mistake
        raise BatchNormError(f"{name} should contain {c} elements not {t.numel()}"
                             if t.dim() == 1 else
                             f"{name} must have shape ({c},), got {tuple(t.shape)}")


def _check(input, running_mean, running_var, weight, bias, training, momentum, eps) -> None:
    """torch 2.13's checks of ``F.batch_norm`` in its order: batch size, eps, then the
    tensors' devices, shapes and dtypes."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if type(training) is not bool:
        training = _validation.check_bool("training", training)
    if type(eps) is not float and (isinstance(eps, bool) or not isinstance(eps, numbers.Real)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if type(momentum) is not float and (
            isinstance(momentum, bool) or not isinstance(momentum, numbers.Real)):
        raise TypeError(f"momentum must be a float, got {type(momentum).__name__}")
    shape = input.shape
    if training and input.dim() >= 1 and shape[0] * math.prod(shape[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.size()}"
        )
    if training and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if input.layout != torch.strided:
        raise TypeError(
            f"input has layout {input.layout}; fastbn takes dense (strided) tensors: "
            "convert it with input.to_dense()"
        )
    if input.device.type not in _SUPPORTED_DEVICES:
        raise BatchNormError(
            f"input is on device {input.device}: fastbn has kernels for 'cpu' and 'cuda' tensors only"
        )
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if not training and running_mean is None:
        raise BatchNormError("running_mean must be defined in evaluation mode")
    if input.numel() == 0:
        return  # as torch: an empty batch is returned without further checks
    if input.dim() < 2:
        raise BatchNormError(
            f"input must have at least 2 dimensions (N, C, ...), got shape {tuple(input.shape)}"
        )
    if input.dtype not in _SUPPORTED_DTYPES:
        raise BatchNormTypeError(
            "input must have dtype torch.float16, torch.bfloat16, torch.float32 or "
            f"torch.float64, got {input.dtype}"
        )
    c = shape[1]
    device = input.device
    dtypes = set()
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None:
            _check_tensor_arg(name, t, device, c)
            dtypes.add(t.dtype)
    # torch's CPU rule: parameters and statistics share one dtype, the input's, or float32
    # for float16/bfloat16 input
    if len(dtypes) > 1 or not (not dtypes or input.dtype in dtypes
                               or (input.dtype in _REDUCED and torch.float32 in dtypes)):
        allowed = (input.dtype, torch.float32) if input.dtype in _REDUCED else (input.dtype,)
        names = " or ".join(str(d) for d in allowed)
        raise BatchNormTypeError(
            f"weight, bias, running_mean and running_var must all have one dtype, {names}, "
            f"for {input.dtype} input; got {', '.join(sorted(str(d) for d in dtypes))}"
        )
    if torch.is_grad_enabled() and running_mean is not None and (
            running_mean.requires_grad or running_var.requires_grad):
        raise BatchNormError(
            "batch norm is not differentiable with respect to running_mean and running_var: "
            "they cannot have requires_grad=True"
        )


# ---------------------------------------------------------------------------------------
# 2. Tensors <-> backend arrays
# ---------------------------------------------------------------------------------------
_CHANNELS_LAST = {4: (torch.channels_last, (0, 2, 3, 1)),
                  5: (torch.channels_last_3d, (0, 2, 3, 4, 1))}


def _memory_perm(x: Tensor):
    """Dimension order of `x` from outermost to innermost in memory, or None for the
    contiguous order.

    Sorting the dimensions by decreasing stride (ties broken by position) gives the
    permutation ``p`` for which ``x.permute(p)`` is contiguous whenever `x` is dense and
    non-overlapping: NCHW gives None, ``channels_last`` NCHW gives (0, 2, 3, 1).
    """
    if x.is_contiguous():
        return None
    cl = _CHANNELS_LAST.get(x.dim())
    if cl is not None and x.is_contiguous(memory_format=cl[0]):
        return cl[1]
    strides = x.stride()
    return tuple(sorted(range(x.dim()), key=lambda d: (-strides[d], d)))


def _layout_strides(shape, perm):
    """Strides of a tensor of `shape` stored densely in the dimension order `perm`."""
    if perm is None:
        perm = range(len(shape))
    strides = [0] * len(shape)
    step = 1
    for d in reversed(perm):
        strides[d] = step
        step *= max(shape[d], 1)
    return strides


_bfloat16 = None


def _np_bfloat16():
    global _bfloat16
    if _bfloat16 is None:
        try:
            import ml_dtypes
        except ImportError as exc:  # pragma: no cover - ml_dtypes is a dependency
            raise BatchNormTypeError("bfloat16 tensors need the ml_dtypes package") from exc
        _bfloat16 = np.dtype(ml_dtypes.bfloat16)
    return _bfloat16


def _np_view(t: Tensor) -> np.ndarray:
    """A NumPy view of the CPU tensor `t` (same memory, strides and offset)."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype is torch.bfloat16:
        return t.view(torch.int16).numpy().view(_np_bfloat16())
    return t.numpy()


# NumPy views of the 1-d CPU tensors (parameters, running statistics) passed to the
# kernels, by id(tensor): a module passes the same tensors at every call, and making a view
# costs more than checking that a cached one still describes the tensor (the same live
# object, data pointer, shape and dtype, contiguous: then the view is the same memory).
_views: dict = {}
_VIEWS_MAX = 4096


def _cpu_view(t: Tensor) -> np.ndarray:
    """:func:`_np_view` of a 1-d CPU tensor, cached for contiguous ones."""
    key = id(t)
    e = _views.get(key)
    if (e is not None and e[0]() is t and e[1] == t.data_ptr() and e[2] == t.shape
            and e[3] is t.dtype and t.is_contiguous()):
        return e[4]
    a = _np_view(t)
    if t.is_contiguous():
        if len(_views) >= _VIEWS_MAX:
            _views.clear()
        # the entry goes when the tensor dies (its id can be reused only after that); the
        # callback holds the dict itself, not a module global, so it also works at exit
        _views[key] = (_weakref.ref(t, lambda _ref, pop=_views.pop, key=key: pop(key, None)),
                       t.data_ptr(), t.shape, t.dtype, a)
    return a


def _np_tensor(a: np.ndarray) -> Tensor:
    """A tensor owning (a reference to) the NumPy array `a`: fresh, not a view."""
    if a.dtype.char == "E":  # ml_dtypes.bfloat16 (no other dtype reaches here with it)
        t = torch.from_numpy(a.view(np.int16))
        return torch.empty((0,), dtype=torch.bfloat16).set_(
            t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
    return torch.from_numpy(a)


class _CPU:
    """Bridge for CPU tensors: NumPy views both ways."""

    lib = "numpy"
    view = staticmethod(_np_view)
    tensor = staticmethod(_np_tensor)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_CPU_BRIDGE = _CPU()


class _CUDA:
    """Bridge for CUDA tensors: CuPy views through DLPack, on torch's current stream.

    CuPy's current device and stream are set to torch's for the duration, so fastbn's
    kernels are queued behind the work that produced the input and no synchronization is
    needed.
    """

    lib = "cupy"

    def __init__(self, device: torch.device):
        try:
            import cupy
        except ImportError as exc:  # pragma: no cover - needs a CUDA machine without cupy
            raise RuntimeError(
                "fastbn needs CuPy for CUDA tensors: pip install 'fastbn[cuda12]' or "
                "'fastbn[cuda13]'"
            ) from exc
        self.cupy = cupy
        index = device.index if device.index is not None else torch.cuda.current_device()
        ptr = torch.cuda.current_stream(index).cuda_stream
        # torch reports its default (legacy) stream as pointer 0, CuPy's null stream
        stream = cupy.cuda.Stream.null if ptr == 0 else cupy.cuda.ExternalStream(ptr, index)
        self._device, self._stream = cupy.cuda.Device(index), stream

    def __enter__(self):
        self._device.__enter__()
        self._stream.__enter__()
        return self

    def __exit__(self, *exc):
        self._stream.__exit__(*exc)
        self._device.__exit__(*exc)
        return False

    def view(self, t: Tensor):
        t = t.detach()
        if t.dtype == torch.bfloat16:
            return self.cupy.from_dlpack(t.view(torch.int16)).view(_np_bfloat16())
        # cupy.from_dlpack passes CuPy's current stream (= torch's) to __dlpack__
        return self.cupy.from_dlpack(t)

    def tensor(self, a) -> Tensor:
        if a.dtype.kind == "V" and a.dtype.itemsize == 2:
            t = torch.from_dlpack(a.view(np.int16))
            return torch.empty((0,), dtype=torch.bfloat16, device=t.device).set_(
                t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
        return torch.from_dlpack(a)


def _bridge(t: Tensor):
    """The bridge for tensors on the device of `t`."""
    return _CPU_BRIDGE if t.is_cpu else _CUDA(t.device)


def _canonical(br, x: Tensor):
    """``(x3, perm, shape)``: the ``(A, C, B)`` array view of `x` (see fastbn.backends),
    the memory order of `x` (None: contiguous) and the shape of ``x.permute(perm)``."""
    if x.is_contiguous():  # the common case, without the general path's arithmetic
        shape = x.shape
        return br.view(x).reshape(shape[0], shape[1], -1), None, shape
    perm = _memory_perm(x)
    if perm is not None and not x.permute(perm).is_contiguous():
        x, perm = x.contiguous(), None  # not a permutation of a dense block: copy once
    a = br.view(x)
    if perm is None:
        pos = 1
    else:
        a = a.transpose(perm)
        pos = perm.index(1)
    shape = a.shape
    return a.reshape(math.prod(shape[:pos]), shape[pos], math.prod(shape[pos + 1:])), perm, shape


def _same_layout(br, t: Tensor, perm, shape3):
    """`t` (shaped like the input) as a contiguous array in the input's canonical order."""
    if perm is None and t.is_contiguous():
        return br.view(t).reshape(shape3)
    a = br.view(t)
    if perm is not None:
        a = a.transpose(perm)
    xp = np if br.lib == "numpy" else br.cupy
    return xp.ascontiguousarray(a).reshape(shape3)


def _vector(br, t: Tensor):
    """The array view of the 1-d tensor `t` (same memory: written in place where `t` is a
    running statistic)."""
    return _cpu_view(t) if br is _CPU_BRIDGE else br.view(t)


def _param_array(br, t: Optional[Tensor], sd: torch.dtype):  # noqa: UP045
    """`t` as a contiguous 1-d array of the statistics dtype (no copy when it is one)."""
    if t is None:
        return None
    if t.dtype is not sd:
        t = t.detach().to(sd)
    if not t.is_contiguous():
        t = t.contiguous()
    return _vector(br, t)


def _kernel_vector(br, t: Optional[Tensor], default: float, sdt: torch.dtype, c: int, be, sd):  # noqa: UP045
    """`t` as the kernels take a per-feature array (`default`s for None; see
    :func:`fastbn._pipeline.param`)."""
    return _pipeline.param(_param_array(br, t, sdt), default, c, be, sd)


def _backend(br):
    return _pipeline.select_backend(br.lib, None)


# ---------------------------------------------------------------------------------------
# 3. Kernel entry points for tensors (no autograd; inputs validated by _check)
# ---------------------------------------------------------------------------------------
def _train(input, weight, bias, running_mean, running_var, momentum, eps):
    """Training forward: ``(y, mean, invstd)``; the running statistics (if any) are
    updated in place, last."""
    sdt = _stats_dtype(input.dtype)
    with _bridge(input) as br:
        be = _backend(br)
        x3, perm, shape = _canonical(br, input)
        rm = None if running_mean is None else _vector(br, running_mean)
        rv = None if running_var is None else _vector(br, running_var)
        c, sd = x3.shape[1], _pipeline.stats_dtype(be, x3.dtype)
        y3, mean, invstd = _bn.forward_train3(
            be, x3, _kernel_vector(br, weight, 1.0, sdt, c, be, sd),
            _kernel_vector(br, bias, 0.0, sdt, c, be, sd), eps, rm, rv, momentum)
        out = br.tensor(_restore(y3, perm, shape)), br.tensor(mean), br.tensor(invstd)
    if running_mean is not None:  # written behind torch's back: tell autograd
        torch.autograd.graph.increment_version((running_mean, running_var))
    return out


def _eval(input, running_mean, running_var, weight, bias, eps):
    """Evaluation forward with the given statistics."""
    sdt = _stats_dtype(input.dtype)
    with _bridge(input) as br:
        be = _backend(br)
        x3, perm, shape = _canonical(br, input)
        c, sd = x3.shape[1], _pipeline.stats_dtype(be, x3.dtype)
        y3 = be.forward_eval(
            x3, _kernel_vector(br, running_mean, 0.0, sdt, c, be, sd),
            _kernel_vector(br, running_var, 1.0, sdt, c, be, sd),
            _kernel_vector(br, weight, 1.0, sdt, c, be, sd),
            _kernel_vector(br, bias, 0.0, sdt, c, be, sd), eps)
        return br.tensor(_restore(y3, perm, shape))


def _backward(grad_output, input, mean, invstd, weight, need_input=True):
    """Gradient of the training forward: ``(grad_input, grad_weight, grad_bias)``, the last
    two in the statistics dtype (computed also when `weight` is None)."""
    sdt = _stats_dtype(input.dtype)
    if grad_output.dtype != input.dtype:
        grad_output = grad_output.to(input.dtype)
    with _bridge(input) as br:
        be = _backend(br)
        x3, perm, shape = _canonical(br, input)
        c = x3.shape[1]
        dy3 = _same_layout(br, grad_output, perm, x3.shape)
        sd = _pipeline.stats_dtype(be, x3.dtype)
        dx3, dw, db = be.backward(
            dy3, x3, _param_array(br, mean, sdt), _param_array(br, invstd, sdt),
            _kernel_vector(br, weight, 1.0, sdt, c, be, sd))
        return br.tensor(_restore(dx3, perm, shape)), br.tensor(dw), br.tensor(db)


def _eval_backward(grad_output, input, running_mean, running_var, weight, eps, needs):
    """Gradients of the evaluation forward (constant statistics)."""
    sdt = _stats_dtype(input.dtype)
    if grad_output.dtype != input.dtype:
        grad_output = grad_output.to(input.dtype)
    with _bridge(input) as br:
        be = _backend(br)
        x3, perm, shape = _canonical(br, input)
        c, sd = x3.shape[1], _pipeline.stats_dtype(be, x3.dtype)
        dx3, dw, db = _bn.backward_eval3(
            be, _same_layout(br, grad_output, perm, x3.shape), x3,
            _kernel_vector(br, running_mean, 0.0, sdt, c, be, sd),
            _kernel_vector(br, running_var, 1.0, sdt, c, be, sd),
            _kernel_vector(br, weight, 1.0, sdt, c, be, sd), eps)
        return (br.tensor(_restore(dx3, perm, shape)) if needs[0] else None,
                br.tensor(dw), br.tensor(db))


def _empty(input, weight, bias):
    """torch's result for an empty batch: the input, scaled and shifted (zero gradients)."""
    out = input.clone()
    if input.dim() >= 2:
        view = [1] * input.dim()
        view[1] = input.shape[1]
        if weight is not None:
            out = out * weight.view(view)
        if bias is not None:
            out = out + bias.view(view)
    return out


# ---------------------------------------------------------------------------------------
# 4. Autograd in eager mode
# ---------------------------------------------------------------------------------------
def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """A per-channel vector shaped to broadcast against `x` along dimension 1."""
    view = [1] * x.dim()
    view[1] = -1
    return t.reshape(view)


def _composite_train_backward(grad_y, x, weight, eps, needs):
    """The training backward in torch operations, statistics recomputed from `x`: its own
    derivatives (autograd's) give the double backward, and it runs under ``torch.func``."""
    sdt = _stats_dtype(x.dtype)
    dims = _reduce_dims(x)
    xs, g = x.to(sdt), grad_y.to(sdt)
    mean = xs.mean(dims, keepdim=True)
    xc = xs - mean
    invstd = torch.rsqrt((xc * xc).mean(dims, keepdim=True) + eps)
    xhat = xc * invstd
    dx = dw = db = None
    if needs[0]:
        scale = invstd if weight is None else invstd * _per_channel(weight.to(sdt), x)
        dx = (scale * (g - g.mean(dims, keepdim=True)
                       - xhat * (g * xhat).mean(dims, keepdim=True))).to(x.dtype)
    if needs[1]:
        dw = (g * xhat).sum(dims)
    if needs[2]:
        db = g.sum(dims)
    return dx, dw, db


def _composite_eval_backward(grad_y, x, running_mean, running_var, weight, eps, needs):
    sdt = _stats_dtype(x.dtype)
    dims = _reduce_dims(x)
    g = grad_y.to(sdt)
    invstd = _per_channel(torch.rsqrt(running_var.detach().to(sdt) + eps), x)
    dx = dw = db = None
    if needs[0]:
        scale = invstd if weight is None else invstd * _per_channel(weight.to(sdt), x)
        dx = (g * scale).to(x.dtype)
    if needs[1]:
        xhat = (x.to(sdt) - _per_channel(running_mean.detach().to(sdt), x)) * invstd
        dw = (g * xhat).sum(dims)
    if needs[2]:
        db = g.sum(dims)
    return dx, dw, db


def _higher_order(grad: Tensor) -> bool:
    """Whether a backward must itself be differentiable, or runs under torch.func or on
    batched gradients (``autograd.grad(..., is_grads_batched=True)``), where the kernels
    cannot see the data."""
    ft = torch._C._functorch
    return (torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()
            or ft.is_batchedtensor(grad) or ft.is_legacy_batchedtensor(grad)
            or ft.is_functorch_wrapped_tensor(grad))


def _cast(g: Tensor | None, like: Tensor | None) -> Tensor | None:
    return None if g is None or like is None else g.to(like.dtype)


def _fold_batch(info, in_dims, x, params, stats, *, training):
    """vmap rule helper: a batch of B independent batch norms over C channels is one batch
    norm over B*C channels. Returns ``(x', params', stats', unfold_stats)``: `x` moved
    to ``(N, B*C, ...)``, per-channel tensors to length B*C (unbatched ones repeated), and a
    callable that writes updated folded running statistics back."""
    b = info.batch_size
    x = x.movedim(in_dims[0], 0) if in_dims[0] is not None else x.expand(b, *x.shape)
    n, c = x.shape[1], x.shape[2]
    xf = x.movedim(0, 1).reshape(n, b * c, *x.shape[3:])

    def fold(t, d):
        if t is None:
            return None
        return t.repeat(b) if d is None else t.movedim(d, 0).reshape(b * c)

    p = [fold(t, d) for t, d in zip(params, in_dims[1:1 + len(params)])]
    sdims = in_dims[1 + len(params):1 + len(params) + len(stats)]
    if training and stats[0] is not None and (sdims[0] is None or sdims[1] is None):
        raise BatchNormError(
            "vmap: batch norm got a batched input while running_mean/running_var, which it "
            "updates in place, are not batched; batch them too, or use "
            "track_running_stats=False (torch.func.replace_all_batch_norm_modules_)"
        )
    s = [None if t is None else fold(t, d).contiguous() for t, d in zip(stats, sdims)]

    def write_back():
        for t, d, f in zip(stats, sdims, s):
            if t is not None and d is not None:
                t.movedim(d, 0).copy_(f.view(b, c))

    return xf, p, s, write_back


def _unfold_output(y: Tensor, b: int) -> Tensor:
    """``(N, B*C, ...)`` back to ``(B, N, C, ...)``."""
    n, bc = y.shape[0], y.shape[1]
    return y.reshape(n, b, bc // b, *y.shape[2:]).movedim(1, 0)


def _with_affine_tangent(ty, xhat, t_weight, t_bias, input):
    """The output tangent ``ty + xhat * t_weight + t_bias`` (per channel) in `input`'s dtype,
    for the tangents that are given (`ty` None: no input tangent; all None: zeros).
    `xhat` is a callable, evaluated only when `t_weight` is given."""
    sdt = _stats_dtype(input.dtype)
    if t_weight is not None:
        term = xhat() * _per_channel(t_weight.to(sdt), input)
        ty = term if ty is None else ty + term
    if t_bias is not None:
        term = _per_channel(t_bias.to(sdt), input).expand(input.shape)
        ty = term if ty is None else ty + term
    return torch.zeros_like(input) if ty is None else ty.to(input.dtype)


class _EagerFunction(torch.autograd.Function):
    """Base of the eager Functions: :meth:`apply` without the signature binding that
    ``torch.autograd.Function.apply`` does for ``setup_context`` Functions (it costs
    ~30 us per call; every argument here is passed positionally, so it binds nothing)."""

    @classmethod
    def apply(cls, *args):
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*args)  # the C implementation


class _TrainFn(_EagerFunction):
    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, momentum, eps):
        return _train(input, weight, bias, running_mean, running_var, momentum, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, _rm, _rv, _momentum, eps = inputs
        _y, mean, invstd = output
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.save_for_forward(input, weight, mean, invstd)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, invstd)

    @staticmethod
    def backward(ctx, grad_y, _g_mean, _g_invstd):
        input, weight, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if not any(needs):
            return None, None, None, None, None, None, None
        if _higher_order(grad_y):
            dx, dw, db = _composite_train_backward(grad_y, input, weight, ctx.eps, needs)
        else:
            dx, dw, db = _backward(grad_y, input, mean, invstd, weight)
        return (dx if needs[0] else None, _cast(dw, weight) if needs[1] else None,
                db.to(ctx.bias_dtype) if needs[2] and ctx.has_bias else None,
                None, None, None, None)

    @staticmethod
    def jvp(ctx, t_input, t_weight, t_bias, _t_rm, _t_rv, _t_momentum, _t_eps):
        # With xhat = (x - mean) * invstd over M values per channel:
        #   d xhat = invstd * (t - mean(t) - xhat * mean(xhat * t)),
        #   d y = weight * d xhat + xhat * d weight + d bias.
        input, weight, mean, invstd = ctx.saved_tensors
        sdt = _stats_dtype(input.dtype)
        dims = _reduce_dims(input)
        inv = _per_channel(invstd, input)
        xhat = (input.to(sdt) - _per_channel(mean, input)) * inv
        ty = None
        if t_input is not None:
            t = t_input.to(sdt)
            dxhat = inv * (t - t.mean(dims, keepdim=True)
                           - xhat * (xhat * t).mean(dims, keepdim=True))
            ty = dxhat if weight is None else dxhat * _per_channel(weight.to(sdt), input)
        # mean and invstd are marked non-differentiable (batch_norm never returns them)
        return _with_affine_tangent(ty, lambda: xhat, t_weight, t_bias, input), None, None

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, running_mean, running_var, momentum, eps):
        xf, (w, b), (rm, rv), write_back = _fold_batch(
            info, in_dims, input, (weight, bias), (running_mean, running_var), training=True)
        y, mean, invstd = _TrainFn.apply(xf, w, b, rm, rv, momentum, eps)
        write_back()
        bs = info.batch_size
        return (_unfold_output(y, bs), mean.view(bs, -1), invstd.view(bs, -1)), (0, 0, 0)


class _EvalFn(_EagerFunction):
    @staticmethod
    def forward(input, running_mean, running_var, weight, bias, eps):
        return _eval(input, running_mean, running_var, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, running_mean, running_var, weight, bias, eps = inputs
        ctx.save_for_backward(input, running_mean, running_var, weight)
        ctx.save_for_forward(input, running_mean, running_var, weight)
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx, grad_y):
        input, running_mean, running_var, weight = ctx.saved_tensors
        need_x, _, _, need_w, need_b = ctx.needs_input_grad[:5]
        needs = (need_x, need_w, need_b and ctx.bias_dtype is not None)
        if not any(needs):
            return None, None, None, None, None, None
        if _higher_order(grad_y):
            dx, dw, db = _composite_eval_backward(grad_y, input, running_mean, running_var,
                                                  weight, ctx.eps, needs)
        else:
            dx, dw, db = _eval_backward(grad_y, input, running_mean, running_var, weight,
                                        ctx.eps, needs)
        return (dx if need_x else None, None, None, _cast(dw, weight) if need_w else None,
                db.to(ctx.bias_dtype) if needs[2] else None, None)

    @staticmethod
    def jvp(ctx, t_input, _t_rm, _t_rv, t_weight, t_bias, _t_eps):
        # y = (x - rm) * invstd * w + b with constant statistics
        input, running_mean, running_var, weight = ctx.saved_tensors
        sdt = _stats_dtype(input.dtype)
        inv = _per_channel(torch.rsqrt(running_var.to(sdt) + ctx.eps), input)
        ty = None
        if t_input is not None:
            scale = inv if weight is None else inv * _per_channel(weight.to(sdt), input)
            ty = t_input.to(sdt) * scale
        return _with_affine_tangent(
            ty, lambda: (input.to(sdt) - _per_channel(running_mean.to(sdt), input)) * inv,
            t_weight, t_bias, input)

    @staticmethod
    def vmap(info, in_dims, input, running_mean, running_var, weight, bias, eps):
        dims = (in_dims[0], in_dims[3], in_dims[4], in_dims[1], in_dims[2])
        xf, (w, b, rm, rv), _, _ = _fold_batch(
            info, dims, input, (weight, bias, running_mean, running_var), (), training=False)
        y = _EvalFn.apply(xf, rm, rv, w, b, eps)
        return _unfold_output(y, info.batch_size), 0


# ---------------------------------------------------------------------------------------
# 5. Custom operators for torch.compile
# ---------------------------------------------------------------------------------------
def _empty_like_layout(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialized tensor shaped and laid out as the operators' outputs for `x`."""
    return torch.empty_strided(x.shape, _layout_strides(x.shape, _memory_perm(x)),
                               dtype=dtype or x.dtype, device=x.device)


def _stats_copy(t: Tensor | None) -> Tensor | None:
    """A fresh contiguous copy of `t` (the functional operator updates the copy)."""
    return None if t is None else t.detach().clone(memory_format=torch.contiguous_format)


# The signatures are parsed by torch.library.custom_op to build the operator schemas; they
# use typing.Optional, the spelling every torch with custom_op understands.
@torch.library.custom_op("fastbn::batch_norm_train", mutates_args=())
def _batch_norm_train(
    input: Tensor,
    weight: Optional[Tensor],  # noqa: UP045
    bias: Optional[Tensor],  # noqa: UP045
    running_mean: Optional[Tensor],  # noqa: UP045
    running_var: Optional[Tensor],  # noqa: UP045
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training-mode batch norm over every dimension but 1, functional.

    Returns ``(output, save_mean, save_invstd, new_running_mean, new_running_var)``; the
    new running statistics are empty tensors when none were given.
    """
    new_rm, new_rv = _stats_copy(running_mean), _stats_copy(running_var)
    y, mean, invstd = _train(input, weight, bias, new_rm, new_rv, momentum, eps)
    empty = input.new_empty((0,), dtype=_stats_dtype(input.dtype))
    return (y, mean, invstd, empty if new_rm is None else new_rm,
            empty.clone() if new_rv is None else new_rv)


@_batch_norm_train.register_fake
def _(input, weight, bias, running_mean, running_var, momentum, eps):
    sdt = _stats_dtype(input.dtype)
    c = input.shape[1]
    stats = [input.new_empty((c,), dtype=sdt) for _ in range(2)]
    new_running = [
        input.new_empty((0,), dtype=sdt) if r is None else torch.empty_like(
            r, memory_format=torch.contiguous_format) for r in (running_mean, running_var)
    ]
    return (_empty_like_layout(input), *stats, *new_running)


@torch.library.custom_op("fastbn::batch_norm_eval", mutates_args=())
def _batch_norm_eval(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor],  # noqa: UP045
    bias: Optional[Tensor],  # noqa: UP045
    eps: float,
) -> Tensor:
    """Evaluation-mode batch norm: normalize with the given statistics."""
    return _eval(input, running_mean, running_var, weight, bias, eps)


@_batch_norm_eval.register_fake
def _(input, running_mean, running_var, weight, bias, eps):
    return _empty_like_layout(input)


@torch.library.custom_op("fastbn::batch_norm_backward", mutates_args=())
def _batch_norm_backward(
    grad_output: Tensor,
    input: Tensor,
    save_mean: Tensor,
    save_invstd: Tensor,
    weight: Optional[Tensor],  # noqa: UP045
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient of the training forward: ``(grad_input, grad_weight, grad_bias)``, the
    last two in the statistics dtype and computed even when `weight` is None."""
    return _backward(grad_output, input, save_mean, save_invstd, weight)


@_batch_norm_backward.register_fake
def _(grad_output, input, save_mean, save_invstd, weight):
    sdt = _stats_dtype(input.dtype)
    c = input.shape[1]
    return (_empty_like_layout(input), input.new_empty((c,), dtype=sdt),
            input.new_empty((c,), dtype=sdt))


def _op_train_setup_context(ctx, inputs, output):
    input, weight, bias, _rm, _rv, _momentum, _eps = inputs
    _y, mean, invstd, _nrm, _nrv = output
    ctx.save_for_backward(input, weight, mean, invstd)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _op_train_backward(ctx, grad_y, _g_mean, _g_invstd, _g_rm, _g_rv):
    # Gradients reaching save_mean/save_invstd/new running stats are ignored:
    # batch_norm never exposes those outputs to differentiable code.
    input, weight, mean, invstd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if not (need_x or need_w or need_b):
        return None, None, None, None, None, None, None
    dx, dw, db = torch.ops.fastbn.batch_norm_backward(grad_y, input, mean, invstd, weight)
    return (dx if need_x else None, _cast(dw, weight) if need_w else None,
            db.to(ctx.bias_dtype) if need_b and ctx.has_bias else None, None, None, None, None)


_batch_norm_train.register_autograd(_op_train_backward, setup_context=_op_train_setup_context)


def _op_eval_setup_context(ctx, inputs, output):
    input, running_mean, running_var, weight, bias, eps = inputs
    ctx.save_for_backward(input, running_mean, running_var, weight)
    ctx.eps = eps
    ctx.bias_dtype = None if bias is None else bias.dtype


def _op_eval_backward(ctx, grad_y):
    input, running_mean, running_var, weight = ctx.saved_tensors
    need_x, _, _, need_w, need_b = ctx.needs_input_grad[:5]
    dx = dw = db = None
    if need_x:  # see _eval_backward
        dx = torch.ops.fastbn.batch_norm_eval(
            grad_y, torch.zeros_like(running_mean), running_var, weight, None, ctx.eps)
    if need_w or (need_b and ctx.bias_dtype is not None):
        sdt = _stats_dtype(input.dtype)
        invstd = torch.rsqrt(running_var.to(sdt) + ctx.eps)
        _, gw, gb = torch.ops.fastbn.batch_norm_backward(
            grad_y, input, running_mean.to(sdt), invstd, weight)
        dw = _cast(gw, weight) if need_w else None
        db = gb.to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None
    return dx, None, None, dw, db, None


_batch_norm_eval.register_autograd(_op_eval_backward, setup_context=_op_eval_setup_context)


# ---------------------------------------------------------------------------------------
# 6. The functional API
# ---------------------------------------------------------------------------------------
_trace_warned: list = []


def _traced(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """Under ``torch.jit.trace``: torch's own batch norm, so that the trace records an
    ``aten::batch_norm`` node. fastbn's kernels return tensors made from NumPy arrays,
    which the tracer would record as constants: the traced module would then return the
    outputs of the example input for every input. Warned once per process."""
    if not _trace_warned:
        _trace_warned.append(True)
        warnings.warn("torch.jit.trace: fastbn's batch norm is traced as torch's "
                      "(aten::batch_norm), because the tracer cannot record fastbn's kernels; "
                      "use torch.compile to keep them", UserWarning, stacklevel=3)
    return torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias,
                                          training, momentum, eps)


def _has_tangent(t) -> bool:
    return t is not None and _fwad.unpack_dual(t).tangent is not None


def _check_stats_tangents(input, running_mean, running_var, weight, bias) -> None:
    """torch's rule in batch_norm_jvp: where forward AD runs (the input, weight or bias has
    a tangent), running statistics with a tangent are an error (the output is not
    differentiable with respect to them). Checked on the arguments: a custom Function's
    jvp sees zeros for the tangents of arguments that have none."""
    if ((_has_tangent(running_mean) or _has_tangent(running_var))
            and (_has_tangent(input) or _has_tangent(weight) or _has_tangent(bias))):
        raise BatchNormError("batch_norm is not differentiable wrt running_mean and running_var, "
                             "they cannot have forward grad defined")


def _needs_autograd(input, weight, bias) -> bool:
    """Whether the call must go through an autograd.Function (gradients to record, a
    forward-AD level open, or a torch.func transform active)."""
    if torch._C._are_functorch_transforms_active() or _fwad._current_level >= 0:
        return True
    return torch.is_grad_enabled() and (
        input.requires_grad or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad))


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch normalization with fastbn's kernels, a drop-in for :func:`torch.nn.functional.batch_norm`.

    Statistics are taken over every dimension of `input` except dimension 1.

    Parameters
    ----------
    input : torch.Tensor
        Shape ``(N, C, ...)``, dtype float16, bfloat16, float32 or float64, on a CPU or
        CUDA device, in any memory format (``channels_last`` stays zero-copy).
    running_mean, running_var : torch.Tensor or None
        Shape ``(C,)``. In training they are updated in place,
        ``running = (1 - momentum) * running + momentum * batch_stat``, with the
        unbiased batch variance; required when `training` is False.
    weight, bias : torch.Tensor or None
        Shape ``(C,)``; None means ones and zeros.
    training : bool
        Normalize with batch statistics (and update the running ones) if True, with the
        running statistics if False.
    momentum : float
        Weight of the new batch statistics in the running average (any float, as in torch).
    eps : float
        Added to the variance before the square root: > 0 in training, >= 0 in evaluation
        (torch's rule).

    Returns
    -------
    torch.Tensor
        A new tensor (not a view: in-place operations on it are fine under autograd) with
        the shape, dtype, device and memory format of `input`. Differentiable with respect
        to `input`, `weight` and `bias` to any order, in reverse and forward mode, and
        under ``torch.func`` transforms.

    Raises
    ------
    TypeError
        If an argument is not a tensor where one is expected, or a dtype is unsupported
        or mixed (:class:`BatchNormTypeError`, also a RuntimeError as in torch).
    ValueError
        For torch's ``ValueError`` cases (one value per channel in training, eps out of
        range, one running statistic without the other) and, as :class:`BatchNormError`
        (also a RuntimeError as in torch), for shape and device mismatches or missing
        running statistics in evaluation.

    Notes
    -----
    Parameters and running statistics share one dtype: the input's, or float32 for
    float16 and bfloat16 input (torch's CPU rule); statistics are float32 then.

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> x = torch.randn(8, 3, 4, 4)
    >>> rm, rv = torch.zeros(3), torch.ones(3)
    >>> y = fastbn.torch.batch_norm(x, rm, rv, training=True)
    >>> y.shape
    torch.Size([8, 3, 4, 4])
    """
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(
            batch_norm, (input, running_mean, running_var, weight, bias), input, running_mean,
            running_var, weight=weight, bias=bias, training=training, momentum=momentum, eps=eps)
    _check(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if input.numel() == 0:
        return _empty(input, weight, bias)
    momentum, eps = float(momentum), float(eps)
    if torch.jit.is_tracing():
        return _traced(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if torch.compiler.is_compiling():
        if not training:
            return torch.ops.fastbn.batch_norm_eval(input, running_mean, running_var, weight,
                                                    bias, eps)
        y, _mean, _invstd, new_rm, new_rv = torch.ops.fastbn.batch_norm_train(
            input, weight, bias, running_mean, running_var, momentum, eps)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.copy_(new_rm)
                running_var.copy_(new_rv)
        return y
    if _needs_autograd(input, weight, bias):
        if _fwad._current_level >= 0:
            _check_stats_tangents(input, running_mean, running_var, weight, bias)
        if training:
            return _TrainFn.apply(input, weight, bias, running_mean, running_var, momentum,
                                  eps)[0]
        return _EvalFn.apply(input, running_mean, running_var, weight, bias, eps)
    if training:
        return _train(input, weight, bias, running_mean, running_var, momentum, eps)[0]
    return _eval(input, running_mean, running_var, weight, bias, eps)


# ---------------------------------------------------------------------------------------
# 7. Modules
# ---------------------------------------------------------------------------------------
class _FastBatchNormMixin:
    """forward() of torch's ``_BatchNorm``, with fastbn doing the normalization."""

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor):
            return self._symbolic(input)
        self._check_input_dim(input)
        # The rest mirrors torch.nn.modules.batchnorm._BatchNorm.forward line for line.
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:  # noqa: SIM102 - kept as in torch
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:  # exponential moving average
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        return batch_norm(
            input,
            # buffers are only updated if they are to be tracked and we are in training
            # mode; they are used for normalization in eval mode when they exist
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )

    def _symbolic(self, proxy):
        """Under ``torch.fx`` symbolic tracing: record this module as one ``call_module``
        node (a leaf, as torch's BatchNorm is), instead of tracing into its Python."""
        tracer = getattr(proxy, "tracer", None)
        if tracer is None:
            raise TypeError(f"input must be a torch.Tensor, got {type(proxy).__name__}")
        path = tracer.path_of_module(self)
        if not path:
            raise TypeError(
                f"{type(self).__name__} cannot be the root of a torch.fx trace (torch's "
                "BatchNorm cannot either); trace the model that contains it"
            )
        return tracer.create_proxy("call_module", path, (proxy,), {})

    def __prepare_scriptable__(self):
        # TorchScript cannot call fastbn's Python kernels: script torch's module, which
        # shares this one's parameters and buffers, and say so.
        warnings.warn(
            f"torch.jit.script: {type(self).__name__} is scripted as torch's "
            f"{self._torch_class.__name__} (same parameters and buffers), because TorchScript "
            "cannot call fastbn's kernels; use torch.compile to keep them",
            UserWarning, stacklevel=2)
        return _rebuilt(self, self._torch_class)


class BatchNorm1d(_FastBatchNormMixin, torch.nn.BatchNorm1d):
    """Drop-in :class:`torch.nn.BatchNorm1d` computed by fastbn.

    Same constructor arguments, parameters (``weight``, ``bias``), buffers
    (``running_mean``, ``running_var``, ``num_batches_tracked``), ``state_dict`` keys and
    behaviour (``momentum=None``, ``affine=False``, ``track_running_stats=False``,
    ``train()``/``eval()``); input ``(N, C)`` or ``(N, C, L)``. It is a subclass of
    :class:`torch.nn.BatchNorm1d`, so ``isinstance`` checks keep working.

    Parameters
    ----------
    num_features : int
        ``C``, the size of input dimension 1.
    eps : float, default 1e-5
        Added to the variance before the square root.
    momentum : float or None, default 0.1
        Weight of each batch in the running statistics; None: cumulative moving average
        (``1 / num_batches_tracked``).
    affine : bool, default True
        Learn ``weight`` and ``bias`` (else they are None).
    track_running_stats : bool, default True
        Keep running statistics and use them in eval mode (else batch statistics are
        always used and the buffers are None).
    device, dtype : optional
        Factory arguments for the parameters and buffers.
    """


class BatchNorm2d(_FastBatchNormMixin, torch.nn.BatchNorm2d):
    """Drop-in :class:`torch.nn.BatchNorm2d` computed by fastbn.

    Input ``(N, C, H, W)``, contiguous or ``channels_last`` (the output keeps the
    input's memory format). Same constructor arguments, parameters, buffers and
    ``state_dict`` keys as torch's module, of which it is a subclass.

    Parameters
    ----------
    num_features : int
        ``C``, the size of input dimension 1.
    eps : float, default 1e-5
        Added to the variance before the square root.
    momentum : float or None, default 0.1
        Weight of each batch in the running statistics; None: cumulative moving average
        (``1 / num_batches_tracked``).
    affine : bool, default True
        Learn ``weight`` and ``bias`` (else they are None).
    track_running_stats : bool, default True
        Keep running statistics and use them in eval mode (else batch statistics are
        always used and the buffers are None).
    device, dtype : optional
        Factory arguments for the parameters and buffers.
    """


class BatchNorm3d(_FastBatchNormMixin, torch.nn.BatchNorm3d):
    """Drop-in :class:`torch.nn.BatchNorm3d` computed by fastbn.

    Input ``(N, C, D, H, W)``, contiguous or ``channels_last_3d``. Same constructor
    arguments, parameters, buffers and ``state_dict`` keys as torch's module, of which it
    is a subclass.

    Parameters
    ----------
    num_features : int
        ``C``, the size of input dimension 1.
    eps : float, default 1e-5
        Added to the variance before the square root.
    momentum : float or None, default 0.1
        Weight of each batch in the running statistics; None: cumulative moving average
        (``1 / num_batches_tracked``).
    affine : bool, default True
        Learn ``weight`` and ``bias`` (else they are None).
    track_running_stats : bool, default True
        Keep running statistics and use them in eval mode (else batch statistics are
        always used and the buffers are None).
    device, dtype : optional
        Factory arguments for the parameters and buffers.
    """



BatchNorm1d._torch_class = torch.nn.BatchNorm1d
BatchNorm2d._torch_class = torch.nn.BatchNorm2d
BatchNorm3d._torch_class = torch.nn.BatchNorm3d

_REPLACEMENTS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def _rebuilt(module: torch.nn.Module, cls) -> torch.nn.Module:
    """A `cls` module sharing `module`'s parameters, buffers and train/eval mode."""
    new = cls(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        device="meta",
    )
    # Share the very same Parameter and buffer objects, so an optimizer built before the
    # conversion keeps updating them and nothing is copied.
    for name in ("weight", "bias"):
        setattr(new, name, getattr(module, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[name] = module._buffers.get(name)
    new.train(module.training)
    return new


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """Swap every :class:`torch.nn.BatchNorm1d`/``2d``/``3d``, :class:`torch.nn.LayerNorm`
    and :class:`torch.nn.RMSNorm` in `model` for fastbn's.

    The replacements share the original modules' parameters and buffers (the same
    tensor objects: weights, running statistics and ``num_batches_tracked`` are kept,
    and an optimizer created earlier still sees them) and their train/eval mode.
    Only modules whose type is exactly one of torch's three classes are swapped
    (subclasses, ``SyncBatchNorm`` and lazy modules are left alone); hooks registered on
    the old modules are not carried over.

    Parameters
    ----------
    model : torch.nn.Module
        Modified in place.

    Returns
    -------
    torch.nn.Module
        `model`, or its replacement if `model` itself is a batch norm module.

    Raises
    ------
    TypeError
        If `model` is not a :class:`torch.nn.Module`.

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> model = fastbn.torch.convert(model)
    >>> type(model[1]).__module__
    'fastbn.torch'
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    swap = _swap(model)
    if swap is not None:
        return swap
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            swap = None if child is None else _swap(child)
            if swap is not None:
                parent._modules[name] = swap
    return model


def _swap(module):
    """fastbn's replacement for `module` (sharing its parameters and buffers), or None."""
    if type(module) in _REPLACEMENTS:
        return _rebuilt(module, _REPLACEMENTS[type(module)])
    rows = _ROW_REPLACEMENTS.get(type(module))
    return None if rows is None else rows[1](module, rows[0])


def _as_torch_modules(method):
    """`method` (a torch fuser method) given torch's BatchNorm in place of fastbn's: the
    fused modules of torch.ao check the exact type of their BatchNorm. The stand-in shares
    the parameters and buffers (:func:`_rebuilt`), so eval-mode folding reads the same
    values and a QAT module trains the same tensors (with torch's batch-norm kernels)."""
    def fuse(is_qat, *mods):
        mods = [_rebuilt(m, m._torch_class) if isinstance(m, _FastBatchNormMixin) else m
                for m in mods]
        return method(is_qat, *mods)

    return functools.wraps(method)(fuse)


def _register_fusers() -> None:
    """Let ``torch.ao.quantization.fuse_modules`` (and ``fuse_modules_qat``) fuse fastbn's
    modules as they fuse torch's: each default (conv/linear, BatchNorm[, ReLU]) pattern is
    registered again with fastbn's class in the BatchNorm position, with the same fuser
    method applied to a torch stand-in (:func:`_as_torch_modules`)."""
    try:
        from torch.ao.quantization import fuser_method_mappings as fmm
    except ImportError:  # pragma: no cover - torch built without torch.ao
        return
    table = getattr(fmm, "_DEFAULT_OP_LIST_TO_FUSER_METHOD", None)
    if not isinstance(table, dict):  # pragma: no cover - a torch that changed it
        return
    for pattern, method in list(table.items()):
        if any(t in _REPLACEMENTS for t in pattern):
            table.setdefault(tuple(_REPLACEMENTS.get(t, t) for t in pattern),
                             _as_torch_modules(method))


_register_fusers()


# Layer norm and RMS norm (fastbn/_torch_rows.py), re-exported here.
from ._torch_rows import REPLACEMENTS as _ROW_REPLACEMENTS  # noqa: E402
from ._torch_rows import LayerNorm, RMSNorm, layer_norm, rms_norm  # noqa: E402, F401
