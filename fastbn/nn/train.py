"""The training loop: seeded mini-batches, loss, backward, optimizer step, periodic evaluation."""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field

import numpy as np

from ._device import array_module
from .data import Dataset, batch_indices
from .layers import MLP
from .losses import SoftmaxCrossEntropy
from .optim import make_optimizer

__all__ = ["History", "Trainer", "evaluate", "train_mlp", "progress_bar"]


def _one_blas_thread():
    """Limit BLAS to one thread for the duration (if threadpoolctl is installed).

    The matrices of these MLPs are small (hundreds of rows): a multi-threaded BLAS spends
    more time waking and synchronizing its threads than multiplying, and on a busy machine
    its spinning threads slow everything else. Measured on a loaded 2-core machine: 300
    steps of a 3x128 MLP took 12.0 s with 2 OpenBLAS threads and 1.6 s with one.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def progress_bar(total, desc, *, enabled=None):
    """A tqdm progress bar, shown only when stdout is a terminal (or when `enabled` says so)."""
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stdout.isatty()
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


@dataclass
class History:
    """What one training run measured.

    Attributes
    ----------
    loss : list of float
        Mini-batch training loss of every step (before that step's update).
    eval_steps : list of int
        Steps at which the model was evaluated (0 = before training).
    test_acc, test_loss, train_acc, train_loss : list of float
        Evaluation-mode metrics on the full test and training sets at `eval_steps`.
    diverged : bool
        True if the training loss became non-finite; training stopped there.
    diverged_at : int or None
        The step at which it did.
    """

    loss: list = field(default_factory=list)
    eval_steps: list = field(default_factory=list)
    test_acc: list = field(default_factory=list)
    test_loss: list = field(default_factory=list)
    train_acc: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)
    diverged: bool = False
    diverged_at: int | None = None

    def steps_to(self, accuracy):
        """First evaluation step whose test accuracy reaches `accuracy`, or None."""
        for s, a in zip(self.eval_steps, self.test_acc):
            if a >= accuracy:
                return s
        return None


def evaluate(model, x, y, loss_fn, chunk=4096):
    """Return ``(mean loss, accuracy)`` of `model` in evaluation mode on device arrays `x`, `y`."""
    xp = model.xp
    total_loss, correct, n = 0.0, 0, x.shape[0]
    for lo in range(0, n, chunk):
        logits = model.forward(x[lo:lo + chunk], training=False)
        yb = y[lo:lo + chunk]
        total_loss += float(loss_fn.forward(logits, yb)) * yb.shape[0]
        correct += int(xp.count_nonzero(logits.argmax(axis=1) == yb))
    return total_loss / n, correct / n


class Trainer:
    """Trains a model on a data set with seeded mini-batches.

    Parameters
    ----------
    model : fastbn.nn.Module
        Has an ``xp`` attribute (its array namespace).
    optimizer : fastbn.nn.SGD or fastbn.nn.Adam
    data : Dataset
        Host arrays; copied to the model's device once.
    batch_size : int
    seed : int
        Seeds the order of the mini-batches.
    """

    def __init__(self, model, optimizer, data: Dataset, batch_size, seed=0):
        xp = model.xp
        self.model, self.optimizer, self.xp = model, optimizer, xp
        self.loss_fn = SoftmaxCrossEntropy(xp)
        self.x_train, self.y_train = xp.asarray(data.x_train), xp.asarray(data.y_train)
        self.x_test, self.y_test = xp.asarray(data.x_test), xp.asarray(data.y_test)
        self._batches = batch_indices(data.x_train.shape[0], batch_size,
                                      np.random.default_rng(np.random.SeedSequence([seed, 1])))
        self.step_count = 0
        self._pending = None

    def next_batch(self):
        """Return the mini-batch ``(x, y)`` (on the device) that the next :meth:`step` trains on.

        Calling it again before that step returns the same batch, so a callback can probe
        the model on exactly the batch of the coming step without changing the batch order.
        """
        if self._pending is None:
            idx = self.xp.asarray(next(self._batches))
            self._pending = (self.x_train[idx], self.y_train[idx])
        return self._pending

    def loss_and_grad(self, x, y, training=True):
        """Forward and backward on one batch (parameter grads set); return the loss as a float."""
        logits = self.model.forward(x, training)
        loss = self.loss_fn.forward(logits, y)
        self.model.backward(self.loss_fn.backward())
        return float(loss)

    def step(self):
        """One optimizer step on the next mini-batch; return its loss (before the update)."""
        x, y = self.next_batch()
        self._pending = None
        loss = self.loss_and_grad(x, y)
        if math.isfinite(loss):
            self.optimizer.step()
        self.step_count += 1
        return loss

    def evaluate(self, history):
        """Append test and training metrics at the current step to `history`."""
        tl, ta = evaluate(self.model, self.x_test, self.y_test, self.loss_fn)
        rl, ra = evaluate(self.model, self.x_train, self.y_train, self.loss_fn)
        history.eval_steps.append(self.step_count)
        history.test_loss.append(tl)
        history.test_acc.append(ta)
        history.train_loss.append(rl)
        history.train_acc.append(ra)

    def fit(self, steps, eval_every=None, callback=None, history=None):
        """Train for `steps` steps, evaluating at step 0, every `eval_every` steps and at the end.

        Parameters
        ----------
        steps : int
        eval_every : int or None
            None evaluates only before and after training.
        callback : callable or None
            ``callback(trainer, step)`` is called before each step and after the last one
            (step = number of completed steps).
        history : History or None
            Appended to; a new one is made if None.

        Returns
        -------
        History
        """
        h = History() if history is None else history
        # a diverging run overflows on purpose (the learning-rate and init sweeps look for
        # it); it is detected from the loss, so NumPy's warnings would only be noise
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"), _one_blas_thread():
            return self._fit(h, steps, eval_every, callback)

    def _fit(self, h, steps, eval_every, callback):
        self.evaluate(h)
        for _ in range(steps):
            if callback is not None:
                callback(self, self.step_count)
            loss = self.step()
            h.loss.append(loss)
            if not math.isfinite(loss):
                h.diverged, h.diverged_at = True, self.step_count
                break
            if eval_every and self.step_count % eval_every == 0 and self.step_count < steps:
                self.evaluate(h)
        if callback is not None and not h.diverged:
            callback(self, self.step_count)
        self.evaluate(h)
        return h


def train_mlp(data: Dataset, *, hidden=(100, 100), activation="relu", batch_norm=False,
              ghost_batch_size=None, dropout=0.0, init="he", init_scale=1.0, optimizer="sgd",
              lr=0.1, momentum=0.9, weight_decay=0.0, batch_size=128, steps=1000,
              eval_every=None, seed=0, device="cpu", callback=None, dtype="float32"):
    """Build an :class:`~fastbn.nn.MLP` for `data`, train it, and return ``(model, trainer, history)``.

    Parameters
    ----------
    data : Dataset
    hidden : sequence of int
        Widths of the hidden layers.
    activation, batch_norm, ghost_batch_size, dropout, init, init_scale, dtype :
        See :class:`~fastbn.nn.MLP`.
    optimizer : {"sgd", "adam"}
    lr, momentum, weight_decay :
        Optimizer settings (`momentum` is SGD's; Adam uses its default betas).
    batch_size, steps, eval_every, callback :
        See :class:`Trainer` and :meth:`Trainer.fit`.
    seed : int
        Fixes the initial weights, the batch order and the dropout masks.
    device : {"cpu", "gpu"}

    Returns
    -------
    model : MLP
    trainer : Trainer
    history : History
    """
    xp = array_module(device)
    model = MLP([data.num_features, *hidden, data.num_classes], xp, seed=seed,
                activation=activation, batch_norm=batch_norm, ghost_batch_size=ghost_batch_size,
                dropout=dropout, init=init, init_scale=init_scale, dtype=dtype)
    opt_kwargs = {"weight_decay": weight_decay}
    if optimizer == "sgd":
        opt_kwargs["momentum"] = momentum
    opt = make_optimizer(optimizer, model.parameters(), lr, **opt_kwargs)
    trainer = Trainer(model, opt, data, batch_size, seed=seed)
    history = trainer.fit(steps, eval_every=eval_every, callback=callback)
    return model, trainer, history
