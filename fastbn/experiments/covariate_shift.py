"""Experiment 6: internal covariate shift, after Ioffe & Szegedy (2015), Figure 1.

A 3-hidden-layer, 100-unit sigmoid MLP is trained with and without batch norm; at regular
intervals the 15th, 50th and 85th percentiles of the input to the sigmoid of every unit of
the last hidden layer are measured over a fixed set of examples (with BN this input is the
normalized, scaled and shifted value, computed with the statistics of that set).
"""

from __future__ import annotations

import numpy as np

from ..nn import to_host, train_mlp
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

NAME = "covariate_shift"
TITLE = "Internal covariate shift (Ioffe & Szegedy 2015, Fig. 1)"
CLAIM = "Batch norm reduces internal covariate shift: the distribution of a layer's inputs stays stable during training."

SIZES = {
    "tiny": dict(steps=40, every=10),
    "quick": dict(steps=1500, every=50),
    "full": dict(steps=20000, every=250),
}
LR = 0.1
BATCH = 60  # as in the paper
PERCENTILES = (15, 50, 85)
PROBE_SIZE = 1000


def _record(trainer, x, store):
    model = trainer.model
    model.set_running_stat_updates(False)
    try:
        pre = model.pre_activations(x, training=True)[-1]  # input of the last hidden sigmoid
    finally:
        model.set_running_stat_updates(True)
    store.append(np.percentile(to_host(pre).astype(np.float64), PERCENTILES, axis=0))  # (3, units)


def _drift(p):
    """Per unit: how far the median travels over training, in units of the 15-85 width.

    `p` has shape (checkpoints, 3, units). Returns (units,) ``range_t(p50) / mean_t(p85 - p15)``.
    """
    med = p[:, 1, :]
    width = (p[:, 2, :] - p[:, 0, :]).mean(axis=0)
    return (med.max(axis=0) - med.min(axis=0)) / np.maximum(width, 1e-12)


def run(ctx):
    """Train the 3x100 sigmoid MLP with and without BN and track the sigmoid-input percentiles."""
    s = SIZES[ctx.tier]
    lr, bs = ctx.lr_or(LR), ctx.batch_or(BATCH)
    probe = ctx.data.x_test[:PROBE_SIZE]
    arms = {}
    for bn in (False, True):
        perc, hists = [], []
        for seed in ctx.seeds:
            store, steps = [], []
            xp_probe = []

            def callback(trainer, step, store=store, steps=steps, xp_probe=xp_probe):
                if not xp_probe:
                    xp_probe.append(trainer.xp.asarray(probe))
                if step % s["every"] == 0:
                    _record(trainer, xp_probe[0], store)
                    steps.append(step)

            _, _, h = train_mlp(ctx.data, hidden=[100, 100, 100], activation="sigmoid", batch_norm=bn,
                                init="normal", init_scale=0.1, lr=lr, momentum=0.9, batch_size=bs,
                                steps=s["steps"], eval_every=s["every"], seed=seed, device=ctx.device,
                                callback=callback)
            perc.append(np.stack(store))
            hists.append(h)
            ctx.advance()
        n = min(len(p) for p in perc)
        arms[bn] = dict(perc=np.stack([p[:n] for p in perc]), steps=steps[:n], hists=hists)

    m = {"hidden": [100, 100, 100], "steps": s["steps"], "record_every": s["every"], "lr": lr,
         "momentum": 0.9, "batch_size": bs, "percentiles": list(PERCENTILES), "probe_size": PROBE_SIZE,
         "seeds": list(ctx.seeds), "num_seeds": len(ctx.seeds), "unit_shown": 0, "depth": 3,
         "width": 100, "init_std": 0.1}
    for bn, key in ((False, "plain"), (True, "bn")):
        p = arms[bn]["perc"]  # (seeds, checkpoints, 3, units)
        drift = np.stack([_drift(ps) for ps in p])  # (seeds, units)
        m[key] = {
            "median_drift_per_seed": drift.mean(axis=1).tolist(),
            "unit0_percentiles": p[:, :, :, 0].mean(axis=0).T.tolist(),  # 3 x checkpoints
            "checkpoints": arms[bn]["steps"],
            "final_test_acc": [h.test_acc[-1] for h in arms[bn]["hists"]],
        }
    cd = compare(m["bn"]["median_drift_per_seed"], m["plain"]["median_drift_per_seed"],
                 higher_is_better=False, min_effect=0.1)
    ca = compare(m["bn"]["final_test_acc"], m["plain"]["final_test_acc"], min_effect=0.01)
    m["compare_drift"], m["compare_acc"] = cd, ca
    findings = [
        f"Over {s['steps']} steps the median of a unit's sigmoid input moves by "
        f"{fmt_num(cd['plain_mean'], 3)} ± {fmt_num(cd['plain_std'], 2)} widths of its 15-85 percentile "
        f"range without BN and {fmt_num(cd['bn_mean'], 3)} ± {fmt_num(cd['bn_std'], 2)} with BN "
        f"(averaged over the 100 units of the last hidden layer and {len(ctx.seeds)} seeds): "
        f"BN {'reduces' if cd['outcome'] == 'better' else 'increases' if cd['outcome'] == 'worse' else 'does not clearly change'} "
        f"this measure of covariate shift.",
        f"Final test accuracy: {fmt_pct(ca['plain_mean'])} ± {fmt_pct(ca['plain_std'])} without BN, "
        f"{fmt_pct(ca['bn_mean'])} ± {fmt_pct(ca['bn_std'])} with BN.",
        "This shows that the distribution is steadier, not that steadiness is why BN helps: "
        "experiment 7 and Santurkar et al. (2018) probe that question.",
    ]
    verdict = verdict_from(cd["outcome"])
    measured = (f"median drift of sigmoid inputs: {fmt_num(cd['plain_mean'], 3)} without BN, "
                f"{fmt_num(cd['bn_mean'], 3)} with BN (in 15-85 widths)")

    fig, ax = new_figure(3, f"{TITLE}: 3x100 sigmoid MLP, batch {bs}")
    for bn, color, label in ((False, PLAIN_COLOR, "no BN"), (True, BN_COLOR, "BN")):
        hs = arms[bn]["hists"]
        ne = min(len(h.eval_steps) for h in hs)
        band(ax[0], hs[0].eval_steps[:ne], [h.test_acc[:ne] for h in hs], label, color)
    ax[0].set(xlabel="training step", ylabel="test accuracy", title="(a) Test accuracy")
    ax[0].legend()
    lims = []
    for k, (bn, color, label) in enumerate(((False, PLAIN_COLOR, "without BN"), (True, BN_COLOR, "with BN"))):
        a, steps = ax[k + 1], arms[bn]["steps"]
        p0 = arms[bn]["perc"][0, :, :, 0]  # first seed, unit 0: (checkpoints, 3)
        for j, (q, ls) in enumerate(zip(PERCENTILES, (":", "-", "--"))):
            a.plot(steps, p0[:, j], color=color, ls=ls, label=f"{q}th percentile")
        a.set(xlabel="training step", ylabel="input to the sigmoid (unit 0, last hidden layer)",
              title=f"({'bc'[k]}) {label}")
        a.legend()
        lims.append(a.get_ylim())
    lo, hi = min(x for x, _ in lims), max(y for _, y in lims)
    for a in ax[1:]:
        a.set_ylim(lo, hi)  # same scale, so the two panels compare directly
    method = (f"MLP with 3 sigmoid hidden layers of 100 units (normal initial weights "
              f"with standard deviation 0.1), SGD with momentum 0.9, learning rate {lr}, batch "
              f"{bs}, {s['steps']} steps. Every {s['every']} steps the 15th/50th/85th percentiles of each "
              f"last-hidden-layer unit's sigmoid input are measured over {PROBE_SIZE} test examples "
              f"(with BN: batch statistics of those examples, running statistics untouched).")
    return Result(NAME, TITLE, CLAIM, method, fig, m, findings, verdict, measured)
