"""Experiment 3: final accuracy across a learning-rate sweep, with and without batch norm."""

from __future__ import annotations

import math

import numpy as np

from ..nn import train_mlp
from ._common import (
    BN_COLOR,
    PLAIN_COLOR,
    Result,
    fmt_num,
    fmt_pct,
    mean_std,
    new_figure,
)

NAME = "lr_tolerance"
TITLE = "Learning-rate tolerance"
CLAIM = "Batch norm allows (much) larger learning rates and makes training less sensitive to the learning rate."

SIZES = {
    "tiny": dict(hidden=[32, 32], steps=30, lrs=[1e-3, 1e-1, 10.0]),
    "quick": dict(hidden=[128, 128, 128], steps=400, lrs=[1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0]),
    "full": dict(hidden=[256, 256, 256], steps=4000,
                 lrs=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]),
}
#: a run "trains" if its final test accuracy is within this fraction of the best run's.
GOOD_FRACTION = 0.9


def run(ctx):
    """Sweep the SGD learning rate for a ReLU MLP with and without BN."""
    s = SIZES[ctx.tier]
    lrs, bs = s["lrs"], ctx.batch_or(128)
    chance = 1.0 / ctx.data.num_classes
    acc = {False: np.zeros((len(lrs), len(ctx.seeds))), True: np.zeros((len(lrs), len(ctx.seeds)))}
    div = {False: np.zeros_like(acc[False], bool), True: np.zeros_like(acc[True], bool)}
    for bn in (False, True):
        for i, lr in enumerate(lrs):
            for j, seed in enumerate(ctx.seeds):
                _, _, h = train_mlp(ctx.data, hidden=s["hidden"], activation="relu", batch_norm=bn,
                                    lr=lr, momentum=0.9, batch_size=bs, steps=s["steps"],
                                    seed=seed, device=ctx.device)
                a = h.test_acc[-1]
                # diverged: the loss became non-finite, or training ended above the loss of
                # guessing uniformly (log of the number of classes)
                failed = h.diverged or not (h.train_loss[-1] < math.log(ctx.data.num_classes))
                acc[bn][i, j] = a if math.isfinite(a) else chance
                div[bn][i, j] = failed
                ctx.advance()

    best = max(acc[False].mean(axis=1).max(), acc[True].mean(axis=1).max())
    m = {"hidden": s["hidden"], "steps": s["steps"], "batch_size": bs, "momentum": 0.9,
         "learning_rates": lrs, "num_lrs": len(lrs), "seeds": list(ctx.seeds), "num_seeds": len(ctx.seeds),
         "best_mean_acc": best, "good_fraction": GOOD_FRACTION, "good_threshold": GOOD_FRACTION * best,
         "orders_of_magnitude_swept": math.log10(lrs[-1] / lrs[0])}
    for bn, key in ((False, "plain"), (True, "bn")):
        mean = acc[bn].mean(axis=1)
        good = [lr for lr, a in zip(lrs, mean) if a >= GOOD_FRACTION * best]
        ok = [lr for lr, d in zip(lrs, div[bn].any(axis=1)) if not d]
        m[key] = {
            "test_acc": acc[bn].tolist(),
            "mean_test_acc": mean.tolist(),
            "std_test_acc": [mean_std(r)[1] for r in acc[bn]],
            "diverged_runs": div[bn].sum(axis=1).tolist(),
            "good_lrs": good,
            "num_good_lrs": len(good),
            "good_range_decades": math.log10(max(good) / min(good)) if good else 0.0,
            "largest_lr_without_divergence": max(ok) if ok else None,
            "best_lr": lrs[int(np.argmax(mean))],
            "best_acc": float(mean.max()),
            "num_lrs_below_threshold": len(lrs) - len(good),
            "total_failed_runs": int(div[bn].sum()),
        }
    p, b = m["plain"], m["bn"]
    wider = b["num_good_lrs"] - p["num_good_lrs"]
    larger = (b["largest_lr_without_divergence"] or 0) > (p["largest_lr_without_divergence"] or 0)
    if wider > 0 and larger:
        verdict = "supported"
    elif wider < 0 and not larger:
        verdict = "opposite"
    elif wider == 0 and not larger:
        verdict = "not supported"
    else:
        verdict = "mixed"

    def lr_list(xs):
        return ", ".join(fmt_num(x, 2) for x in xs) if xs else "none"

    findings = [
        f"Over {len(lrs)} learning rates from {fmt_num(lrs[0], 2)} to {fmt_num(lrs[-1], 2)} "
        f"({fmt_num(m['orders_of_magnitude_swept'], 2)} orders of magnitude), "
        f"the number of learning rates reaching at least {fmt_pct(GOOD_FRACTION, 0)} of the best mean "
        f"accuracy ({fmt_pct(best)}) is {p['num_good_lrs']} without BN ({lr_list(p['good_lrs'])}) and "
        f"{b['num_good_lrs']} with BN ({lr_list(b['good_lrs'])}).",
        f"Largest learning rate at which no seed diverged: "
        f"{fmt_num(p['largest_lr_without_divergence'], 2)} without BN, "
        f"{fmt_num(b['largest_lr_without_divergence'], 2)} with BN.",
        f"Best mean test accuracy: {fmt_pct(p['best_acc'])} at learning rate {fmt_num(p['best_lr'], 2)} "
        f"without BN, {fmt_pct(b['best_acc'])} at {fmt_num(b['best_lr'], 2)} with BN.",
    ]
    findings.append(
        f"With BN, {b['num_lrs_below_threshold']} of the {len(lrs)} learning rates still end below that "
        f"threshold and {b['total_failed_runs']} runs failed (without BN: {p['num_lrs_below_threshold']} "
        f"and {p['total_failed_runs']}): BN's range of good learning rates is "
        f"{'wider' if wider > 0 else 'not wider'}, and it is not unlimited.")
    measured = (f"learning rates within {fmt_pct(GOOD_FRACTION, 0)} of best: {p['num_good_lrs']} without "
                f"BN, {b['num_good_lrs']} with BN (of {len(lrs)})")

    fig, ax = new_figure(2, f"{TITLE} (ReLU MLP {s['hidden']}, SGD+momentum, {s['steps']} steps)")
    for bn, key, color, label in ((False, "plain", PLAIN_COLOR, "no BN"), (True, "bn", BN_COLOR, "BN")):
        mean, a = np.asarray(m[key]["mean_test_acc"]), acc[bn]
        ax[0].plot(lrs, mean, "o-", color=color, label=label)
        ax[0].fill_between(lrs, a.min(axis=1), a.max(axis=1), color=color, alpha=0.2, lw=0)
        ax[1].plot(lrs, m[key]["diverged_runs"], "o-", color=color, label=label)
    ax[0].axhline(GOOD_FRACTION * best, color="gray", ls="--", lw=1,
                  label=f"{GOOD_FRACTION:.0%} of best")
    ax[0].axhline(chance, color="black", ls=":", lw=1, label="chance")
    ax[0].set(xscale="log", xlabel="learning rate", ylabel=f"test accuracy after {s['steps']} steps",
              title="Final test accuracy (mean, min-max band)")
    ax[1].set(xscale="log", xlabel="learning rate", ylabel=f"runs that failed (of {len(ctx.seeds)})",
              title="Diverged or untrained runs")
    ax[1].set_ylim(-0.1, len(ctx.seeds) + 0.1)
    ax[1].set_yticks(range(len(ctx.seeds) + 1))
    for a in ax:
        a.legend()
    method = (f"ReLU MLP with hidden widths {s['hidden']}, SGD with momentum 0.9, batch {bs}, "
              f"{s['steps']} steps at each of {len(lrs)} learning rates, {len(ctx.seeds)} seeds per "
              f"point. A run counts as failed if its loss became non-finite or its final training "
              f"loss is above that of a uniform guess.")
    return Result(NAME, TITLE, CLAIM, method, fig, m, findings, verdict, measured)
