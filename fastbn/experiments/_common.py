"""What every experiment shares: its context, its result, statistics over seeds, plotting."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Context", "Result", "mean_std", "compare", "fmt_pct", "fmt_num", "new_figure",
           "band", "TIERS", "BN_COLOR", "PLAIN_COLOR"]

#: budget tiers: "tiny" (tests), "quick" (all seven in a few minutes on 2 CPU cores), "full".
TIERS = ("tiny", "quick", "full")
BN_COLOR = "#1f77b4"
PLAIN_COLOR = "#d62728"


@dataclass
class Context:
    """Everything an experiment needs to run.

    Attributes
    ----------
    tier : {"tiny", "quick", "full"}
        Budget of the run (sizes come from each experiment's table for this tier).
    data : fastbn.nn.Dataset
    device : {"cpu", "gpu"}
    seeds : list of int
        One training run per seed and arm.
    lr : float or None
        Overrides the learning rate of the experiments that train at one learning rate.
    batch_size : int or None
        Overrides the batch size.
    progress : bool or None
        Show progress bars (None: only when stdout is a terminal).
    """

    tier: str
    data: object
    device: str = "cpu"
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    lr: float | None = None
    batch_size: int | None = None
    progress: bool | None = None
    #: called once per finished training run (advances the progress bar).
    tick: object = None

    def advance(self):
        """Report one finished training run to the progress bar, if any."""
        if self.tick is not None:
            self.tick()

    def lr_or(self, default):
        """The learning-rate override if given, else `default`."""
        return default if self.lr is None else self.lr

    def batch_or(self, default):
        """The batch-size override if given, else `default`."""
        return default if self.batch_size is None else self.batch_size


@dataclass
class Result:
    """What one experiment produced.

    Attributes
    ----------
    name : str
        Short identifier (``--only`` name).
    title : str
    claim : str
        The claim about batch norm that the experiment tests.
    method : str
        What was run, in one paragraph (generated from the configuration).
    figure : matplotlib.figure.Figure
    metrics : dict
        Every number the findings quote (JSON-serializable).
    findings : list of str
        Sentences generated from `metrics`.
    verdict : str
        ``"supported"``, ``"not supported"``, ``"opposite"`` or ``"mixed"``.
    measured : str
        One-line measured effect for the summary table.
    """

    name: str
    title: str
    claim: str
    method: str
    figure: object
    metrics: dict
    findings: list
    verdict: str
    measured: str
    seconds: float = 0.0


def mean_std(values):
    """Mean and sample standard deviation (0 for a single value) of finite-or-not `values`."""
    a = np.asarray(values, dtype=np.float64)
    mean = float(a.mean()) if a.size else float("nan")
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return mean, std


def compare(bn_values, plain_values, *, higher_is_better=True, min_effect=0.0):
    """Compare the BN arm with the plain arm over seeds.

    The difference of the means counts as an effect only if it exceeds both two standard
    errors of the difference (Welch: ``sqrt(s1^2/n1 + s2^2/n2)``) and `min_effect`, a size
    below which a difference does not matter in practice.

    Returns
    -------
    dict
        ``bn_mean``, ``bn_std``, ``plain_mean``, ``plain_std``, ``diff`` (bn - plain),
        ``se`` and ``outcome``: ``"better"`` (BN better), ``"worse"`` or ``"no clear difference"``.
    """
    bm, bs = mean_std(bn_values)
    pm, ps = mean_std(plain_values)
    n1, n2 = len(bn_values), len(plain_values)
    se = math.sqrt(bs * bs / n1 + ps * ps / n2)
    diff = bm - pm
    gain = diff if higher_is_better else -diff
    if not math.isfinite(gain):
        outcome = "no clear difference"
    elif gain > max(2 * se, min_effect):
        outcome = "better"
    elif -gain > max(2 * se, min_effect):
        outcome = "worse"
    else:
        outcome = "no clear difference"
    return {"bn_mean": bm, "bn_std": bs, "plain_mean": pm, "plain_std": ps, "diff": diff,
            "se": se, "outcome": outcome}


def verdict_from(outcome):
    """Map a :func:`compare` outcome to a verdict on the claim that BN helps."""
    return {"better": "supported", "worse": "opposite"}.get(outcome, "not supported")


def fmt_pct(x, digits=1):
    """Format a fraction as a percentage, e.g. ``0.6734 -> '67.3%'``."""
    return f"{100 * x:.{digits}f}%" if math.isfinite(x) else "n/a"


def fmt_num(x, digits=3):
    """Format a number with `digits` significant digits (``'n/a'`` if not finite)."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.{digits}g}"


def new_figure(ncols, title, width=5.2, height=4.0):
    """A matplotlib Figure (no pyplot, no GUI backend) with `ncols` axes and a title."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=100, layout="constrained")
    axes = fig.subplots(1, ncols)
    axes = list(np.atleast_1d(axes))
    fig.suptitle(title, fontsize=13)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def band(ax, x, runs, label, color, *, logy=False):
    """Plot the mean over runs (rows of `runs`) with a min-max band."""
    a = np.asarray(runs, dtype=np.float64)
    if a.ndim == 1:
        a = a[None]
    with np.errstate(all="ignore"):
        if logy:
            m = np.exp(np.nanmean(np.log(a), axis=0))
        else:
            m = np.nanmean(a, axis=0)
        lo, hi = np.nanmin(a, axis=0), np.nanmax(a, axis=0)
    ax.plot(x, m, color=color, label=label, lw=1.8)
    if a.shape[0] > 1:
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
    if logy:
        ax.set_yscale("log")
