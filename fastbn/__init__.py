"""fastbn: fast, numerically stable normalization for NumPy, CuPy, PyTorch and JAX arrays.

The public API::

    y = fastbn.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, axis=1)
    y, mean, invstd = fastbn.batch_norm_forward(x, weight, bias, eps=1e-5, axis=1)
    dx, dweight, dbias = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=1)
    bn = fastbn.BatchNorm(num_features, axis=1)
    y = fastbn.layer_norm(x, normalized_shape, weight, bias, eps=1e-5)
    y, mean, rstd = fastbn.layer_norm_forward(x, normalized_shape, weight, bias)
    dx, dweight, dbias = fastbn.layer_norm_backward(dy, x, mean, rstd, normalized_shape, weight)
    y = fastbn.rms_norm(x, normalized_shape, weight, eps=None)
    y, rstd = fastbn.rms_norm_forward(x, normalized_shape, weight)
    dx, dweight = fastbn.rms_norm_backward(dy, x, rstd, normalized_shape, weight)
    ln = fastbn.LayerNorm(normalized_shape); rms = fastbn.RMSNorm(normalized_shape)
    fastbn.reference        # the float64 NumPy oracle
    fastbn.backends()       # backends usable on this machine
    fastbn.set_cache_limit(n), fastbn.empty_cache(), fastbn.cache_info()
                            # reuse of large CPU output buffers

NumPy arrays run on Numba CPU kernels, CuPy arrays on CUDA kernels; other DLPack producers
are viewed zero-copy. Optional frameworks are imported only when their arrays show up.
"""

from . import reference
from ._buffers import cache_info, empty_cache, set_cache_limit
from .backends import available_backends
from .functional import (
    batch_norm,
    batch_norm_backward,
    batch_norm_forward,
    layer_norm,
    layer_norm_backward,
    layer_norm_forward,
    rms_norm,
    rms_norm_backward,
    rms_norm_forward,
)
from .layers import BatchNorm
from .rowlayers import LayerNorm, RMSNorm

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "LayerNorm",
    "RMSNorm",
    "available_backends",
    "backends",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "cache_info",
    "empty_cache",
    "layer_norm",
    "layer_norm_backward",
    "layer_norm_forward",
    "reference",
    "rms_norm",
    "rms_norm_backward",
    "rms_norm_forward",
    "set_cache_limit",
]
