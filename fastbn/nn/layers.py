"""Layers of the MLP trainer, each with its forward pass and its hand-written backward pass.

Every layer works on ``(batch, features)`` arrays of one array namespace ``xp`` (NumPy or
CuPy), picked once when the model is built. ``forward`` caches what ``backward`` needs;
``backward(dy)`` returns the gradient with respect to the input and stores the parameter
gradients in ``Parameter.grad``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "Parameter", "Module", "Linear", "BatchNorm", "ReLU", "Tanh", "Sigmoid", "Dropout",
    "Sequential", "MLP", "ACTIVATIONS", "INITS",
]

#: weight initializations of :class:`Linear`: name -> standard deviation for (fan_in, fan_out).
INITS = {
    "he": lambda fan_in, fan_out: math.sqrt(2.0 / fan_in),
    "xavier": lambda fan_in, fan_out: math.sqrt(2.0 / (fan_in + fan_out)),
    "normal": lambda fan_in, fan_out: 1.0,
}


class Parameter:
    """A trainable array and its gradient.

    Parameters
    ----------
    value : array
        The parameter (NumPy or CuPy), updated in place by the optimizers.
    name : str
        A readable name, e.g. ``"linear0.weight"``.

    Attributes
    ----------
    grad : array or None
        The gradient of the last backward pass (same shape and dtype as `value`).
    """

    def __init__(self, value, name: str = ""):
        self.value = value
        self.grad = None
        self.name = name

    def __repr__(self) -> str:
        return f"Parameter({self.name!r}, shape={tuple(self.value.shape)}, dtype={self.value.dtype})"


class Module:
    """Base class: a layer with ``forward``, ``backward`` and ``parameters``."""

    def parameters(self) -> list[Parameter]:
        """Return the trainable parameters of the layer (empty for parameter-free layers)."""
        return []

    def forward(self, x, training: bool = True):
        """Compute the layer's output for `x`; cache what :meth:`backward` needs."""
        raise NotImplementedError

    def backward(self, dy):
        """Return dL/dx given dL/dy for the last forward pass; set the parameters' grads."""
        raise NotImplementedError

    def __call__(self, x, training: bool = True):
        return self.forward(x, training)


class Linear(Module):
    """Fully connected layer ``y = x @ weight.T + bias`` (weight of shape ``(out, in)``, as torch).

    Parameters
    ----------
    in_features, out_features : int
        Input and output widths.
    xp : module
        Array namespace (numpy or cupy).
    rng : numpy.random.Generator
        Generator for the initial weights (drawn on the host, so a seed gives the same
        weights on every device).
    init : {"he", "xavier", "normal"}
        Standard deviation of the normal initial weights: ``sqrt(2/fan_in)``,
        ``sqrt(2/(fan_in+fan_out))`` or 1, multiplied by `init_scale`.
    init_scale : float
        Multiplier of the standard deviation.
    bias : bool
        Whether the layer has a bias (initialized to zero).
    dtype : str or numpy.dtype
        Parameter dtype.
    """

    def __init__(self, in_features, out_features, xp, rng, *, init="he", init_scale=1.0,
                 bias=True, dtype="float32", name="linear"):
        if init not in INITS:
            raise ValueError(f"init must be one of {sorted(INITS)}, got {init!r}")
        if not (isinstance(init_scale, (int, float)) and init_scale > 0 and math.isfinite(init_scale)):
            raise ValueError(f"init_scale must be a positive finite number, got {init_scale!r}")
        self.xp = xp
        std = INITS[init](in_features, out_features) * float(init_scale)
        w = rng.standard_normal((out_features, in_features)) * std
        self.weight = Parameter(xp.asarray(w.astype(dtype)), f"{name}.weight")
        self.bias = Parameter(xp.zeros(out_features, dtype=dtype), f"{name}.bias") if bias else None
        self._x = None

    def parameters(self):
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def forward(self, x, training=True):
        self._x = x
        y = x @ self.weight.value.T
        if self.bias is not None:
            y += self.bias.value
        return y

    def backward(self, dy):
        x = self._x
        self.weight.grad = dy.T @ x
        if self.bias is not None:
            self.bias.grad = dy.sum(axis=0)
        return dy @ self.weight.value


class BatchNorm(Module):
    """Batch normalization over the batch axis, computed by fastbn's public API.

    Training uses :func:`fastbn.batch_norm_forward` and :func:`fastbn.batch_norm_backward`
    (batch statistics; running statistics updated in place); evaluation uses
    :func:`fastbn.batch_norm` with the running statistics.

    Parameters
    ----------
    num_features : int
        Width of the layer.
    xp : module
        Array namespace (numpy or cupy).
    eps, momentum : float
        As in :func:`fastbn.batch_norm`.
    ghost_batch_size : int or None
        If given, a training batch is split into sub-batches of about this size that are
        normalized separately ("ghost batch norm"): the statistics of smaller batches are
        noisier. None normalizes the whole batch at once.
    dtype : str or numpy.dtype
        dtype of the scale, shift and running statistics.
    """

    def __init__(self, num_features, xp, *, eps=1e-5, momentum=0.1, ghost_batch_size=None,
                 dtype="float32", name="bn"):
        if ghost_batch_size is not None and (not isinstance(ghost_batch_size, int) or ghost_batch_size < 2):
            raise ValueError(f"ghost_batch_size must be an int >= 2 or None, got {ghost_batch_size!r}")
        import fastbn

        self._fastbn = fastbn
        self.xp = xp
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.ghost_batch_size = ghost_batch_size
        self.weight = Parameter(xp.ones(num_features, dtype=dtype), f"{name}.weight")
        self.bias = Parameter(xp.zeros(num_features, dtype=dtype), f"{name}.bias")
        self.running_mean = xp.zeros(num_features, dtype=dtype)
        self.running_var = xp.ones(num_features, dtype=dtype)
        #: if False, training-mode forwards leave the running statistics alone (used to
        #: probe the loss landscape without changing the model).
        self.update_running_stats = True
        self._cache = None

    def parameters(self):
        return [self.weight, self.bias]

    def _chunks(self, n):
        g = self.ghost_batch_size
        if g is None or g >= n:
            return [(0, n)]
        k = max(1, n // g)  # k near-equal chunks, each at least g values
        bounds = [round(i * n / k) for i in range(k + 1)]
        return list(zip(bounds[:-1], bounds[1:]))

    def forward(self, x, training=True):
        fb = self._fastbn
        w, b = self.weight.value, self.bias.value
        if not training:
            self._cache = None
            return fb.batch_norm(x, self.running_mean, self.running_var, w, b, training=False,
                                 eps=self.eps)
        rm, rv = (self.running_mean, self.running_var) if self.update_running_stats else (None, None)
        chunks = self._chunks(x.shape[0])
        outs, stats = [], []
        for lo, hi in chunks:
            y, mean, invstd = fb.batch_norm_forward(x[lo:hi], w, b, eps=self.eps, running_mean=rm,
                                                    running_var=rv, momentum=self.momentum)
            outs.append(y)
            stats.append((lo, hi, mean, invstd))
        self._cache = (x, stats)
        return outs[0] if len(outs) == 1 else self.xp.concatenate(outs, axis=0)

    def backward(self, dy):
        fb = self._fastbn
        x, stats = self._cache
        w = self.weight.value
        dxs, dw, db = [], None, None
        for lo, hi, mean, invstd in stats:
            dx, dwc, dbc = fb.batch_norm_backward(dy[lo:hi], x[lo:hi], mean, invstd, w)
            dxs.append(dx)
            dw = dwc if dw is None else dw + dwc
            db = dbc if db is None else db + dbc
        self.weight.grad, self.bias.grad = dw, db
        return dxs[0] if len(dxs) == 1 else self.xp.concatenate(dxs, axis=0)


class ReLU(Module):
    """``max(x, 0)``; the gradient at 0 is taken as 0."""

    def forward(self, x, training=True):
        self._mask = x > 0
        return x * self._mask

    def backward(self, dy):
        return dy * self._mask


class Tanh(Module):
    """Hyperbolic tangent."""

    def __init__(self, xp):
        self.xp = xp

    def forward(self, x, training=True):
        self._y = self.xp.tanh(x)
        return self._y

    def backward(self, dy):
        return dy * (1 - self._y * self._y)


class Sigmoid(Module):
    """Logistic sigmoid ``1 / (1 + exp(-x))``, computed as ``(1 + tanh(x/2)) / 2`` (no overflow)."""

    def __init__(self, xp):
        self.xp = xp

    def forward(self, x, training=True):
        self._y = (self.xp.tanh(x * 0.5) + 1) * 0.5
        return self._y

    def backward(self, dy):
        return dy * (self._y * (1 - self._y))


class Dropout(Module):
    """Inverted dropout: in training, zero each value with probability `p` and scale the rest by ``1/(1-p)``.

    Parameters
    ----------
    p : float
        Drop probability, in [0, 1).
    xp : module
        Array namespace.
    seed : int
        Seed of the mask generator (``xp.random.default_rng``).
    """

    def __init__(self, p, xp, seed=0):
        if not (isinstance(p, (int, float)) and 0 <= p < 1):
            raise ValueError(f"dropout p must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.xp = xp
        self._rng = xp.random.default_rng(seed)
        self._mask = None

    def forward(self, x, training=True):
        if not training or self.p == 0:
            self._mask = None
            return x
        keep = self._rng.random(x.shape, dtype=np.float32) >= self.p
        self._mask = keep.astype(x.dtype) * (1.0 / (1.0 - self.p))
        return x * self._mask

    def backward(self, dy):
        return dy if self._mask is None else dy * self._mask


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse."""

    def __init__(self, layers):
        self.layers = list(layers)

    def parameters(self):
        return [p for layer in self.layers for p in layer.parameters()]

    def forward(self, x, training=True):
        for layer in self.layers:
            x = layer.forward(x, training)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy


#: activation name -> layer factory taking the array namespace.
ACTIVATIONS = {
    "relu": lambda xp: ReLU(),
    "tanh": Tanh,
    "sigmoid": Sigmoid,
}


class MLP(Sequential):
    """Multilayer perceptron: ``[Linear -> (BatchNorm) -> activation -> (Dropout)] * depth -> Linear``.

    Batch normalization sits between each hidden Linear and its nonlinearity, as in Ioffe &
    Szegedy (2015); a Linear followed by batch norm has no bias (the norm's shift replaces it).

    Parameters
    ----------
    sizes : sequence of int
        ``[inputs, hidden_1, ..., hidden_k, outputs]``.
    xp : module
        Array namespace (see :func:`fastbn.nn.array_module`).
    seed : int
        Seeds the weights (and the dropout masks).
    activation : {"relu", "tanh", "sigmoid"}
    batch_norm : bool
        Insert :class:`BatchNorm` after every hidden Linear.
    ghost_batch_size : int or None
        Passed to every :class:`BatchNorm`.
    dropout : float
        Dropout probability after every hidden activation (0 disables it).
    init, init_scale :
        Passed to every :class:`Linear`.
    dtype : str
        Parameter and activation dtype.
    """

    def __init__(self, sizes, xp, *, seed=0, activation="relu", batch_norm=False,
                 ghost_batch_size=None, dropout=0.0, init="he", init_scale=1.0, dtype="float32",
                 bn_momentum=0.1, bn_eps=1e-5):
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must list at least 2 positive widths, got {sizes!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        init_rng, drop_seed = np.random.SeedSequence(seed).spawn(2)
        rng = np.random.default_rng(init_rng)
        layers = []
        self.hidden_linears, self.activations, self.norms = [], [], []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            last = i == len(sizes) - 2
            lin = Linear(fan_in, fan_out, xp, rng, init=init, init_scale=init_scale,
                         bias=last or not batch_norm, dtype=dtype, name=f"linear{i}")
            layers.append(lin)
            if last:
                break
            self.hidden_linears.append(lin)
            if batch_norm:
                bn = BatchNorm(fan_out, xp, eps=bn_eps, momentum=bn_momentum,
                               ghost_batch_size=ghost_batch_size, dtype=dtype, name=f"bn{i}")
                layers.append(bn)
                self.norms.append(bn)
            act = ACTIVATIONS[activation](xp)
            layers.append(act)
            self.activations.append(act)
            if dropout:
                layers.append(Dropout(dropout, xp, seed=int(drop_seed.generate_state(1)[0]) + i))
        super().__init__(layers)
        self.xp = xp
        self.sizes = sizes
        self.linears = [layer for layer in layers if isinstance(layer, Linear)]

    def pre_activations(self, x, training=False):
        """Run a forward pass and return the input of every hidden nonlinearity.

        Parameters
        ----------
        x : array
            A batch of inputs.
        training : bool
            Mode of the pass (evaluation by default: running statistics, no dropout).

        Returns
        -------
        list of arrays
            One ``(batch, width)`` array per hidden layer: what enters its activation
            function (the batch-norm output when the model has batch norm).
        """
        wanted = {id(a) for a in self.activations}
        out = []
        for layer in self.layers:
            if id(layer) in wanted:
                out.append(x)
            x = layer.forward(x, training)
        return out

    def set_running_stat_updates(self, enabled: bool) -> None:
        """Turn the running-statistics updates of every batch-norm layer on or off."""
        for bn in self.norms:
            bn.update_running_stats = bool(enabled)
