"""Helpers for tests/test_torch_ported.py: access to PyTorch's own test infrastructure
(``torch.testing._internal``: the BatchNorm ModuleInfos of ``common_modules``, the
``nn.functional.batch_norm`` OpInfo of ``common_methods_invocations`` and ``common_utils``'
``TestCase``, which needs PyTorch's test dependency ``expecttest``, one of the test extras).
"""

from __future__ import annotations


def import_torch_testing():
    """Import and return ``(common_utils, common_modules, common_methods_invocations, common_nn)``."""
    import torch.testing._internal.common_methods_invocations as cmi
    import torch.testing._internal.common_modules as cm
    import torch.testing._internal.common_nn as cnn
    import torch.testing._internal.common_utils as cu

    return cu, cm, cmi, cnn


def make_asserter(cu, precision: float = 0.0, rel_tol: float = 0.0):
    """An instance of torch's own ``TestCase`` to call ``assertEqual`` & co. on.

    ``precision``/``rel_tol`` are the class-level tolerance floors some torch test
    classes set (``TestModule`` uses 1e-5 for both).
    """

    class _Asserter(cu.TestCase):
        def runTest(self):  # pragma: no cover - never run
            pass

    _Asserter.precision = precision
    _Asserter.rel_tol = rel_tol
    return _Asserter()
