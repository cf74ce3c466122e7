"""CPU backend: batch-normalization kernels compiled with Numba.

Implements the backend contract of :mod:`fastbn.backends` on C-contiguous NumPy arrays
of shape ``(A, C, B)``.

Files, by phase: :mod:`._plan` (size thresholds, work splits, per-channel values laid
out along rows, the views of 16-bit data), :mod:`._moments` (statistics and the
backward's sums), :mod:`._elementwise` (the normalization and dx passes), :mod:`._half`
(float16 and bfloat16 loads and stores) and one file per operation composing them
(:mod:`.batchnorm`; :mod:`.rownorm` for layer norm and RMS norm, which normalize rows).

Design
------
Every tensor is seen two ways at once: channel ``c`` of ``(A, C, B)`` is ``A`` runs of
``B`` contiguous values, and the buffer is ``A`` rows of ``C * B`` values in which column
``J`` belongs to channel ``J // B``. Three paths, chosen by shape:

* **runs** (``B >= _RUN``, long runs; e.g. NCHW activations): per channel, statistics
  with register reductions over its runs, then normalization of the same channel while
  it is still in L2 (one read from memory). Parallel over channels, or over ranges of a
  channel's values merged afterwards when there are fewer channels than threads.
* **channel groups** (short runs or channels-last, when all rows of a group of channels
  fit in L2; e.g. (32, 2048, 7, 7) or (64, 65536)): per-column statistics over row tiles,
  folded into channels, then normalization of the group while it is cached.
* **row ranges** (everything else; e.g. NHWC, (8192, 1024), (1_000_000, 4)): each thread
  computes per-column partial statistics of a range of rows; the partials are merged
  into channels; a second parallel pass normalizes. Rows of fewer than ``_WIDE`` values
  are regrouped into *wide rows* of ``k`` consecutive rows (a free reinterpretation of
  the buffer) so inner loops are long and vectorize; ``A % k`` rows left over are a
  short tail.

Elementwise passes over runs of at least ``_SHORT`` values go run by run with
per-channel scalars; shorter runs use per-column coefficients laid out along a row.

Numerics: statistics are accumulated in float64 with a *blocked two-pass* scheme: a
cache-resident block (at most ``_BLOCK`` values of a channel, or a tile of at most
``_TILE`` values for per-column statistics) is summed for its mean, then its squared
deviations from that mean are summed, and blocks are merged with Chan's formula (so
are per-thread partials and the columns of a channel). This reads the data from memory
once and has the accuracy of the two-pass algorithm: the error does not grow with
``(|mean| / std)**2`` as ``E[x**2] - E[x]**2`` does (merging rounded block means
leaves a relative error of order ``G * |mean| / std``, with ``G`` the relative error
of the float64 sums: at most ``M * u64``, typically ``~sqrt(M) * u64``). Small tensors (the serial kernels, cache resident) use the plain two-pass
algorithm over each whole channel, without merges. float64 data are summed shifted,
``sum(x - k)`` with ``k`` a value of the block (see :func:`_shift`), so that a constant
feature has its value as mean and a variance of exactly 0 (float32, float16 and bfloat16
sums of a constant are exact in float64 already). Merges of partial means keep infinite means:
where the difference of two means is not finite, Chan's ``mean_a + d * f`` would give
inf - inf, and the weighted average is used instead (see :func:`_chan`). Normalization is one multiply-add
per value, ``y = x * alpha + beta`` with ``alpha = weight * invstd`` and
``beta = bias - mean * alpha`` computed and applied in float64, so that the
cancellation between ``x * alpha`` and ``beta`` for data far from zero costs float64,
not float32, precision (measured: as fast as float32 arithmetic, the passes are
memory-bound). Backward accumulates ``sum(dy)`` and ``sum(dy * (x - mean))`` in one
pass, then applies ``dx = g * dy + c2 * x + c3`` (the contract's formula expanded per
channel, coefficients in float64).

Parallelism: partial results are per work item and merged afterwards (never a shared
accumulator). The number of threads is read with :func:`numba.get_num_threads` at
call time, so :func:`numba.set_num_threads` is respected. Tensors of at most
``SERIAL_MAX`` values use serial kernels: starting threads costs microseconds. The
parallel kernels write into outputs allocated in Python by :mod:`fastbn._buffers`, which
reuses large buffers no array refers to any more: a fresh 51 MB output costs about 4 ms
of page faults (the operating system maps and zeroes it on first touch), more than the
kernel (a fresh 32 MiB output from Numba's own allocator, without transparent huge
pages, measured 35 ms against 9 ms for ``np.empty``). The kernels release
the GIL and are safe to call from several Python threads at once with the ``tbb`` or
``omp`` threading layer (``workqueue`` is not).

Only reductions are compiled with ``fastmath={"reassoc", "contract"}`` (reassociation
lets LLVM vectorize them); elementwise kernels use ``{"contract"}`` (multiply-add
fusion) only. Neither changes NaN/inf semantics: NaN in the input gives NaN statistics.
"""

from __future__ import annotations

import numpy as np

from ... import _threading
from .. import stats_dtype  # the shared rule: float16, bfloat16 -> float32 statistics

# Before any parallel kernel runs: a thread- and fork-safe threading layer (tbb loaded from
# the installed wheel, or a fork-safe fallback); see fastbn._threading.
_threading.configure()

# after the threading layer is configured
from ._plan import BACKWARD_SERIAL_MAX, SERIAL_MAX
from .batchnorm import (
    backward,
    backward_eval,
    forward_eval,
    forward_train,
    forward_train_update,
    update_running_stats,
)
from .rownorm import (
    layer_norm_backward,
    layer_norm_forward,
    rms_norm_backward,
    rms_norm_forward,
)

__all__ = [
    "BACKWARD_SERIAL_MAX",
    "SERIAL_MAX",
    "available",
    "backward",
    "backward_eval",
    "dtypes",
    "forward_eval",
    "forward_train",
    "forward_train_update",
    "layer_norm_backward",
    "layer_norm_forward",
    "name",
    "rms_norm_backward",
    "rms_norm_forward",
    "stats_dtype",
    "update_running_stats",
    "xp",
]

#: The backend's name, as accepted by ``backend=``.
name = "cpu"
#: Array namespace of the arrays this backend takes and returns.
xp = np
#: Input dtypes supported (float16 is read and written as float16, statistics in float64;
#: ml_dtypes.bfloat16 likewise, not listed: see the contract in :mod:`fastbn.backends`).
dtypes = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


# --------------------------------------------------------------------------------------
# The backend contract
# --------------------------------------------------------------------------------------


def available():
    """Whether this backend can run here.

    Returns
    -------
    tuple of (bool, str)
        ``(True, "")``: the backend needs only NumPy and Numba, which fastbn requires.
    """
    return True, ""
