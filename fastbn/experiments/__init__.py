"""Seven experiments that measure what batch normalization does to training.

Each experiment trains the :mod:`fastbn.nn` MLP with and without batch norm over several
seeds and tests one claim commonly made about batch norm. Run them all with
``fastbn-experiments --quick`` (or ``python -m fastbn.experiments``); the report (HTML,
Markdown, figures, ``metrics.json``) is written by :mod:`fastbn.experiments.report`.

=================== ===================================================================
name                claim tested
=================== ===================================================================
gradient_flow       BN prevents vanishing gradients in a deep sigmoid network
convergence         BN converges in fewer steps at the same learning rate
lr_tolerance        BN tolerates a wider range of learning rates
regularization      BN (and ghost BN) reduce the train-test gap
init_robustness     BN makes training insensitive to the initial weight scale
covariate_shift     BN keeps the distribution of layer inputs steady (Ioffe & Szegedy, Fig. 1)
smoothness          BN smooths the loss landscape (Santurkar et al.)
=================== ===================================================================
"""

from __future__ import annotations

import importlib

__all__ = ["EXPERIMENTS", "get_experiment", "run_experiment"]

#: experiment names, in report order.
EXPERIMENTS = ("gradient_flow", "convergence", "lr_tolerance", "regularization",
               "init_robustness", "covariate_shift", "smoothness")


def get_experiment(name):
    """Return the module of experiment `name` (it has ``NAME``, ``TITLE``, ``CLAIM``, ``SIZES``, ``run``).

    Raises
    ------
    ValueError
        If `name` is not in :data:`EXPERIMENTS`.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"{__name__}.{name}")


def run_experiment(name, ctx):
    """Run experiment `name` with a :class:`~fastbn.experiments._common.Context`; return its Result."""
    import time

    t0 = time.perf_counter()
    result = get_experiment(name).run(ctx)
    result.seconds = time.perf_counter() - t0
    return result


def runs_of(name, ctx):
    """Number of training runs experiment `name` makes (for the progress bar)."""
    mod = get_experiment(name)
    s = mod.SIZES[ctx.tier]
    per_arm = len(ctx.seeds)
    if name == "lr_tolerance":
        return 2 * per_arm * len(s["lrs"])
    if name == "init_robustness":
        return 2 * per_arm * len(s["scales"])
    if name == "regularization":
        return per_arm * (2 + sum(g < ctx.batch_or(128) for g in s["ghosts"]))
    return 2 * per_arm
