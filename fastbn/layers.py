"""A stateful batch-normalization layer on top of the functional API."""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import numpy as np

from . import _validation as v
from ._device import array_module
from .batchnorm import (
    _batch_norm_backward_eval,
    batch_norm,
    batch_norm_backward,
    batch_norm_forward,
)

__all__ = ["BatchNorm"]

_STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _host_array(key: str, value):
    """A state_dict entry as a NumPy array (torch tensors copied to the host; bfloat16 to float32)."""
    try:
        if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch tensors
            value = value.detach().cpu()
            if str(value.dtype) == "torch.bfloat16":  # exactly representable in float32
                value = value.float()
            return value.numpy()
        return np.asarray(value)
    except Exception as exc:  # noqa: BLE001 - e.g. a CuPy array or a meta tensor
        raise TypeError(f"{key} cannot be converted to a NumPy array ({type(exc).__name__}: "
                        f"{exc})") from None


def _num_batches(value) -> int:
    """Validate ``num_batches_tracked``: a non-negative integer scalar."""
    key = "num_batches_tracked"
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{key} must be an integer, got {type(value).__name__}")
    if isinstance(value, numbers.Integral):
        n = int(value)
    else:
        if value is None or isinstance(value, (float, complex, str, bytes)):
            raise TypeError(f"{key} must be an integer, got {type(value).__name__}")
        if v.source_library(value) == "cupy":
            value = value.get()  # a device scalar: copying it to the host is harmless
        arr = _host_array(key, value)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{key} must be an integer, got an array of dtype {arr.dtype}")
        if arr.shape != ():
            raise ValueError(f"{key} must be a scalar (0-d), got shape {arr.shape}")
        n = int(arr)
    if n < 0:
        raise ValueError(f"{key} must be >= 0, got {n}")
    return n


def _check_state_keys(state_dict, strict, expected) -> None:
    """``load_state_dict``'s checks of the mapping and, with `strict`, of its keys."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping (e.g. a dict) from names to arrays, "
                        f"got {type(state_dict).__name__}")
    if v.check_bool("strict", strict):
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if missing or unexpected:
            raise KeyError(f"state_dict mismatch: missing keys {missing}, unexpected keys {unexpected}")


class BatchNorm:
    """Batch normalization layer with ``torch.nn.BatchNorm*d``'s state and semantics.

    Holds the affine parameters and the running statistics, and calls the functional API
    (:func:`fastbn.batch_norm_forward`, :func:`fastbn.batch_norm_backward`,
    :func:`fastbn.batch_norm`). It works on NumPy arrays (``device="cpu"``) or CuPy arrays
    (``device="gpu"``), with the feature axis anywhere.

    Parameters
    ----------
    num_features : int
        Number of features (channels), the length of `axis`.
    axis : int, optional
        The feature axis of the inputs: 1 for NCHW and (N, C), -1 for channels-last.
    eps : float, optional
        Added to the variance for numerical stability.
    momentum : float or None, optional
        Weight of each batch in the running statistics; None gives the cumulative average
        over ``num_batches_tracked`` batches, as in torch.
    affine : bool, optional
        Learn a per-feature `weight` (init 1) and `bias` (init 0).
    track_running_stats : bool, optional
        Keep running statistics (used in eval mode). If False, batch statistics are used in
        both modes and `running_mean`, `running_var`, `num_batches_tracked` are None.
    dtype : str or numpy.dtype, optional
        dtype of the parameters and running statistics (float32 or float64).
    device : {"cpu", "gpu"}, optional
        Where the parameters live: NumPy arrays or CuPy arrays. Inputs must be arrays of
        the same library (for torch tensors use :class:`fastbn.torch.BatchNorm2d` and its
        siblings, or :func:`fastbn.torch.convert`).

    Attributes
    ----------
    weight, bias : array or None
        The affine parameters.
    grad_weight, grad_bias : array or None
        Their gradients, set (overwritten) by :meth:`backward`.
    running_mean, running_var : array or None
        Running statistics (init 0 and 1).
    num_batches_tracked : int or None
        Training batches seen.
    training : bool
        Training mode (batch statistics) or eval mode (running statistics).

    Notes
    -----
    A layer can be pickled, deep-copied and sent to other processes (a CuPy layer is
    restored on the current CUDA device). The input saved by the last forward pass is not
    part of the copy: call :meth:`forward` on the copy before :meth:`backward`.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> bn = fastbn.BatchNorm(3)
    >>> x = np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32)
    >>> y = bn(x)
    >>> dx = bn.backward(np.ones_like(y))
    >>> bn.num_batches_tracked
    1
    """

    def __init__(self, num_features, *, axis=1, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype="float32", device="cpu"):
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
            raise TypeError(f"num_features must be an integer, got {type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an integer, got {type(axis).__name__}")
        eps = v.check_eps(eps)
        if momentum is not None:
            momentum = v.check_momentum(momentum)
        affine = v.check_bool("affine", affine)
        track_running_stats = v.check_bool("track_running_stats", track_running_stats)
        if dtype is None:  # np.dtype(None) would be float64
            raise TypeError("dtype must be float32 or float64, got None")
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
        if dt not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dt}")
        xp = array_module(device)

        self.num_features = int(num_features)
        self.axis = int(axis)
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.dtype = dt
        self.device = str(device)
        self.xp = xp
        self.training = True
        c = self.num_features
        self.weight = xp.ones(c, dtype=dt) if affine else None
        self.bias = xp.zeros(c, dtype=dt) if affine else None
        self.grad_weight = None
        self.grad_bias = None
        if track_running_stats:
            self.running_mean = xp.zeros(c, dtype=dt)
            self.running_var = xp.ones(c, dtype=dt)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self._saved = None

    # ------------------------------------------------------------------ modes
    def train(self, mode=True):
        """Set training mode (batch statistics) or, with ``mode=False``, eval mode.

        Parameters
        ----------
        mode : bool, optional
            True for training mode, False for eval mode.

        Returns
        -------
        BatchNorm
            self

        Raises
        ------
        TypeError
            If `mode` is not a bool.
        """
        self.training = v.check_bool("mode", mode)
        return self

    def eval(self):
        """Set eval mode: normalize with the running statistics.

        Returns
        -------
        BatchNorm
            self
        """
        return self.train(False)

    # ------------------------------------------------------------------ forward / backward
    def __call__(self, x):
        """Normalize `x` (see :meth:`forward`)."""
        return self.forward(x)

    def forward(self, x):
        """Normalize `x` and remember what :meth:`backward` needs.

        In training mode (or without running statistics) the batch statistics are used and
        the running statistics updated; in eval mode the running statistics are used.

        Parameters
        ----------
        x : array
            Input whose `axis` has length `num_features`.

        Returns
        -------
        array
            The normalized output.

        Raises
        ------
        TypeError, ValueError
            For an input of another array library than the layer's, or any input the
            functional API rejects. The layer is unchanged then.
        """
        arr = self._check_input(x)
        if arr.ndim >= 2:
            ax = v.check_axis(self.axis, arr.ndim)
            if arr.shape[ax] != self.num_features:
                raise ValueError(f"x has {arr.shape[ax]} features along axis {self.axis} (shape "
                                 f"{tuple(arr.shape)}), but this layer has num_features="
                                 f"{self.num_features}")
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats:
            y = batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                           training=False, eps=self.eps, axis=self.axis)
            self._saved = ("eval", arr)
            return y
        record = self.training and self.track_running_stats
        momentum = 0.0
        if record:
            if self.momentum is None:
                momentum = 1.0 / (self.num_batches_tracked + 1)
            else:
                momentum = self.momentum
        y, mean, invstd = batch_norm_forward(
            x, self.weight, self.bias, eps=self.eps, axis=self.axis,
            running_mean=self.running_mean if record else None,
            running_var=self.running_var if record else None, momentum=momentum,
        )
        if record:
            self.num_batches_tracked += 1
        self._saved = ("train", x, mean, invstd)
        return y

    def backward(self, dy):
        """Gradient with respect to the last forward input; sets `grad_weight`, `grad_bias`.

        Parameters
        ----------
        dy : array
            Gradient of the loss with respect to the last output.

        Returns
        -------
        array
            Gradient with respect to the last input.

        Raises
        ------
        RuntimeError
            If no forward pass was made.
        """
        if self._saved is None:
            raise RuntimeError("backward() needs a forward pass first")
        if self._saved[0] == "train":
            _, x, mean, invstd = self._saved
            dx, dw, db = batch_norm_backward(dy, x, mean, invstd, self.weight, axis=self.axis)
        else:
            dx, dw, db = self._eval_backward(dy, self._saved[1])
        if self.affine:
            self.grad_weight, self.grad_bias = dw, db
        return dx

    def _check_input(self, x):
        """`x` as an array of the layer's library, or a TypeError saying what to pass."""
        arr, _, _ = v.as_array("x", x)
        lib = v.source_library(x)
        if lib != self._library:
            if self.device == "cpu":
                hint = {"torch": "; for torch tensors use a torch layer: fastbn.torch.BatchNorm2d "
                                 "(or BatchNorm1d, BatchNorm3d), or fastbn.torch.convert(model)",
                        "jax": "; for JAX use fastbn.jax.batch_norm"}.get(lib, "")
                raise TypeError(f"x is a {lib} array, but this BatchNorm holds NumPy arrays "
                                f"(device='cpu'): pass a numpy.ndarray{hint}")
            raise TypeError(f"x is a {lib} array, but this BatchNorm holds CuPy arrays "
                            "(device='gpu'): pass a cupy.ndarray (cupy.asarray or "
                            "cupy.from_dlpack convert other GPU arrays)")
        return arr

    @property
    def _library(self) -> str:
        return "numpy" if self.device == "cpu" else "cupy"

    def _eval_backward(self, dy, x):
        # In eval mode the statistics are constants: the kernels' eval-mode backward.
        dx, dw, db = _batch_norm_backward_eval(dy, x, self.running_mean, self.running_var,
                                               self.weight if self.affine else None, self.eps,
                                               self.axis)
        return dx, dw.astype(self.dtype), db.astype(self.dtype)

    # ------------------------------------------------------------------ pickling
    def __getstate__(self):
        """The layer's attributes without the array module and the saved forward input."""
        state = self.__dict__.copy()
        state.pop("xp", None)
        state["_saved"] = None
        return state

    def __setstate__(self, state):
        """Restore the attributes; the array module is resolved again from `device`."""
        xp = array_module(state["device"])
        self.__dict__.update(state)
        self.xp = xp

    # ------------------------------------------------------------------ state
    def state_dict(self):
        """Return copies of the parameters and buffers under torch's BatchNorm key names.

        Returns
        -------
        dict
            ``weight``, ``bias`` (if affine), ``running_mean``, ``running_var``,
            ``num_batches_tracked`` (if tracking; a 0-d int64 array).
        """
        state = {}
        if self.affine:
            state["weight"] = self.weight.copy()
            state["bias"] = self.bias.copy()
        if self.track_running_stats:
            state["running_mean"] = self.running_mean.copy()
            state["running_var"] = self.running_var.copy()
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return state

    def load_state_dict(self, state_dict, strict=True):
        """Load parameters and buffers saved by :meth:`state_dict` (or by torch's BatchNorm).

        Every entry is validated before anything is assigned: when loading fails, the layer
        is unchanged.

        Parameters
        ----------
        state_dict : mapping
            Arrays (or anything ``numpy.asarray`` accepts, e.g. torch CPU tensors; bfloat16
            tensors are widened to float32, exactly) by key. ``num_batches_tracked`` is a
            non-negative integer: a Python or NumPy integer, or a 0-d integer array.
        strict : bool, optional
            Require exactly the keys this layer has.

        Raises
        ------
        TypeError
            If `state_dict` is not a mapping, `strict` not a bool, or an entry cannot be
            converted to an array or has the wrong kind of dtype.
        KeyError
            With ``strict=True``, if keys are missing or unexpected.
        ValueError
            If an entry has the wrong shape, or ``num_batches_tracked`` is negative.
        """
        expected = [k for k in _STATE_KEYS
                    if (k in ("weight", "bias") and self.affine)
                    or (k not in ("weight", "bias") and self.track_running_stats)]
        _check_state_keys(state_dict, strict, expected)
        xp = self.xp
        new = {}
        for key in expected:
            if key not in state_dict:
                continue
            value = state_dict[key]
            if key == "num_batches_tracked":
                new[key] = _num_batches(value)
                continue
            if xp is np or hasattr(value, "detach"):
                arr = _host_array(key, value)
            else:
                try:
                    arr = xp.asarray(value)
                except Exception as exc:  # noqa: BLE001
                    raise TypeError(f"{key} cannot be converted to a {xp.__name__} array "
                                    f"({type(exc).__name__}: {exc})") from None
            if arr.dtype.kind != "f":
                if arr.dtype == object and not isinstance(value, np.ndarray):
                    got = type(value).__name__  # None, or objects NumPy wraps as a 0-d array
                else:
                    got = f"dtype {arr.dtype}"
                raise TypeError(f"{key} must be a floating array, got {got}")
            if arr.shape != (self.num_features,):
                raise ValueError(f"{key} must have shape ({self.num_features},), got {tuple(arr.shape)}")
            new[key] = xp.asarray(arr).astype(self.dtype, copy=True)
        for key, value in new.items():
            setattr(self, key, value)

    def __repr__(self):
        return (f"BatchNorm({self.num_features}, axis={self.axis}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, dtype={self.dtype}, "
                f"device={self.device!r})")
