"""Experiment 7: loss-landscape smoothness along the gradient, after Santurkar et al. (2018).

At regular points of training, on the mini-batch of the coming step, the loss and the
gradient are evaluated at ``w - eta * g`` for several step sizes ``eta`` along the gradient ``g``:

* loss variation: ``max - min`` of the loss over the step sizes;
* gradient predictiveness: ``max ||g(w - eta g) - g(w)||``;
* effective beta-smoothness: ``max ||g(w - eta g) - g(w)|| / ||eta g||``.

With BN the batch statistics of the same mini-batch are used at every point (training mode,
running statistics untouched), as in the paper.
"""

from __future__ import annotations

import math

import numpy as np

from ..nn import train_mlp
from ._common import (
    BN_COLOR,
    PLAIN_COLOR,
    Result,
    band,
    compare,
    fmt_num,
    new_figure,
)

NAME = "smoothness"
TITLE = "Loss-landscape smoothness (Santurkar et al. 2018)"
CLAIM = "Batch norm makes the loss landscape smoother: loss and gradient change less along the gradient."

SIZES = {
    "tiny": dict(hidden=[32, 32], steps=30, every=10),
    "quick": dict(hidden=[128, 128, 128], steps=600, every=50),
    "full": dict(hidden=[256, 256, 256, 256], steps=6000, every=200),
}
LR = 0.02
#: step sizes along the gradient, as multiples of the learning rate.
STEP_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0)


def _flat_grads(model):
    return [p.grad.copy() for p in model.parameters()]


def _landscape(trainer, lr):
    model = trainer.model
    xp = model.xp
    x, y = trainer.next_batch()
    params = model.parameters()
    saved = [p.value.copy() for p in params]
    model.set_running_stat_updates(False)
    try:
        l0 = trainer.loss_and_grad(x, y)
        g0 = _flat_grads(model)
        gnorm = math.sqrt(sum(float((g * g).sum()) for g in g0))
        losses, dgs = [l0], []
        for k in STEP_MULTIPLES:
            eta = k * lr
            for p, w, g in zip(params, saved, g0):
                p.value[...] = w - eta * g
            losses.append(trainer.loss_and_grad(x, y))
            dg = math.sqrt(sum(float(((p.grad - g) ** 2).sum()) for p, g in zip(params, g0)))
            dgs.append((dg, dg / max(eta * gnorm, 1e-30)))
    finally:
        for p, w in zip(params, saved):
            p.value[...] = w
        model.set_running_stat_updates(True)
    del xp
    finite = [v for v in losses if math.isfinite(v)]
    return (max(finite) - min(finite) if len(finite) == len(losses) else float("inf"),
            max(d for d, _ in dgs), max(b for _, b in dgs))


def run(ctx):
    """Train ReLU MLPs with and without BN and probe the landscape along the gradient."""
    s = SIZES[ctx.tier]
    lr, bs = ctx.lr_or(LR), ctx.batch_or(128)
    arms = {}
    for bn in (False, True):
        rows = []
        for seed in ctx.seeds:
            rec = []

            def callback(trainer, step, rec=rec):
                if step % s["every"] == 0:
                    rec.append((step, *_landscape(trainer, lr)))

            _, _, h = train_mlp(ctx.data, hidden=s["hidden"], activation="relu", batch_norm=bn, lr=lr,
                                momentum=0.9, batch_size=bs, steps=s["steps"], seed=seed,
                                device=ctx.device, callback=callback)
            rows.append(np.asarray(rec))
            ctx.advance()
        n = min(len(r) for r in rows)
        arms[bn] = np.stack([r[:n] for r in rows])  # (seeds, checkpoints, 4)

    m = {"hidden": s["hidden"], "steps": s["steps"], "probe_every": s["every"], "lr": lr, "momentum": 0.9,
         "batch_size": bs, "step_multiples": list(STEP_MULTIPLES), "seeds": list(ctx.seeds),
         "num_seeds": len(ctx.seeds)}
    names = ("loss_variation", "grad_change", "beta_smoothness")
    for bn, key in ((False, "plain"), (True, "bn")):
        a = arms[bn]
        m[key] = {"checkpoints": a[0, :, 0].astype(int).tolist()}
        for i, nm in enumerate(names):
            m[key][nm] = a[:, :, i + 1].tolist()
            # per seed: mean over checkpoints after step 0 (the landscape during training)
            m[key][f"{nm}_per_seed"] = a[:, 1:, i + 1].mean(axis=1).tolist() if a.shape[1] > 1 \
                else a[:, :, i + 1].mean(axis=1).tolist()
    comps = {nm: compare(m["bn"][f"{nm}_per_seed"], m["plain"][f"{nm}_per_seed"],
                         higher_is_better=False) for nm in names}
    m["compare"] = comps
    words = {"loss_variation": "loss variation along the gradient",
             "grad_change": "gradient change (predictiveness)",
             "beta_smoothness": "effective beta-smoothness"}
    findings = []
    for nm in names:
        c = comps[nm]
        ratio = c["plain_mean"] / c["bn_mean"] if c["bn_mean"] else float("nan")
        m["compare"][nm]["plain_over_bn"] = ratio
        findings.append(
            f"{words[nm].capitalize()}: {fmt_num(c['plain_mean'], 3)} ± {fmt_num(c['plain_std'], 2)} "
            f"without BN, {fmt_num(c['bn_mean'], 3)} ± {fmt_num(c['bn_std'], 2)} with BN "
            f"(ratio without/with {fmt_num(ratio, 3)}; {c['outcome'] if c['outcome'] != 'better' else 'smoother with BN'}).")
    outs = [comps[nm]["outcome"] for nm in names]
    if all(o == "better" for o in outs):
        verdict = "supported"
    elif all(o == "worse" for o in outs):
        verdict = "opposite"
    elif any(o == "better" for o in outs):
        verdict = "mixed"
    else:
        verdict = "not supported"
    findings.append("These are absolute changes; the two networks have differently scaled weights "
                    "and losses, so the comparison is of the landscapes each optimizer actually sees.")
    b = comps["beta_smoothness"]
    measured = (f"effective beta-smoothness: {fmt_num(b['plain_mean'], 3)} without BN, "
                f"{fmt_num(b['bn_mean'], 3)} with BN")

    fig, ax = new_figure(3, f"{TITLE}: ReLU MLP {s['hidden']}, lr {lr}")
    for bn, color, label in ((False, PLAIN_COLOR, "no BN"), (True, BN_COLOR, "BN")):
        a = arms[bn]
        for i, (nm, ylabel) in enumerate(zip(names, ("max - min loss", "max ||g(w - eta g) - g(w)||",
                                                         "max ||dg|| / ||eta g||"))):
            band(ax[i], a[0, :, 0], a[:, :, i + 1], label, color, logy=True)
            ax[i].set(xlabel="training step", ylabel=ylabel, title=words[nm])
    for x in ax:
        x.legend()
    method = (f"ReLU MLP with hidden widths {s['hidden']}, SGD with momentum 0.9, learning rate {lr}, "
              f"batch {bs}, {s['steps']} steps. Every {s['every']} steps, on the mini-batch of the "
              f"coming step, "
              f"the loss and gradient are evaluated at step sizes "
              f"{', '.join(fmt_num(k, 2) for k in STEP_MULTIPLES)} times the learning rate along the "
              f"gradient; per seed, the three measures are averaged over the checkpoints after step "
              f"0; {len(ctx.seeds)} seeds per arm.")
    return Result(NAME, TITLE, CLAIM, method, fig, m, findings, verdict, measured)
