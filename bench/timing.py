"""Timing of one implementation's block of back-to-back calls, shared by the script
benchmarks (the pytest-benchmark suite times with pytest-benchmark)."""

from __future__ import annotations

import gc
import time


def time_block(fn, reps: int) -> float:
    """Seconds per call of `fn`, over `reps` back-to-back calls (GC paused)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps
    finally:
        if was_enabled:
            gc.enable()
