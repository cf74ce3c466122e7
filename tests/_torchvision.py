"""torchvision's real ResNet models, loaded without running torchvision's package ``__init__``.

Why: ``import torchvision`` runs ``torchvision/__init__.py``, which first loads the
package's C++ extension (``torchvision/_C.so``, custom operators such as
``torchvision::nms``) and then imports ``ops``, ``io``, ``datasets`` and ``models`` with
all its sub-packages (detection, segmentation, ...), which register fake and autograd
implementations for those operators. When the installed torchvision wheel was not built
against the installed torch (here: torch 2.13.0 CPU with torchvision 0.28.0 installed
with ``--no-deps``) the extension does not load and the import fails with
``RuntimeError: operator torchvision::nms does not exist``. ``torchvision/models/resnet.py``
itself is pure Python and needs none of that.

How: :func:`load_resnet` puts two stub *package* modules into :data:`sys.modules`,

* ``torchvision``        -- instead of ``torchvision/__init__.py`` (the C extension and
  every sub-package);
* ``torchvision.models`` -- instead of ``torchvision/models/__init__.py`` (imports every
  model family, and through ``detection`` etc. ``torchvision.ops``, which needs the C
  extension);

each an empty module whose ``__path__`` is the real directory, so that the submodules
are found and executed from the installed files as usual. Then it imports the real
``torchvision.models.resnet``, which pulls in, unmodified, ``torchvision.models._api``,
``._meta``, ``._utils``, ``torchvision._utils``, ``torchvision.utils`` (needs Pillow) and
the real ``torchvision.transforms`` package (its ``__init__`` is pure Python; resnet.py
uses ``transforms._presets.ImageClassification`` for its weight metadata). Nothing else is
stubbed.

Tidiness: everything named ``torchvision`` or ``torchvision.*`` is removed from
``sys.modules`` again afterwards (the stubs and the real modules imported under them) and
whatever was there before is put back, so a later ``import torchvision`` behaves exactly
as it would have without this loader (here: it fails the same way). The loaded resnet
module is kept in this module's cache only. Consequence: the model classes cannot be
re-imported by name, so ``pickle``/``torch.save`` of a *whole* model fails
(``copy.deepcopy``, ``state_dict()`` and ``torch.save(model.state_dict())`` work).

If ``torchvision.models.resnet`` is already imported (a working torchvision), that module
is used as is.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

__all__ = ["TorchvisionUnavailable", "load_resnet", "resnet18", "resnet50"]

_STUBBED_PACKAGES = ("torchvision", "torchvision.models")
_cache: dict[str, types.ModuleType] = {}


class TorchvisionUnavailable(ImportError):
    """torchvision is not installed, or its resnet module cannot be loaded."""


def _is_torchvision(name: str) -> bool:
    return name == "torchvision" or name.startswith("torchvision.")


def _stub_package(name: str, path: str) -> types.ModuleType:
    module = types.ModuleType(name, f"stub of {name}'s package __init__ (tests/_torchvision.py)")
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [path]
    module.__spec__ = spec
    module.__path__ = [path]
    module.__package__ = name
    return module


def load_resnet() -> types.ModuleType:
    """The real ``torchvision.models.resnet`` module (see the module docstring).

    Raises
    ------
    TorchvisionUnavailable
        If torchvision is not installed or resnet.py fails to import (the message names
        the cause; e.g. Pillow missing).
    """
    if "resnet" in _cache:
        return _cache["resnet"]
    loaded = sys.modules.get("torchvision.models.resnet")
    if loaded is not None and hasattr(loaded, "resnet18"):
        _cache["resnet"] = loaded
        return loaded
    try:
        spec = importlib.util.find_spec("torchvision")  # locates; does not execute __init__
    except (ImportError, ValueError) as exc:
        raise TorchvisionUnavailable(f"torchvision cannot be located: {exc!r}") from exc
    if spec is None or not spec.submodule_search_locations:
        raise TorchvisionUnavailable("torchvision is not installed")
    root = next(iter(spec.submodule_search_locations))
    paths = {"torchvision": root, "torchvision.models": os.path.join(root, "models")}
    if not os.path.isfile(os.path.join(paths["torchvision.models"], "resnet.py")):
        raise TorchvisionUnavailable(f"no models/resnet.py in the torchvision package at {root}")

    saved = {k: v for k, v in sys.modules.items() if _is_torchvision(k)}
    for k in saved:
        del sys.modules[k]
    try:
        for name in _STUBBED_PACKAGES:
            sys.modules[name] = _stub_package(name, paths[name])
        module = importlib.import_module("torchvision.models.resnet")
    except Exception as exc:
        raise TorchvisionUnavailable(
            f"torchvision's resnet module at {paths['torchvision.models']} failed to import: {exc!r}"
        ) from exc
    finally:
        for k in [k for k in sys.modules if _is_torchvision(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
    _cache["resnet"] = module
    return module


def resnet18(**kwargs) -> object:
    """``torchvision.models.resnet.resnet18(**kwargs)`` (e.g. ``num_classes=10``).

    Raises :class:`TorchvisionUnavailable` (an ImportError) where torchvision is missing.
    """
    return load_resnet().resnet18(**kwargs)


def resnet50(**kwargs) -> object:
    """``torchvision.models.resnet.resnet50(**kwargs)``; see :func:`resnet18`."""
    return load_resnet().resnet50(**kwargs)
