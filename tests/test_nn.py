"""Tests of the MLP trainer: every backward pass against finite differences (float64), the
whole model against torch (float32), the optimizers against closed-form steps, the data,
and determinism under a seed."""

from __future__ import annotations

import random
import socket

import numpy as np
import pytest

import fastbn
from fastbn import nn

# Central differences in float64 with step H: truncation error ~ H^2 * |f'''| ~ 1e-12 and
# rounding error ~ u * |f| / H ~ 1e-16 / 1e-6 = 1e-10 (relative to |f| ~ 1), so analytic and
# numeric gradients of O(1) functions agree to ~1e-9; RTOL/ATOL leave two orders of margin
# while any wrong term in a backward pass (an O(1) error) fails by many orders.
H = 1e-6
RTOL, ATOL = 1e-6, 1e-7


def numeric_grad(f, a):
    """Central-difference gradient of scalar f() with respect to array `a` (perturbed in place)."""
    g = np.zeros_like(a)
    it = np.nditer(a, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = a[i]
        a[i] = old + H
        fp = f()
        a[i] = old - H
        fm = f()
        a[i] = old
        g[i] = (fp - fm) / (2 * H)
    return g


def check_layer(layer, x, training=True):
    """Compare layer.backward (input and parameter grads) with finite differences of sum(y * r)."""
    rng = np.random.default_rng(1)
    r = rng.standard_normal(layer.forward(x.copy(), training).shape)

    def loss():
        return float((layer.forward(x, training) * r).sum())

    loss()
    dx = layer.backward(r)
    grads = [(p.grad.copy(), p) for p in layer.parameters()]
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=RTOL, atol=ATOL)
    for g, p in grads:
        np.testing.assert_allclose(g, numeric_grad(loss, p.value), rtol=RTOL, atol=ATOL,
                                   err_msg=p.name)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_linear_backward(rng):
    lin = nn.Linear(5, 4, np, rng, dtype="float64")
    lin.bias.value[...] = rng.standard_normal(4)
    check_layer(lin, rng.standard_normal((7, 5)))


@pytest.mark.parametrize("layer", [nn.ReLU(), nn.Tanh(np), nn.Sigmoid(np)], ids=["relu", "tanh", "sigmoid"])
def test_activation_backward(layer, rng):
    x = rng.standard_normal((6, 5))
    x[np.abs(x) < 1e-3] = 0.5  # keep ReLU away from its kink (FD step is 1e-6)
    check_layer(layer, x)


def test_sigmoid_values_and_no_overflow():
    s = nn.Sigmoid(np)
    x = np.array([[-1000.0, -5.0, 0.0, 5.0, 1000.0]])
    with np.errstate(all="raise"):
        y = s.forward(x)
    np.testing.assert_allclose(y, 1 / (1 + np.exp(-np.clip(x, -700, 700))), rtol=1e-12, atol=1e-300)


def test_dropout_backward_and_scaling(rng):
    d = nn.Dropout(0.3, np, seed=5)
    x = rng.standard_normal((50, 40))
    y = d.forward(x, training=True)
    mask = d._mask.copy()
    kept = mask != 0
    np.testing.assert_allclose(y[kept], x[kept] / 0.7, rtol=1e-12)
    assert not y[~kept].any()
    # 2000 Bernoulli(0.3) draws: std of the drop fraction is sqrt(.3*.7/2000) = 0.01; 5 sigma
    assert abs((~kept).mean() - 0.3) < 0.05
    np.testing.assert_array_equal(d.backward(np.ones_like(x)), mask)
    assert d.forward(x, training=False) is x


@pytest.mark.parametrize("ghost", [None, 3])
def test_batchnorm_backward(ghost, rng):
    bn = nn.BatchNorm(4, np, ghost_batch_size=ghost, dtype="float64")
    bn.weight.value[...] = rng.uniform(0.5, 2.0, 4)
    bn.bias.value[...] = rng.standard_normal(4)
    x = rng.standard_normal((9, 4)) * 3 + 1
    check_layer(bn, x)


def test_batchnorm_forward_matches_reference(rng):
    bn = nn.BatchNorm(6, np, dtype="float64", momentum=0.2)
    bn.weight.value[...] = rng.uniform(0.5, 2.0, 6)
    bn.bias.value[...] = rng.standard_normal(6)
    x = rng.standard_normal((32, 6)) * 2 + 5
    rm, rv = np.zeros(6), np.ones(6)
    ref, _, _ = fastbn.reference.batch_norm_forward(x, bn.weight.value, bn.bias.value, eps=1e-5,
                                                    running_mean=rm, running_var=rv, momentum=0.2)
    y = bn.forward(x, training=True)
    # float64 two-pass statistics on both sides: agreement to a few ulps of O(1) outputs
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(bn.running_var, rv, rtol=1e-12)
    ye = bn.forward(x, training=False)
    ref_e = fastbn.reference.batch_norm(x, rm, rv, bn.weight.value, bn.bias.value, training=False)
    np.testing.assert_allclose(ye, ref_e, rtol=1e-12, atol=1e-12)


def test_ghost_batchnorm_normalizes_chunks_separately(rng):
    bn = nn.BatchNorm(3, np, ghost_batch_size=4, dtype="float64")
    x = rng.standard_normal((12, 3)) + np.arange(12)[:, None]  # chunk means differ
    y = bn.forward(x, training=True)
    for lo in (0, 4, 8):
        ref, _, _ = fastbn.reference.batch_norm_forward(x[lo:lo + 4])
        np.testing.assert_allclose(y[lo:lo + 4], ref, rtol=1e-12, atol=1e-12)
    # whole-batch BN would give a different result
    assert not np.allclose(y, fastbn.reference.batch_norm_forward(x)[0])


def test_running_stats_frozen_when_disabled(rng):
    bn = nn.BatchNorm(3, np)
    bn.update_running_stats = False
    bn.forward(rng.standard_normal((8, 3)).astype(np.float32) + 4)
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)


def test_cross_entropy_value_and_backward(rng):
    ce = nn.SoftmaxCrossEntropy(np)
    logits = rng.standard_normal((5, 4)) * 3
    y = rng.integers(0, 4, 5)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(float(ce.forward(logits, y)), -np.log(p[np.arange(5), y]).mean(), rtol=1e-12)
    d = ce.backward()
    np.testing.assert_allclose(d, numeric_grad(lambda: float(ce.forward(logits, y)), logits),
                               rtol=RTOL, atol=ATOL)
    # no overflow for huge logits
    assert np.isfinite(float(ce.forward(np.array([[1e4, -1e4]]), np.array([1]))))


@pytest.mark.parametrize("bn,act,dropout", [(False, "tanh", 0.0), (True, "sigmoid", 0.0),
                                            (True, "relu", 0.2)])
def test_mlp_backward_end_to_end(bn, act, dropout, rng):
    model = nn.MLP([5, 6, 7, 3], np, seed=3, activation=act, batch_norm=bn, dropout=dropout,
                   dtype="float64")
    ce = nn.SoftmaxCrossEntropy(np)
    x = rng.standard_normal((10, 5))
    y = rng.integers(0, 3, 10)
    if dropout:  # freeze the masks: replay the first pass's masks in every FD evaluation
        model.forward(x, True)
        drops = [lyr for lyr in model.layers if isinstance(lyr, nn.Dropout)]
        masks = [d._mask.copy() for d in drops]
        for d, mk in zip(drops, masks):
            d._rng = type("Fixed", (), {"random": lambda self, shape, dtype, mk=mk: np.where(mk > 0, 1.0, 0.0).astype(dtype)})()

    def loss():
        return float(ce.forward(model.forward(x, True), y))

    loss()
    model.backward(ce.backward())
    for p in model.parameters():
        g = p.grad.copy()
        np.testing.assert_allclose(g, numeric_grad(loss, p.value), rtol=RTOL, atol=ATOL, err_msg=p.name)


def test_mlp_structure():
    m = nn.MLP([4, 8, 8, 2], np, batch_norm=True, dropout=0.1)
    kinds = [type(layer).__name__ for layer in m.layers]
    assert kinds == ["Linear", "BatchNorm", "ReLU", "Dropout", "Linear", "BatchNorm", "ReLU",
                     "Dropout", "Linear"]
    assert m.linears[0].bias is None and m.linears[-1].bias is not None  # BN's shift replaces it
    pre = m.pre_activations(np.zeros((3, 4), np.float32) + np.arange(3)[:, None])
    assert [a.shape for a in pre] == [(3, 8), (3, 8)]


@pytest.mark.parametrize("init,expected", [("he", np.sqrt(2 / 400)), ("xavier", np.sqrt(2 / 600)),
                                           ("normal", 1.0)])
def test_linear_init_scale(init, expected):
    lin = nn.Linear(400, 200, np, np.random.default_rng(0), init=init, init_scale=0.5)
    # 80000 draws: the sample std is within 1% of the true one with overwhelming probability
    np.testing.assert_allclose(lin.weight.value.std(), 0.5 * expected, rtol=0.01)


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="init"):
        nn.Linear(2, 2, np, np.random.default_rng(0), init="bogus")
    with pytest.raises(ValueError, match="init_scale"):
        nn.Linear(2, 2, np, np.random.default_rng(0), init_scale=-1)
    with pytest.raises(ValueError, match="ghost_batch_size"):
        nn.BatchNorm(2, np, ghost_batch_size=1)
    with pytest.raises(ValueError, match="dropout p"):
        nn.Dropout(1.0, np)
    with pytest.raises(ValueError, match="activation"):
        nn.MLP([2, 2, 2], np, activation="gelu")


# ---------------------------------------------------------------- optimizers


def _params(rng, n=2):
    ps = [nn.Parameter(rng.standard_normal(3)) for _ in range(n)]
    return ps, [p.value.copy() for p in ps]


def test_sgd_plain_step(rng):
    ps, p0 = _params(rng)
    g = [rng.standard_normal(3) for _ in ps]
    for p, gi in zip(ps, g):
        p.grad = gi
    nn.SGD(ps, lr=0.1).step()
    for p, a, gi in zip(ps, p0, g):
        np.testing.assert_allclose(p.value, a - 0.1 * gi, rtol=1e-15)


def test_sgd_momentum_weight_decay_two_steps(rng):
    lr, mu, wd = 0.05, 0.9, 0.01
    (p,), (w0,) = _params(rng, 1)
    g1, g2 = rng.standard_normal(3), rng.standard_normal(3)
    opt = nn.SGD([p], lr=lr, momentum=mu, weight_decay=wd)
    p.grad = g1
    opt.step()
    b1 = g1 + wd * w0
    w1 = w0 - lr * b1
    np.testing.assert_allclose(p.value, w1, rtol=1e-14)
    p.grad = g2
    opt.step()
    b2 = mu * b1 + g2 + wd * w1
    np.testing.assert_allclose(p.value, w1 - lr * b2, rtol=1e-14)


def test_adam_two_steps(rng):
    lr, b1, b2, eps, wd = 0.01, 0.8, 0.95, 1e-8, 0.1
    (p,), (w0,) = _params(rng, 1)
    g1, g2 = rng.standard_normal(3), rng.standard_normal(3)
    opt = nn.Adam([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    p.grad = g1
    opt.step()
    # step 1: bias-corrected m/sqrt(v) = g/|g|, so each coordinate moves by lr (minus eps effect)
    gg = g1 + wd * w0
    w1 = w0 - lr * gg / (np.abs(gg) + eps)
    np.testing.assert_allclose(p.value, w1, rtol=1e-13)
    p.grad = g2
    opt.step()
    gg2 = g2 + wd * w1
    m = b1 * (1 - b1) * gg + (1 - b1) * gg2
    v = b2 * (1 - b2) * gg**2 + (1 - b2) * gg2**2
    w2 = w1 - lr * (m / (1 - b1**2)) / (np.sqrt(v / (1 - b2**2)) + eps)
    np.testing.assert_allclose(p.value, w2, rtol=1e-13)


@pytest.mark.parametrize("kwargs,match", [({"lr": -0.1}, "lr"), ({"lr": float("nan")}, "lr"),
                                          ({"lr": 0.1, "momentum": 1.0}, "momentum"),
                                          ({"lr": 0.1, "weight_decay": -1}, "weight_decay")])
def test_sgd_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nn.SGD([], **kwargs)


def test_adam_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="lr"):
        nn.Adam([], lr=-1)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        nn.Adam([], lr=1e-3, betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="optimizer"):
        nn.make_optimizer("rmsprop", [], 0.1)


# ---------------------------------------------------------------- data


def test_mnist1d_generated_locally_and_rng_untouched(monkeypatch):
    pytest.importorskip("mnist1d")
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    np.random.seed(123)
    random.seed(123)
    before = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    x, y, xt, _ = nn.data._mnist1d()
    assert (np.random.random(), random.random()) == before  # global generators restored
    assert x.shape == (4000, 40) and xt.shape == (1000, 40)
    assert set(np.unique(y)) == set(range(10))


@pytest.mark.parametrize("name,features,classes", [("mnist1d", 40, 10), ("digits", 64, 10),
                                                   ("spirals", 2, 2)])
def test_datasets_standardized(name, features, classes):
    pytest.importorskip({"mnist1d": "mnist1d", "digits": "sklearn"}.get(name, "numpy"))
    d = nn.load_dataset(name)
    assert d.num_features == features and d.num_classes == classes
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    varying = d.x_train.std(axis=0) > 0
    np.testing.assert_allclose(d.x_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(d.x_train.std(axis=0)[varying], 1, rtol=1e-4)
    assert len(d.y_test) > 0 and not d.x_train.flags.writeable
    assert nn.load_dataset(name) is d  # cached


def test_unknown_dataset():
    with pytest.raises(ValueError, match="dataset must be one of"):
        nn.load_dataset("cifar")


def test_batch_indices_are_seeded_epochs():
    it = nn.batch_indices(10, 3, np.random.default_rng(7))
    first = [next(it) for _ in range(6)]  # two epochs of 3 batches (the 10th index dropped)
    assert all(len(b) == 3 for b in first)
    for epoch in (first[:3], first[3:]):
        assert len(set(np.concatenate(epoch))) == 9
    again = nn.batch_indices(10, 3, np.random.default_rng(7))
    assert all(np.array_equal(a, next(again)) for a in first)
    with pytest.raises(ValueError, match="batch_size"):
        next(nn.batch_indices(10, 11, np.random.default_rng(0)))


def test_devices():
    assert nn.array_module("cpu") is np
    with pytest.raises(ValueError, match="device must be 'cpu' or 'gpu', got 'tpu'"):
        nn.array_module("tpu")
    try:
        import cupy  # noqa: F401
    except Exception:
        with pytest.raises(RuntimeError, match="CuPy"):
            nn.array_module("gpu")


# ---------------------------------------------------------------- training


def test_training_is_deterministic_under_a_seed():
    d = nn.load_dataset("spirals")
    kw = dict(hidden=(16, 16), batch_norm=True, dropout=0.1, lr=0.05, batch_size=32, steps=30,
              eval_every=10)
    _, _, h1 = nn.train_mlp(d, seed=4, **kw)
    _, _, h2 = nn.train_mlp(d, seed=4, **kw)
    _, _, h3 = nn.train_mlp(d, seed=5, **kw)
    assert h1.loss == h2.loss and h1.test_acc == h2.test_acc
    assert h1.loss != h3.loss
    assert h1.eval_steps == [0, 10, 20, 30]


def test_probing_the_next_batch_does_not_change_training():
    d = nn.load_dataset("spirals")
    kw = {"hidden": (8,), "lr": 0.05, "batch_size": 32, "steps": 12, "seed": 2}
    _, _, plain = nn.train_mlp(d, **kw)
    seen = []

    def probe(trainer, step):
        seen.append(trainer.next_batch()[1].copy())

    _, _, probed = nn.train_mlp(d, callback=probe, **kw)
    assert probed.loss == plain.loss
    assert len(seen) == 13 and not all(np.array_equal(seen[0], s) for s in seen[1:])


def test_training_learns_and_bn_model_evaluates():
    pytest.importorskip("sklearn")
    d = nn.load_dataset("digits")
    _, _, h = nn.train_mlp(d, hidden=(64,), batch_norm=True, lr=0.05, batch_size=64, steps=150, seed=0)
    assert h.loss[-1] < h.loss[0] / 3
    assert h.test_acc[-1] > 0.85  # digits: a small MLP reaches ~95%; chance is 10%
    assert not h.diverged


def test_divergence_is_detected():
    d = nn.load_dataset("spirals")
    _, _, h = nn.train_mlp(d, hidden=(32, 32), lr=1e4, batch_size=32, steps=50, seed=0)
    assert h.diverged and h.diverged_at == len(h.loss)


def test_adam_trains():
    d = nn.load_dataset("spirals")
    _, _, h = nn.train_mlp(d, hidden=(32, 32), optimizer="adam", lr=1e-2, batch_size=64, steps=200,
                           seed=0, batch_norm=True)
    assert h.test_acc[-1] > 0.8  # the two spirals are separable; chance is 50%


# ---------------------------------------------------------------- against torch


def test_mlp_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    sizes = [12, 32, 24, 5]
    model = nn.MLP(sizes, np, seed=1, activation="tanh", batch_norm=True)
    layers = []
    for i, lin in enumerate(model.linears):
        tl = torch.nn.Linear(sizes[i], sizes[i + 1], bias=lin.bias is not None)
        with torch.no_grad():
            tl.weight.copy_(torch.from_numpy(lin.weight.value))
            if lin.bias is not None:
                tl.bias.copy_(torch.from_numpy(lin.bias.value))
        layers.append(tl)
        if i < len(model.norms):
            layers += [torch.nn.BatchNorm1d(sizes[i + 1]), torch.nn.Tanh()]
    tmodel = torch.nn.Sequential(*layers)
    x = rng.standard_normal((64, 12)).astype(np.float32) * 2 + 1
    y = rng.integers(0, 5, 64)
    ce = nn.SoftmaxCrossEntropy(np)
    loss = float(ce.forward(model.forward(x, True), y))
    model.backward(ce.backward())
    tloss = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(x)), torch.from_numpy(y))
    tloss.backward()
    # float32 (u = 6e-8): every value is a sum of at most 64 terms of a well-conditioned net,
    # so forward values agree to ~64u ~ 4e-6 relative; BN's backward subtracts terms of size
    # |dy| to get dx, which can lose ~2 more digits on small gradients. Hence rtol 1e-5 for the
    # loss and, for gradients, atol 1e-5 * max|g| on top of rtol 1e-4.
    np.testing.assert_allclose(loss, tloss.item(), rtol=1e-5)
    ours = [p.grad for p in model.parameters()]
    ordered = []
    for tl in layers:
        if isinstance(tl, torch.nn.Linear):
            ordered.append(tl.weight)
            if tl.bias is not None:
                ordered.append(tl.bias)
        elif isinstance(tl, torch.nn.BatchNorm1d):
            ordered += [tl.weight, tl.bias]
    assert len(ordered) == len(ours)
    for g, tp in zip(ours, ordered):
        tg = tp.grad.numpy()
        np.testing.assert_allclose(g, tg, rtol=1e-4, atol=1e-5 * np.abs(tg).max())
    # running statistics follow torch's update (unbiased variance, momentum 0.1)
    for bn, tl in zip(model.norms, [m for m in layers if isinstance(m, torch.nn.BatchNorm1d)]):
        np.testing.assert_allclose(bn.running_mean, tl.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.running_var, tl.running_var.numpy(), rtol=1e-5, atol=1e-6)
