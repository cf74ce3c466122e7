"""Optimizers: SGD with momentum and weight decay, and Adam (torch's update rules).

Both update ``Parameter.value`` in place from ``Parameter.grad``.
"""

from __future__ import annotations

import math

__all__ = ["SGD", "Adam", "make_optimizer"]


def _check_nonneg(name, value, *, upper=None):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if ok and upper is not None:
        ok = value < upper
    if not ok:
        bound = f"in [0, {upper})" if upper is not None else "a finite number >= 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return float(value)


class SGD:
    """Stochastic gradient descent with heavy-ball momentum and L2 weight decay.

    With ``g = grad + weight_decay * p``: ``buf = g`` on the first step and
    ``buf = momentum * buf + g`` afterwards, then ``p -= lr * buf`` (torch.optim.SGD with
    dampening 0, not Nesterov).

    Parameters
    ----------
    params : list of Parameter
    lr : float
        Learning rate, >= 0.
    momentum : float
        In [0, 1).
    weight_decay : float
        L2 penalty coefficient, >= 0.
    """

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        self.params = list(params)
        self.lr = _check_nonneg("lr", lr)
        self.momentum = _check_nonneg("momentum", momentum, upper=1.0)
        self.weight_decay = _check_nonneg("weight_decay", weight_decay)
        self._buf = [None] * len(self.params)

    def step(self):
        """Apply one update to every parameter that has a gradient."""
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            if self.weight_decay:
                g = g + self.weight_decay * p.value
            if self.momentum:
                if self._buf[i] is None:
                    self._buf[i] = g.copy()
                else:
                    self._buf[i] *= self.momentum
                    self._buf[i] += g
                g = self._buf[i]
            p.value -= self.lr * g


class Adam:
    """Adam (Kingma & Ba, 2015) with torch's L2 weight decay (added to the gradient).

    ``m = b1*m + (1-b1)*g``, ``v = b2*v + (1-b2)*g*g``, and after step t
    ``p -= lr * (m / (1-b1**t)) / (sqrt(v / (1-b2**t)) + eps)``.

    Parameters
    ----------
    params : list of Parameter
    lr : float
        Learning rate, >= 0.
    betas : (float, float)
        Decay rates of the first and second moments, each in [0, 1).
    eps : float
        Added to the denominator, > 0.
    weight_decay : float
        L2 penalty coefficient, >= 0.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.params = list(params)
        self.lr = _check_nonneg("lr", lr)
        self.b1 = _check_nonneg("betas[0]", betas[0], upper=1.0)
        self.b2 = _check_nonneg("betas[1]", betas[1], upper=1.0)
        self.eps = _check_nonneg("eps", eps)
        if self.eps == 0:
            raise ValueError("eps must be > 0, got 0")
        self.weight_decay = _check_nonneg("weight_decay", weight_decay)
        self.t = 0
        self._m = [None] * len(self.params)
        self._v = [None] * len(self.params)

    def step(self):
        """Apply one update to every parameter that has a gradient."""
        self.t += 1
        c1 = 1.0 - self.b1 ** self.t
        c2 = 1.0 - self.b2 ** self.t
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            if self.weight_decay:
                g = g + self.weight_decay * p.value
            if self._m[i] is None:
                self._m[i] = (1 - self.b1) * g
                self._v[i] = (1 - self.b2) * g * g
            else:
                self._m[i] *= self.b1
                self._m[i] += (1 - self.b1) * g
                self._v[i] *= self.b2
                self._v[i] += (1 - self.b2) * g * g
            denom = (self._v[i] / c2) ** 0.5 + self.eps
            p.value -= (self.lr / c1) * self._m[i] / denom


def make_optimizer(name, params, lr, **kwargs):
    """Build an optimizer by name: ``"sgd"`` (:class:`SGD`) or ``"adam"`` (:class:`Adam`)."""
    table = {"sgd": SGD, "adam": Adam}
    if name not in table:
        raise ValueError(f"optimizer must be one of {sorted(table)}, got {name!r}")
    return table[name](params, lr, **kwargs)
