"""fastbn.torch under every autograd mode torch's batch norm supports: in-place use of the
output, forward AD, torch.func transforms, double backward and batched gradients.

Each check runs the same computation with torch's module (the reference) and with
fastbn's, in float64. Both evaluate the same formulas over M <= 64 values per channel, so
they differ by rounding only: a few M * 2**-53 relative to the values' scale. The
tolerance below, 1e-11 of the scale, is about 100 times that bound and 1e4 times below
any real formula error (a wrong term changes results at O(1)).
"""

import copy

import pytest

torch = pytest.importorskip("torch")
import torch.autograd.forward_ad as fwAD  # noqa: E402
import torch.func as tf  # noqa: E402

import fastbn.torch as ft  # noqa: E402

TOL = 1e-11


def close(a, b):
    scale = max(1.0, b.abs().max().item())
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= TOL * scale, (a - b).abs().max().item()


def pair(training, track=True, c=3, cls="BatchNorm2d"):
    """torch's module and fastbn's, float64, with the same random parameters and stats."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, cls)(c, track_running_stats=track).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
        if track:
            ref.running_mean.uniform_(-1, 1)
            ref.running_var.uniform_(0.5, 2)
    fb = getattr(ft, cls)(c, track_running_stats=track).double()
    fb.load_state_dict(ref.state_dict())
    ref.train(training)
    fb.train(training)
    return ref, fb


# torch.func needs the mutated running statistics passed in: in training the modules keep
# none (track_running_stats=False), as torch.func's docs prescribe
MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]


def functional(m):
    params = dict(m.named_parameters())
    buffers = {k: v.clone() for k, v in m.named_buffers()}
    return (lambda x: tf.functional_call(m, (params, buffers), (x,))), params, buffers


@pytest.mark.parametrize("training", MODES)
def test_inplace_ops_after_the_output_under_autograd(training):
    ref, fb = pair(training)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    for layout in (torch.contiguous_format, torch.channels_last):
        grads = []
        for m in (ref, fb):
            xi = x.clone(memory_format=layout).requires_grad_()
            y = m(xi)
            assert not y._is_view() and y.is_contiguous(memory_format=layout)
            y += xi  # a residual connection, then an in-place activation (as in ResNets)
            torch.nn.functional.leaky_relu(y, 0.1, inplace=True)
            (y * y).sum().backward()
            grads.append((xi.grad, m.weight.grad.clone(), m.bias.grad.clone()))
            m.zero_grad()
        for a, b in zip(grads[1], grads[0]):
            close(a, b)


@pytest.mark.parametrize("training", MODES)
def test_torch_func_transforms_match_torch(training):
    ref, fb = pair(training, track=not training)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    t = torch.randn_like(x)
    (f_ref, p_ref, b_ref), (f_fb, p_fb, b_fb) = functional(ref), functional(fb)
    y_ref, j_ref = tf.jvp(f_ref, (x,), (t,))
    y_fb, j_fb = tf.jvp(f_fb, (x,), (t,))
    close(y_fb, y_ref)
    close(j_fb, j_ref)
    assert j_fb.abs().max() > 0.1  # the tangent is not silently zero
    close(tf.jacfwd(f_fb)(x), tf.jacfwd(f_ref)(x))
    close(tf.jacrev(f_fb)(x), tf.jacrev(f_ref)(x))
    close(tf.grad(lambda x: f_fb(x).pow(3).sum())(x), tf.grad(lambda x: f_ref(x).pow(3).sum())(x))
    close(tf.hessian(lambda x: f_fb(x).pow(3).sum())(x),
          tf.hessian(lambda x: f_ref(x).pow(3).sum())(x))
    # gradients and tangents with respect to the parameters
    for argnums in (0,):
        g_fb = tf.grad(lambda p: tf.functional_call(fb, (p, b_fb), (x,)).pow(3).sum(),
                       argnums=argnums)(p_fb)
        g_ref = tf.grad(lambda p: tf.functional_call(ref, (p, b_ref), (x,)).pow(3).sum(),
                        argnums=argnums)(p_ref)
        for k in g_ref:
            close(g_fb[k], g_ref[k])
    tw = {k: torch.randn_like(v) for k, v in p_fb.items()}
    _, jp_fb = tf.jvp(lambda p: tf.functional_call(fb, (p, b_fb), (x,)), (p_fb,), (tw,))
    _, jp_ref = tf.jvp(lambda p: tf.functional_call(ref, (p, b_ref), (x,)), (p_ref,), (tw,))
    close(jp_fb, jp_ref)


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("in_dim", [0, 2])
def test_vmap_matches_torch(training, in_dim):
    ref, fb = pair(training, track=not training)
    xs = torch.randn(4, 5, 3, 2, 2, dtype=torch.float64).movedim(0, in_dim)
    f_ref, f_fb = functional(ref)[0], functional(fb)[0]
    close(tf.vmap(f_fb, in_dims=in_dim)(xs), tf.vmap(f_ref, in_dims=in_dim)(xs))
    close(tf.vmap(tf.jacrev(f_fb), in_dims=in_dim)(xs),
          tf.vmap(tf.jacrev(f_ref), in_dims=in_dim)(xs))


def test_vmap_over_stacked_models_updates_their_running_stats():
    # model ensembling (torch.func.stack_module_state): each member's running statistics
    # are updated from its own batch, as torch does
    ref, fb = pair(True, cls="BatchNorm1d")
    xs = torch.randn(5, 8, 3, dtype=torch.float64)
    results = []
    for m in (ref, fb):
        members = [copy.deepcopy(m) for _ in range(5)]
        params, buffers = tf.stack_module_state(members)
        base = copy.deepcopy(m).to("meta")
        y = tf.vmap(lambda p, b, x: tf.functional_call(base, (p, b), (x,)))(params, buffers, xs)
        results.append((y, buffers["running_mean"], buffers["running_var"]))
    for a, b in zip(results[1], results[0]):
        close(a, b)
    assert not torch.equal(results[1][1][0], results[1][1][1])  # per-member statistics


def test_vmap_refuses_unbatched_running_stats_in_training():
    fb = ft.BatchNorm1d(3).double()
    xs = torch.randn(5, 8, 3, dtype=torch.float64)
    rm0 = fb.running_mean.clone()
    with pytest.raises(ValueError, match="running_mean/running_var.*not batched"):
        tf.vmap(fb)(xs)
    assert torch.equal(fb.running_mean, rm0)


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_forward_ad_dual_tensors(training, requires_grad):
    ref, fb = pair(training)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=requires_grad)
    t = torch.randn_like(x)
    tangents = []
    for m in (ref, fb):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent)
    assert tangents[1] is not None
    close(tangents[1], tangents[0])


@pytest.mark.parametrize("training", MODES)
def test_gradcheck_gradgradcheck_forward_ad_and_batched_grads(training):
    torch.manual_seed(1)
    x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def f(x, w, b):
        # copies: gradcheck calls f many times and training updates the statistics
        return ft.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training)

    assert torch.autograd.gradcheck(f, (x, w, b), check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)
    assert torch.autograd.gradgradcheck(f, (x, w, b), check_fwd_over_rev=True,
                                        check_rev_over_rev=True, check_batched_grad=True)


def test_gradient_penalty_matches_torch():
    # WGAN-GP: the gradient of a penalty on d(output)/d(input) with respect to the weights
    ref, fb = pair(True)
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    out = []
    for m in (ref, fb):
        xi = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(m(xi).pow(3).sum(), xi, create_graph=True)
        penalty = (g.flatten(1).norm(dim=1) - 1).pow(2).mean()
        penalty.backward()
        out.append((g.detach(), m.weight.grad.clone(), m.bias.grad.clone()))
    for a, b in zip(out[1], out[0]):
        close(a, b)
    assert out[1][1].abs().max() > 1e-3  # the second-order term is not silently dropped
