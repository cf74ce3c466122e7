"""Numba's threading layer for fastbn's parallel CPU kernels: thread- and fork-safe.

Numba runs ``parallel=True`` kernels on one of three threading layers, picking the first
that loads of ``tbb``, ``omp``, ``workqueue`` (unless ``NUMBA_THREADING_LAYER`` says
otherwise):

* ``tbb`` is safe for calls from several Python threads at once and, with care, after
  ``fork``. fastbn depends on the ``tbb`` wheel, but that wheel puts ``libtbb.so.12`` into
  ``<prefix>/lib``, where Numba's ``tbbpool`` extension (which has no RPATH to it) does
  not find it in a virtual environment: Numba then silently falls back to ``omp``.
  :func:`configure` therefore loads the library from the files the installed ``tbb``
  distribution records, with ``RTLD_GLOBAL``, before Numba starts its threads.
* ``omp`` (GNU OpenMP on Linux) is not fork-safe: Numba terminates a forked child the
  moment it enters a parallel region ("fork() called from a process already using GNU
  OpenMP, this is unsafe"), which kills ``multiprocessing`` pools and torch
  ``DataLoader`` workers.
* ``workqueue`` is fork-safe but aborts when two threads launch parallel kernels at once.

What fastbn guarantees, whatever the layer:

* **Threads.** Any number of Python threads may call fastbn at once. With ``tbb`` and
  ``omp`` the parallel kernels run concurrently; with ``workqueue`` fastbn runs its
  parallel kernels one call at a time.
* **Fork.** A child made by ``os.fork`` (``multiprocessing``'s fork start method, torch
  ``DataLoader`` workers) can always call fastbn. It runs the parallel kernels when the
  threading layer is known to survive the fork: ``workqueue`` always; ``tbb`` when the
  fork was made by the thread that started the pool and no other thread that ran
  fastbn's parallel kernels was alive (Numba then shuts TBB's workers down before the
  fork and restarts them in the child). Otherwise (a fork from another thread, which
  leaves TBB "in an invalid state in the child process"; other threads attached to TBB,
  so that it is "unable to join threads to shut down before fork()"; GNU ``omp``, whose
  children Numba terminates; a pool started by other code than fastbn) the child runs
  fastbn's serial kernels, which never touch the threading layer: the same results
  within the documented error bounds, on one core.

If the user chose a layer (``NUMBA_THREADING_LAYER`` or ``numba.config.THREADING_LAYER``
other than ``"default"``, or a custom ``NUMBA_THREADING_LAYER_PRIORITY``), fastbn keeps
it. Otherwise, if ``tbb`` cannot be loaded, fastbn selects Numba's ``"forksafe"`` layer
(``workqueue`` on Linux) instead of letting Numba fall back to ``omp``, and says so once
with a :class:`RuntimeWarning` (and in ``python -m fastbn info``).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import warnings
from importlib import metadata

__all__ = ["begin", "configure", "end", "report", "start"]

#: file name of the TBB runtime that Numba's tbbpool extension links against
_TBB_LIBRARY = {"linux": "libtbb.so.12", "darwin": "libtbb.12.dylib", "win32": "tbb12.dll"}

_DEFAULT_PRIORITY = ["tbb", "omp", "workqueue"]

_state = {
    "configured": False,
    "setting": None,  # numba.config.THREADING_LAYER when configured
    "tbb_ok": None,  # whether Numba's tbb layer can be loaded
    "tbb_why": "",  # and if not, why
    "tbb_path": None,  # the library fastbn loaded, if any
    "selected": None,  # the layer fastbn asked Numba for (None: left as it was)
    "layer": None,  # the layer in use, once the pool runs
    "init_ident": None,  # the thread that started the pool, when fastbn started it
    "exclusive": False,  # parallel calls one at a time (workqueue)
    "serial": False,  # this process runs only serial kernels (see the module docstring)
    "serial_why": "",
}

_lock = threading.Lock()  # guards starting the pool and _attached
_exclusive = threading.Lock()  # held during a parallel call when the layer is workqueue
_attached: set = set()  # idents of the threads that have run fastbn's parallel kernels
_fork = {"ident": None, "others": False}  # the forking thread; other attached threads alive


# ------------------------------------------------------------------------------ tbb
def _find_tbb():
    """``(path, reason, installed)``: the TBB runtime recorded by the installed ``tbb``
    distribution (None and the reason if there is none), and whether that distribution
    is installed at all."""
    name = _TBB_LIBRARY.get(sys.platform)
    if name is None:
        return None, f"no TBB runtime name known for platform {sys.platform!r}", False
    try:
        dist = metadata.distribution("tbb")
    except metadata.PackageNotFoundError:
        return None, "the 'tbb' package is not installed (pip install tbb)", False
    files = dist.files
    if files is None:
        return None, f"the installed 'tbb' {dist.version} records no files", True
    for f in files:
        if f.name == name:
            path = os.path.realpath(dist.locate_file(f))
            if os.path.exists(path):
                return path, "", True
            why = f"the installed 'tbb' {dist.version} lists {name}, but {path} is missing"
            return None, why, True
    return None, f"the installed 'tbb' {dist.version} has no {name}", True


def _load_tbb():
    """Load the TBB runtime globally, then check that Numba's tbb layer loads.

    Returns ``(usable, reason, installed)``."""
    path, why, installed = _find_tbb()
    if path is not None:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            _state["tbb_path"] = path
        except OSError as exc:
            why = f"{path} could not be loaded ({exc})"
    try:
        from numba.np.ufunc import parallel

        check = getattr(parallel, "_check_tbb_version_compatible", None)
        if check is not None:
            with warnings.catch_warnings():  # the ImportError below carries the reason
                warnings.simplefilter("ignore")
                check()
        from numba.np.ufunc import tbbpool  # noqa: F401 - loading it is the test
    except ImportError as exc:
        return False, why or f"Numba's tbb layer does not load ({exc})", installed
    return True, "", installed


def _tbb_is_a_dependency() -> bool:
    """Whether fastbn's package metadata requires tbb here (x86-64)."""
    import platform

    return platform.machine() in ("x86_64", "AMD64")


def configure():
    """Make sure Numba will use a fork-safe threading layer; call before any parallel
    kernel runs (the CPU backend calls it on import). Idempotent.

    Loads the TBB runtime of the installed ``tbb`` package so that Numba's ``tbb`` layer
    is found; if that fails and the user has not chosen a layer, selects Numba's
    ``"forksafe"`` layer rather than ``omp`` and warns once.
    """
    if _state["configured"]:
        return
    import numba
    from numba.np.ufunc import parallel

    _state["configured"] = True
    setting = str(numba.config.THREADING_LAYER).lower()
    _state["setting"] = setting
    if getattr(parallel, "_is_initialized", False):  # some other code started the pool
        _state["tbb_ok"], _state["tbb_why"] = None, "the pool was started before fastbn loaded"
        return
    ok, why, installed = _load_tbb()
    _state["tbb_ok"], _state["tbb_why"] = ok, why
    priority = list(numba.config.THREADING_LAYER_PRIORITY)
    user_chose = setting != "default" or priority != _DEFAULT_PRIORITY
    if ok or user_chose:
        return
    numba.config.THREADING_LAYER = "forksafe"
    _state["selected"] = "forksafe"
    if installed or _tbb_is_a_dependency():  # elsewhere tbb is not expected: no warning
        warnings.warn(
            f"fastbn: Numba's 'tbb' threading layer is not usable ({why}). fastbn selected "
            "Numba's 'forksafe' layer instead of 'omp', which is not fork-safe (on Linux "
            "that is 'workqueue', on which fastbn runs its parallel kernels one call at a "
            "time). Reinstall 'tbb' to get it back, or set NUMBA_THREADING_LAYER to choose "
            "a layer yourself.",
            RuntimeWarning,
            stacklevel=2,
        )


# ------------------------------------------------------------------------------ calls
def start():
    """Start Numba's thread pool (if it is not running) and record the layer in use.

    Returns
    -------
    str
        The threading layer: ``"tbb"``, ``"omp"`` or ``"workqueue"``.
    """
    with _lock:
        return _start()


def _start():
    if _state["layer"] is None:
        configure()
        import numba
        from numba.np.ufunc import parallel

        if not parallel._is_initialized:
            parallel._launch_threads()
            _state["init_ident"] = threading.get_ident()
        _state["layer"] = layer = numba.threading_layer()
        _state["exclusive"] = layer == "workqueue"
    return _state["layer"]


def begin() -> bool:
    """Enter a parallel kernel call; pair every True with :func:`end`.

    Returns
    -------
    bool
        False when this process must use the serial kernels (then do not call
        :func:`end`).
    """
    if _state["serial"]:
        return False
    me = threading.get_ident()
    if me not in _attached:
        with _lock:
            _start()
            _attached.add(me)
    if _state["exclusive"]:
        _exclusive.acquire()
    return True


def end():
    """Leave a parallel kernel call entered with :func:`begin`."""
    if _state["exclusive"]:
        _exclusive.release()


# ------------------------------------------------------------------------------ fork
def _before_fork():
    me = threading.get_ident()
    alive = sys._current_frames()  # every thread of the interpreter, however it was made
    _fork["ident"] = me
    _fork["others"] = any(t != me and t in alive for t in _attached)


def _after_fork_child():
    global _lock, _exclusive
    _lock = threading.Lock()
    _exclusive = threading.Lock()
    _attached.clear()
    if _state["serial"]:
        return
    from numba.np.ufunc import parallel

    if not getattr(parallel, "_is_initialized", False):
        return  # no pool in the parent: the child starts its own
    layer = getattr(parallel, "_threading_layer", None)
    why = ""
    if layer == "tbb":
        if _state["init_ident"] is None:
            why = "TBB's pool was started by other code than fastbn: its state is unknown"
        elif _fork["ident"] != _state["init_ident"]:
            why = "forked from a thread other than the one that started TBB's pool"
        elif _fork["others"]:
            why = ("forked while other threads that ran parallel kernels were alive, so TBB "
                   "could not shut down its workers for the fork")
    elif layer == "omp":
        from numba.np.ufunc import omppool

        if getattr(omppool, "openmp_vendor", "GNU") == "GNU":
            why = "GNU OpenMP cannot run in a forked child"
    if why:
        _state["serial"] = True
        _state["serial_why"] = why
    else:  # the child's only thread is the one that forked; Numba restarted the pool in it
        _state["init_ident"] = threading.get_ident()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_child)


# ------------------------------------------------------------------------------ report
def report() -> dict:
    """What fastbn knows of the threading layer in this process.

    Returns
    -------
    dict
        ``setting`` (``numba.config.THREADING_LAYER`` as fastbn found it), ``selected``
        (the layer fastbn asked for, or None), ``tbb_usable`` and ``tbb_reason``,
        ``tbb_library`` (the runtime fastbn loaded), ``layer`` (in use; None until the
        pool runs), ``serial_only`` and ``serial_reason`` (a forked child that runs the
        serial kernels).
    """
    return {
        "setting": _state["setting"],
        "selected": _state["selected"],
        "tbb_usable": _state["tbb_ok"],
        "tbb_reason": _state["tbb_why"],
        "tbb_library": _state["tbb_path"],
        "layer": _state["layer"],
        "serial_only": _state["serial"],
        "serial_reason": _state["serial_why"],
    }
