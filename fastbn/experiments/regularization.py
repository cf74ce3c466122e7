"""Experiment 4: batch norm as a regularizer: train-test gap, with ghost batches of several sizes."""

from __future__ import annotations

import numpy as np

from ..nn import train_mlp
from ._common import (
    BN_COLOR,
    PLAIN_COLOR,
    Result,
    band,
    compare,
    fmt_pct,
    new_figure,
)

NAME = "regularization"
TITLE = "Regularization: the train-test gap"
CLAIM = "Batch norm regularizes (its batch statistics add noise), reducing overfitting."

SIZES = {
    "tiny": dict(hidden=[32, 32], steps=40, eval_every=20, ghosts=[8]),
    "quick": dict(hidden=[256, 256], steps=1500, eval_every=100, ghosts=[32, 8]),
    "full": dict(hidden=[512, 512, 512], steps=10000, eval_every=250, ghosts=[64, 32, 16, 8, 4]),
}
LR = 0.02


def run(ctx):
    """Train to overfitting without BN, with BN, and with ghost-batch BN; compare the gaps."""
    s = SIZES[ctx.tier]
    lr, bs = ctx.lr_or(LR), ctx.batch_or(128)
    arms = [("no BN", False, None), (f"BN (batch {bs})", True, None)]
    arms += [(f"ghost BN {g}", True, g) for g in s["ghosts"] if g < bs]
    hists = {}
    for label, bn, ghost in arms:
        hists[label] = []
        for seed in ctx.seeds:
            _, _, h = train_mlp(ctx.data, hidden=s["hidden"], activation="relu", batch_norm=bn,
                                ghost_batch_size=ghost, lr=lr, momentum=0.9, batch_size=bs,
                                steps=s["steps"], eval_every=s["eval_every"], seed=seed,
                                device=ctx.device)
            hists[label].append(h)
            ctx.advance()

    m = {"hidden": s["hidden"], "steps": s["steps"], "lr": lr, "momentum": 0.9, "batch_size": bs,
         "ghost_batch_sizes": [g for _, _, g in arms[2:]], "seeds": list(ctx.seeds),
         "num_seeds": len(ctx.seeds), "arms": {}}
    for label, _, ghost in arms:
        hs = hists[label]
        m["arms"][label] = {
            "ghost_batch_size": ghost,
            "final_train_acc": [h.train_acc[-1] for h in hs],
            "final_test_acc": [h.test_acc[-1] for h in hs],
            "gap": [h.train_acc[-1] - h.test_acc[-1] for h in hs],
            "best_test_acc": [max(h.test_acc) for h in hs],
            "final_test_loss": [h.test_loss[-1] for h in hs],
        }
    plain = m["arms"]["no BN"]
    findings, outcomes = [], {}
    for label, _, _ in arms:
        a = m["arms"][label]
        cg = compare(a["gap"], plain["gap"], higher_is_better=False, min_effect=0.01)
        ct = compare(a["final_test_acc"], plain["final_test_acc"], min_effect=0.01)
        a["compare_gap"], a["compare_test_acc"] = cg, ct
        outcomes[label] = (cg["outcome"], ct["outcome"])
        findings.append(
            f"{label}: train accuracy {fmt_pct(np.mean(a['final_train_acc']))}, test accuracy "
            f"{fmt_pct(ct['bn_mean'])} ± {fmt_pct(ct['bn_std'])}, gap {fmt_pct(cg['bn_mean'])} "
            f"± {fmt_pct(cg['bn_std'])}"
            + ("." if label == "no BN" else
               f" (gap vs no BN: {cg['outcome']}; test accuracy vs no BN: {ct['outcome']})."))
        a["mean_train_acc"] = float(np.mean(a["final_train_acc"]))
    full_bn = arms[1][0]
    gap_out, acc_out = outcomes[full_bn]
    if gap_out == "better" and acc_out == "better":
        verdict = "supported"
    elif gap_out == "worse" or acc_out == "worse":
        verdict = "opposite" if gap_out != "better" else "mixed"
    elif gap_out == "better" or acc_out == "better":
        verdict = "mixed"
    else:
        verdict = "not supported"
    ghost_gaps = {lab: compare(m["arms"][lab]["gap"], m["arms"][full_bn]["gap"],
                               higher_is_better=False, min_effect=0.01)["outcome"]
                  for lab, _, _ in arms[2:]}
    m["ghost_gap_vs_full_bn"] = ghost_gaps
    if ghost_gaps:
        smaller = [lab for lab, o in ghost_gaps.items() if o == "better"]
        findings.append(
            "Smaller ghost batches (noisier statistics) narrow the gap further than full-batch BN "
            f"for: {', '.join(smaller)}." if smaller else
            "No ghost-batch size narrowed the gap clearly beyond full-batch BN.")
    measured = (f"train-test gap: {fmt_pct(np.mean(plain['gap']))} without BN, "
                f"{fmt_pct(np.mean(m['arms'][full_bn]['gap']))} with BN")

    fig, ax = new_figure(2, f"{TITLE} (ReLU MLP {s['hidden']}, batch {bs}, {s['steps']} steps)")
    labels = [lab for lab, _, _ in arms]
    colors = [PLAIN_COLOR, BN_COLOR] + ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"][:len(arms) - 2]
    x = np.arange(len(labels))
    for k, (what, off, hatch) in enumerate((("final_train_acc", -0.2, ""), ("final_test_acc", 0.2, "//"))):
        vals = [np.mean(m["arms"][lab][what]) for lab in labels]
        errs = [np.std(m["arms"][lab][what]) for lab in labels]
        ax[0].bar(x + off, vals, 0.4, yerr=errs, color=colors, hatch=hatch, edgecolor="black",
                  label="train" if k == 0 else "test (hatched)")
    ax[0].set_xticks(x, labels, rotation=15)
    ax[0].set(ylabel="final accuracy", title="Train and test accuracy (mean ± std)")
    lo = min(np.min(m["arms"][lab]["final_test_acc"]) for lab in labels)
    ax[0].set_ylim(max(0.0, lo - 0.1), 1.02)
    ax[0].legend(loc="lower right")
    for lab, color in zip(labels, colors):
        hs = hists[lab]
        ne = min(len(h.eval_steps) for h in hs)
        gaps = [np.subtract(h.train_acc[:ne], h.test_acc[:ne]) for h in hs]
        band(ax[1], hs[0].eval_steps[:ne], gaps, lab, color)
    ax[1].set(xlabel="training step", ylabel="train accuracy - test accuracy",
              title="Generalization gap during training")
    ax[1].legend()
    method = (f"ReLU MLP with hidden widths {s['hidden']} trained long enough to overfit: SGD with "
              f"momentum 0.9, learning rate {lr}, batch {bs}, {s['steps']} steps, no other "
              f"regularization. Arms: no BN, BN over the whole batch, and ghost BN (each batch "
              f"normalized in sub-batches of the given size); {len(ctx.seeds)} seeds each.")
    return Result(NAME, TITLE, CLAIM, method, fig, m, findings, verdict, measured)
