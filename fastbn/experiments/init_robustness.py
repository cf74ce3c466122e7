"""Experiment 5: robustness to the scale of the initial weights, with and without batch norm."""

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

NAME = "init_robustness"
TITLE = "Robustness to the initialization scale"
CLAIM = "Batch norm makes training insensitive to the weight initialization."

SIZES = {
    "tiny": dict(hidden=[32] * 4, steps=30, scales=[0.1, 1.0, 10.0]),
    "quick": dict(hidden=[128] * 6, steps=400, scales=[0.01, 0.1, 0.3, 1.0, 3.0, 10.0]),
    "full": dict(hidden=[256] * 8, steps=4000, scales=[0.001, 0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0]),
}
LR = 0.02
GOOD_FRACTION = 0.9
#: "insensitive" means: the mean accuracy varies by at most this much across the scales.
INSENSITIVE_RANGE = 0.05


def run(ctx):
    """Train a deep ReLU MLP from He-init weights multiplied by several scales."""
    s = SIZES[ctx.tier]
    lr, bs, scales = ctx.lr_or(LR), ctx.batch_or(128), s["scales"]
    chance = 1.0 / ctx.data.num_classes
    acc = {bn: np.zeros((len(scales), len(ctx.seeds))) for bn in (False, True)}
    div = {bn: np.zeros((len(scales), len(ctx.seeds)), bool) for bn in (False, True)}
    for bn in (False, True):
        for i, scale in enumerate(scales):
            for j, seed in enumerate(ctx.seeds):
                _, _, h = train_mlp(ctx.data, hidden=s["hidden"], activation="relu", batch_norm=bn,
                                    init="he", init_scale=scale, lr=lr, momentum=0.9,
                                    batch_size=bs, steps=s["steps"], seed=seed, device=ctx.device)
                a = h.test_acc[-1]
                acc[bn][i, j] = a if math.isfinite(a) else chance
                div[bn][i, j] = h.diverged
                ctx.advance()

    best = max(acc[False].mean(axis=1).max(), acc[True].mean(axis=1).max())
    m = {"hidden": s["hidden"], "depth": len(s["hidden"]), "width": s["hidden"][0], "steps": s["steps"],
         "lr": lr, "momentum": 0.9, "batch_size": bs, "init_scales": scales, "num_scales": len(scales), "seeds": list(ctx.seeds),
         "num_seeds": len(ctx.seeds), "best_mean_acc": best, "good_fraction": GOOD_FRACTION,
         "insensitive_range": INSENSITIVE_RANGE}
    for bn, key in ((False, "plain"), (True, "bn")):
        mean = acc[bn].mean(axis=1)
        good = [sc for sc, a in zip(scales, mean) if a >= GOOD_FRACTION * best]
        m[key] = {"test_acc": acc[bn].tolist(), "mean_test_acc": mean.tolist(),
                  "std_test_acc": [mean_std(r)[1] for r in acc[bn]],
                  "diverged_runs": div[bn].sum(axis=1).tolist(),
                  "good_scales": good, "num_good_scales": len(good),
                  "worst_acc": float(mean.min()), "acc_range": float(mean.max() - mean.min())}
    p, b = m["plain"], m["bn"]
    more_robust = b["num_good_scales"] > p["num_good_scales"] and b["acc_range"] < p["acc_range"]
    note = None
    if more_robust and b["acc_range"] <= INSENSITIVE_RANGE:
        verdict = "supported"
    elif more_robust:
        verdict = "mixed"
        note = (f"BN is more robust than no BN here, but not insensitive: its mean accuracy still "
                f"varies by {fmt_pct(b['acc_range'])} across the scales (more than "
                f"{fmt_pct(INSENSITIVE_RANGE, 0)}).")
    elif b["num_good_scales"] < p["num_good_scales"]:
        verdict = "opposite"
    elif b["num_good_scales"] == p["num_good_scales"] and b["acc_range"] >= p["acc_range"] - 0.01:
        verdict = "not supported"
    else:
        verdict = "mixed"
        note = (f"The two measures disagree: with BN {b['num_good_scales']} scales are good (without: "
                f"{p['num_good_scales']}), but the spread is {fmt_pct(b['acc_range'])} (without: "
                f"{fmt_pct(p['acc_range'])}).")

    def sc_list(xs):
        return ", ".join(fmt_num(x, 2) for x in xs) if xs else "none"

    findings = [
        f"Of {len(scales)} initialization scales (multiples of the He standard deviation, "
        f"{fmt_num(scales[0], 2)} to {fmt_num(scales[-1], 2)}), {p['num_good_scales']} reach at least "
        f"{fmt_pct(GOOD_FRACTION, 0)} of the best mean accuracy ({fmt_pct(best)}) without BN "
        f"({sc_list(p['good_scales'])}) and {b['num_good_scales']} with BN ({sc_list(b['good_scales'])}).",
        f"Worst mean test accuracy over the scales: {fmt_pct(p['worst_acc'])} without BN, "
        f"{fmt_pct(b['worst_acc'])} with BN; spread (best minus worst): {fmt_pct(p['acc_range'])} "
        f"without BN, {fmt_pct(b['acc_range'])} with BN.",
        f"Runs that diverged: {sum(p['diverged_runs'])} without BN, {sum(b['diverged_runs'])} with BN.",
    ]
    if note:
        findings.append(note)
    m["plain"]["total_diverged"], m["bn"]["total_diverged"] = sum(p["diverged_runs"]), sum(b["diverged_runs"])
    measured = (f"init scales within {fmt_pct(GOOD_FRACTION, 0)} of best: {p['num_good_scales']} "
                f"without BN, {b['num_good_scales']} with BN (of {len(scales)})")

    fig, ax = new_figure(1, f"{TITLE} ({len(s['hidden'])} ReLU layers of {s['hidden'][0]}, "
                            f"{s['steps']} steps)", width=7.0, height=4.5)
    for bn, key, color, label in ((False, "plain", PLAIN_COLOR, "no BN"), (True, "bn", BN_COLOR, "BN")):
        a = acc[bn]
        ax[0].plot(scales, a.mean(axis=1), "o-", color=color, label=label)
        ax[0].fill_between(scales, a.min(axis=1), a.max(axis=1), color=color, alpha=0.2, lw=0)
    ax[0].axhline(GOOD_FRACTION * best, color="gray", ls="--", lw=1, label=f"{GOOD_FRACTION:.0%} of best")
    ax[0].axhline(chance, color="black", ls=":", lw=1, label="chance")
    ax[0].set(xscale="log", xlabel="init scale (x He standard deviation)", ylabel="final test accuracy",
              title="Final test accuracy (mean, min-max band over seeds)")
    ax[0].legend()
    method = (f"ReLU MLP with {len(s['hidden'])} hidden layers of width {s['hidden'][0]}, normal initial "
              f"weights with the He standard deviation times the scale, SGD with momentum 0.9, learning rate {lr}, "
              f"batch {bs}, {s['steps']} steps; {len(ctx.seeds)} seeds per point.")
    return Result(NAME, TITLE, CLAIM, method, fig, m, findings, verdict, measured)
