"""The stateful BatchNorm layer: torch's running-stat semantics, modes and state_dict."""

import copy
import multiprocessing
import pickle
import warnings

import numpy as np
import pytest

import fastbn
from _helpers import unit_roundoff


def _x(seed=0, shape=(8, 3, 4, 4), offset=2.0):
    rng = np.random.default_rng(seed)
    return (offset + 1.5 * rng.standard_normal(shape)).astype(np.float32)


def test_defaults():
    bn = fastbn.BatchNorm(3)
    assert bn.training and bn.affine and bn.track_running_stats
    assert np.array_equal(bn.weight, np.ones(3)) and np.array_equal(bn.bias, np.zeros(3))
    assert np.array_equal(bn.running_mean, np.zeros(3)) and np.array_equal(bn.running_var, np.ones(3))
    assert bn.num_batches_tracked == 0 and bn.weight.dtype == np.float32


def test_running_stats_follow_momentum():
    bn = fastbn.BatchNorm(3, momentum=0.25, dtype="float64")
    rm, rv = np.zeros(3), np.ones(3)
    for seed in range(3):
        x = _x(seed).astype(np.float64)
        bn(x)
        xc = np.moveaxis(x, 1, 0).reshape(3, -1)
        rm = 0.75 * rm + 0.25 * xc.mean(axis=1)
        rv = 0.75 * rv + 0.25 * xc.var(axis=1, ddof=1)
    np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, rv, rtol=1e-12)
    assert bn.num_batches_tracked == 3


def test_momentum_none_is_cumulative_average():
    bn = fastbn.BatchNorm(3, momentum=None, dtype="float64")
    xs = [_x(s).astype(np.float64) for s in range(4)]
    for x in xs:
        bn(x)
    means = [np.moveaxis(x, 1, 0).reshape(3, -1).mean(axis=1) for x in xs]
    variances = [np.moveaxis(x, 1, 0).reshape(3, -1).var(axis=1, ddof=1) for x in xs]
    # torch: factor 1/n at the n-th batch -> the plain average of the batch statistics
    np.testing.assert_allclose(bn.running_mean, np.mean(means, axis=0), rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, np.mean(variances, axis=0), rtol=1e-12)


def test_eval_uses_running_stats_and_changes_nothing():
    bn = fastbn.BatchNorm(3)
    bn(_x(0))
    bn.eval()
    state = bn.state_dict()
    x = _x(1)
    y = bn(x)
    after = bn.state_dict()
    for k in state:
        assert np.array_equal(state[k], after[k])
    expected = (x - bn.running_mean[None, :, None, None]) / np.sqrt(bn.running_var[None, :, None, None] + bn.eps)
    np.testing.assert_allclose(y, expected, rtol=0, atol=16 * unit_roundoff(np.float32) * np.abs(expected).max())


def test_eval_backward_treats_stats_as_constants():
    bn = fastbn.BatchNorm(3, dtype="float64")
    bn.weight[:] = [0.5, 2.0, -1.0]
    bn(_x(0).astype(np.float64))
    bn.eval()
    x = _x(1).astype(np.float64)
    bn(x)
    dy = np.random.default_rng(2).standard_normal(x.shape)
    dx = bn.backward(dy)
    invstd = 1 / np.sqrt(bn.running_var + bn.eps)
    np.testing.assert_allclose(dx, dy * (bn.weight * invstd)[None, :, None, None], rtol=1e-13)
    xhat = (x - bn.running_mean[None, :, None, None]) * invstd[None, :, None, None]
    np.testing.assert_allclose(bn.grad_weight, (dy * xhat).sum(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(bn.grad_bias, dy.sum(axis=(0, 2, 3)), rtol=1e-12)


def test_train_backward_matches_functional():
    bn = fastbn.BatchNorm(4, axis=-1, dtype="float64")
    bn.weight[:] = [1.0, -0.5, 2.0, 0.1]
    x = _x(3, shape=(16, 5, 4)).astype(np.float64)
    y = bn(x)
    dy = np.random.default_rng(4).standard_normal(y.shape)
    dx = bn.backward(dy)
    _, mean, invstd = fastbn.reference.batch_norm_forward(x, bn.weight, axis=-1)
    dx_ref, dw_ref, db_ref = fastbn.reference.batch_norm_backward(dy, x, mean, invstd, bn.weight, axis=-1)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bn.grad_weight, dw_ref, rtol=1e-9)
    np.testing.assert_allclose(bn.grad_bias, db_ref, rtol=1e-9)


def test_no_tracking_uses_batch_stats_in_eval():
    bn = fastbn.BatchNorm(3, track_running_stats=False)
    assert bn.running_mean is None and bn.num_batches_tracked is None
    bn.eval()
    x = _x(5)
    y = bn(x)
    y_ref, _, _ = fastbn.reference.batch_norm_forward(x)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5)
    assert set(bn.state_dict()) == {"weight", "bias"}


def test_not_affine():
    bn = fastbn.BatchNorm(3, affine=False)
    assert bn.weight is None and bn.bias is None
    x = _x(6)
    bn(x)
    bn.backward(np.ones_like(x))
    assert bn.grad_weight is None
    assert set(bn.state_dict()) == {"running_mean", "running_var", "num_batches_tracked"}


def test_state_dict_round_trip():
    bn = fastbn.BatchNorm(3)
    for s in range(3):
        bn(_x(s))
    bn.weight[:] = [1.0, 2.0, 3.0]
    state = bn.state_dict()
    assert list(state) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert state["num_batches_tracked"].dtype == np.int64 and int(state["num_batches_tracked"]) == 3
    other = fastbn.BatchNorm(3)
    other.load_state_dict(state)
    for k, v in other.state_dict().items():
        assert np.array_equal(v, state[k])
    state["weight"][0] = 99  # a copy: the layer is unaffected
    assert bn.weight[0] == 1.0


class _NoArray:
    """Refuses conversion to a NumPy array, as a CuPy array does."""

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed")


def _bfloat16(values):
    torch = pytest.importorskip("torch")
    return torch.tensor(values, dtype=torch.bfloat16)


def _meta_tensor():
    return pytest.importorskip("torch").empty(3, device="meta")


BAD_STATE = [
    ("None", TypeError, r"state_dict must be a mapping .*got NoneType", lambda s: None),
    ("list", TypeError, r"state_dict must be a mapping .*got list", lambda s: list(s.items())),
    ("negative num_batches_tracked", ValueError, r"num_batches_tracked must be >= 0, got -1",
     lambda s: {**s, "num_batches_tracked": np.array(-1)}),
    ("negative int num_batches_tracked", ValueError, r"num_batches_tracked must be >= 0, got -5",
     lambda s: {**s, "num_batches_tracked": -5}),
    ("float num_batches_tracked", TypeError, r"num_batches_tracked must be an integer.*float",
     lambda s: {**s, "num_batches_tracked": 3.0}),
    ("float array num_batches_tracked", TypeError, r"num_batches_tracked must be an integer.*float64",
     lambda s: {**s, "num_batches_tracked": np.array(3.0)}),
    ("bool num_batches_tracked", TypeError, r"num_batches_tracked must be an integer.*bool",
     lambda s: {**s, "num_batches_tracked": True}),
    ("bool array num_batches_tracked", TypeError, r"num_batches_tracked must be an integer.*bool",
     lambda s: {**s, "num_batches_tracked": np.array(True)}),
    ("1-d num_batches_tracked", ValueError, r"num_batches_tracked must be a scalar.*\(1,\)",
     lambda s: {**s, "num_batches_tracked": np.array([3])}),
    ("None num_batches_tracked", TypeError, r"num_batches_tracked must be an integer.*NoneType",
     lambda s: {**s, "num_batches_tracked": None}),
    ("unconvertible num_batches_tracked", TypeError, r"num_batches_tracked cannot be converted",
     lambda s: {**s, "num_batches_tracked": _NoArray()}),
    ("unconvertible weight", TypeError,
     r"weight cannot be converted to a NumPy array .*Implicit conversion",
     lambda s: {**s, "weight": _NoArray()}),
    ("None bias", TypeError, r"bias must be a floating array, got NoneType",
     lambda s: {**s, "bias": None}),
    ("string running_mean", TypeError, r"running_mean must be a floating array",
     lambda s: {**s, "running_mean": "abc"}),
    ("int running_var", TypeError, r"running_var must be a floating array, got dtype int64",
     lambda s: {**s, "running_var": np.ones(3, np.int64)}),
    ("complex weight", TypeError, r"weight must be a floating array, got dtype complex128",
     lambda s: {**s, "weight": np.ones(3, complex)}),
    ("short running_var", ValueError, r"running_var must have shape \(3,\), got \(4,\)",
     lambda s: {**s, "running_var": np.ones(4, np.float32)}),
    ("meta tensor", TypeError, r"running_mean cannot be converted to a NumPy array",
     lambda s: {**s, "running_mean": _meta_tensor()}),
    ("bfloat16 wrong length", ValueError, r"bias must have shape \(3,\), got \(2,\)",
     lambda s: {**s, "bias": _bfloat16([1.0, 2.0])}),
    ("strict not bool", TypeError, r"strict must be a bool, got str", "strict"),
]


@pytest.mark.parametrize("case", BAD_STATE, ids=[c[0] for c in BAD_STATE])
def test_bad_state_dict_changes_nothing(case):
    _, exc, match, make = case
    bn = _trained()
    good = bn.state_dict()
    before = _attributes(bn)
    with pytest.raises(exc, match=match):
        if make == "strict":
            bn.load_state_dict(good, strict="no")
        else:
            bn.load_state_dict(make(good))
    _assert_unchanged(bn, before)
    bn.load_state_dict(good)  # still usable
    _assert_unchanged(bn, before)


def test_bad_state_dict_non_strict_changes_nothing():
    bn = _trained()
    before = _attributes(bn)
    with pytest.raises(ValueError, match=r"num_batches_tracked must be >= 0"):
        bn.load_state_dict({"weight": np.zeros(3, np.float32), "num_batches_tracked": -1},
                           strict=False)
    _assert_unchanged(bn, before)


def test_load_bfloat16_torch_state():
    torch = pytest.importorskip("torch")
    ref = torch.nn.BatchNorm2d(3).to(torch.bfloat16)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
        ref.running_var.copy_(torch.tensor([1.25, 3.0, 0.0078125]))
    ref.num_batches_tracked += 7
    bn = fastbn.BatchNorm(3)
    bn.load_state_dict(ref.state_dict())
    np.testing.assert_array_equal(bn.weight, [0.5, 1.5, -2.0])
    np.testing.assert_array_equal(bn.running_var, [1.25, 3.0, 0.0078125])
    assert bn.weight.dtype == np.float32 and bn.num_batches_tracked == 7
    assert type(bn.num_batches_tracked) is int


def test_load_state_dict_accepts_integer_scalars():
    bn = fastbn.BatchNorm(3)
    for n, expected in ((np.int32(4), 4), (5, 5), (np.array(6, np.uint8), 6), (0, 0)):
        state = bn.state_dict()
        state["num_batches_tracked"] = n
        bn.load_state_dict(state)
        assert bn.num_batches_tracked == expected and type(bn.num_batches_tracked) is int


def test_load_state_dict_validates_before_assigning():
    bn = fastbn.BatchNorm(3)
    bn(_x(0))
    before = bn.state_dict()
    bad = dict(before)
    bad["running_var"] = np.ones(4, np.float32)
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\)"):
        bn.load_state_dict(bad)
    missing = {k: v for k, v in before.items() if k != "bias"}
    with pytest.raises(KeyError, match=r"missing keys \['bias'\]"):
        bn.load_state_dict(missing)
    for k, v in bn.state_dict().items():
        assert np.array_equal(v, before[k])


def test_bad_input_changes_nothing():
    bn = fastbn.BatchNorm(3)
    bn(_x(0))
    before = bn.state_dict()
    with pytest.raises(ValueError, match=r"x has 4 features along axis 1 .* num_features=3"):
        bn(_x(1, shape=(8, 4, 2)))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn(_x(1, shape=(1, 3)))
    for k, v in bn.state_dict().items():
        assert np.array_equal(v, before[k]), k


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(num_features=0), ValueError, "num_features must be a positive integer"),
    (dict(num_features=3, eps=-1.0), ValueError, "eps must be"),
    (dict(num_features=3, momentum=2.0), ValueError, "momentum must be in"),
    (dict(num_features=3, dtype="int32"), TypeError, "dtype must be float32 or float64"),
    (dict(num_features=3, device="tpu"), ValueError, "device must be 'cpu' or 'gpu'"),
    (dict(num_features=3, axis="1"), TypeError, "axis must be an integer"),
    (dict(num_features=3.0), TypeError, "num_features must be an integer, got float"),
    (dict(num_features=True), TypeError, "num_features must be an integer, got bool"),
    (dict(num_features="3"), TypeError, "num_features must be an integer, got str"),
    (dict(num_features=3, affine="no"), TypeError, "affine must be a bool, got str"),
    (dict(num_features=3, affine=1), TypeError, "affine must be a bool, got int"),
    (dict(num_features=3, affine=None), TypeError, "affine must be a bool, got NoneType"),
    (dict(num_features=3, track_running_stats="False"), TypeError,
     "track_running_stats must be a bool, got str"),
    (dict(num_features=3, track_running_stats=0), TypeError, "track_running_stats must be a bool"),
    (dict(num_features=3, device=0), TypeError, "device must be 'cpu' or 'gpu', got int"),
    (dict(num_features=3, device=None), TypeError, "device must be 'cpu' or 'gpu', got NoneType"),
    (dict(num_features=3, dtype=None), TypeError, "dtype must be float32 or float64, got None"),
    (dict(num_features=3, dtype=">f4"), TypeError, "dtype must be float32 or float64, got >f4"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastbn.BatchNorm(**kwargs)


def test_constructor_accepts_numpy_scalars():
    bn = fastbn.BatchNorm(np.int64(3), axis=np.int32(-1), affine=np.bool_(False),
                          track_running_stats=np.True_, device=np.str_("cpu"))
    assert bn.num_features == 3 and type(bn.num_features) is int
    assert bn.axis == -1 and type(bn.axis) is int
    assert bn.affine is False and bn.track_running_stats is True
    assert bn.weight is None and bn.running_mean is not None
    assert bn.device == "cpu" and type(bn.device) is str


@pytest.mark.parametrize("mode", ["no", 0, None, 1.0])
def test_train_mode_must_be_bool(mode):
    bn = fastbn.BatchNorm(3)
    with pytest.raises(TypeError, match="mode must be a bool"):
        bn.train(mode)
    assert bn.training is True
    assert bn.train(np.False_).training is False


# ----------------------------------------------------------------------------- bad inputs
def _attributes(bn):
    """Every attribute of the layer, arrays copied, for before/after comparisons."""
    out = {}
    for k, val in vars(bn).items():
        if isinstance(val, np.ndarray):
            out[k] = ("array", val.dtype, val.copy())
        elif k == "_saved":
            out[k] = ("saved", None if val is None else tuple(id(a) for a in val))
        else:
            out[k] = ("value", val)
    return out


def _assert_unchanged(bn, before):
    after = _attributes(bn)
    assert after.keys() == before.keys()
    for k, b in before.items():
        a = after[k]
        if b[0] == "array":
            assert a[0] == "array" and a[1] == b[1], k
            np.testing.assert_array_equal(a[2], b[2], err_msg=k)
        else:
            assert a == b, k


def _matrix(a):
    """``numpy.matrix(a)``, without its PendingDeprecationWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.matrix(a)


class _OddDLPack:
    def __dlpack__(self, **kwargs):
        raise BufferError("cannot pack")

    def __dlpack_device__(self):
        return "cpu"


def _torch_x(x):
    return pytest.importorskip("torch").from_numpy(x)


BAD_LAYER_INPUTS = [
    ("masked", TypeError, r"x is a numpy\.ma\.MaskedArray", lambda x: np.ma.masked_array(x)),
    ("masked strided", TypeError, r"x is a numpy\.ma\.MaskedArray",
     lambda x: np.ma.masked_array(np.concatenate([x, x]))[::2]),
    ("matrix", TypeError, r"x is a numpy\.matrix", lambda x: _matrix(x[:, :, 0, 0])),
    ("odd dlpack", TypeError, r"x must be .*__dlpack_device__", lambda x: _OddDLPack()),
    ("torch", TypeError,
     r"x is a torch array, but this BatchNorm holds NumPy arrays.*fastbn\.torch\.BatchNorm2d.*"
     r"fastbn\.torch\.convert", _torch_x),
    ("jax", TypeError, r"x is a jax array, but this BatchNorm holds NumPy arrays.*fastbn\.jax",
     lambda x: pytest.importorskip("jax.numpy").asarray(x)),
]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", BAD_LAYER_INPUTS, ids=[c[0] for c in BAD_LAYER_INPUTS])
def test_bad_layer_input_changes_nothing(case, mode):
    _, exc, match, make = case
    bn = fastbn.BatchNorm(3, momentum=None)
    x = _x(0)
    bn(x)
    bn.backward(np.ones_like(x))
    bn.train(mode == "train")
    before = _attributes(bn)
    with pytest.raises(exc, match=match):
        bn(make(_x(1)))
    _assert_unchanged(bn, before)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bad_layer_dy_changes_nothing(mode):
    bn = fastbn.BatchNorm(3)
    x = _x(0)
    bn(x)
    bn.train(mode == "train")
    bn(x)
    bn.backward(np.ones_like(x))
    before = _attributes(bn)
    for dy, match in ((np.ma.masked_array(np.ones_like(x)), r"dy is a numpy\.ma\.MaskedArray"),
                      (_torch_x(np.ones_like(x)), r"dy is a torch array but x is a numpy array"),
                      (np.ones(x.shape, np.int32), r"dy must have a floating dtype"),
                      (np.ones((2, 3), np.float32), r"dy must have the shape of x")):
        with pytest.raises((TypeError, ValueError), match=match):
            bn.backward(dy)
        _assert_unchanged(bn, before)


def test_eval_backward_big_endian_results_are_native():
    bn = fastbn.BatchNorm(3).eval()
    x = _x(0)
    y = bn(x.astype(">f4"))
    dx = bn.backward(np.ones(x.shape, ">f4"))
    assert y.dtype == np.float32 and y.dtype.isnative
    assert dx.dtype == np.float32 and dx.dtype.isnative
    np.testing.assert_array_equal(y, bn(x))
    np.testing.assert_array_equal(dx, bn.backward(np.ones_like(x)))


# ----------------------------------------------------------------------------- pickling, copies
def _trained(seed=0, **kwargs):
    bn = fastbn.BatchNorm(3, **kwargs)
    bn.weight[:] = [0.5, 1.5, -2.0]
    bn.bias[:] = [0.1, -0.2, 0.3]
    for s in range(2):
        x = _x(seed + s)
        bn(x)
        bn.backward(np.ones_like(x))
    return bn


def _same_state(a, b):
    assert repr(a) == repr(b)
    assert a.training == b.training and a.num_batches_tracked == b.num_batches_tracked
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    for k in ("grad_weight", "grad_bias"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)


@pytest.mark.parametrize("kwargs", [dict(), dict(momentum=None, dtype="float64"),
                                    dict(affine=False, track_running_stats=False)], ids=str)
def test_pickle_round_trip(kwargs):
    bn = fastbn.BatchNorm(3, axis=1, eps=1e-3, **kwargs)
    x = _x(0)
    bn(x)
    bn.backward(np.ones_like(x))
    clone = pickle.loads(pickle.dumps(bn))
    _same_state(bn, clone)
    assert clone.xp is np
    for mode in (True, False):
        bn.train(mode)
        clone.train(mode)
        x = _x(5)
        np.testing.assert_array_equal(clone(x), bn(x))
        dy = np.random.default_rng(6).standard_normal(x.shape).astype(np.float32)
        np.testing.assert_array_equal(clone.backward(dy), bn.backward(dy))
        _same_state(bn, clone)


def test_copies_need_a_new_forward_before_backward():
    bn = fastbn.BatchNorm(3)
    x = _x(0)
    bn(x)
    data = pickle.dumps(bn)
    assert x.tobytes() not in data  # the saved input is not part of the pickle
    for clone in (pickle.loads(data), copy.deepcopy(bn)):
        with pytest.raises(RuntimeError, match="forward pass first"):
            clone.backward(np.ones_like(x))
    bn.backward(np.ones_like(x))  # the original keeps its saved input


def test_deepcopy_is_independent():
    bn = _trained()
    clone = copy.deepcopy(bn)
    _same_state(bn, clone)
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert not np.shares_memory(getattr(bn, name), getattr(clone, name)), name
    before = bn.state_dict()
    x = _x(7)
    clone(x)
    clone.backward(np.ones_like(x))
    clone.weight[0] = 42.0
    clone.train(False)
    for k, val in bn.state_dict().items():
        np.testing.assert_array_equal(val, before[k], err_msg=k)
    assert bn.training and clone.num_batches_tracked == bn.num_batches_tracked + 1
    bn(x)  # and the other way round
    assert clone.num_batches_tracked == bn.num_batches_tracked


def _train_step(bn, x):
    """Run in a worker process: one training step on a layer that came through pickle."""
    y = bn(x)
    dx = bn.backward(np.ones_like(x))
    return y, dx, bn


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_layer_in_a_worker_process(method):
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"start method {method!r} is not available here")
    bn = _trained()
    x = _x(9)
    with multiprocessing.get_context(method).Pool(1) as pool:
        y, dx, remote = pool.apply(_train_step, (bn, x))
    y_here, dx_here, _ = _train_step(bn, x)
    np.testing.assert_array_equal(y, y_here)
    np.testing.assert_array_equal(dx, dx_here)
    _same_state(remote, bn)


def test_pickle_on_cupy():
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as exc:  # noqa: BLE001 - CuPy installed but no usable driver
        pytest.skip(f"no CUDA device ({exc})")
    bn = fastbn.BatchNorm(3, device="gpu")
    x = cp.asarray(_x(0))
    bn(x)
    for clone in (pickle.loads(pickle.dumps(bn)), copy.deepcopy(bn)):
        assert clone.xp is cp and isinstance(clone.running_mean, cp.ndarray)
        np.testing.assert_array_equal(clone.running_mean.get(), bn.running_mean.get())
        x = cp.asarray(_x(1))
        np.testing.assert_array_equal(clone(x).get(), bn(x).get())
    bn.eval()
    with pytest.raises(TypeError, match=r"x is a numpy array, but this BatchNorm holds CuPy arrays"):
        bn(_x(2))


def test_backward_before_forward():
    with pytest.raises(RuntimeError, match="forward pass first"):
        fastbn.BatchNorm(2).backward(np.ones((4, 2), np.float32))


# ----------------------------------------------------------------------------- torch parity
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_matches_torch_batchnorm2d(momentum, dtype):
    torch = pytest.importorskip("torch")
    tdtype = getattr(torch, dtype)
    ref = torch.nn.BatchNorm2d(3, momentum=momentum, dtype=tdtype)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
        ref.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    bn = fastbn.BatchNorm(3, momentum=momentum, dtype=dtype)
    bn.load_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
    u = unit_roundoff(np.dtype(dtype))
    for step in range(3):
        x = _x(step, offset=3.0).astype(dtype)
        xt = torch.tensor(x, requires_grad=True)
        yt = ref(xt)
        dy = np.random.default_rng(10 + step).standard_normal(x.shape).astype(dtype)
        yt.backward(torch.tensor(dy))
        y = bn(x)
        dx = bn.backward(dy)
        # both are stable implementations: each within ~16 u (1 + r + |xhat|) of exact, with
        # r ~ 2 and |xhat| <= 5 here: 2 * 16 u * 8 = 256 u of each other, relative to the scale
        tol = 256 * u
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=0, atol=tol * 2 * np.abs(y).max())
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=0, atol=tol * np.abs(dx).max())
        np.testing.assert_allclose(bn.grad_weight, ref.weight.grad.numpy(), rtol=0,
                                   atol=tol * 16 * np.abs(bn.grad_weight).max() + tol)
        np.testing.assert_allclose(bn.grad_bias, ref.bias.grad.numpy(), rtol=tol * 16, atol=tol * np.sqrt(x.size))
        ref.weight.grad = None
        ref.bias.grad = None
    for k, v in ref.state_dict().items():
        np.testing.assert_allclose(bn.state_dict()[k], v.numpy(), rtol=64 * u)
    ref.eval()
    bn.eval()
    x = _x(9).astype(dtype)
    np.testing.assert_allclose(bn(x), ref(torch.tensor(x)).detach().numpy(), rtol=0,
                               atol=256 * u * 8)


def test_float16_running_stats_and_input():
    """Running statistics replaced by float16 arrays keep their dtype and are updated in
    float64, rounded once (as the functional API does); float16 input works in both modes."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((32, 3, 4)) * 2 + 1).astype(np.float16)
    bn = fastbn.BatchNorm(3)
    bn.running_mean = np.zeros(3, np.float16)
    bn.running_var = np.ones(3, np.float16)
    ref = fastbn.BatchNorm(3, dtype="float64")
    for _ in range(3):
        bn(x)
        ref(x)
        assert bn.running_mean.dtype == np.float16 and bn.running_var.dtype == np.float16
        np.testing.assert_array_equal(bn.running_mean, ref.running_mean.astype(np.float16))
        np.testing.assert_array_equal(bn.running_var, ref.running_var.astype(np.float16))
        ref.running_mean = bn.running_mean.astype(np.float64)  # continue from the rounded
        ref.running_var = bn.running_var.astype(np.float64)
    y = bn.eval()(x)
    assert y.dtype == np.float16 and np.all(np.isfinite(y))
