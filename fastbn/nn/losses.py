"""Softmax cross-entropy loss with its hand-written gradient."""

from __future__ import annotations

__all__ = ["SoftmaxCrossEntropy"]


class SoftmaxCrossEntropy:
    """Mean softmax cross-entropy of logits against integer labels.

    ``forward(logits, labels)`` returns the mean over the batch of
    ``logsumexp(logits[i]) - logits[i, labels[i]]`` (computed with the max subtracted, so it
    does not overflow); ``backward()`` returns its gradient ``(softmax(logits) - onehot) / N``.

    Parameters
    ----------
    xp : module
        Array namespace (numpy or cupy).
    """

    def __init__(self, xp):
        self.xp = xp
        self._cache = None

    def forward(self, logits, labels):
        """Return the mean loss (a 0-d array of ``logits.dtype``) and cache the softmax."""
        xp = self.xp
        n = logits.shape[0]
        shifted = logits - logits.max(axis=1, keepdims=True)
        e = xp.exp(shifted)
        s = e.sum(axis=1, keepdims=True)
        logp = shifted - xp.log(s)
        rows = xp.arange(n)
        loss = -logp[rows, labels].mean()
        self._cache = (e / s, labels, rows)
        return loss

    __call__ = forward

    def backward(self):
        """Return dL/dlogits for the last :meth:`forward`."""
        p, labels, rows = self._cache
        d = p.copy()
        d[rows, labels] -= 1
        d /= p.shape[0]
        return d
