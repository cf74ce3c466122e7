"""Experiment 2: convergence speed at one learning rate, with and without batch norm."""

from __future__ import annotations

import time

import numpy as np

from ..nn import train_mlp
from ._common import (
    BN_COLOR,
    PLAIN_COLOR,
    Result,
    band,
    compare,
    fmt_num,
    fmt_pct,
    new_figure,
    verdict_from,
)

NAME = "convergence"
TITLE = "Convergence speed at the same learning rate"
CLAIM = "Batch norm makes training converge faster."

SIZES = {
    "tiny": dict(hidden=[32, 32], steps=40, eval_every=10),
    "quick": dict(hidden=[128, 128, 128], steps=1200, eval_every=50),
    "full": dict(hidden=[256, 256, 256], steps=8000, eval_every=100),
}
LR = 0.02
#: test accuracy to reach, per data set (MNIST-1D: an MLP reaches about 68%).
TARGETS = {"mnist1d": 0.60, "digits": 0.95, "spirals": 0.90}


def run(ctx):
    """Train a ReLU MLP with and without BN at one learning rate; time-to-target and curves."""
    s = SIZES[ctx.tier]
    lr, bs = ctx.lr_or(LR), ctx.batch_or(128)
    target = TARGETS.get(ctx.data.name, 0.9)
    hists, secs = {}, {}
    for bn in (False, True):  # warm-up, so that first-call costs (JIT cache loads) are not timed
        train_mlp(ctx.data, hidden=s["hidden"], batch_norm=bn, batch_size=bs, steps=2,
                  seed=ctx.seeds[0], device=ctx.device)
    for bn in (False, True):
        hists[bn], secs[bn] = [], []
        for seed in ctx.seeds:
            t0 = time.perf_counter()
            _, _, h = train_mlp(ctx.data, hidden=s["hidden"], activation="relu", batch_norm=bn,
                                lr=lr, momentum=0.9, batch_size=bs, steps=s["steps"],
                                eval_every=s["eval_every"], seed=seed, device=ctx.device)
            secs[bn].append((time.perf_counter() - t0) / max(1, len(h.loss)))
            hists[bn].append(h)
            ctx.advance()

    steps = s["steps"]
    m = {"hidden": s["hidden"], "steps": steps, "eval_every": s["eval_every"], "lr": lr,
         "momentum": 0.9, "batch_size": bs, "target_acc": target, "seeds": list(ctx.seeds),
         "num_seeds": len(ctx.seeds)}
    for bn, key in ((False, "plain"), (True, "bn")):
        hs = hists[bn]
        reached = [h.steps_to(target) for h in hs]
        m[key] = {
            "steps_to_target": reached,
            "runs_reaching_target": sum(r is not None for r in reached),
            # a run that never reached the target counts as `steps` (a lower bound)
            "steps_to_target_censored": [steps if r is None else r for r in reached],
            "final_test_acc": [h.test_acc[-1] for h in hs],
            "final_train_loss": [h.train_loss[-1] for h in hs],
            "seconds_per_step": secs[bn],
        }
    cs = compare(m["bn"]["steps_to_target_censored"], m["plain"]["steps_to_target_censored"],
                 higher_is_better=False, min_effect=s["eval_every"])
    ca = compare(m["bn"]["final_test_acc"], m["plain"]["final_test_acc"], min_effect=0.01)
    ct = compare(m["bn"]["seconds_per_step"], m["plain"]["seconds_per_step"], higher_is_better=False)
    m["compare_steps"], m["compare_acc"], m["compare_time"] = cs, ca, ct
    m["speedup_in_steps"] = cs["plain_mean"] / cs["bn_mean"] if cs["bn_mean"] else float("nan")
    m["time_cost_per_step"] = ct["bn_mean"] / ct["plain_mean"] if ct["plain_mean"] else float("nan")
    n = len(ctx.seeds)

    def reach(key):
        k, c = m[key]["runs_reaching_target"], (cs["bn_mean"] if key == "bn" else cs["plain_mean"])
        if k == 0:
            return f"no run reached it within {steps} steps"
        tail = "" if k == n else f" ({k} of {n} runs reached it; the others count as {steps})"
        return f"{fmt_num(c, 4)} steps on average{tail}"

    findings = [
        f"Steps to {fmt_pct(target, 0)} test accuracy: without BN {reach('plain')}; with BN {reach('bn')}"
        f" (evaluated every {s['eval_every']} steps).",
        f"Steps needed without BN divided by steps needed with BN: {fmt_num(m['speedup_in_steps'], 3)}.",
        f"Final test accuracy after {steps} steps: {fmt_pct(ca['plain_mean'])} ± {fmt_pct(ca['plain_std'])} "
        f"without BN, {fmt_pct(ca['bn_mean'])} ± {fmt_pct(ca['bn_std'])} with BN.",
        (f"A BN step (with its share of the evaluations) took {fmt_num(m['time_cost_per_step'], 3)} times "
         f"as long as a step without BN in this run, so the gain in wall-clock time is the gain in steps "
         f"divided by that (timings on a busy machine are noisy)."),
    ]
    verdict = verdict_from(cs["outcome"])
    measured = (f"steps to {fmt_pct(target, 0)}: {fmt_num(cs['plain_mean'], 4)} without BN, "
                f"{fmt_num(cs['bn_mean'], 4)} with BN")

    fig, ax = new_figure(2, f"{TITLE} (ReLU MLP {s['hidden']}, SGD lr {lr})")
    for bn, color, label in ((False, PLAIN_COLOR, "no BN"), (True, BN_COLOR, "BN")):
        hs = hists[bn]
        length = min(len(h.loss) for h in hs)
        k = max(1, length // 50)  # smooth the mini-batch loss over windows of k steps
        win = length // k * k
        sm = [np.asarray(h.loss[:win]).reshape(-1, k).mean(axis=1) for h in hs]
        band(ax[0], np.arange(len(sm[0])) * k + k / 2, sm, label, color, logy=True)
        ne = min(len(h.eval_steps) for h in hs)
        band(ax[1], hs[0].eval_steps[:ne], [h.test_acc[:ne] for h in hs], label, color)
    ax[1].axhline(target, color="gray", ls="--", lw=1, label=f"target {target:.0%}")
    ax[0].set(xlabel="training step", ylabel="training loss (mini-batch, smoothed)",
              title="Training loss")
    ax[1].set(xlabel="training step", ylabel="test accuracy", title="Test accuracy")
    for a in ax:
        a.legend()
    method = (f"ReLU MLP with hidden widths {s['hidden']}, SGD with momentum 0.9 at learning rate {lr} "
              f"for both arms, batch {bs}, {steps} steps, test accuracy evaluated every "
              f"{s['eval_every']} steps; {n} seeds per arm.")
    return Result(NAME, TITLE, CLAIM, method, fig, m, findings, verdict, measured)
