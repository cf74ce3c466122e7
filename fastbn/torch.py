"""PyTorch embedding: fastbn's kernels as a differentiable PyTorch operator and modules.

Importing this module imports PyTorch (an optional dependency: ``pip install
"fastbn[torch]"``); ``import fastbn`` alone never does.

Contents, in reading order:

1. Layout helpers: how a tensor is handed to fastbn without copying (DLPack) and how
   the result comes back with the same memory format as the input.
2. Three functional custom operators in the ``fastbn`` namespace, registered with
   :func:`torch.library.custom_op` and each with a fake (meta) implementation, so that
   ``torch.compile`` traces them as single nodes:

   ``torch.ops.fastbn.batch_norm_train``
       Training-mode forward; returns the output, the batch mean and inverse standard
       deviation (saved for backward) and the *new* running statistics (computed by
       fastbn's public API on copies of the old ones, so the operator stays functional).
   ``torch.ops.fastbn.batch_norm_eval``
       Evaluation-mode forward with given statistics.
   ``torch.ops.fastbn.batch_norm_backward``
       Gradient of the training-mode forward.

   Their autograd formulas (:func:`torch.library.register_autograd`) call the operators
   above, so the backward is traceable too.
3. :func:`batch_norm`, the drop-in replacement for
   :func:`torch.nn.functional.batch_norm`: it validates, calls an operator, and copies
   the new running statistics into the caller's buffers in place.
4. :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`: subclasses of
   torch's modules (same constructor, parameters, buffers, ``state_dict`` keys and
   ``isinstance`` behaviour) whose forward runs fastbn; and :func:`convert`, which swaps
   them into an existing model.

Zero-copy
---------
CPU tensors are viewed as NumPy arrays with :func:`numpy.from_dlpack` and results come
back with :func:`torch.from_dlpack`; CUDA tensors go through :func:`cupy.from_dlpack`
with CuPy's current stream set to PyTorch's current stream, so fastbn's GPU kernels are
queued behind the work that produced the input and no synchronization is needed. A
tensor whose memory is a permutation of a contiguous block (``channels_last``,
``channels_last_3d``, a transposed 2-d batch) is handed over as that contiguous
permuted view with the matching feature axis; only other strided tensors are copied.

Limitations: double backward is not supported; ``bfloat16`` is not supported (NumPy
has no such dtype); devices other than ``cpu`` and ``cuda`` are rejected; the modules
cannot be compiled with TorchScript (``torch.jit.script``; ``torch.compile`` works).
Requires PyTorch >= 2.4 (``torch.library.custom_op``).
"""

import contextlib
import math
import numbers
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import _validation

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm", "convert"]

_SUPPORTED_DTYPES = (torch.float16, torch.float32, torch.float64)
_SUPPORTED_DEVICES = ("cpu", "cuda")


# ---------------------------------------------------------------------------------------
# 1. Layout and DLPack helpers (used inside the operators only: never traced)
# ---------------------------------------------------------------------------------------
def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of statistics, weight and bias for input `dtype` (float16 -> float32)."""
    return torch.float32 if dtype == torch.float16 else dtype


def _memory_perm(x: Tensor) -> list[int]:
    """Dimension order of `x` from outermost to innermost in memory.

    Sorting the dimensions by decreasing stride (ties broken by position, so a
    contiguous tensor gives the identity) yields the permutation ``p`` for which
    ``x.permute(p)`` is contiguous whenever `x` is dense and non-overlapping: NCHW
    gives (0, 1, 2, 3), ``channels_last`` NCHW gives (0, 2, 3, 1).
    """
    strides = x.stride()
    return sorted(range(x.dim()), key=lambda d: (-strides[d], d))


def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _empty_like_layout(x: Tensor, perm: list[int], dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialized tensor shaped like `x`, laid out in memory in the order `perm`.

    This is the layout every operator returns, and what the fake implementations
    produce, so real and fake outputs have identical strides.
    """
    shape = [x.shape[p] for p in perm]
    return x.new_empty(shape, dtype=dtype or x.dtype).permute(_inverse(perm))


def _stats_operand(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """`t` as a contiguous 1-d tensor of `dtype`; no copy when it already is one."""
    if t is None:
        return None
    t = t.detach()
    if t.dtype != dtype:
        t = t.to(dtype)
    return t.contiguous()


def _stats_copy(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A fresh contiguous copy of `t` in `dtype` (fastbn updates it in place)."""
    if t is None:
        return None
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    out.copy_(t.detach())
    return out


@contextlib.contextmanager
def _array_bridge(device: torch.device):
    """Yield ``(to_array, to_tensor)`` converting between torch tensors on `device` and
    the arrays fastbn takes (NumPy on CPU, CuPy on CUDA), both zero-copy via DLPack.

    On CUDA, CuPy's current device and stream are set to PyTorch's current ones for the
    duration, so fastbn launches its kernels on the stream the caller is using.
    """
    if device.type == "cpu":

        def to_array(t):
            return None if t is None else np.from_dlpack(t.detach())

        yield to_array, torch.from_dlpack
        return
    # device.type == "cuda" (checked by the caller)
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - needs a CUDA machine without cupy
        raise RuntimeError(
            "fastbn needs CuPy for CUDA tensors: pip install 'fastbn[cuda12]' or 'fastbn[cuda13]'"
        ) from exc
    index = device.index if device.index is not None else torch.cuda.current_device()
    ptr = torch.cuda.current_stream(index).cuda_stream
    # torch reports its default (legacy) stream as pointer 0, which is CuPy's null stream
    stream = cupy.cuda.Stream.null if ptr == 0 else cupy.cuda.ExternalStream(ptr, index)
    with cupy.cuda.Device(index), stream:

        def to_array(t):
            # cupy.from_dlpack passes CuPy's current stream (= torch's) to __dlpack__,
            # so torch inserts no synchronization.
            return None if t is None else cupy.from_dlpack(t.detach())

        yield to_array, torch.from_dlpack


def _fastbn():
    import fastbn

    return fastbn


# ---------------------------------------------------------------------------------------
# 2. Custom operators
# ---------------------------------------------------------------------------------------
# The signatures below are parsed by torch.library.custom_op to build the operator
# schemas; they use typing.Optional, the spelling every torch with custom_op understands.
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
    """Training-mode batch norm over every dimension but 1.

    Returns ``(output, save_mean, save_invstd, new_running_mean, new_running_var)``.
    The new running statistics are empty tensors when none were given.
    """
    fastbn = _fastbn()
    perm = _memory_perm(input)
    axis = perm.index(1)
    sdt = _stats_dtype(input.dtype)
    xp = input.detach().permute(perm).contiguous()
    new_rm = _stats_copy(running_mean, sdt)
    new_rv = _stats_copy(running_var, sdt)
    with _array_bridge(input.device) as (arr, tensor):
        y, mean, invstd = fastbn.batch_norm_forward(
            arr(xp),
            arr(_stats_operand(weight, sdt)),
            arr(_stats_operand(bias, sdt)),
            eps=eps,
            axis=axis,
            running_mean=arr(new_rm),
            running_var=arr(new_rv),
            momentum=momentum,
        )
        y, mean, invstd = tensor(y), tensor(mean), tensor(invstd)
    y = y.reshape(xp.shape).permute(_inverse(perm))
    empty = input.new_empty((0,), dtype=sdt)
    return (
        y,
        mean,
        invstd,
        empty if new_rm is None else new_rm,
        empty.clone() if new_rv is None else new_rv,
    )


@_batch_norm_train.register_fake
def _(input, weight, bias, running_mean, running_var, momentum, eps):
    sdt = _stats_dtype(input.dtype)
    c = input.shape[1]
    stats = [input.new_empty((c,), dtype=sdt) for _ in range(2)]
    new_running = [
        input.new_empty((0,) if r is None else (c,), dtype=sdt) for r in (running_mean, running_var)
    ]
    return (_empty_like_layout(input, _memory_perm(input)), *stats, *new_running)


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
    fastbn = _fastbn()
    perm = _memory_perm(input)
    sdt = _stats_dtype(input.dtype)
    xp = input.detach().permute(perm).contiguous()
    with _array_bridge(input.device) as (arr, tensor):
        y = fastbn.batch_norm(
            arr(xp),
            running_mean=arr(_stats_operand(running_mean, sdt)),
            running_var=arr(_stats_operand(running_var, sdt)),
            weight=arr(_stats_operand(weight, sdt)),
            bias=arr(_stats_operand(bias, sdt)),
            training=False,
            eps=eps,
            axis=perm.index(1),
        )
        y = tensor(y)
    return y.reshape(xp.shape).permute(_inverse(perm))


@_batch_norm_eval.register_fake
def _(input, running_mean, running_var, weight, bias, eps):
    return _empty_like_layout(input, _memory_perm(input))


@torch.library.custom_op("fastbn::batch_norm_backward", mutates_args=())
def _batch_norm_backward(
    grad_output: Tensor,
    input: Tensor,
    save_mean: Tensor,
    save_invstd: Tensor,
    weight: Optional[Tensor],  # noqa: UP045
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient of the training-mode forward with statistics ``save_mean``/``save_invstd``.

    Returns ``(grad_input, grad_weight, grad_bias)``; the last two in the statistics
    dtype and computed even when `weight` is None (they are then simply unused).
    ``grad_input`` has the memory layout of `input`.
    """
    fastbn = _fastbn()
    perm = _memory_perm(input)
    sdt = _stats_dtype(input.dtype)
    xp = input.detach().permute(perm).contiguous()
    dyp = grad_output.detach().to(input.dtype).permute(perm).contiguous()
    with _array_bridge(input.device) as (arr, tensor):
        dx, dw, db = fastbn.batch_norm_backward(
            arr(dyp),
            arr(xp),
            arr(_stats_operand(save_mean, sdt)),
            arr(_stats_operand(save_invstd, sdt)),
            arr(_stats_operand(weight, sdt)),
            axis=perm.index(1),
        )
        dx, dw, db = tensor(dx), tensor(dw), tensor(db)
    return dx.reshape(xp.shape).permute(_inverse(perm)), dw, db


@_batch_norm_backward.register_fake
def _(grad_output, input, save_mean, save_invstd, weight):
    sdt = _stats_dtype(input.dtype)
    c = input.shape[1]
    return (
        _empty_like_layout(input, _memory_perm(input)),
        input.new_empty((c,), dtype=sdt),
        input.new_empty((c,), dtype=sdt),
    )


def _cast_grad(g: Tensor, like: Tensor | None) -> Tensor | None:
    return None if like is None else g.to(like.dtype)


def _train_setup_context(ctx, inputs, output):
    input, weight, _bias, _rm, _rv, _momentum, _eps = inputs
    _y, mean, invstd, _nrm, _nrv = output
    ctx.save_for_backward(input, weight, mean, invstd)
    ctx.has_bias = _bias is not None
    ctx.bias_dtype = None if _bias is None else _bias.dtype


def _train_backward(ctx, grad_y, _g_mean, _g_invstd, _g_rm, _g_rv):
    # Gradients reaching save_mean/save_invstd/new running stats are ignored:
    # fastbn.torch.batch_norm never exposes those outputs to differentiable code.
    input, weight, mean, invstd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if not (need_x or need_w or need_b):
        return None, None, None, None, None, None, None
    dx, dw, db = torch.ops.fastbn.batch_norm_backward(grad_y, input, mean, invstd, weight)
    return (
        dx if need_x else None,
        _cast_grad(dw, weight) if need_w else None,
        db.to(ctx.bias_dtype) if need_b and ctx.has_bias else None,
        None,
        None,
        None,
        None,
    )


_batch_norm_train.register_autograd(_train_backward, setup_context=_train_setup_context)


def _eval_setup_context(ctx, inputs, output):
    input, running_mean, running_var, weight, bias, eps = inputs
    ctx.save_for_backward(input, running_mean, running_var, weight)
    ctx.eps = eps
    ctx.bias_dtype = None if bias is None else bias.dtype


def _eval_backward(ctx, grad_y):
    # y = (x - rm) * w / sqrt(rv + eps) + b with constant statistics, so
    #   dx = dy * w / sqrt(rv + eps)  -- the eval-mode forward applied to dy with mean 0
    #        and no bias, i.e. the same fastbn kernel;
    #   dw = sum(dy * xhat), db = sum(dy) -- the two reductions of the training backward,
    #        evaluated at mean = rm, invstd = 1/sqrt(rv + eps) (its dx is not used).
    input, running_mean, running_var, weight = ctx.saved_tensors
    need_x, _, _, need_w, need_b = ctx.needs_input_grad[:5]
    dx = dw = db = None
    if need_x:
        dx = torch.ops.fastbn.batch_norm_eval(
            grad_y, torch.zeros_like(running_mean), running_var, weight, None, ctx.eps
        )
    if need_w or need_b:
        sdt = _stats_dtype(input.dtype)
        invstd = torch.rsqrt(running_var.to(sdt) + ctx.eps)
        _, gw, gb = torch.ops.fastbn.batch_norm_backward(
            grad_y, input, running_mean.to(sdt), invstd, weight
        )
        dw = _cast_grad(gw, weight) if need_w else None
        db = gb.to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None
    return dx, None, None, dw, db, None


_batch_norm_eval.register_autograd(_eval_backward, setup_context=_eval_setup_context)


# ---------------------------------------------------------------------------------------
# 3. The functional API
# ---------------------------------------------------------------------------------------
def _check_tensor_arg(name: str, t, input: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.device != input.device:
        raise ValueError(
            f"{name} is on device {t.device} but input is on {input.device}: "
            "all tensors must be on the same device"
        )
    allowed = {input.dtype, _stats_dtype(input.dtype)}
    if t.dtype not in allowed:
        names = " or ".join(sorted(str(d) for d in allowed))
        raise TypeError(f"{name} must have dtype {names} for {input.dtype} input, got {t.dtype}")
    c = input.shape[1]
    if t.dim() != 1 or t.shape[0] != c:
        raise ValueError(
            f"{name} must have shape ({c},) (one value per feature of input dimension 1), "
            f"got {tuple(t.shape)}"
        )


def _check(input, running_mean, running_var, weight, bias, training, momentum, eps) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"input must have dtype torch.float16, torch.float32 or torch.float64, got {input.dtype}"
        )
    if input.device.type not in _SUPPORTED_DEVICES:
        raise ValueError(
            f"input is on device {input.device}: fastbn has kernels for 'cpu' and 'cuda' tensors only"
        )
    if input.dim() < 2:
        raise ValueError(
            f"input must have at least 2 dimensions (N, C, ...), got shape {tuple(input.shape)}"
        )
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        _check_tensor_arg(name, t, input)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    training = _validation.check_bool("training", training)
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a float, got {type(momentum).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if training and math.prod(input.shape) // input.shape[1] == 1:
        # torch.nn.functional.batch_norm's own check and message
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.size()}"
        )


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
        Shape ``(N, C, ...)``, dtype float16, float32 or float64, on a CPU or CUDA
        device, in any memory format (``channels_last`` stays zero-copy).
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
        Weight of the new batch statistics in the running average.
    eps : float
        Added to the variance before the square root; must be >= 0.

    Returns
    -------
    torch.Tensor
        Same shape, dtype, device and memory format as `input`. Differentiable with
        respect to `input`, `weight` and `bias` (first order).

    Raises
    ------
    TypeError
        If an argument is not a tensor where one is expected, or has an unsupported
        dtype (integer, bfloat16, or a weight/statistic dtype that does not match
        `input`).
    ValueError
        If `input` is on a device other than cpu/cuda, tensors are on different devices,
        shapes do not match, `eps` < 0, only one running statistic is given, running
        statistics are missing in evaluation, or a training batch has one value per
        channel.

    Notes
    -----
    float16 input uses float32 statistics; float16 `weight`, `bias` and running
    statistics are accepted and converted (the running statistics are written back in
    their own dtype).

    Examples
    --------
    >>> import torch, fastbn.torch
    >>> x = torch.randn(8, 3, 4, 4)
    >>> rm, rv = torch.zeros(3), torch.ones(3)
    >>> y = fastbn.torch.batch_norm(x, rm, rv, training=True)
    >>> y.shape
    torch.Size([8, 3, 4, 4])
    """
    _check(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if not training:
        return torch.ops.fastbn.batch_norm_eval(
            input, running_mean, running_var, weight, bias, float(eps)
        )
    y, _mean, _invstd, new_rm, new_rv = torch.ops.fastbn.batch_norm_train(
        input, weight, bias, running_mean, running_var, float(momentum), float(eps)
    )
    if running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_rm)
            running_var.copy_(new_rv)
    return y


# ---------------------------------------------------------------------------------------
# 4. Modules
# ---------------------------------------------------------------------------------------
class _FastBatchNormMixin:
    """forward() of torch's ``_BatchNorm``, with fastbn doing the normalization."""

    def forward(self, input: Tensor) -> Tensor:
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


_REPLACEMENTS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def _converted(module: torch.nn.Module) -> torch.nn.Module:
    cls = _REPLACEMENTS[type(module)]
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
    """Swap every :class:`torch.nn.BatchNorm1d`/``2d``/``3d`` in `model` for fastbn's.

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
    if type(model) in _REPLACEMENTS:
        return _converted(model)
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and type(child) in _REPLACEMENTS:
                parent._modules[name] = _converted(child)
    return model
