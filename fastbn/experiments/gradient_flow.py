"""Experiment 1: gradient flow through a deep sigmoid MLP, with and without batch norm."""

from __future__ import annotations

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
    mean_std,
    new_figure,
    verdict_from,
)

NAME = "gradient_flow"
TITLE = "Gradient flow in a deep sigmoid network"
CLAIM = "Batch norm prevents vanishing gradients in deep networks."

SIZES = {
    "tiny": dict(depth=10, width=16, steps=20, probes=3),
    "quick": dict(depth=12, width=64, steps=300, probes=7),
    "full": dict(depth=16, width=128, steps=3000, probes=11),
}
LR = 0.1
PROBE_SIZE = 500


def _grad_norms(trainer, x, y):
    """Per-layer Frobenius norms of the weight gradients on a fixed probe batch."""
    model = trainer.model
    model.set_running_stat_updates(False)
    try:
        trainer.loss_and_grad(x, y, training=True)
    finally:
        model.set_running_stat_updates(True)
    return [float(model.xp.linalg.norm(lin.weight.grad)) for lin in model.linears]


def run(ctx):
    """Train the deep sigmoid MLP with and without BN; record per-layer gradient norms."""
    s = SIZES[ctx.tier]
    lr, bs = ctx.lr_or(LR), ctx.batch_or(128)
    probe_steps = sorted(set(np.linspace(0, s["steps"], s["probes"]).astype(int).tolist()))
    arms = {}
    for bn in (False, True):
        norms, accs, finals = [], [], []
        for seed in ctx.seeds:
            rec = {}
            probe = slice(0, min(PROBE_SIZE, ctx.data.x_train.shape[0]))

            def callback(trainer, step, rec=rec, probe=probe):
                if step in probe_steps:
                    rec[step] = _grad_norms(trainer, trainer.x_train[probe], trainer.y_train[probe])

            _, _, h = train_mlp(ctx.data, hidden=[s["width"]] * s["depth"], activation="sigmoid",
                                batch_norm=bn, init="xavier", lr=lr, momentum=0.9, batch_size=bs,
                                steps=s["steps"], eval_every=max(1, s["steps"] // 10), seed=seed,
                                device=ctx.device, callback=callback)
            norms.append([rec.get(t, [np.nan] * (s["depth"] + 1)) for t in probe_steps])
            accs.append(h.test_acc[-1])
            finals.append(h)
            ctx.advance()
        arms[bn] = dict(norms=np.asarray(norms), acc=accs, hist=finals)

    depth = s["depth"]
    m = {"depth": depth, "width": s["width"], "steps": s["steps"], "lr": lr, "batch_size": bs,
         "probe_steps": probe_steps, "num_probes": len(probe_steps), "probe_size": PROBE_SIZE,
         "momentum": 0.9, "seeds": list(ctx.seeds), "num_seeds": len(ctx.seeds)}
    for bn, key in ((False, "plain"), (True, "bn")):
        n = arms[bn]["norms"]  # (seeds, probes, layers)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.log10(n[:, :, 0] / n[:, :, depth - 1])  # first / last hidden layer
        m[key] = {
            "grad_norm_init_per_layer": n[:, 0, :].mean(axis=0).tolist(),
            "grad_norm_per_layer_per_probe": n.mean(axis=0).tolist(),
            "log10_first_over_last_init": ratio[:, 0].tolist(),
            "log10_first_over_last_end": ratio[:, -1].tolist(),
            "final_test_acc": arms[bn]["acc"],
        }
    c0 = compare(np.abs(m["bn"]["log10_first_over_last_init"]),
                 np.abs(m["plain"]["log10_first_over_last_init"]), higher_is_better=False,
                 min_effect=0.5)
    c1 = compare(np.abs(m["bn"]["log10_first_over_last_end"]),
                 np.abs(m["plain"]["log10_first_over_last_end"]), higher_is_better=False,
                 min_effect=0.5)
    ca = compare(m["bn"]["final_test_acc"], m["plain"]["final_test_acc"], min_effect=0.01)
    m["compare_init"], m["compare_end"], m["compare_acc"] = c0, c1, ca

    for key in ("plain", "bn"):
        for when in ("init", "end"):
            mu, sd = mean_std(m[key][f"log10_first_over_last_{when}"])
            m[key][f"log10_ratio_{when}_mean"], m[key][f"log10_ratio_{when}_std"] = mu, sd

    def orders(key, when):
        x = m[key][f"log10_ratio_{when}_mean"]
        return f"{fmt_num(abs(x), 2)} orders of magnitude {'smaller' if x < 0 else 'larger'}"

    findings = [
        f"At initialization the first layer's weight gradient is {orders('plain', 'init')} than "
        f"the last hidden layer's without BN, and {orders('bn', 'init')} with BN "
        f"(mean of log10 ratios over {len(ctx.seeds)} seeds).",
        f"After {s['steps']} steps it is {orders('plain', 'end')} without BN and "
        f"{orders('bn', 'end')} with BN.",
        f"Final test accuracy: {fmt_pct(ca['plain_mean'])} ± {fmt_pct(ca['plain_std'])} without BN, "
        f"{fmt_pct(ca['bn_mean'])} ± {fmt_pct(ca['bn_std'])} with BN.",
    ]
    verdict = verdict_from(c0["outcome"])
    if verdict == "supported" and c1["outcome"] != "better":
        verdict = "mixed"
        findings.append("The difference at initialization does not persist through training.")
    measured = (f"log10 of first/last hidden-layer gradient norm at init: "
                f"{fmt_num(m['plain']['log10_ratio_init_mean'], 2)} without BN, "
                f"{fmt_num(m['bn']['log10_ratio_init_mean'], 2)} with BN")

    fig, ax = new_figure(3, f"{TITLE} ({depth} hidden layers of {s['width']}, sigmoid)")
    layers = np.arange(1, depth + 2)
    for bn, key, color, label in ((False, "plain", PLAIN_COLOR, "no BN"), (True, "bn", BN_COLOR, "BN")):
        n = arms[bn]["norms"]
        band(ax[0], layers, n[:, 0, :], label, color, logy=True)
        band(ax[1], probe_steps, n[:, :, 0], label, color, logy=True)
        hs = arms[bn]["hist"]
        band(ax[2], hs[0].eval_steps, [h.test_acc for h in hs], label, color)
    ax[0].set(xlabel=f"Linear layer (1 = input side, {depth + 1} = output)", ylabel="||dL/dW|| at initialization",
              title="Weight-gradient norm per layer at init")
    ax[1].set(xlabel="training step", ylabel="||dL/dW|| of layer 1", title="First-layer gradient norm")
    ax[2].set(xlabel="training step", ylabel="test accuracy", title="Test accuracy")
    for a in ax:
        a.legend()
    method = (f"MLP with {depth} sigmoid hidden layers of width {s['width']} (Xavier init), SGD with "
              f"momentum 0.9, learning rate {lr}, batch {bs}, {s['steps']} steps. Weight-gradient norms "
              f"are measured on a fixed batch of {PROBE_SIZE} training examples at {len(probe_steps)} "
              f"points of training.")
    return Result(NAME, TITLE, CLAIM, method, fig, m, findings, verdict, measured)
