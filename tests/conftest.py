"""Shared test configuration: Hypothesis profiles and helpers."""

import os

from hypothesis import settings

# Hypothesis loads its built-in "ci" profile (derandomized, no deadline) when CI is set;
# extend it with a bounded example budget so the suite stays within minutes on 2 cores.
# Locally there is no deadline either: first calls compile Numba kernels.
settings.register_profile("ci", parent=settings.get_profile("ci"), max_examples=40, deadline=None,
                          print_blob=True)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))
