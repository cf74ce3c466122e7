"""Argument validation and canonicalization shared by the public API and the reference.

Everything here runs before any kernel: a call that fails validation changes nothing.
"""

from __future__ import annotations

import math
import numbers
import sys

import numpy as np

from .backends import is_bfloat16

__all__ = [
    "as_array",
    "source_library",
    "check_axis",
    "check_bool",
    "check_eps",
    "check_momentum",
    "check_x",
    "check_per_channel",
    "check_running_stats",
    "check_like_x",
    "check_backward_args",
    "check_normalized_shape",
    "check_saved",
    "check_shaped",
    "check_training_batch",
]

_F16 = np.dtype(np.float16)
_FLOAT_DTYPES = frozenset(np.dtype(t) for t in (np.float16, np.float32, np.float64))
#: The floating dtypes any array argument may have (the data's own are per backend), and
#: ml_dtypes.bfloat16: wherever float16 is accepted, bfloat16 is too (see :func:`_admits`;
#: it is not in the set, which would need ml_dtypes imported).
FLOAT_DTYPES = _FLOAT_DTYPES


def _library_of(obj) -> str:
    return type(obj).__module__.partition(".")[0]


def _is_cupy_array(obj) -> bool:
    cp = sys.modules.get("cupy")
    return cp is not None and isinstance(obj, cp.ndarray)


def source_library(obj) -> str:
    """The array library `obj` comes from, for the one-library-per-call rule.

    ``"numpy"`` for any ``numpy.ndarray`` (subclasses included), ``"cupy"`` for CuPy arrays,
    ``"jax"`` for JAX arrays (whose types live in ``jaxlib``), otherwise the top-level module
    of ``type(obj)`` (``"torch"`` for torch tensors and parameters).

    Parameters
    ----------
    obj : object
        An array argument.

    Returns
    -------
    str
        The library's name.
    """
    if isinstance(obj, np.ndarray):
        return "numpy"
    if _is_cupy_array(obj):
        return "cupy"
    lib = _library_of(obj)
    return "jax" if lib == "jaxlib" else lib


def _base_ndarray(name: str, obj):
    """View an ndarray subclass as a plain ndarray; reject those whose meaning that would lose."""
    ma = sys.modules.get("numpy.ma")  # never imported here: without it nothing is masked
    if ma is not None and isinstance(obj, ma.MaskedArray):
        raise TypeError(
            f"{name} is a numpy.ma.MaskedArray; fastbn cannot honour its mask. Pass "
            f"{name}.filled(value) for the values to use at masked positions (or "
            f"np.asarray({name}) to ignore the mask)"
        )
    if isinstance(obj, np.matrix):
        raise TypeError(
            f"{name} is a numpy.matrix, whose operators and shapes differ from an array's; "
            f"pass np.asarray({name})"
        )
    return obj.view(np.ndarray)


def _dlpack_device_type(name: str, obj) -> int:
    """The DLPack device type of `obj`, or a TypeError naming the argument."""
    try:
        device = obj.__dlpack_device__()
    except Exception as exc:  # noqa: BLE001 - e.g. torch's meta device raises ValueError
        raise TypeError(
            f"{name} must be an array on a CPU or CUDA device; its "
            f"{type(obj).__name__}.__dlpack_device__() raised {type(exc).__name__}: {exc}"
        ) from None
    if (type(device) is not tuple or len(device) != 2
            or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in device)):
        raise TypeError(
            f"{name} must be an array whose __dlpack_device__() returns a (device_type, "
            f"device_id) tuple of integers; {type(obj).__name__}.__dlpack_device__() "
            f"returned {device!r}"
        )
    return int(device[0])


def as_array(name: str, obj):
    """Return ``(array, library, wrap)`` for a user-supplied array argument.

    ``array`` is a ``numpy.ndarray`` or ``cupy.ndarray`` viewing the same memory (no copy);
    ndarray subclasses are viewed as plain ndarrays. ``library`` is ``"numpy"`` or
    ``"cupy"``, the library of `array` (see :func:`source_library` for that of `obj`);
    ``wrap`` converts a result array back to the kind of object the caller passed (None for
    NumPy and CuPy input, ``from_dlpack`` of the producing library for other DLPack
    producers such as torch tensors).

    Parameters
    ----------
    name : str
        The argument's name, for error messages.
    obj : object
        The argument.

    Returns
    -------
    array : numpy.ndarray or cupy.ndarray
    library : str
    wrap : callable or None

    Raises
    ------
    TypeError
        If `obj` is not an array NumPy or CuPy can view without copying, is a masked array
        or a ``numpy.matrix``, or is a DLPack producer that does not follow the protocol.
    """
    if type(obj) is np.ndarray:
        return obj, "numpy", None
    if isinstance(obj, np.ndarray):
        return _base_ndarray(name, obj), "numpy", None
    if _is_cupy_array(obj):
        return obj, "cupy", None
    if hasattr(obj, "__cuda_array_interface__"):
        try:
            import cupy
        except ImportError as exc:
            raise TypeError(
                f"{name} is a CUDA array ({type(obj).__name__}); handling it needs CuPy, "
                f"which could not be imported ({exc})"
            ) from None
        return cupy.asarray(obj), "cupy", None
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        device_type = _dlpack_device_type(name, obj)
        if device_type in (1, 3):  # kDLCPU, kDLCUDAHost
            try:
                arr = np.from_dlpack(obj)
            except Exception as exc:  # noqa: BLE001 - e.g. unsupported dtype such as bfloat16
                raise TypeError(
                    f"{name}: NumPy cannot import this {type(obj).__name__} through DLPack ({exc})"
                ) from None
            lib = "numpy"
        elif device_type in (2, 13):  # kDLCUDA, kDLCUDAManaged
            try:
                import cupy
            except ImportError as exc:
                raise TypeError(
                    f"{name} is on a CUDA device; handling it needs CuPy, which could not be "
                    f"imported ({exc})"
                ) from None
            try:
                arr = cupy.from_dlpack(obj)
            except Exception as exc:  # noqa: BLE001
                raise TypeError(
                    f"{name}: CuPy cannot import this {type(obj).__name__} through DLPack ({exc})"
                ) from None
            lib = "cupy"
        else:
            raise TypeError(
                f"{name} lives on a device fastbn has no kernels for (DLPack device type "
                f"{device_type}); expected a CPU or CUDA array"
            )
        return arr, lib, _dlpack_wrapper(obj)
    raise TypeError(
        f"{name} must be an array (numpy.ndarray, cupy.ndarray, or an object supporting "
        f"__cuda_array_interface__ or __dlpack__), got {type(obj).__name__}"
    )


def _dlpack_wrapper(obj):
    """Return a function turning a NumPy/CuPy result into `obj`'s kind of array, or None."""
    lib = _library_of(obj)
    mod = sys.modules.get(lib)
    if lib == "torch" and mod is not None:
        return mod.from_dlpack
    if lib in ("jax", "jaxlib"):
        jnp = sys.modules.get("jax.numpy")
        if jnp is not None:
            return jnp.from_dlpack
    from_dlpack = getattr(mod, "from_dlpack", None)
    return from_dlpack


def _admits(dtype, allowed) -> bool:
    """Whether `dtype` is one of `allowed`, or bfloat16 where `allowed` has float16 (the rule:
    bfloat16 is accepted wherever float16 is; ml_dtypes' dtypes have kind ``"V"``)."""
    return dtype in allowed or (dtype.kind == "V" and _F16 in allowed and is_bfloat16(dtype))


def _dtype_names(allowed) -> str:
    names = {str(np.dtype(d)) for d in allowed}
    if _F16 in allowed:
        names.add("bfloat16")
    return ", ".join(sorted(names))


def check_float_dtype(name: str, arr, allowed) -> None:
    """Raise TypeError unless ``arr.dtype`` is one of `allowed` (or bfloat16, if float16 is)."""
    if not _admits(arr.dtype, allowed):
        raise TypeError(f"{name} must have a floating dtype ({_dtype_names(allowed)}), got "
                        f"{arr.dtype}")


def _native_float(dtype, allowed):
    """The native-byte-order twin of a non-native floating `dtype`, if it is `allowed`.

    Floats have kind ``"f"``; bfloat16 (ml_dtypes) has kind ``"V"`` and a byte order too
    (NumPy byte-swaps it like any 2-byte type)."""
    if dtype.kind in "fV" and not dtype.isnative:
        native = dtype.newbyteorder("=")
        if _admits(native, allowed):
            return native
    return None


def _check_float_any_order(name: str, arr, allowed) -> None:
    """Raise TypeError unless ``arr.dtype`` is `allowed` in some byte order."""
    if not _admits(arr.dtype, allowed) and _native_float(arr.dtype, allowed) is None:
        check_float_dtype(name, arr, allowed)


def _native(name: str, arr, allowed):
    """`arr` if its dtype is `allowed`, a native-byte-order copy if only that is, else raise."""
    if _admits(arr.dtype, allowed):
        return arr
    _check_float_any_order(name, arr, allowed)
    return arr.astype(_native_float(arr.dtype, allowed))


def check_x(name: str, arr, dtypes, min_ndim: int = 2):
    """Validate the data array: floating dtype supported by the backend, ndim >= `min_ndim`
    (2 for batch norm: a batch axis and a feature axis).

    Parameters
    ----------
    name : str
        The argument's name, for error messages.
    arr : numpy.ndarray or cupy.ndarray
        The array (from :func:`as_array`).
    dtypes : collection of numpy.dtype
        The dtypes the backend takes.

    Returns
    -------
    numpy.ndarray or cupy.ndarray
        `arr`, or a copy in native byte order if its dtype is a non-native one of `dtypes`.

    Raises
    ------
    TypeError
        For a dtype that is not one of `dtypes` in any byte order.
    ValueError
        For fewer than `min_ndim` dimensions.
    """
    if arr.ndim < min_ndim:
        _check_float_any_order(name, arr, dtypes)
        what = ("2 dimensions (a batch axis and a feature axis)" if min_ndim == 2 else
                f"{min_ndim} dimension" + ("s" if min_ndim > 1 else ""))
        raise ValueError(f"{name} must have at least {what}, got shape {tuple(arr.shape)}")
    return _native(name, arr, dtypes)


def check_bool(name: str, value) -> bool:
    """A flag must be a bool (Python or NumPy): ``"no"`` or 1 are not taken for True.

    Parameters
    ----------
    name : str
        The argument's name, for the message.
    value : object
        The argument.

    Returns
    -------
    bool

    Raises
    ------
    TypeError
        If `value` is not a ``bool`` or ``numpy.bool_``.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_axis(axis, ndim: int) -> int:
    """Normalize the feature axis to ``0 <= axis < ndim``."""
    if type(axis) is int and -ndim <= axis < ndim:  # fast path
        return axis % ndim
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an integer, got {type(axis).__name__}")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an input with {ndim} dimensions")
    return axis % ndim


def check_eps(eps) -> float:
    """eps must be a real number >= 0 (not NaN)."""
    if type(eps) is float and 0.0 <= eps < math.inf:  # fast path; NaN fails the comparison
        return eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    eps = float(eps)
    if not eps >= 0.0 or math.isinf(eps):  # also catches NaN
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return eps


def check_momentum(momentum) -> float:
    """momentum must be a real number in [0, 1]."""
    if type(momentum) is float and 0.0 <= momentum <= 1.0:  # fast path
        return momentum
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a real number in [0, 1], got {type(momentum).__name__}")
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    return momentum


def _same_library(name: str, obj, arr, lib: str, library: str, like) -> None:
    """`obj` (viewed as `arr` of array library `lib`) must come from `library`, like x."""
    src = source_library(obj)
    if src != library:
        raise TypeError(
            f"{name} is a {src} array but x is a {library} array; all arrays of one call "
            f"must come from the same library"
        )
    x_lib = "numpy" if isinstance(like, np.ndarray) else "cupy"
    if lib != x_lib:
        where = {"numpy": "on the CPU", "cupy": "on a CUDA device"}
        raise TypeError(
            f"{name} is {where[lib]} but x is {where[x_lib]}; all arrays of one call must live "
            f"on the same device"
        )
    if lib == "cupy" and arr.device != like.device:
        raise ValueError(
            f"{name} is on CUDA device {arr.device.id} but the input is on device {like.device.id}"
        )


def _check_shaped(name, obj, shape, library, like, writable, what=""):
    """:func:`check_shaped` without the byte-order conversion (`obj` not None)."""
    arr, lib, _ = as_array(name, obj)
    _same_library(name, obj, arr, lib, library, like)
    _check_float_any_order(name, arr, _FLOAT_DTYPES)
    if tuple(arr.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}{what}, got {tuple(arr.shape)}")
    if writable and not getattr(arr.flags, "writeable", True):  # CuPy arrays are always writable
        raise ValueError(f"{name} is read-only, but it is updated in place in training")
    return arr


def check_shaped(name: str, obj, shape: tuple, library: str, like, *, what: str = "",
                 writable: bool = False):
    """Validate an optional float array of exactly `shape` (a weight, a bias, running or saved
    statistics).

    Parameters
    ----------
    name : str
        The argument's name, for error messages.
    obj : array or None
        The argument.
    shape : tuple of int
        Its required shape.
    library : str
        The library x comes from (:func:`source_library`); `obj` must come from it too.
    like : numpy.ndarray or cupy.ndarray
        x as returned by :func:`as_array`: `obj` must be on its device.
    what : str, optional
        Said after the shape in the error message (e.g. ``" (one value per feature)"``).
    writable : bool, optional
        `obj` is updated in place (running statistics in training).

    Returns
    -------
    numpy.ndarray, cupy.ndarray or None
        None for None. With `writable`, `obj` itself (ndarray subclasses: a plain ndarray
        view of the same memory), in whatever floating dtype and byte order it has.
        Otherwise the same, except that a non-native byte order is converted (a copy).

    Raises
    ------
    TypeError
        For a non-array, a non-floating dtype, or an array of another library or device.
    ValueError
        For a wrong shape, or a read-only array with `writable`.
    """
    if obj is None:
        return None
    if (type(obj) is np.ndarray and library == "numpy" and obj.shape == shape
            and obj.dtype in _FLOAT_DTYPES and (obj.flags.writeable or not writable)):
        return obj  # fast path for the common case; the checks below explain any failure
    arr = _check_shaped(name, obj, shape, library, like, writable, what)
    return arr if writable else _native(name, arr, _FLOAT_DTYPES)


#: what a per-feature array's shape error adds
PER_FEATURE = " (one value per feature)"


def check_per_channel(name: str, obj, num_features: int, library: str, like, *, writable: bool = False):
    """:func:`check_shaped` for a per-feature array: shape ``(num_features,)``."""
    return check_shaped(name, obj, (num_features,), library, like, what=PER_FEATURE,
                        writable=writable)


def check_running_stats(running_mean, running_var, num_features, library, like, *, training):
    """Validate the running statistics; both or neither must be given.

    Returns ``(running_mean, running_var)`` as :func:`check_per_channel` does, with
    ``writable=training``: in training the caller's arrays, updated in place later; in eval
    mode converted to native byte order where needed.
    """
    if running_mean is None and running_var is None:
        return None, None
    if (running_mean is None) != (running_var is None):
        missing = "running_var" if running_var is None else "running_mean"
        raise ValueError("running_mean and running_var must either both be None or neither be "
                         f"None; {missing} is None")
    shape = (num_features,)
    rm = _check_shaped("running_mean", running_mean, shape, library, like, training, PER_FEATURE)
    rv = _check_shaped("running_var", running_var, shape, library, like, training, PER_FEATURE)
    if _shares_memory(rm, rv):
        raise ValueError("running_mean and running_var must not share memory")
    if not training:
        rm, rv = _native("running_mean", rm, _FLOAT_DTYPES), _native("running_var", rv, _FLOAT_DTYPES)
    return rm, rv


def _shares_memory(a, b) -> bool:
    if isinstance(a, np.ndarray):
        if a.flags.owndata and b.flags.owndata:  # two owners of memory never overlap
            return a is b
        return np.shares_memory(a, b)
    return a.data.ptr == b.data.ptr


def check_like_x(name: str, obj, x, library: str):
    """Validate an array that must match x: same library, device and shape, floating dtype.

    Parameters
    ----------
    name : str
        The argument's name, for error messages.
    obj : array
        The argument (``dy``).
    x : numpy.ndarray or cupy.ndarray
        The validated x.
    library : str
        The library x comes from (:func:`source_library`).

    Returns
    -------
    numpy.ndarray or cupy.ndarray
        `obj` viewed as an array, in native byte order (a copy if it was not).
    """
    arr, lib, _ = as_array(name, obj)
    _same_library(name, obj, arr, lib, library, x)
    _check_float_any_order(name, arr, _FLOAT_DTYPES)
    if arr.shape != x.shape:
        raise ValueError(f"{name} must have the shape of x {tuple(x.shape)}, got {tuple(arr.shape)}")
    return _native(name, arr, _FLOAT_DTYPES)


def check_saved(name: str, obj, shape: tuple, producer: str, library: str, like, *,
                what: str = ""):
    """Validate statistics saved by a forward function for its backward: required (None is
    a TypeError naming `producer`), otherwise as :func:`check_shaped`."""
    if obj is None:
        raise TypeError(f"{name} must be the array {producer} returned, got None")
    return check_shaped(name, obj, shape, library, like, what=what)


def check_backward_args(dy, x, library, c, save_mean, save_invstd, weight):
    """Validate the arguments of a batch-norm backward call (x already validated).

    `library` is the library x comes from (:func:`source_library`). Returns
    ``(dy, mean, invstd, weight)`` as arrays like x's, in native byte order (weight may be
    None).
    """
    d = check_like_x("dy", dy, x, library)
    stats = [check_saved(name, s, (c,), "batch_norm_forward", library, x, what=PER_FEATURE)
             for name, s in (("save_mean", save_mean), ("save_invstd", save_invstd))]
    w = check_per_channel("weight", weight, c, library, x)
    return (d, *stats, w)


def check_training_batch(shape, axis: int) -> None:
    """torch's rule: training needs more than one value per channel (an empty batch is allowed)."""
    c = shape[axis]
    size = math.prod(shape) // c if c else 0
    if size == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(shape)}"
        )


def check_normalized_shape(normalized_shape, x_shape) -> tuple:
    """torch's ``normalized_shape``: an int or a sequence of ints, the trailing dimensions of
    x. Returns it as a tuple of ints."""
    ns = normalized_shape
    if isinstance(ns, numbers.Integral) and not isinstance(ns, bool):
        ns = (int(ns),)
    else:
        try:
            ns = tuple(ns)
        except TypeError:
            raise TypeError("normalized_shape must be an int or a sequence of ints, got "
                            f"{type(normalized_shape).__name__}") from None
        for d in ns:
            if isinstance(d, bool) or not isinstance(d, numbers.Integral):
                raise TypeError("normalized_shape must be an int or a sequence of ints, got an "
                                f"element of type {type(d).__name__}")
        ns = tuple(int(d) for d in ns)
    if not ns:
        raise ValueError("normalized_shape must have at least one dimension, got ()")
    if any(d < 0 for d in ns):
        raise ValueError(f"normalized_shape must not have negative dimensions, got {ns}")
    k = len(ns)
    if len(x_shape) < k or tuple(x_shape[len(x_shape) - k:]) != ns:
        raise ValueError(f"x's trailing dimensions must be normalized_shape {ns}, got x of shape "
                         f"{tuple(x_shape)}")
    return ns
