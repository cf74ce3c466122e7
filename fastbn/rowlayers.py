"""Stateful layer-norm and RMS-norm layers on NumPy arrays, with torch's state.

:class:`LayerNorm` and :class:`RMSNorm` hold their parameters (torch's key names in
:meth:`~LayerNorm.state_dict`), normalize with :func:`fastbn.layer_norm` /
:func:`fastbn.rms_norm`, and give the gradients of the last forward pass with
:meth:`~LayerNorm.backward` (``grad_weight``, ``grad_bias`` set, ``dx`` returned).
"""

from __future__ import annotations

import numbers

import numpy as np

from . import _validation as v
from .layers import _check_state_keys, _host_array
from .rownorm import (
    layer_norm_backward,
    layer_norm_forward,
    rms_norm_backward,
    rms_norm_forward,
)

__all__ = ["LayerNorm", "RMSNorm"]


def _shape(normalized_shape) -> tuple:
    ns = normalized_shape
    if isinstance(ns, numbers.Integral) and not isinstance(ns, bool):
        ns = (int(ns),)
    try:
        ns = tuple(ns)
    except TypeError:
        raise TypeError("normalized_shape must be an int or a sequence of ints, got "
                        f"{type(normalized_shape).__name__}") from None
    if not ns or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 0
                     for d in ns):
        raise ValueError(f"normalized_shape must be one or more non-negative ints, got "
                         f"{normalized_shape!r}")
    return tuple(int(d) for d in ns)


def _float_dtype(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


class _RowNorm:
    """What the two layers share: parameters of shape `normalized_shape`, state, backward."""

    _keys: tuple = ()

    def __init__(self, normalized_shape, eps, elementwise_affine, bias, dtype):
        self.normalized_shape = _shape(normalized_shape)
        self.elementwise_affine = v.check_bool("elementwise_affine", elementwise_affine)
        has_bias = v.check_bool("bias", bias)
        self.dtype = _float_dtype(dtype)
        self.eps = eps
        if self.elementwise_affine:
            self.weight = np.ones(self.normalized_shape, self.dtype)
            self.bias = np.zeros(self.normalized_shape, self.dtype) if has_bias else None
        else:
            self.weight = self.bias = None
        self.grad_weight = self.grad_bias = None
        self._saved = None

    def __call__(self, x):
        return self.forward(x)

    def state_dict(self):
        """Copies of the parameters under torch's key names (``weight``, ``bias``)."""
        return {k: getattr(self, k).copy() for k in self._keys if getattr(self, k) is not None}

    def load_state_dict(self, state_dict, strict=True):
        """Load parameters saved by :meth:`state_dict` or by torch's module.

        Every entry is validated before anything is assigned: when loading fails, the layer
        is unchanged.

        Parameters
        ----------
        state_dict : mapping
            Arrays (or anything ``numpy.asarray`` accepts, e.g. torch CPU tensors) by key.
        strict : bool, optional
            Require exactly the keys this layer has.

        Raises
        ------
        TypeError
            If `state_dict` is not a mapping or an entry is not a floating array.
        KeyError
            With ``strict=True``, for missing or unexpected keys.
        ValueError
            For an entry of another shape than `normalized_shape`.
        """
        expected = [k for k in self._keys if getattr(self, k) is not None]
        _check_state_keys(state_dict, strict, expected)
        new = {}
        for key in expected:
            if key not in state_dict:
                continue
            arr = _host_array(key, state_dict[key])
            if arr.dtype.kind != "f":
                raise TypeError(f"{key} must be a floating array, got dtype {arr.dtype}")
            if arr.shape != self.normalized_shape:
                raise ValueError(f"{key} must have shape {self.normalized_shape}, got {tuple(arr.shape)}")
            new[key] = arr.astype(self.dtype, copy=True)
        for key, value in new.items():
            setattr(self, key, value)

    def _set_grads(self, dw, db=None):
        if self.elementwise_affine:
            self.grad_weight = dw
            self.grad_bias = db

    def _need_forward(self):
        if self._saved is None:
            raise RuntimeError("backward() needs a forward pass first")
        return self._saved


class LayerNorm(_RowNorm):
    """Layer normalization with ``torch.nn.LayerNorm``'s state and semantics.

    Parameters
    ----------
    normalized_shape : int or tuple of int
        The trailing dimensions normalized together.
    eps : float, optional
        Added to the variance.
    elementwise_affine : bool, optional
        Learnable ``weight`` (ones) and, with `bias`, ``bias`` (zeros) of shape
        `normalized_shape`.
    bias : bool, optional
        Whether the affine transform has a bias.
    dtype : {"float32", "float64"}, optional
        dtype of the parameters.

    Attributes
    ----------
    weight, bias : numpy.ndarray or None
    grad_weight, grad_bias : numpy.ndarray or None
        Their gradients, set by :meth:`backward`.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> ln = fastbn.LayerNorm(4)
    >>> y = ln(np.arange(8.0, dtype=np.float32).reshape(2, 4))
    >>> dx = ln.backward(np.ones_like(y))
    >>> sorted(ln.state_dict())
    ['bias', 'weight']
    """

    _keys = ("weight", "bias")

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
                 dtype="float32"):
        eps = v.check_eps(eps)
        super().__init__(normalized_shape, eps, elementwise_affine, bias, dtype)

    def forward(self, x):
        """Normalize `x` (trailing dimensions `normalized_shape`); remember it for
        :meth:`backward`."""
        y, mean, rstd = layer_norm_forward(x, self.normalized_shape, self.weight, self.bias,
                                           self.eps)
        self._saved = (x, mean, rstd)
        return y

    def backward(self, dy):
        """Gradient with respect to the last forward input; sets the parameter gradients.

        Raises
        ------
        RuntimeError
            If no forward pass was made.
        """
        x, mean, rstd = self._need_forward()
        dx, dw, db = layer_norm_backward(dy, x, mean, rstd, self.normalized_shape, self.weight)
        if dw is not None:
            dw = dw.astype(self.dtype)
            db = db.astype(self.dtype) if self.bias is not None else None
        self._set_grads(dw, db)
        return dx

    def __repr__(self):
        return (f"LayerNorm({self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}, "
                f"dtype={self.dtype})")


class RMSNorm(_RowNorm):
    """RMS normalization with ``torch.nn.RMSNorm``'s state and semantics.

    Parameters
    ----------
    normalized_shape : int or tuple of int
        The trailing dimensions normalized together.
    eps : float or None, optional
        Added to the mean square; None means ``finfo(x.dtype).eps``, as in torch.
    elementwise_affine : bool, optional
        A learnable ``weight`` (ones) of shape `normalized_shape`.
    dtype : {"float32", "float64"}, optional
        dtype of the weight.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> rms = fastbn.RMSNorm(2, eps=0.0)
    >>> rms(np.array([[3.0, 4.0]], dtype=np.float32)).round(4)
    array([[0.8485, 1.1314]], dtype=float32)
    """

    _keys = ("weight",)

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, dtype="float32"):
        if eps is not None:
            eps = v.check_eps(eps)
        super().__init__(normalized_shape, eps, elementwise_affine, False, dtype)

    def forward(self, x):
        """Normalize `x`; remember it for :meth:`backward`."""
        y, rstd = rms_norm_forward(x, self.normalized_shape, self.weight, self.eps)
        self._saved = (x, rstd)
        return y

    def backward(self, dy):
        """Gradient with respect to the last forward input; sets ``grad_weight``.

        Raises
        ------
        RuntimeError
            If no forward pass was made.
        """
        x, rstd = self._need_forward()
        dx, dw = rms_norm_backward(dy, x, rstd, self.normalized_shape, self.weight)
        self._set_grads(None if dw is None else dw.astype(self.dtype))
        return dx

    def __repr__(self):
        return (f"RMSNorm({self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}, dtype={self.dtype})")
