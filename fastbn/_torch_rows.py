"""Layer norm and RMS norm for torch tensors on fastbn's CPU kernels (part of
:mod:`fastbn.torch`, which re-exports the public names).

The eager path mirrors batch norm's: without gradients to record (and no forward-AD level
or torch.func transform active) the kernels are called directly; otherwise an
:class:`torch.autograd.Function` whose backward runs the kernels' backward, or, when the
backward itself must be differentiable (``create_graph=True``, ``gradgradcheck``), the same
formulas in torch operations with the statistics recomputed from the input, whose own
derivatives give the higher orders. The Functions have ``jvp`` formulas (forward-mode AD,
``torch.func.jvp``/``jacfwd``) and ``vmap`` rules (a batch dimension of x is one more
leading dimension; a batched weight or bias is applied with torch operations). Outputs are
fresh tensors: C-contiguous for layer norm, as torch's; RMS norm keeps a channels-last
input's memory format, as torch's elementwise composition does.

CUDA tensors are refused with a clear error: fastbn's GPU row-norm kernels take CuPy
arrays, and CUDA tensors are not routed to them yet.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import rownorm as _rows
from .torch import _EagerFunction  # fastbn.torch imports this module at its end

__all__ = ["LayerNorm", "RMSNorm", "layer_norm", "rms_norm"]


def _ns(normalized_shape) -> tuple:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(normalized_shape)


def _check(input, weight, bias, what):
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is not None and t.device.type != "cpu":
            raise NotImplementedError(
                f"{name} is on device {t.device}: fastbn.torch runs {what} on CPU tensors only "
                "(fastbn's GPU row-norm kernels take CuPy arrays; CUDA tensors are not routed to "
                "them yet); use torch's module there")


def _np(t):
    from .torch import _np_view

    return None if t is None else _np_view(t.contiguous())


def _tensor(a):
    from .torch import _np_tensor

    # (np.ascontiguousarray would turn the 0-d statistics of an x without leading dimensions
    # into shape (1,))
    return _np_tensor(a if a.flags.c_contiguous else np.ascontiguousarray(a))


def _in_format_of(t, x):
    """`t` (C-contiguous, x's shape) in x's memory format where x is a channels-last 4-d or
    5-d tensor: torch's RMS norm is made of elementwise operations, whose outputs (and
    gradients) follow the input's memory format."""
    if x.is_contiguous() or x.dim() not in (4, 5):
        return t
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt) if x.is_contiguous(memory_format=fmt) else t


def _negative(eps) -> bool:
    """A negative eps: torch accepts it (var + eps may then be negative, and rstd NaN),
    fastbn's kernels do not (eps >= 0); such calls run torch's own function."""
    return isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps < 0


def _needs_graph(input, weight, bias=None) -> bool:
    from .torch import _needs_autograd  # (gradients, a forward-AD level, torch.func)

    return _needs_autograd(input, weight, bias)


def _higher_order(grad) -> bool:
    from .torch import _higher_order as h

    return h(grad)


# --------------------------------------------------------------------------- layer norm
def _dims(x, ns):
    k = len(ns)
    return tuple(range(x.dim() - k, x.dim())), tuple(range(x.dim() - k))


def _sum_lead(t, lead):
    """`t` summed over the leading dimensions `lead` (none: `t` itself; torch's ``sum(())``
    would sum every dimension)."""
    return t.sum(lead) if lead else t


def _sdt(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _ln_composite_backward(dy, x, ns, weight, bias, eps):
    """The layer-norm backward in torch operations, statistics recomputed from `x`: its own
    derivatives (autograd's) give the double backward."""
    dims, lead = _dims(x, ns)
    sdt = _sdt(x.dtype)
    xs, d = x.to(sdt), dy.to(sdt)
    mean = xs.mean(dims, keepdim=True)
    rstd = torch.rsqrt(((xs - mean) ** 2).mean(dims, keepdim=True) + eps)
    xhat = (xs - mean) * rstd
    g = d if weight is None else d * weight.to(sdt)
    dx = rstd * (g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True))
    dw = None if weight is None else _sum_lead(d * xhat, lead).to(weight.dtype)
    db = None if bias is None else _sum_lead(d, lead).to(bias.dtype)
    return dx.to(x.dtype), dw, db


def _trailing(x, ns, t):
    """A tensor of shape `ns` (weight, bias, their tangents) broadcastable against x."""
    return t.reshape((1,) * (x.dim() - len(ns)) + tuple(ns))


def _row_stat(x, ns, s):
    """A statistic of the leading shape, broadcastable against x."""
    return s.reshape(tuple(x.shape[:x.dim() - len(ns)]) + (1,) * len(ns))


def _affine_vmap(fn, info, in_dims, x, params, ns, eps):
    """The vmap rule of a row norm: x's batch dimension becomes one more leading dimension
    (the kernels do not care); batched weight or bias are applied outside the kernels, with
    torch operations, to the unaffine result."""
    b = info.batch_size
    xd, pds = in_dims[0], in_dims[1:1 + len(params)]
    xb = x.movedim(xd, 0) if xd is not None else x.unsqueeze(0).expand(b, *x.shape)
    if all(d is None for d in pds):
        out = fn.apply(xb, *params, ns, eps)
        return out, (0,) * len(out)
    out = fn.apply(xb, *(None for _ in params), ns, eps)
    y = out[0]
    lead = (1,) * (xb.dim() - 1 - len(ns))
    for k, (p, d) in enumerate(zip(params, pds)):
        if p is None:
            continue
        p = p.movedim(d, 0) if d is not None else p.unsqueeze(0)
        p = p.reshape(p.shape[0], *lead, *ns).to(y.dtype)
        y = y * p if k == 0 else y + p  # weight first, then bias
    return (y, *out[1:]), (0,) * len(out)


def _ln_forward(x, weight, bias, ns, eps):
    """``(y, mean, rstd)`` tensors from the kernels."""
    y, mean, rstd = _rows.layer_norm_forward(_np(x), ns, _np(weight), _np(bias), eps)
    return _tensor(y), _tensor(mean), _tensor(rstd)


def _ln_backward(dy, x, mean, rstd, ns, weight, bias_dtype):
    """``(dx, dweight, dbias)`` from the kernels; dweight None without a weight, dbias None
    without a bias (`bias_dtype` None)."""
    dx, dw, db = _rows.layer_norm_backward(_np(dy), _np(x), _np(mean), _np(rstd), ns,
                                           _np(weight))
    dx = _tensor(dx)
    dw = None if dw is None else _tensor(dw).to(weight.dtype)
    if bias_dtype is None:
        db = None
    elif db is None:  # no weight: the kernels skip the affine gradients; db = sum of dy
        db = _sum_lead(dy, _dims(dy, ns)[1]).to(bias_dtype)
    else:
        db = _tensor(db).to(bias_dtype)
    return dx, dw, db


class _LayerNormFn(_EagerFunction):
    @staticmethod
    def forward(x, weight, bias, ns, eps):
        return _ln_forward(x, weight, bias, ns, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, ns, eps = inputs
        _y, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.save_for_forward(x, weight, bias, mean, rstd)
        ctx.ns, ctx.eps = ns, eps
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def backward(ctx, dy, _g_mean, _g_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        ns, eps = ctx.ns, ctx.eps
        need = ctx.needs_input_grad
        if _higher_order(dy):
            dx, dw, db = _ln_composite_backward(dy, x, ns, weight, bias, eps)
        else:
            dx, dw, db = _ln_backward(dy, x, mean, rstd, ns, weight,
                                      None if bias is None or not need[2] else bias.dtype)
        return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None,
                None, None)

    @staticmethod
    def jvp(ctx, t_x, t_w, t_b, _t_ns, _t_eps):
        # xhat = (x - mean) * rstd over each row: d xhat = rstd * (t - mean(t) - xhat *
        # mean(xhat * t)), d y = weight * d xhat + xhat * d weight + d bias
        x, weight, _bias, mean, rstd = ctx.saved_tensors
        ns = ctx.ns
        dims, _ = _dims(x, ns)
        sdt = _sdt(x.dtype)
        rs = _row_stat(x, ns, rstd)
        xhat = (x.to(sdt) - _row_stat(x, ns, mean)) * rs
        ty = torch.zeros(x.shape, dtype=sdt)
        if t_x is not None:
            t = t_x.to(sdt)
            d = rs * (t - t.mean(dims, keepdim=True) - xhat * (xhat * t).mean(dims, keepdim=True))
            ty = ty + (d if weight is None else d * _trailing(x, ns, weight.to(sdt)))
        if t_w is not None:
            ty = ty + xhat * _trailing(x, ns, t_w.to(sdt))
        if t_b is not None:
            ty = ty + _trailing(x, ns, t_b.to(sdt))
        return ty.to(x.dtype), None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, ns, eps):
        return _affine_vmap(_LayerNormFn, info, in_dims, x, (weight, bias), ns, eps)


# --------------------------------------------------------------------------- torch.compile
# torch.compile cannot trace the eager Functions (their forward calls the NumPy kernels):
# while compiling, the public functions call these custom operators instead, whose fake
# implementations give the graph the shapes, dtypes and memory formats. The signatures are
# parsed by torch.library.custom_op (typing.Optional, as in fastbn.torch's).


def _lead_shape(x, ns):
    return tuple(x.shape[:x.dim() - len(ns)])


@torch.library.custom_op("fastbn::layer_norm_fwd", mutates_args=())
def _op_ln_fwd(input: Tensor, normalized_shape: list[int], weight: Optional[Tensor],  # noqa: UP045
               bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:  # noqa: UP045
    """Layer norm: ``(output, mean, rstd)``."""
    return _ln_forward(input, weight, bias, tuple(normalized_shape), eps)


@_op_ln_fwd.register_fake
def _(input, normalized_shape, weight, bias, eps):
    lead, sdt = _lead_shape(input, normalized_shape), _sdt(input.dtype)
    return (input.new_empty(input.shape), input.new_empty(lead, dtype=sdt),
            input.new_empty(lead, dtype=sdt))


@torch.library.custom_op("fastbn::layer_norm_bwd", mutates_args=())
def _op_ln_bwd(grad_output: Tensor, input: Tensor, mean: Tensor, rstd: Tensor,
               normalized_shape: list[int], weight: Optional[Tensor],  # noqa: UP045
               bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:  # noqa: UP045
    """Layer norm's gradients ``(grad_input, grad_weight, grad_bias)``; the last two are
    empty tensors where there is no weight or bias."""
    dx, dw, db = _ln_backward(grad_output, input, mean, rstd, tuple(normalized_shape), weight,
                              None if bias is None else bias.dtype)
    empty = input.new_empty((0,))
    return dx, empty if dw is None else dw, empty.clone() if db is None else db


@_op_ln_bwd.register_fake
def _(grad_output, input, mean, rstd, normalized_shape, weight, bias):
    return (input.new_empty(input.shape),
            input.new_empty((0,)) if weight is None else torch.empty_like(weight),
            input.new_empty((0,)) if bias is None else torch.empty_like(bias))


def _op_ln_setup_context(ctx, inputs, output):
    input, normalized_shape, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(input, weight, bias, mean, rstd)
    ctx.ns = list(normalized_shape)


def _op_ln_backward(ctx, grad_y, _g_mean, _g_rstd):
    input, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.fastbn.layer_norm_bwd(grad_y, input, mean, rstd, ctx.ns, weight, bias)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, None, dw if need[2] and weight is not None else None,
            db if need[3] and bias is not None else None, None)


_op_ln_fwd.register_autograd(_op_ln_backward, setup_context=_op_ln_setup_context)


@torch.library.custom_op("fastbn::rms_norm_fwd", mutates_args=())
def _op_rms_fwd(input: Tensor, normalized_shape: list[int], weight: Optional[Tensor],  # noqa: UP045
                eps: float) -> tuple[Tensor, Tensor]:
    """RMS norm: ``(output, rstd)``, the output in the input's memory format."""
    return _rms_forward(input, weight, tuple(normalized_shape), eps)


@_op_rms_fwd.register_fake
def _(input, normalized_shape, weight, eps):
    return torch.empty_like(input), input.new_empty(_lead_shape(input, normalized_shape),
                                                    dtype=_sdt(input.dtype))


@torch.library.custom_op("fastbn::rms_norm_bwd", mutates_args=())
def _op_rms_bwd(grad_output: Tensor, input: Tensor, rstd: Tensor, normalized_shape: list[int],
                weight: Optional[Tensor]) -> tuple[Tensor, Tensor]:  # noqa: UP045
    """RMS norm's gradients ``(grad_input, grad_weight)`` (an empty tensor without weight)."""
    dx, dw = _rms_backward(grad_output, input, rstd, tuple(normalized_shape), weight)
    return dx, input.new_empty((0,)) if dw is None else dw


@_op_rms_bwd.register_fake
def _(grad_output, input, rstd, normalized_shape, weight):
    return torch.empty_like(input), (input.new_empty((0,)) if weight is None
                                     else torch.empty_like(weight))


def _op_rms_setup_context(ctx, inputs, output):
    input, normalized_shape, weight, _eps = inputs
    ctx.save_for_backward(input, weight, output[1])
    ctx.ns = list(normalized_shape)


def _op_rms_backward(ctx, grad_y, _g_rstd):
    input, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.fastbn.rms_norm_bwd(grad_y, input, rstd, ctx.ns, weight)
    need = ctx.needs_input_grad
    return dx if need[0] else None, None, dw if need[2] and weight is not None else None, None


_op_rms_fwd.register_autograd(_op_rms_backward, setup_context=_op_rms_setup_context)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """:func:`torch.nn.functional.layer_norm` on fastbn's CPU kernels.

    Parameters
    ----------
    input : torch.Tensor
        A CPU tensor, float16, bfloat16, float32 or float64, any layout.
    normalized_shape : int or sequence of int
        The trailing dimensions normalized together.
    weight, bias : torch.Tensor or None
        Shape `normalized_shape`.
    eps : float
        Added to the variance.

    Returns
    -------
    torch.Tensor
        A fresh, contiguous tensor; differentiable with respect to `input`, `weight` and
        `bias` (to any order).

    Raises
    ------
    TypeError, ValueError
        As :func:`fastbn.layer_norm`, except that a negative `eps`, which torch accepts and
        fastbn's kernels do not, runs torch's own ``layer_norm``.
    NotImplementedError
        For CUDA (or other non-CPU) tensors.
    """
    _check(input, weight, bias, "layer-norm")
    if _negative(eps):
        return torch.nn.functional.layer_norm(input, normalized_shape, weight, bias, eps)
    ns = _ns(normalized_shape)
    if torch.compiler.is_compiling():
        return torch.ops.fastbn.layer_norm_fwd(input, list(ns), weight, bias, float(eps))[0]
    if _needs_graph(input, weight, bias):
        return _LayerNormFn.apply(input, weight, bias, ns, float(eps))[0]
    y = _rows.layer_norm(_np(input), ns, _np(weight), _np(bias), eps)
    return _tensor(y)


# --------------------------------------------------------------------------- RMS norm
def _rms_eps(eps, dtype):
    return torch.finfo(dtype).eps if eps is None else float(eps)


def _rms_composite_backward(dy, x, ns, weight, eps):
    """The RMS-norm backward in torch operations (see :func:`_ln_composite_backward`)."""
    dims, lead = _dims(x, ns)
    sdt = _sdt(x.dtype)
    xs, d = x.to(sdt), dy.to(sdt)
    rstd = torch.rsqrt((xs * xs).mean(dims, keepdim=True) + eps)
    g = d if weight is None else d * weight.to(sdt)
    dx = rstd * g - xs * rstd**3 * (g * xs).mean(dims, keepdim=True)
    dw = None if weight is None else _sum_lead(d * xs * rstd, lead).to(weight.dtype)
    return dx.to(x.dtype), dw


def _rms_forward(x, weight, ns, eps):
    """``(y, rstd)`` tensors from the kernels, y in x's memory format."""
    y, rstd = _rows.rms_norm_forward(_np(x), ns, _np(weight), eps)
    return _in_format_of(_tensor(y), x), _tensor(rstd)


def _rms_backward(dy, x, rstd, ns, weight):
    """``(dx, dweight)`` from the kernels (dweight None without a weight)."""
    dx, dw = _rows.rms_norm_backward(_np(dy), _np(x), _np(rstd), ns, _np(weight))
    return _in_format_of(_tensor(dx), x), None if dw is None else _tensor(dw).to(weight.dtype)


class _RMSNormFn(_EagerFunction):
    @staticmethod
    def forward(x, weight, ns, eps):
        return _rms_forward(x, weight, ns, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, ns, eps = inputs
        _y, rstd = output
        ctx.save_for_backward(x, weight, rstd)
        ctx.save_for_forward(x, weight, rstd)
        ctx.ns, ctx.eps = ns, eps
        ctx.mark_non_differentiable(rstd)

    @staticmethod
    def backward(ctx, dy, _g_rstd):
        x, weight, rstd = ctx.saved_tensors
        ns, eps = ctx.ns, ctx.eps
        need = ctx.needs_input_grad
        if _higher_order(dy):
            dx, dw = _rms_composite_backward(dy, x, ns, weight, eps)
        else:
            dx, dw = _rms_backward(dy, x, rstd, ns, weight)
        return dx if need[0] else None, dw if need[1] else None, None, None

    @staticmethod
    def jvp(ctx, t_x, t_w, _t_ns, _t_eps):
        # xhat = x * rstd: d xhat = rstd * (t - xhat * mean(xhat * t)),
        # d y = weight * d xhat + xhat * d weight
        x, weight, rstd = ctx.saved_tensors
        ns = ctx.ns
        dims, _ = _dims(x, ns)
        sdt = _sdt(x.dtype)
        rs = _row_stat(x, ns, rstd)
        xhat = x.to(sdt) * rs
        ty = torch.zeros(x.shape, dtype=sdt)
        if t_x is not None:
            t = t_x.to(sdt)
            d = rs * (t - xhat * (xhat * t).mean(dims, keepdim=True))
            ty = ty + (d if weight is None else d * _trailing(x, ns, weight.to(sdt)))
        if t_w is not None:
            ty = ty + xhat * _trailing(x, ns, t_w.to(sdt))
        return ty.to(x.dtype), None

    @staticmethod
    def vmap(info, in_dims, x, weight, ns, eps):
        return _affine_vmap(_RMSNormFn, info, in_dims, x, (weight,), ns, eps)


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """:func:`torch.nn.functional.rms_norm` on fastbn's CPU kernels.

    Parameters
    ----------
    input : torch.Tensor
        A CPU tensor, float16, bfloat16, float32 or float64.
    normalized_shape : int or sequence of int
        The trailing dimensions normalized together.
    weight : torch.Tensor or None
        Shape `normalized_shape`.
    eps : float or None
        Added to the mean square; None means ``torch.finfo(input.dtype).eps``.

    Returns
    -------
    torch.Tensor
        A fresh tensor, differentiable to any order: contiguous, or channels-last where
        `input` is (as torch's, whose RMS norm is made of elementwise operations).

    Raises
    ------
    TypeError, ValueError
        As :func:`fastbn.rms_norm`, except that a negative `eps` runs torch's own
        ``rms_norm`` (see :func:`layer_norm`).
    NotImplementedError
        For non-CPU tensors.
    """
    _check(input, weight, None, "RMS-norm")
    if _negative(eps):
        return torch.nn.functional.rms_norm(input, normalized_shape, weight, eps)
    ns = _ns(normalized_shape)
    eps = _rms_eps(eps, input.dtype)
    if torch.compiler.is_compiling():
        return torch.ops.fastbn.rms_norm_fwd(input, list(ns), weight, float(eps))[0]
    if _needs_graph(input, weight):
        return _RMSNormFn.apply(input, weight, ns, eps)[0]
    return _tensor(_rows.rms_norm(_np(input), ns, _np(weight), eps))


# --------------------------------------------------------------------------- modules
class LayerNorm(torch.nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` on fastbn's CPU kernels (same parameters, state and
    semantics; see :func:`layer_norm`)."""

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """:class:`torch.nn.RMSNorm` on fastbn's CPU kernels (see :func:`rms_norm`)."""

    def forward(self, input: Tensor) -> Tensor:
        return rms_norm(input, self.normalized_shape, self.weight, self.eps)


def _rebuilt_layer_norm(module, cls):
    new = cls(module.normalized_shape, eps=module.eps,
              elementwise_affine=module.elementwise_affine,
              bias=module.bias is not None, device="meta")
    new.weight, new.bias = module.weight, module.bias  # the same Parameters
    new.train(module.training)
    return new


def _rebuilt_rms_norm(module, cls):
    new = cls(module.normalized_shape, eps=module.eps,
              elementwise_affine=module.elementwise_affine, device="meta")
    new.weight = module.weight
    new.train(module.training)
    return new


#: torch class -> (fastbn class, how to rebuild one sharing the module's parameters)
REPLACEMENTS = {torch.nn.LayerNorm: (LayerNorm, _rebuilt_layer_norm),
                torch.nn.RMSNorm: (RMSNorm, _rebuilt_rms_norm)}
