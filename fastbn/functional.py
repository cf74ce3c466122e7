"""The functional API, every operation's public functions in one namespace (as
``torch.nn.functional``): ``from fastbn import functional as F``.

Each operation lives in a file of its own (:mod:`fastbn.batchnorm`, :mod:`fastbn.rownorm`),
which holds its hooks for the shared pipeline (:mod:`fastbn._pipeline`) and its public
functions; this module only gathers them.
"""

from __future__ import annotations

from .batchnorm import batch_norm, batch_norm_backward, batch_norm_forward
from .rownorm import (
    layer_norm,
    layer_norm_backward,
    layer_norm_forward,
    rms_norm,
    rms_norm_backward,
    rms_norm_forward,
)

__all__ = ["batch_norm", "batch_norm_backward", "batch_norm_forward", "layer_norm",
           "layer_norm_backward", "layer_norm_forward", "rms_norm", "rms_norm_backward",
           "rms_norm_forward"]
