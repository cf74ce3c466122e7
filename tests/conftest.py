"""Shared test configuration: Numba's cache folder, Hypothesis profiles and helpers."""

import os

import pytest
from hypothesis import settings

from fastbn.backends import _jitcache  # imports neither Numba nor the kernels

# Numba keys a cached kernel on its own source file only (numba issue 1833): a folder per
# digest of the CPU backend's sources, so an edit anywhere in the package compiles afresh.
# Set before anything imports Numba, which reads it once; an explicit setting wins.
if "NUMBA_CACHE_DIR" not in os.environ:
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".numba-cache",
        _jitcache.source_digest())

# Hypothesis loads its built-in "ci" profile (derandomized, no deadline) when CI is set;
# extend it with a bounded example budget so the suite stays within minutes on 2 cores.
# Locally there is no deadline either: first calls compile Numba kernels.
settings.register_profile("ci", parent=settings.get_profile("ci"), max_examples=40, deadline=None,
                          print_blob=True)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def fresh_buffer_cache():
    """The output-buffer cache with a 1 GiB limit, empty, its size history cleared; the
    previous limit restored afterwards."""
    import fastbn
    from fastbn import _buffers

    old = fastbn.set_cache_limit(1 << 30)
    fastbn.empty_cache()
    _buffers._sizes.clear()
    yield
    fastbn.set_cache_limit(old)
    fastbn.empty_cache()
    _buffers._sizes.clear()
