"""fastbn.torch against PyTorch's own batch norm: values, running stats, gradients,
autograd/compile integration, module drop-in behaviour and error messages."""

from __future__ import annotations

import copy
import math
import zlib

import pytest

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastbn.torch")

import fastbn

TORCH_BN = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
FAST_BN = {1: ft.BatchNorm1d, 2: ft.BatchNorm2d, 3: ft.BatchNorm3d}


# ---------------------------------------------------------------------------------------
# Tolerances
# ---------------------------------------------------------------------------------------
def rel_tol(dtype: torch.dtype, m: int) -> float:
    """Bound on the difference of two correct batch norms, relative to the result's scale.

    Error analysis (DESIGN.md, "Numerics"): a sum of M terms computed by blocked or
    pairwise summation has a relative error of at most about u * log2(M) (u the unit
    roundoff); fastbn accumulates float32 data in float64 (error ~ u_f64 * M, negligible
    for these sizes, then one float32 rounding of mean and invstd) and torch's vectorized
    CPU reductions have errors of the u * log2(M) order. The mean and invstd inherit it;
    the output y = (x - mean) * invstd * w + b adds a few roundings, and |x - mean| / std
    stays below about 6 for the normal data used here (|mean|/std <= 1). So each
    implementation's error in y, relative to its scale, is below
    u * (log2(M) + 4) * 8 (|xhat| <= 6 plus the few roundings), and the difference of two
    is below twice that. The backward's sums (dbias = sum dy, dweight = sum dy * xhat)
    and dx = w * invstd / M * (M dy - dbias - xhat * dweight) obey the same bound relative
    to the scales used in the assertions below.
    """
    u = torch.finfo(dtype).eps / 2
    return 16 * u * (math.log2(max(m, 2)) + 4)


def assert_close(actual, expected, tol, scale=None, what=""):
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert actual.shape == expected.shape, what
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * max(scale, 1e-300), f"{what}: max abs error {err:.3g} > {tol:.3g} * scale {scale:.3g}"


def reduced_count(x: torch.Tensor) -> int:
    return x.numel() // x.shape[1]


# ---------------------------------------------------------------------------------------
# Module parity with torch.nn.BatchNorm1d/2d/3d
# ---------------------------------------------------------------------------------------
LAYOUTS = [
    (1, (16, 5), "contiguous"),
    (1, (6, 5, 7), "contiguous"),
    (1, (6, 5, 7), "transposed"),  # a (N, C, L) view of an (N, L, C) tensor
    (2, (4, 6, 5, 7), "contiguous"),
    (2, (4, 6, 5, 7), "channels_last"),
    (3, (2, 4, 3, 5, 6), "contiguous"),
    (3, (2, 4, 3, 5, 6), "channels_last"),
]
CONFIGS = [
    {},
    {"momentum": None},
    {"affine": False},
    {"track_running_stats": False},
]


def make_input(shape, layout, dtype, gen, offset=0.5, scale=2.0):
    x = torch.randn(shape, dtype=dtype, generator=gen) * scale + offset
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    elif layout == "transposed":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x


def check_step(tm, fm, x, gen, what):
    """One forward + backward through both modules; compare everything."""
    dtype = x.dtype
    m = reduced_count(x)
    tol = rel_tol(dtype, m)
    xt = x.clone().requires_grad_(True)
    xf = x.clone().requires_grad_(True)
    yt = tm(xt)
    yf = fm(xf)
    assert yf.dtype == yt.dtype and yf.shape == yt.shape
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous(
        memory_format=torch.channels_last_3d
    ):
        assert yf.stride() == yt.stride(), f"{what}: output memory format differs from torch's"
    else:  # torch returns a contiguous tensor here; fastbn keeps the input's layout
        assert yf.stride() == x.stride()
    assert_close(yf, yt, tol, scale=yt.abs().max().item() + 1, what=f"{what}: output")
    for name in ("running_mean", "running_var"):
        bt, bf = getattr(tm, name), getattr(fm, name)
        assert (bt is None) == (bf is None), name
        if bt is not None:
            assert_close(bf, bt, tol, what=f"{what}: {name}")
    if tm.num_batches_tracked is not None:
        assert int(fm.num_batches_tracked) == int(tm.num_batches_tracked)

    dy = torch.randn(x.shape, dtype=dtype, generator=gen)
    params_t = [p for p in (tm.weight, tm.bias) if p is not None]
    params_f = [p for p in (fm.weight, fm.bias) if p is not None]
    gt = torch.autograd.grad(yt, [xt, *params_t], dy)
    gf = torch.autograd.grad(yf, [xf, *params_f], dy)
    # dx: scale |w| * invstd * max|dy| * (1 + max|xhat|), the size of the terms that cancel
    w = tm.weight.detach().abs().max().item() if tm.weight is not None else 1.0
    if tm.training or tm.running_var is None:
        dims = [d for d in range(x.dim()) if d != 1]
        xd = x.double()
        invstd = 1 / torch.sqrt(xd.var(dims, unbiased=False) + tm.eps)
        xhat = (xd - xd.mean(dims, keepdim=True)) * invstd.reshape([1, -1] + [1] * (x.dim() - 2))
    else:
        invstd = 1 / torch.sqrt(tm.running_var.double() + tm.eps)
        shape = [1, -1] + [1] * (x.dim() - 2)
        xhat = (x.double() - tm.running_mean.double().reshape(shape)) * invstd.reshape(shape)
    dx_scale = w * invstd.max().item() * dy.abs().max().item() * (1 + xhat.abs().max().item())
    assert_close(gf[0], gt[0], tol, scale=dx_scale, what=f"{what}: grad input")
    # dweight = sum(dy * xhat), dbias = sum(dy): scale is the sum of the magnitudes
    sums = {"weight": (dy.double() * xhat).abs().sum().item(), "bias": dy.double().abs().sum().item()}
    names = [n for n in ("weight", "bias") if getattr(tm, n) is not None]
    for name, a, b in zip(names, gf[1:], gt[1:]):
        assert a.dtype == b.dtype
        assert_close(a, b, tol, scale=sums[name], what=f"{what}: grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("config", CONFIGS, ids=["default", "cma", "noaffine", "notrack"])
@pytest.mark.parametrize("dim,shape,layout", LAYOUTS, ids=[f"{d}d-{l}-{len(s)}" for d, s, l in LAYOUTS])
def test_module_parity(dim, shape, layout, config, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dim, shape, layout, config, dtype)).encode()))
    c = shape[1]
    tm = TORCH_BN[dim](c, dtype=dtype, **config)
    with torch.no_grad():
        if tm.affine:
            tm.weight.uniform_(0.5, 1.5, generator=gen)
            tm.bias.uniform_(-1, 1, generator=gen)
    fm = FAST_BN[dim](c, dtype=dtype, **config)
    fm.load_state_dict(tm.state_dict())
    for step in range(3):
        check_step(tm, fm, make_input(shape, layout, dtype, gen), gen, f"train step {step}")
    tm.eval()
    fm.eval()
    check_step(tm, fm, make_input(shape, layout, dtype, gen), gen, "eval")


def test_state_dict_keys_match_torch():
    for dim in (1, 2, 3):
        for kwargs in CONFIGS:
            t = TORCH_BN[dim](4, **kwargs)
            f = FAST_BN[dim](4, **kwargs)
            assert list(f.state_dict()) == list(t.state_dict())
            assert [n for n, _ in f.named_parameters()] == [n for n, _ in t.named_parameters()]
            assert isinstance(f, TORCH_BN[dim])
    # a torch checkpoint loads strictly into fastbn's module and back
    t = torch.nn.BatchNorm2d(3)
    t(torch.randn(4, 3, 2, 2))
    f = ft.BatchNorm2d(3)
    f.load_state_dict(t.state_dict(), strict=True)
    assert torch.equal(f.running_var, t.running_var) and int(f.num_batches_tracked) == 1
    torch.nn.BatchNorm2d(3).load_state_dict(f.state_dict(), strict=True)


def test_module_rejects_wrong_rank_like_torch():
    with pytest.raises(ValueError, match="expected 4D input"):
        ft.BatchNorm2d(3)(torch.randn(4, 3, 5))


#: unit roundoff of the 16-bit dtypes
HALF_U = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_half_input(dtype, memory_format):
    # 16-bit data, float32 statistics: compare with torch in float32 on the same values.
    # The output is rounded to the data dtype (relative error u = 2^-11 or 2^-8), which
    # dominates the float32 computation's error, so the bound is a few ulps of max|y|.
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 4, 6, 6, generator=gen) * 3 + 1).to(dtype)
    x = x.contiguous(memory_format=memory_format)
    u = HALF_U[dtype]
    rm, rv = torch.zeros(4), torch.ones(4)
    y = ft.batch_norm(x, rm, rv, training=True)
    rm_t, rv_t = torch.zeros(4), torch.ones(4)
    y_t = torch.nn.functional.batch_norm(x.float(), rm_t, rv_t, training=True)
    assert y.dtype == dtype and y.is_contiguous(memory_format=memory_format)
    assert_close(y, y_t, 2 * u, what=f"{dtype} output")
    assert_close(rm, rm_t, rel_tol(torch.float32, x.numel() // 4))
    assert_close(rv, rv_t, rel_tol(torch.float32, x.numel() // 4))
    # backward: dx computed in float32 from the same 16-bit values and rounded once to the
    # data dtype (u |dx|); dweight summed over M values (float32 sums in torch)
    xr = x.detach().requires_grad_(True)
    xt = x.detach().float().requires_grad_(True)
    g = torch.randn(x.shape, generator=gen).to(dtype).contiguous(memory_format=memory_format)
    w = (torch.rand(4, generator=gen) + 0.5).requires_grad_(True)
    wt = w.detach().clone().requires_grad_(True)
    ft.batch_norm(xr, None, None, w, None, training=True).backward(g)
    torch.nn.functional.batch_norm(xt, None, None, wt, None, training=True).backward(g.float())
    assert xr.grad.dtype == dtype and w.grad.dtype == torch.float32
    assert_close(xr.grad, xt.grad, 2 * u, what=f"{dtype} input grad")
    xhat = torch.nn.functional.batch_norm(x.float(), None, None, training=True)
    assert_close(w.grad, wt.grad, rel_tol(torch.float32, x.numel() // 4),
                 scale=(g.float() * xhat).abs().sum((0, 2, 3)).max().item(), what="weight grad")
    # an all-16-bit module works too (weights converted, running stats written back)
    m = ft.BatchNorm2d(4).to(dtype)
    m(x).sum().backward()
    assert m.weight.grad.dtype == dtype and m.running_mean.dtype == dtype


def test_cpu_autocast_bfloat16_on_converted_model():
    """CPU autocast (bfloat16 by default): convolutions run in bfloat16 and torch's batch
    norm runs on their bfloat16 output with float32 parameters; a converted model does the
    same, with the same output dtype and values within bfloat16 rounding of torch's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3), torch.nn.BatchNorm2d(4))
    conv = ft.convert(copy.deepcopy(model))
    x = torch.randn(4, 3, 10, 10)
    outs = []
    for m in (model, conv):
        with torch.autocast("cpu"):
            out = m(x)
        out.float().sum().backward()
        outs.append(out)
    t, f = outs
    assert f.dtype == t.dtype == torch.bfloat16
    # both outputs round values computed from the same bfloat16 convolution outputs; the
    # second convolution sees inputs that differ by an ulp here and there: a few ulps
    assert_close(f.float(), t.float(), 8 * HALF_U[torch.bfloat16], what="autocast output")
    for (n, pt), pf in zip(model.named_parameters(), conv.parameters()):
        assert pf.grad is not None and pf.grad.dtype == pt.grad.dtype == torch.float32, n
    assert torch.equal(conv[1].num_batches_tracked, model[1].num_batches_tracked)
    assert_close(conv[1].running_mean, model[1].running_mean, 8 * HALF_U[torch.bfloat16],
                 scale=model[1].running_mean.abs().max().item() + 1e-3)


def test_empty_batch_like_torch():
    for training in (True, False):
        x = torch.randn(0, 3, 4, requires_grad=True)
        rm, rv = torch.randn(3), torch.rand(3) + 0.5
        rm0, rv0 = rm.clone(), rv.clone()
        y = ft.batch_norm(x, rm, rv, training=training)
        assert y.shape == x.shape
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
        y.sum().backward()
        assert x.grad.shape == x.shape


# ---------------------------------------------------------------------------------------
# Functional API: autograd and operator checks
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_training(layout):
    gen = torch.Generator().manual_seed(1)
    x = make_input((3, 4, 3, 2), layout, torch.float64, gen).requires_grad_(True)
    w = torch.rand(4, dtype=torch.float64, generator=gen).add_(0.5).requires_grad_(True)
    b = torch.randn(4, dtype=torch.float64, generator=gen).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: ft.batch_norm(x, None, None, w, b, training=True), (x, w, b)
    )
    # without weight and bias (None): gradient with respect to the input only
    assert torch.autograd.gradcheck(lambda x: ft.batch_norm(x, None, None, training=True), (x,))


def test_gradcheck_eval():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 4, dtype=torch.float64, generator=gen).requires_grad_(True)
    w = torch.rand(3, dtype=torch.float64, generator=gen).add_(0.5).requires_grad_(True)
    b = torch.randn(3, dtype=torch.float64, generator=gen).requires_grad_(True)
    rm = torch.randn(3, dtype=torch.float64, generator=gen)
    rv = torch.rand(3, dtype=torch.float64, generator=gen) + 0.5
    assert torch.autograd.gradcheck(
        lambda x, w, b: ft.batch_norm(x, rm, rv, w, b, training=False), (x, w, b)
    )


def test_opcheck():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, generator=gen, requires_grad=True)
    xc = make_input((4, 3, 5, 2), "channels_last", torch.float32, gen).requires_grad_(True)
    w = torch.rand(3, generator=gen, requires_grad=True)
    b = torch.randn(3, generator=gen, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    ops = torch.ops.fastbn
    cases = [
        (ops.batch_norm_train.default, (x, w, b, rm, rv, 0.1, 1e-5)),
        (ops.batch_norm_train.default, (xc, w, b, None, None, 0.1, 1e-5)),
        (ops.batch_norm_train.default, (x, None, None, rm, rv, 0.3, 0.0)),
        (ops.batch_norm_eval.default, (x, rm, rv, w, b, 1e-5)),
        (ops.batch_norm_eval.default, (xc, rm, rv, None, b, 1e-3)),
        (ops.batch_norm_backward.default,
         (torch.randn(4, 3, 5), x.detach(), torch.randn(3), torch.rand(3), w.detach())),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_functional_updates_running_stats_in_place_like_torch():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(10, 3, 7, generator=gen) * 3 + 2
    rm, rv = torch.full((3,), 0.5), torch.full((3,), 2.0)
    rm_t, rv_t = rm.clone(), rv.clone()
    rm_id, rv_id = rm.data_ptr(), rv.data_ptr()
    y = ft.batch_norm(x, rm, rv, training=True, momentum=0.25, eps=1e-3)
    y_t = torch.nn.functional.batch_norm(x, rm_t, rv_t, training=True, momentum=0.25, eps=1e-3)
    tol = rel_tol(torch.float32, 70)
    assert rm.data_ptr() == rm_id and rv.data_ptr() == rv_id
    assert_close(y, y_t, tol, scale=y_t.abs().max().item() + 1)
    assert_close(rm, rm_t, tol)
    assert_close(rv, rv_t, tol)


def test_cpu_tensors_are_passed_zero_copy(monkeypatch):
    # Record the memory the kernels receive: a channels_last tensor must arrive as the same
    # buffer, viewed as (N*H*W, C, 1) rows, not a copy; the output is a fresh tensor (not a
    # view) in the same memory format.
    seen = {}
    real = fastbn.batchnorm.forward_train3

    def spy(be, x3, *args, **kwargs):
        seen["ptr"], seen["shape"] = x3.ctypes.data, x3.shape
        return real(be, x3, *args, **kwargs)

    monkeypatch.setattr(fastbn.batchnorm, "forward_train3", spy)
    x = torch.randn(4, 3, 5, 6).to(memory_format=torch.channels_last)
    y = ft.batch_norm(x, None, None, training=True)
    assert seen == {"ptr": x.data_ptr(), "shape": (4 * 5 * 6, 3, 1)}
    assert y.is_contiguous(memory_format=torch.channels_last) and not y._is_view()


# ---------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------
def small_cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8, momentum=None),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 16),
        torch.nn.BatchNorm1d(16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 4),
    )


def test_small_cnn_trains_like_torch():
    torch.manual_seed(5)
    ref = small_cnn()
    fast = ft.convert(copy.deepcopy(ref))
    assert sum(isinstance(m, (ft.BatchNorm1d, ft.BatchNorm2d)) for m in fast.modules()) == 3
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(16, 3, 8, 8, generator=gen) * 2 + 1
    target = torch.randint(0, 4, (16,), generator=gen)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, fast)]
    steps = 6
    losses = {0: [], 1: []}
    for _ in range(steps):
        for i, (model, opt) in enumerate(zip((ref, fast), opts)):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            losses[i].append(loss.item())
    # Each batch norm's outputs and gradients differ from torch's by at most
    # rel_tol(float32, M) relative to their scale (M = 16 * 8 * 8 for the convolutions,
    # the largest), and the cross-entropy of a well-conditioned small network passes such
    # relative perturbations through with a factor of order 1. SGD with a small step
    # carries the differences forward, adding at most about that much per step, so after
    # k steps the losses agree to (k + 1) * rel_tol relative to the loss.
    tol = rel_tol(torch.float32, 16 * 8 * 8)
    for k, (a, b) in enumerate(zip(losses[1], losses[0])):
        assert abs(a - b) <= (k + 1) * tol * abs(b), (k, losses)
    assert losses[0][-1] < losses[0][0]  # the network did learn something
    for mt, mf in zip(ref.modules(), fast.modules()):
        if isinstance(mt, torch.nn.modules.batchnorm._BatchNorm):
            assert int(mf.num_batches_tracked) == steps
            assert_close(mf.running_var, mt.running_var, (steps + 1) * tol)
    # evaluation mode agrees too
    ref.eval()
    fast.eval()
    with torch.no_grad():
        assert_close(fast(x), ref(x), (steps + 2) * tol, what="eval logits")


def test_convert_keeps_parameters_and_buffers():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(2, 3, 1)
            self.bn = torch.nn.BatchNorm3d(3, affine=False)

    class MyBN(torch.nn.BatchNorm1d):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5), Block(), MyBN(5))
    model[2].bn.eval()
    old_w, old_rm = model[1].weight, model[1].running_mean
    old_nbt = model[2].bn.num_batches_tracked
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = ft.convert(model)
    assert out is model
    assert type(model[1]) is ft.BatchNorm1d and type(model[2].bn) is ft.BatchNorm3d
    assert type(model[3]) is MyBN  # subclasses are left alone
    assert model[1].weight is old_w and model[1].running_mean is old_rm
    assert model[2].bn.num_batches_tracked is old_nbt and model[2].bn.weight is None
    assert not model[2].bn.training and model[1].training
    assert model[1].weight.device == old_w.device
    # the optimizer built before the swap still trains the converted layer
    before = old_w.detach().clone()
    model[1](torch.randn(8, 5)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(model[1].weight, before)
    # a bare batch norm module is returned converted
    bn = torch.nn.BatchNorm2d(3)
    assert type(ft.convert(bn)) is ft.BatchNorm2d
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ft.convert("not a model")


def _have_cxx():
    import shutil

    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",  # traces forward and backward through the fake implementations
        pytest.param(
            "inductor",
            marks=pytest.mark.skipif(not _have_cxx(), reason="inductor needs a C++ compiler on CPU"),
        ),
    ],
)
def test_torch_compile_model(backend):
    torch._dynamo.reset()
    torch.manual_seed(7)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), ft.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 2),
    )
    eager = copy.deepcopy(model)
    # fullgraph: a graph break is an error, so the operators must be traced, not skipped
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(5, 3, 6, 6, generator=gen)
    # Same operators on the same data; the compiled graph may only reorder the sums of the
    # convolution, the linear layer and their gradients (at most 5 * 4 * 4 = 80 terms
    # each) and fuse elementwise code, so results agree to rel_tol(float32, 80).
    tol = rel_tol(torch.float32, 80)
    for mode in ("train", "eval"):
        getattr(compiled, mode)()
        getattr(eager, mode)()
        y_c = compiled(x)
        y_e = eager(x)
        assert_close(y_c, y_e, tol, scale=y_e.abs().max().item() + 1, what=f"compiled {mode} output")
        g_c = torch.autograd.grad(y_c.sum(), list(model.parameters()))
        g_e = torch.autograd.grad(y_e.sum(), list(eager.parameters()))
        for a, b in zip(g_c, g_e):
            assert_close(a, b, tol, scale=b.abs().max().item() + 1, what=f"compiled {mode} grad")
    assert_close(model[1].running_mean, eager[1].running_mean, tol, what="running_mean")
    assert_close(model[1].running_var, eager[1].running_var, tol, what="running_var")
    assert int(model[1].num_batches_tracked) == 1


@pytest.mark.parametrize(
    "backend",
    ["aot_eager", pytest.param("inductor", marks=pytest.mark.skipif(
        not _have_cxx(), reason="inductor needs a C++ compiler on CPU"))],
)
def test_torch_compile_row_norms(backend):
    """torch.compile(fullgraph=True) of a model with fastbn's LayerNorm and RMSNorm: the
    custom operators fastbn::layer_norm_fwd/_bwd and rms_norm_fwd/_bwd are traced (a graph
    break would be an error), forward and backward agree with the eager model (bitwise
    under aot_eager, which runs the same operators on the same data; within the Linear
    layers' reordered sums, rel_tol(float32, 32), under inductor); dynamic batch sizes reuse
    one graph."""
    torch._dynamo.reset()
    torch.manual_seed(11)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), ft.LayerNorm(32), torch.nn.GELU(),
                                ft.RMSNorm(32), torch.nn.Linear(32, 4), ft.LayerNorm(4, bias=False))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)
    tol = rel_tol(torch.float32, 32)
    for n in (5, 9):
        x = torch.randn(n, 32)
        y_c, y_e = compiled(x), eager(x)
        g_c = torch.autograd.grad(y_c.square().sum(), list(model.parameters()))
        g_e = torch.autograd.grad(y_e.square().sum(), list(eager.parameters()))
        if backend == "aot_eager":
            assert torch.equal(y_c, y_e)
            assert all(torch.equal(a, b) for a, b in zip(g_c, g_e))
        else:
            assert_close(y_c, y_e, tol, scale=y_e.abs().max().item() + 1, what="compiled output")
            for a, b in zip(g_c, g_e):
                assert_close(a, b, tol, scale=b.abs().max().item() + 1, what="compiled grad")


def test_torch_compile_dynamic_shapes_channels_last():
    # symbolic batch sizes: the fake implementations must derive shapes and strides
    # (channels_last kept) from symbolic sizes, without recompiling per batch size
    torch._dynamo.reset()
    torch.manual_seed(10)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), ft.BatchNorm2d(4))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (4, 7):
        x = torch.randn(n, 3, 7, 9).to(memory_format=torch.channels_last)
        y_c, y_e = compiled(x), eager(x)
        assert y_c.is_contiguous(memory_format=torch.channels_last)
        # identical operators on identical data in the same order: bitwise equal
        assert torch.equal(y_c, y_e)
        g_c = torch.autograd.grad(y_c.square().sum(), list(model.parameters()))
        g_e = torch.autograd.grad(y_e.square().sum(), list(eager.parameters()))
        for a, b in zip(g_c, g_e):
            assert torch.equal(a, b)
    assert torch.equal(model[1].running_var, eager[1].running_var)


def test_no_grad_and_inference_mode():
    m = ft.BatchNorm1d(3)
    x = torch.randn(6, 3)
    with torch.no_grad():
        y1 = m(x)
    with torch.inference_mode():
        y2 = m(x)
        m.eval()
        y3 = m(x)
    assert not y1.requires_grad and torch.equal(y1, y2)
    assert int(m.num_batches_tracked) == 2
    ref = torch.nn.functional.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias)
    assert_close(y3, ref, rel_tol(torch.float32, 6), scale=ref.abs().max().item() + 1)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------
def test_errors_name_the_argument():
    x = torch.randn(4, 3, 5)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(TypeError, match="input must have dtype.*torch.int64"):
        ft.batch_norm(torch.ones(4, 3, dtype=torch.int64), rm, rv)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        ft.batch_norm(x.numpy(), rm, rv)
    with pytest.raises(ValueError, match="input is on device meta"):
        ft.batch_norm(x.to("meta"), rm.to("meta"), rv.to("meta"))
    with pytest.raises(ValueError, match="weight is on device meta but input is on cpu"):
        ft.batch_norm(x, rm, rv, weight=torch.ones(3, device="meta"))
    with pytest.raises(TypeError, match="must all have one dtype, torch.float32, for torch.float32 "
                       "input; got torch.float32, torch.float64"):
        ft.batch_norm(x, rm, rv, bias=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight should contain 3 elements not 4"):
        ft.batch_norm(x, rm, rv, weight=torch.ones(4))
    with pytest.raises(ValueError, match="both be None or neither"):
        ft.batch_norm(x, rm, None, training=True)
    with pytest.raises(ValueError, match="running_mean must be defined in evaluation mode"):
        ft.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ft.batch_norm(torch.randn(1, 3), rm, rv, training=True)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        ft.batch_norm(x, rm, rv, eps=-1.0)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        ft.batch_norm(x, rm, rv, training=True, eps=0.0)
    with pytest.raises(TypeError, match="training must be a bool"):
        ft.batch_norm(x, rm, rv, training="yes")
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        ft.batch_norm(torch.randn(5), None, None, training=True)
    with pytest.raises(TypeError, match="input has layout torch.sparse_coo"):
        ft.batch_norm(x.to_sparse(), rm, rv)
    # torch raises RuntimeError for shape and dtype mismatches: so does fastbn.torch
    with pytest.raises(RuntimeError, match="running_mean should contain 3 elements not 2"):
        ft.batch_norm(x, rm[:2], rv[:2])
    with pytest.raises(RuntimeError, match="must all have one dtype"):
        ft.batch_norm(x, rm.double(), rv.double())


def test_errors_leave_running_stats_untouched():
    rm, rv = torch.zeros(3), torch.ones(3)
    for bad in ({"weight": torch.ones(2)}, {"eps": 0.0}, {"bias": torch.ones(3, dtype=torch.float64)},
                {"momentum": "0.1"}):
        with pytest.raises((TypeError, ValueError)):
            ft.batch_norm(torch.randn(4, 3), rm, rv, training=True, **bad)
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


# ---------------------------------------------------------------------------------------
# CUDA (runs only where a GPU, torch with CUDA and CuPy are present)
# ---------------------------------------------------------------------------------------
def _cuda_ready():
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA GPU, torch with CUDA and CuPy")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_parity_on_a_side_stream(layout):
    gen = torch.Generator().manual_seed(9)
    x = make_input((8, 16, 12, 12), layout, torch.float32, gen).cuda()
    tm = torch.nn.BatchNorm2d(16).cuda()
    fm = ft.convert(copy.deepcopy(tm))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        xt = x.clone().requires_grad_(True)
        xf = x.clone().requires_grad_(True)
        yt, yf = tm(xt), fm(xf)
        dy = torch.randn_like(yt)
        gt = torch.autograd.grad(yt, [xt, tm.weight, tm.bias], dy)
        gf = torch.autograd.grad(yf, [xf, fm.weight, fm.bias], dy)
    stream.synchronize()
    tol = rel_tol(torch.float32, reduced_count(x)) * 4  # GPU float32 accumulation (Welford)
    assert yf.stride() == yt.stride()
    assert_close(yf, yt, tol, scale=yt.abs().max().item() + 1)
    assert_close(fm.running_var, tm.running_var, tol)
    for a, b in zip(gf, gt):
        assert_close(a, b, tol, scale=b.abs().max().item() + 1)
    with pytest.raises(ValueError, match="running_mean is on device cpu"):
        ft.batch_norm(x, torch.zeros(16), torch.ones(16, device="cuda"))


# ---------------------------------------------------------------------------------------
# torch 2.13's semantics at the edges (torch is the reference in each case)
# ---------------------------------------------------------------------------------------
def _both(fn):
    """fn(batch_norm) for torch's functional and fastbn's: (torch result, fastbn result)."""
    return fn(torch.nn.functional.batch_norm), fn(ft.batch_norm)


def test_momentum_outside_unit_interval_like_torch():
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    for momentum in (-1.0, 1.5):
        (rm_t, rv_t), (rm_f, rv_f) = _both(lambda bn: _stats_after(bn, x, momentum))
        torch.testing.assert_close(rm_f, rm_t, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rv_f, rv_t, rtol=1e-12, atol=1e-12)


def _stats_after(bn, x, momentum):
    rm, rv = torch.full((3,), 0.5, dtype=x.dtype), torch.full((3,), 2.0, dtype=x.dtype)
    bn(x, rm, rv, training=True, momentum=momentum)
    return rm, rv


def test_empty_inputs_like_torch():
    cases = [
        (torch.randn(0), True),                                          # 1-d, empty
        (torch.randn(0, 3, 4, 4, dtype=torch.float64), False),           # float64 vs float32 stats
        (torch.randn(0, 3, 4, 4).to(memory_format=torch.channels_last), True),
    ]
    for x, training in cases:
        c = x.shape[1] if x.dim() > 1 else 0
        t, f = _both(lambda bn: bn(x, torch.zeros(c), torch.ones(c), training=training))
        assert (f.shape, f.dtype, f.stride()) == (t.shape, t.dtype, t.stride())


def test_check_order_like_torch():
    # torch checks the batch size, then eps, then dtypes: the first failing check decides
    xi = torch.ones(4, 3, dtype=torch.int64)
    rm, rv = torch.zeros(3), torch.ones(3)
    for bn in (torch.nn.functional.batch_norm, ft.batch_norm):
        with pytest.raises(ValueError, match="eps must be positive during training"):
            bn(xi, rm, rv, training=True, eps=0.0)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            bn(torch.randn(1, 3), rm, rv, training=True, eps=0.0)


def test_errors_are_catchable_as_torchs():
    x = torch.randn(4, 3)
    rm, rv = torch.zeros(3), torch.ones(3)
    cases = [
        dict(running_mean=torch.zeros(4), running_var=torch.ones(4)),
        dict(running_mean=rm, running_var=rv, weight=torch.ones(2)),
        dict(running_mean=rm.double(), running_var=rv.double()),
        dict(running_mean=None, running_var=None, training=False),
    ]
    for kwargs in cases:
        for bn in (torch.nn.functional.batch_norm, ft.batch_norm):
            with pytest.raises(RuntimeError):
                bn(x, **kwargs)
    # running statistics are not differentiable, in torch or here
    rmg = torch.zeros(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="running_mean"):
        ft.batch_norm(x.requires_grad_(), rmg, rv, training=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_mixed_precision_parameters_like_torch(dtype):
    # 16-bit input: parameters all in the data dtype or all float32; anything else is an error
    x = torch.randn(8, 3, 4).to(dtype)
    for p_dtype in (dtype, torch.float32):
        t, f = _both(lambda bn: bn(x, torch.zeros(3, dtype=p_dtype), torch.ones(3, dtype=p_dtype),
                                   torch.ones(3, dtype=p_dtype), torch.zeros(3, dtype=p_dtype),
                                   training=True))
        assert f.dtype == t.dtype == dtype
        assert_close(f.float(), t.float(), 4 * HALF_U[dtype], what=f"{dtype} output")
    for bn in (torch.nn.functional.batch_norm, ft.batch_norm):
        with pytest.raises(RuntimeError):
            bn(x, torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype),
               torch.ones(3), training=True)


# ---------------------------------------------------------------------------------------
# Ecosystem tools on converted models
# ---------------------------------------------------------------------------------------
def _tool_model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(inplace=True),
        torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5), torch.nn.BatchNorm1d(5))
    m = ft.convert(m)
    m(torch.randn(4, 3, 8, 8))  # non-trivial running statistics
    return m.eval()


def test_fx_traces_the_modules_as_leaves():
    m = _tool_model()
    x = torch.randn(2, 3, 8, 8)
    gm = torch.fx.symbolic_trace(m)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["0", "1", "2", "3", "4", "5"]
    assert isinstance(gm.get_submodule("1"), ft.BatchNorm2d)
    assert torch.equal(gm(x), m(x))
    from torch.fx.experimental.optimization import fuse

    # torch's fx fuse folds only exact torch types: the graph runs, fastbn's module kept
    fused = fuse(copy.deepcopy(m))
    assert torch.equal(fused(x), m(x))
    with pytest.raises(TypeError, match="cannot be the root of a torch.fx trace"):
        torch.fx.symbolic_trace(ft.BatchNorm2d(4))


def test_quantization_fuse_modules():
    m = _tool_model()
    x = torch.randn(2, 3, 8, 8)
    fused = torch.ao.quantization.fuse_modules(copy.deepcopy(m), [["0", "1", "2"], ["4", "5"]])
    names = [type(c).__name__ for c in fused.children()]
    assert names == ["ConvReLU2d", "Identity", "Identity", "Flatten", "Linear", "Identity"]
    # the folded weights: float32 rounding of conv (27 terms) and BN scale, so a few ulps
    assert_close(fused(x), m(x), 64 * 2.0**-24, scale=m(x).abs().max().item() + 1)


def test_torchscript_scripts_torchs_module_with_a_warning():
    m = _tool_model()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="TorchScript cannot call fastbn's kernels"):
        s = torch.jit.script(m)
    assert torch.equal(s(x), m(x))
    # the scripted module shares the parameters and buffers
    assert getattr(s, "1").running_mean.data_ptr() == m[1].running_mean.data_ptr()


def test_convert_sync_batchnorm_gives_torchs_module_as_documented():
    m = _tool_model()
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(m))
    assert type(synced[1]) is torch.nn.SyncBatchNorm
    # fastbn.torch.convert leaves SyncBatchNorm alone
    assert type(ft.convert(synced)[1]) is torch.nn.SyncBatchNorm


def test_mkldnn_input_gets_a_clear_error():
    bn = ft.BatchNorm2d(3).eval()
    with pytest.raises(TypeError, match="input has layout torch._mkldnn.*to_dense"):
        bn(torch.randn(2, 3, 4, 4).to_mkldnn())


# ---------------------------------------------------------------------------------------
# The cache of NumPy views of parameters and running statistics
# ---------------------------------------------------------------------------------------
def _eval_pair(c=6):
    tm = torch.nn.BatchNorm2d(c).eval()
    with torch.no_grad():
        tm.weight.uniform_(0.5, 1.5)
        tm.bias.normal_()
        tm.running_mean.normal_()
        tm.running_var.uniform_(0.5, 2.0)
    fm = ft.BatchNorm2d(c).eval()
    fm.load_state_dict(tm.state_dict())
    return tm, fm


@pytest.mark.parametrize("change", ["in_place", "data_swap", "same_pointer_new_shape",
                                    "state_dict"])
def test_parameter_changes_are_seen(change):
    """Views of a module's tensors are cached between calls; every way of changing a
    parameter or statistic afterwards is seen by the next call, exactly as by torch."""
    tm, fm = _eval_pair()
    x = torch.randn(4, 6, 3, 3)
    with torch.no_grad():
        fm(x), fm(x)  # the views are cached now
        for m in (tm, fm):
            if change == "in_place":
                m.weight.mul_(2.0)
                m.running_var.add_(1.0)
            elif change == "data_swap":
                m.weight.data = torch.linspace(0.1, 2.0, 6)
                m.running_mean.data = torch.linspace(-1.0, 1.0, 6)
            elif change == "same_pointer_new_shape":
                # a view of the first 6 values of a longer tensor: same data pointer
                long = torch.arange(12, dtype=torch.float32) / 4 + 0.5
                m.weight.data = long[:6]
            else:
                sd = {k: v.clone() for k, v in tm.state_dict().items()}
                sd["bias"] = torch.linspace(3.0, 4.0, 6)
                m.load_state_dict(sd)
        want = tm(x)
        got = fm(x)
    assert_close(got, want, rel_tol(torch.float32, 36), what=change)


def test_running_stats_restrided_in_place_are_updated_where_they_are():
    """Training writes the running statistics in place through the cached view; after
    ``as_strided_`` (same data pointer and shape, other memory) the update lands in the
    tensor's new elements, as torch's does."""
    x = torch.randn(8, 6, 3, 3)
    bufs = {}
    for name, cls in (("torch", torch.nn.BatchNorm2d), ("fastbn", ft.BatchNorm2d)):
        m = cls(6)
        base = torch.zeros(12)
        m.running_mean = base[:6]  # contiguous view of the first 6 values
        m(x)  # cached (fastbn)
        m.running_mean.as_strided_((6,), (2,))  # now every other value of `base`
        m(x)
        bufs[name] = base
    assert_close(bufs["fastbn"], bufs["torch"], rel_tol(torch.float32, 72))
    assert bufs["torch"][10] != 0  # the second update reached base[6:12:2]


def test_view_cache_drops_dead_tensors():
    """A cached view does not outlive its tensor: the entry goes when the tensor dies (the
    view holds the memory, so a stale entry would hold it too)."""
    import gc

    x = torch.randn(4, 6, 3, 3)
    _, fm = _eval_pair()
    with torch.no_grad():
        fm(x)
    ids = {id(t) for t in (fm.weight, fm.bias, fm.running_mean, fm.running_var)}
    assert ids <= set(ft._views)
    del fm
    gc.collect()
    assert not ids & set(ft._views)


def test_view_cache_is_not_fooled_by_a_reused_id():
    """A new tensor at the address (id) of a dead one is not given the dead one's view."""
    x = torch.randn(4, 3, 2)
    rm, rv = torch.zeros(3), torch.ones(3)
    for k in range(20):
        w = torch.full((3,), float(k + 1))  # ids of dead tensors are often reused
        y = ft.batch_norm(x, rm, rv, w, None, False, 0.1, 0.0)
        assert torch.equal(y, x * (k + 1)), k
        del w


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eval_backward_without_backward_eval(layout, monkeypatch):
    """Backends without the optional backward_eval (the GPU ones) get the eval-mode
    gradients composed from forward_eval and backward; both routes agree with torch."""
    import types

    tm, fm = _eval_pair()
    x = torch.randn(5, 6, 4, 3, dtype=torch.float32)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    grads = {}
    for route in ("backward_eval", "composed"):
        if route == "composed":
            cpu = ft._backend(ft._CPU_BRIDGE)
            bare = types.SimpleNamespace(**{k: getattr(cpu, k) for k in dir(cpu)
                                            if not k.startswith("__") and k != "backward_eval"})
            monkeypatch.setattr(ft, "_backend", lambda br: bare)
        xr = x.detach().clone().requires_grad_(True)
        out = torch.autograd.grad(fm(xr), [xr, fm.weight, fm.bias], g)
        grads[route] = out
    xr = x.detach().clone().requires_grad_(True)
    want = torch.autograd.grad(tm(xr), [xr, tm.weight, tm.bias], g)
    m = x.numel() // 6
    for route, got in grads.items():
        for a, b, name in zip(got, want, ("dx", "dweight", "dbias")):
            assert_close(a, b, rel_tol(torch.float32, m), what=f"{route} {name}")
