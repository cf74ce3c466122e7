"""The stateful BatchNorm layer: torch's running-stat semantics, modes and state_dict."""

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
])
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastbn.BatchNorm(**kwargs)


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
