"""Every bad input gets a clear TypeError/ValueError naming the argument, and changes nothing."""

import warnings

import numpy as np
import pytest

import fastbn
from _helpers import NUMPY_BACKENDS

C = 3


def _state():
    rng = np.random.default_rng(0)
    return dict(
        x=rng.standard_normal((4, C, 5)).astype(np.float32),
        w=rng.standard_normal(C).astype(np.float32),
        b=rng.standard_normal(C).astype(np.float32),
        rm=rng.standard_normal(C).astype(np.float32),
        rv=rng.uniform(0.5, 2, C).astype(np.float32),
    )


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _matrix(a):
    """``numpy.matrix(a)``, without its PendingDeprecationWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.matrix(a)


def _masked(a):
    """A masked array sharing `a`'s memory (so an accepted in-place update would show)."""
    return np.ma.masked_array(a, mask=np.zeros(a.shape, bool))


def _torch(a):
    """A torch tensor sharing `a`'s memory."""
    return pytest.importorskip("torch").from_numpy(a)


def _jax(a):
    return pytest.importorskip("jax.numpy").asarray(a)


def _swapped(a):
    return a.astype(a.dtype.newbyteorder("S"))


class _OddDLPack:
    """A DLPack producer whose __dlpack_device__ returns a string, or raises."""

    def __init__(self, raises=False):
        self.raises = raises

    def __dlpack__(self, **kwargs):
        raise BufferError("cannot pack")

    def __dlpack_device__(self):
        if self.raises:
            raise ValueError("Unknown device type meta for Dlpack")
        return "cpu"


# (description, exception, message regex, call(state, backend, api)) where api is fastbn
# itself or fastbn.reference, which validates its arguments the same way.
CASES = [
    ("x list", TypeError, r"x must be an array .*got list",
     lambda s, be, a: a.batch_norm([[1.0, 2.0]], s["rm"], s["rv"], training=True, backend=be)),
    ("x int", TypeError, r"x must have a floating dtype .*got int64",
     lambda s, be, a: a.batch_norm(np.ones((4, C), np.int64), s["rm"], s["rv"], training=True, backend=be)),
    ("x complex", TypeError, r"x must have a floating dtype .*got complex128",
     lambda s, be, a: a.batch_norm_forward(np.ones((4, C), np.complex128), backend=be)),
    ("x object", TypeError, r"x must have a floating dtype .*got object",
     lambda s, be, a: a.batch_norm_forward(np.ones((4, C), object), backend=be)),
    ("x 1-d", ValueError, r"x must have at least 2 dimensions.*\(5,\)",
     lambda s, be, a: a.batch_norm(np.ones(5, np.float32), s["rm"], s["rv"], training=True, backend=be)),
    ("axis out of range", ValueError, r"axis 3 is out of range for an input with 3 dimensions",
     lambda s, be, a: a.batch_norm(s["x"], s["rm"], s["rv"], training=True, axis=3, backend=be)),
    ("axis negative out of range", ValueError, r"axis -4 is out of range",
     lambda s, be, a: a.batch_norm_forward(s["x"], axis=-4, backend=be)),
    ("axis float", TypeError, r"axis must be an integer, got float",
     lambda s, be, a: a.batch_norm_forward(s["x"], axis=1.0, backend=be)),
    ("weight length", ValueError, r"weight must have shape \(3,\) .*got \(4,\)",
     lambda s, be, a: a.batch_norm(s["x"], s["rm"], s["rv"], np.ones(4, np.float32), training=True, backend=be)),
    ("weight 2-d", ValueError, r"weight must have shape \(3,\) .*got \(1, 3\)",
     lambda s, be, a: a.batch_norm_forward(s["x"], np.ones((1, C), np.float32), backend=be)),
    ("weight int", TypeError, r"weight must have a floating dtype .*got int64",
     lambda s, be, a: a.batch_norm_forward(s["x"], np.ones(C, np.int64), backend=be)),
    ("weight list", TypeError, r"weight must be an array .*got list",
     lambda s, be, a: a.batch_norm(s["x"], s["rm"], s["rv"], [1.0, 1.0, 1.0], training=True, backend=be)),
    ("bias length", ValueError, r"bias must have shape \(3,\) .*got \(2,\)",
     lambda s, be, a: a.batch_norm(s["x"], s["rm"], s["rv"], s["w"], np.ones(2, np.float32), training=True, backend=be)),
    ("running_mean length", ValueError, r"running_mean must have shape \(3,\) .*got \(5,\)",
     lambda s, be, a: a.batch_norm(s["x"], np.zeros(5, np.float32), s["rv"], training=True, backend=be)),
    ("running_var length", ValueError, r"running_var must have shape \(3,\) .*got \(2,\)",
     lambda s, be, a: a.batch_norm(s["x"], s["rm"], np.ones(2, np.float32), training=True, backend=be)),
    ("running_var int", TypeError, r"running_var must have a floating dtype",
     lambda s, be, a: a.batch_norm(s["x"], s["rm"], np.ones(C, np.int32), training=True, backend=be)),
    ("only running_mean", ValueError, r"running_mean and running_var must either both be None.*running_var is None",
     lambda s, be, a: a.batch_norm(s["x"], s["rm"], None, training=True, backend=be)),
    ("only running_var", ValueError, r"running_mean is None",
     lambda s, be, a: a.batch_norm_forward(s["x"], running_var=s["rv"], backend=be)),
    ("one value per channel", ValueError, r"Expected more than 1 value per channel when training, got input size \(1, 3\)",
     lambda s, be, a: a.batch_norm(np.ones((1, C), np.float32), s["rm"], s["rv"], training=True, backend=be)),
    ("one value per channel 3-d", ValueError, r"Expected more than 1 value per channel when training",
     lambda s, be, a: a.batch_norm_forward(np.ones((1, C, 1), np.float32), running_mean=s["rm"], running_var=s["rv"], backend=be)),
    ("eps negative", ValueError, r"eps must be a finite number >= 0, got -1e-05",
     lambda s, be, a: a.batch_norm(s["x"], s["rm"], s["rv"], training=True, eps=-1e-5, backend=be)),
    ("eps nan", ValueError, r"eps must be a finite number >= 0, got nan",
     lambda s, be, a: a.batch_norm_forward(s["x"], eps=float("nan"), running_mean=s["rm"], running_var=s["rv"], backend=be)),
    ("eps string", TypeError, r"eps must be a real number, got str",
     lambda s, be, a: a.batch_norm_forward(s["x"], eps="1e-5", backend=be)),
    ("momentum above 1", ValueError, r"momentum must be in \[0, 1\], got 1.5",
     lambda s, be, a: a.batch_norm(s["x"], s["rm"], s["rv"], training=True, momentum=1.5, backend=be)),
    ("momentum negative", ValueError, r"momentum must be in \[0, 1\], got -0.1",
     lambda s, be, a: a.batch_norm_forward(s["x"], running_mean=s["rm"], running_var=s["rv"], momentum=-0.1, backend=be)),
    ("momentum None", TypeError, r"momentum must be a real number in \[0, 1\], got NoneType",
     lambda s, be, a: a.batch_norm(s["x"], s["rm"], s["rv"], training=True, momentum=None, backend=be)),
    ("read-only running_mean", ValueError, r"running_mean is read-only",
     lambda s, be, a: a.batch_norm(s["x"], _readonly(s["rm"]), s["rv"], training=True, backend=be)),
    ("read-only running_var", ValueError, r"running_var is read-only",
     lambda s, be, a: a.batch_norm_forward(s["x"], running_mean=s["rm"], running_var=_readonly(s["rv"]), backend=be)),
    ("eval without running stats", ValueError, r"running_mean and running_var must be given when training=False",
     lambda s, be, a: a.batch_norm(s["x"], training=False, backend=be)),
    ("training not bool", TypeError, r"training must be a bool, got str",
     lambda s, be, a: a.batch_norm(s["x"], s["rm"], s["rv"], training="yes", backend=be)),
    ("unknown backend", ValueError, r"backend must be one of .*'gpu'",
     lambda s, be, a: a.batch_norm(s["x"], s["rm"], s["rv"], training=True, backend="gpu")),
    ("aliased running stats", ValueError, r"running_mean and running_var must not share memory",
     lambda s, be, a: a.batch_norm(s["x"], s["rm"], s["rm"], training=True, backend=be)),
    # ndarray subclasses whose meaning NumPy's base class would lose
    ("x masked", TypeError, r"x is a numpy\.ma\.MaskedArray.*x\.filled\(",
     lambda s, be, a: a.batch_norm(_masked(s["x"]), s["rm"], s["rv"], training=True, backend=be)),
    ("x masked strided", TypeError, r"x is a numpy\.ma\.MaskedArray",
     lambda s, be, a: a.batch_norm_forward(_masked(s["x"])[::2], running_mean=s["rm"], running_var=s["rv"], backend=be)),
    ("x matrix", TypeError, r"x is a numpy\.matrix.*np\.asarray\(x\)",
     lambda s, be, a: a.batch_norm(_matrix(s["x"][:, :, 0]), s["rm"], s["rv"], training=True, backend=be)),
    ("weight masked", TypeError, r"weight is a numpy\.ma\.MaskedArray",
     lambda s, be, a: a.batch_norm(s["x"], s["rm"], s["rv"], _masked(s["w"]), training=True, backend=be)),
    ("bias matrix", TypeError, r"bias is a numpy\.matrix",
     lambda s, be, a: a.batch_norm_forward(s["x"], s["w"], _matrix(s["b"]), running_mean=s["rm"], running_var=s["rv"], backend=be)),
    ("running_mean masked", TypeError, r"running_mean is a numpy\.ma\.MaskedArray",
     lambda s, be, a: a.batch_norm(s["x"], _masked(s["rm"]), s["rv"], training=True, backend=be)),
    ("running_var masked eval", TypeError, r"running_var is a numpy\.ma\.MaskedArray",
     lambda s, be, a: a.batch_norm(s["x"], s["rm"], _masked(s["rv"]), training=False, backend=be)),
    # one array library per call
    ("torch x numpy weight", TypeError, r"weight is a numpy array but x is a torch array",
     lambda s, be, a: a.batch_norm_forward(_torch(s["x"]), s["w"], running_mean=_torch(s["rm"]), running_var=_torch(s["rv"]), backend=be)),
    ("torch x numpy running stats", TypeError, r"running_mean is a numpy array but x is a torch array",
     lambda s, be, a: a.batch_norm(_torch(s["x"]), s["rm"], s["rv"], training=True, backend=be)),
    ("numpy x torch running_var", TypeError, r"running_var is a torch array but x is a numpy array",
     lambda s, be, a: a.batch_norm(s["x"], s["rm"], _torch(s["rv"]), training=True, backend=be)),
    ("numpy x torch bias", TypeError, r"bias is a torch array but x is a numpy array",
     lambda s, be, a: a.batch_norm_forward(s["x"], s["w"], _torch(s["b"]), running_mean=s["rm"], running_var=s["rv"], backend=be)),
    ("jax x numpy weight", TypeError, r"weight is a numpy array but x is a jax array",
     lambda s, be, a: a.batch_norm_forward(_jax(s["x"]), s["w"], backend=be)),
    # DLPack producers that do not follow the protocol
    ("x odd dlpack device", TypeError, r"x must be .*__dlpack_device__\(\) returned 'cpu'",
     lambda s, be, a: a.batch_norm(_OddDLPack(), s["rm"], s["rv"], training=True, backend=be)),
    ("weight raising dlpack device", TypeError, r"weight must be .*__dlpack_device__\(\) raised ValueError",
     lambda s, be, a: a.batch_norm(s["x"], s["rm"], s["rv"], _OddDLPack(raises=True), training=True, backend=be)),
    # byte order: any float byte order is accepted; read-only and non-float are still errors
    ("read-only big-endian running_mean", ValueError, r"running_mean is read-only",
     lambda s, be, a: a.batch_norm(s["x"], _readonly(_swapped(s["rm"])), s["rv"], training=True, backend=be)),
    ("x big-endian int", TypeError, r"x must have a floating dtype .*got >i4",
     lambda s, be, a: a.batch_norm_forward(np.ones((4, C), ">i4"), backend=be)),
]


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_forward_input(case, backend):
    _, exc, match, call = case
    s = _state()
    before = {k: v.copy() for k, v in s.items()}
    with pytest.raises(exc, match=match):
        call(s, backend, fastbn)
    for k in s:
        np.testing.assert_array_equal(s[k], before[k], err_msg=f"{k} was modified")


def test_unusable_backend_message():
    """A known backend that cannot run here says why (RuntimeError), or a type mismatch."""
    x = np.ones((4, 2), np.float32)
    if "cupy" in fastbn.backends():
        with pytest.raises(TypeError, match="backend 'cupy' runs on cupy arrays"):
            fastbn.batch_norm_forward(x, backend="cupy")
    else:
        with pytest.raises(RuntimeError, match="backend 'cupy' is not usable here: .+"):
            fastbn.batch_norm_forward(x, backend="cupy")


def _bwd_state():
    s = _state()
    s["dy"] = np.random.default_rng(1).standard_normal(s["x"].shape).astype(np.float32)
    _, s["mean"], s["invstd"] = fastbn.batch_norm_forward(s["x"])
    return s


BWD_CASES = [
    ("dy shape", ValueError, r"dy must have the shape of x \(4, 3, 5\), got \(4, 3\)",
     lambda s, be, a: a.batch_norm_backward(s["dy"][..., 0], s["x"], s["mean"], s["invstd"], backend=be)),
    ("dy list", TypeError, r"dy must be an array",
     lambda s, be, a: a.batch_norm_backward(s["dy"].tolist(), s["x"], s["mean"], s["invstd"], backend=be)),
    ("dy int", TypeError, r"dy must have a floating dtype",
     lambda s, be, a: a.batch_norm_backward(s["dy"].astype(np.int32), s["x"], s["mean"], s["invstd"], backend=be)),
    ("x int", TypeError, r"x must have a floating dtype",
     lambda s, be, a: a.batch_norm_backward(s["dy"], s["x"].astype(np.int16), s["mean"], s["invstd"], backend=be)),
    ("save_mean length", ValueError, r"save_mean must have shape \(3,\)",
     lambda s, be, a: a.batch_norm_backward(s["dy"], s["x"], s["mean"][:2], s["invstd"], backend=be)),
    ("save_invstd None", TypeError, r"save_invstd must be the array batch_norm_forward returned, got None",
     lambda s, be, a: a.batch_norm_backward(s["dy"], s["x"], s["mean"], None, backend=be)),
    ("weight length", ValueError, r"weight must have shape \(3,\)",
     lambda s, be, a: a.batch_norm_backward(s["dy"], s["x"], s["mean"], s["invstd"], np.ones(5, np.float32), backend=be)),
    ("axis out of range", ValueError, r"axis 5 is out of range",
     lambda s, be, a: a.batch_norm_backward(s["dy"], s["x"], s["mean"], s["invstd"], axis=5, backend=be)),
    ("axis changes C", ValueError, r"save_mean must have shape \(5,\)",
     lambda s, be, a: a.batch_norm_backward(s["dy"], s["x"], s["mean"], s["invstd"], axis=2, backend=be)),
    ("dy masked", TypeError, r"dy is a numpy\.ma\.MaskedArray",
     lambda s, be, a: a.batch_norm_backward(_masked(s["dy"]), s["x"], s["mean"], s["invstd"], backend=be)),
    ("save_invstd matrix", TypeError, r"save_invstd is a numpy\.matrix",
     lambda s, be, a: a.batch_norm_backward(s["dy"], s["x"], s["mean"], _matrix(s["invstd"]), backend=be)),
    ("torch dy numpy x", TypeError, r"dy is a torch array but x is a numpy array",
     lambda s, be, a: a.batch_norm_backward(_torch(s["dy"]), s["x"], s["mean"], s["invstd"], backend=be)),
    ("torch x numpy save_mean", TypeError, r"save_mean is a numpy array but x is a torch array",
     lambda s, be, a: a.batch_norm_backward(_torch(s["dy"]), _torch(s["x"]), s["mean"], _torch(s["invstd"]), backend=be)),
    ("dy odd dlpack device", TypeError, r"dy must be .*__dlpack_device__\(\)",
     lambda s, be, a: a.batch_norm_backward(_OddDLPack(), s["x"], s["mean"], s["invstd"], backend=be)),
]


@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
@pytest.mark.parametrize("case", BWD_CASES, ids=[c[0] for c in BWD_CASES])
def test_bad_backward_input(case, backend):
    _, exc, match, call = case
    s = _bwd_state()
    before = {k: v.copy() for k, v in s.items()}
    with pytest.raises(exc, match=match):
        call(s, backend, fastbn)
    for k in s:
        np.testing.assert_array_equal(s[k], before[k], err_msg=f"{k} was modified")


REFERENCE_CASES = [c for c in CASES if "backend" not in c[0]]


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=[c[0] for c in REFERENCE_CASES])
def test_reference_validates_too(case):
    """The oracle has the same argument checks and messages as the public API."""
    _, exc, match, call = case
    s = _state()
    before = {k: v.copy() for k, v in s.items()}
    with pytest.raises(exc, match=match):
        call(s, None, fastbn.reference)
    for k in s:
        np.testing.assert_array_equal(s[k], before[k], err_msg=f"{k} was modified")


@pytest.mark.parametrize("case", BWD_CASES, ids=[c[0] for c in BWD_CASES])
def test_reference_backward_validates_too(case):
    _, exc, match, call = case
    s = _bwd_state()
    with pytest.raises(exc, match=match):
        call(s, None, fastbn.reference)
