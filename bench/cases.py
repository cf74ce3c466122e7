"""Benchmark cases: operations, shapes, layouts, dtypes and the byte-count model.

Shapes come from real networks. The ResNet-50 layers use batch sizes that make every
float32 tensor 12.8 M elements (51 MB), larger than the 32 MiB last-level cache of the
reference machine, so the figures measure DRAM bandwidth rather than cache bandwidth.
``--quick`` swaps in small shapes of the same families (a smoke test for CI).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: the four timed operations, in the order they run for each shape.
OPS = ("forward-train", "forward-eval", "backward", "forward-backward")

#: ideal DRAM traffic per element, in units of the element size ``s`` (docs: DESIGN
#: "Memory traffic"): forward-training reads x once and writes y once with a
#: cache-blocked kernel (2s), forward-eval reads x and writes y (2s), backward reads x
#: and dy once and writes dx (3s); forward+backward is the sum (5s).
BYTES_PER_ELEMENT = {
    "forward-train": 2,
    "forward-eval": 2,
    "backward": 3,
    "forward-backward": 5,
}

#: bytes per element moved by the memcpy floor (read the input once, write it once).
MEMCPY_BYTES_PER_ELEMENT = 2


@dataclass(frozen=True)
class Shape:
    """A benchmark tensor: logical shape, memory layout and feature axis.

    ``dims`` is the shape of the NumPy array as stored: NCHW and NC arrays are stored
    as given, an NHWC case stores ``(N, H, W, C)`` and normalizes over ``axis=-1``.
    """

    family: str  # "resnet50", "mlp", "skinny", "wide"
    dims: tuple[int, ...]
    layout: str  # "NCHW", "NHWC" or "NC"

    @property
    def axis(self) -> int:
        return -1 if self.layout == "NHWC" else 1

    @property
    def num_features(self) -> int:
        return self.dims[self.axis]

    @property
    def numel(self) -> int:
        return math.prod(self.dims)

    @property
    def canonical(self) -> tuple[int, int, int]:
        """The ``(A, C, B)`` view the kernels see (DESIGN: "Canonical form")."""
        ax = self.axis % len(self.dims)
        return (math.prod(self.dims[:ax]), self.dims[ax], math.prod(self.dims[ax + 1 :]))

    @property
    def label(self) -> str:
        return "x".join(map(str, self.dims)) + f"-{self.layout}"


def _resnet(n: int, c: int, hw: int) -> list[Shape]:
    return [
        Shape("resnet50", (n, c, hw, hw), "NCHW"),
        Shape("resnet50", (n, hw, hw, c), "NHWC"),
    ]


#: full size set. (N, 64, 56, 56), (N, 256, 14, 14) and (N, 2048, 7, 7) are the
#: ResNet-50 stage-1, stage-3 and stage-4 batch norms.
FULL_SHAPES = [
    *_resnet(64, 64, 56),
    *_resnet(256, 256, 14),
    *_resnet(128, 2048, 7),
    Shape("mlp", (64, 128), "NC"),
    Shape("mlp", (8192, 1024), "NC"),
    Shape("mlp", (65536, 256), "NC"),
    Shape("skinny", (1_000_000, 4), "NC"),
    Shape("wide", (64, 65536), "NC"),
]

#: small shapes of the same families, for a smoke run (``--quick``).
QUICK_SHAPES = [
    *_resnet(4, 64, 14),
    *_resnet(4, 256, 7),
    Shape("mlp", (64, 128), "NC"),
    Shape("mlp", (1024, 256), "NC"),
    Shape("skinny", (20_000, 4), "NC"),
    Shape("wide", (16, 4096), "NC"),
]

#: dtypes run on every shape by default, and the extra dtypes run on a few shapes only
#: (each extra dtype doubles the run time; the listed shapes cover both kernel families).
DEFAULT_DTYPES = ("float32",)
EXTRA_DTYPES = ("float16", "float64")
EXTRA_DTYPE_LABELS = {
    "full": {"64x64x56x56-NCHW", "64x56x56x64-NHWC", "8192x1024-NC"},
    "quick": {"4x64x14x14-NCHW", "4x14x14x64-NHWC", "64x128-NC"},
}

#: implementations slower than a few GB/s (the float64 reference) run only up to this size.
SMALL_NUMEL = 1 << 20


def shapes_for(quick: bool) -> list[Shape]:
    return list(QUICK_SHAPES if quick else FULL_SHAPES)


def dtypes_for(shape: Shape, quick: bool, requested: tuple[str, ...] | None) -> tuple[str, ...]:
    """dtypes to run on `shape`: `requested` on every shape if given, else the defaults."""
    if requested is not None:
        return requested
    extra = EXTRA_DTYPES if shape.label in EXTRA_DTYPE_LABELS["quick" if quick else "full"] else ()
    return DEFAULT_DTYPES + extra


def itemsize(dtype: str) -> int:
    return np.dtype(dtype).itemsize


def ideal_bytes(op: str, shape: Shape, dtype: str) -> int:
    """Bytes an ideal (cache-blocked) kernel moves for `op` (DESIGN byte model)."""
    return BYTES_PER_ELEMENT[op] * shape.numel * itemsize(dtype)


def memcpy_bytes(shape: Shape, dtype: str) -> int:
    return MEMCPY_BYTES_PER_ELEMENT * shape.numel * itemsize(dtype)


def group_name(op: str, shape: Shape, dtype: str) -> str:
    """pytest-benchmark group: one per (operation, shape, layout, dtype)."""
    return f"{op} {shape.label} {dtype}"


# ----------------------------------------------------------------------------------------
# layer norm and RMS norm
# ----------------------------------------------------------------------------------------

#: the timed row-norm operations: forward, and forward + backward (with respect to x,
#: weight and, for layer norm, bias)
ROW_OPS = ("layer-norm", "layer-norm-fwd-bwd", "rms-norm", "rms-norm-fwd-bwd")
#: ideal DRAM traffic per element (units of the element size): the forward reads x and
#: writes y (2s); the backward reads x and dy and writes dx (3s), 5s with the forward
ROW_BYTES_PER_ELEMENT = {"layer-norm": 2, "layer-norm-fwd-bwd": 5, "rms-norm": 2,
                         "rms-norm-fwd-bwd": 5}
#: transformer shapes (rows, hidden size); the last one is a small call
ROW_SHAPES = [(16384, 1024), (4096, 4096), (2048, 12288), (65536, 128), (64, 128)]
ROW_QUICK_SHAPES = [(512, 1024), (64, 128)]


def row_shapes_for(quick: bool) -> list[tuple[int, int]]:
    return list(ROW_QUICK_SHAPES if quick else ROW_SHAPES)


def row_label(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def row_group_name(op: str, shape: tuple[int, int], dtype: str) -> str:
    """pytest-benchmark group of a row-norm case (``rows ...`` keeps them apart)."""
    return f"rows {op} {row_label(shape)} {dtype}"
