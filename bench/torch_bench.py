"""fastbn.torch against PyTorch's own batch norm: single modules, resnet18, training curves.

Usage (from the repository root)::

    python bench/torch_bench.py --out bench/results/torch-$(date +%F).json [--markdown FILE.md]
    python bench/torch_bench.py --out /tmp/torch-quick.json --quick     # smoke test (~1-2 min)

Three parts, each torch's implementation against fastbn's in the same process:

1. **Modules**: ``BatchNorm2d(64)`` on (16, 64, 8, 8) (contiguous and ``channels_last``)
   and ``BatchNorm1d(128)`` on (64, 128); ``torch.nn`` module vs ``fastbn.torch`` module
   (same state), in train and eval mode, forward under ``torch.no_grad()`` and
   forward + backward (input requires grad; ``torch.autograd.grad`` of the output with
   a fixed ``grad_output`` with respect to input, weight and bias).
2. **resnet18** (torchvision's, loaded by ``tests/_torchvision.py``), batch 16, 3x64x64,
   contiguous and ``channels_last`` (model and input): a training step (zero_grad,
   forward, cross-entropy, backward, SGD step with lr 0 so every round does the same
   work) and an eval forward under ``no_grad``;
   the unconverted model vs ``fastbn.torch.convert`` of a deepcopy.
3. **Training curves**: 20 SGD steps from the same initial weights on the same synthetic
   batches, four runs (torch, torch channels_last, fastbn, fastbn channels_last); the loss
   curves and the largest loss differences. Different memory formats make torch itself
   sum in different orders, so ``torch channels_last vs torch`` is the size of a harmless
   difference; the target is fastbn's difference within it.

Timing: the machines this runs on are shared, so the implementations are interleaved
round by round (which one goes first alternates), each round timing ``reps`` calls of
each after a warm-up (which also compiles fastbn's kernels), and the figure of merit is
the **median over rounds of the per-round ratio fastbn / torch**; the per-implementation
medians are reported too. ``torch.get_num_threads()`` is left at torch's default and
recorded, with the CPU, the core count, the versions and the load average.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the checkout's fastbn, and tests/_torchvision.py

import torch
import torch.nn.functional as F

import fastbn
import fastbn.torch as ft

sys.path.insert(0, str(ROOT / "bench"))
import machine
from render import fmt_time
from timing import time_block

SCHEMA = "fastbn-torch-bench/1"
IMPLS = ("torch", "fastbn")


# ---------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------
def machine_info() -> dict:
    versions = machine.versions(("torch", "numpy", "numba", "torchvision", "tbb"))
    versions["fastbn"] = getattr(fastbn, "__version__", None)
    info = {
        "cpu_model": machine.cpu_model(),
        "memory_gib": machine.mem_total_gib(),
        "os_cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
    }
    try:
        import numba

        info["numba_num_threads"] = numba.get_num_threads()
    except Exception:  # noqa: BLE001 - informational only
        info["numba_num_threads"] = None
    return info


def _threading_report() -> dict | None:
    try:
        from fastbn import _threading

        return _threading.report()
    except Exception:  # noqa: BLE001 - informational only
        return None


# ---------------------------------------------------------------------------------------
# interleaved timing
# ---------------------------------------------------------------------------------------
def compare(fns: dict, *, rounds: int, target_s: float, warmup: int) -> dict:
    """Time fns["torch"] and fns["fastbn"] interleaved; see the module docstring."""
    per_call = {}
    for name in IMPLS:
        for _ in range(warmup):
            fns[name]()
        per_call[name] = time_block(fns[name], 1)
    reps = max(1, math.ceil(target_s / max(max(per_call.values()), 1e-9)))
    times = {name: [] for name in IMPLS}
    for r in range(rounds):
        order = IMPLS if r % 2 == 0 else IMPLS[::-1]
        for name in order:
            times[name].append(time_block(fns[name], reps))
    ratios = [f / t for f, t in zip(times["fastbn"], times["torch"])]
    return {
        "rounds": rounds,
        "reps_per_round": reps,
        "impls": {
            name: {
                "median_s": statistics.median(ts),
                "min_s": min(ts),
                "max_s": max(ts),
                "per_round_s": ts,
            }
            for name, ts in times.items()
        },
        "ratio_fastbn_over_torch": {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
            "per_round": ratios,
        },
    }


# ---------------------------------------------------------------------------------------
# 1. single modules
# ---------------------------------------------------------------------------------------
MODULE_CASES = [
    # (label, torch class, fastbn class, C, shape, layout)
    ("BatchNorm2d(64)", torch.nn.BatchNorm2d, ft.BatchNorm2d, 64, (16, 64, 8, 8), "contiguous"),
    ("BatchNorm2d(64)", torch.nn.BatchNorm2d, ft.BatchNorm2d, 64, (16, 64, 8, 8), "channels_last"),
    ("BatchNorm1d(128)", torch.nn.BatchNorm1d, ft.BatchNorm1d, 128, (64, 128), "contiguous"),
]


def _module_fn(module, x, grad_output, mode: str, pass_: str):
    module.train(mode == "train")
    params = [x, module.weight, module.bias]
    if pass_ == "forward":

        def fn():
            with torch.no_grad():
                return module(x)
    else:

        def fn():
            y = module(x)
            return torch.autograd.grad(y, params, grad_output)

    return fn


def bench_modules(args) -> list[dict]:
    results = []
    gen = torch.Generator().manual_seed(0)
    for label, tcls, fcls, c, shape, layout in MODULE_CASES:
        x = torch.randn(shape, generator=gen) * 2 + 0.5
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_(True)
        grad_output = torch.randn(shape, generator=gen).to(memory_format=_memory_format(layout))
        tm = tcls(c)
        with torch.no_grad():  # non-trivial affine parameters and running statistics
            tm.weight.uniform_(0.5, 1.5, generator=gen)
            tm.bias.normal_(generator=gen)
            tm.running_mean.normal_(generator=gen)
            tm.running_var.uniform_(0.5, 2.0, generator=gen)
        fm = fcls(c)
        fm.load_state_dict(tm.state_dict())
        for mode in ("train", "eval"):
            for pass_ in ("forward", "forward+backward"):
                fns = {
                    "torch": _module_fn(tm, x, grad_output, mode, pass_),
                    "fastbn": _module_fn(fm, x, grad_output, mode, pass_),
                }
                # sanity: the two compute the same thing (max |difference| recorded)
                check = _max_diff(fns["fastbn"](), fns["torch"]())
                res = compare(fns, rounds=args.rounds, target_s=args.target_s, warmup=args.warmup)
                res.update({
                    "part": "module",
                    "case": f"{label} {tuple(shape)} {layout} {mode} {pass_}",
                    "module": label, "shape": list(shape), "layout": layout, "mode": mode,
                    "pass": pass_, "max_abs_diff": check,
                })
                results.append(res)
                _progress(res)
    return results


def _memory_format(layout: str):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def _max_diff(a, b) -> float:
    if isinstance(a, torch.Tensor):
        a, b = (a,), (b,)
    return max((u.detach().double() - v.detach().double()).abs().max().item() for u, v in zip(a, b))


# ---------------------------------------------------------------------------------------
# 2. resnet18
# ---------------------------------------------------------------------------------------
def load_torchvision():
    """tests/_torchvision.py, imported from its file (not as a package)."""
    path = ROOT / "tests" / "_torchvision.py"
    spec = importlib.util.spec_from_file_location("_fastbn_bench_torchvision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RESNET_BATCH, RESNET_SIZE, RESNET_CLASSES = 16, 64, 10


def _resnet_pair(tv, layout: str, seed: int):
    fmt = _memory_format(layout)
    torch.manual_seed(seed)
    ref = tv.resnet18(num_classes=RESNET_CLASSES)
    fast = ft.convert(copy.deepcopy(ref))
    return ref.to(memory_format=fmt), fast.to(memory_format=fmt), fmt


def _train_step(model, opt, x, target):
    def fn():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        return loss

    return fn


def _eval_forward(model, x):
    def fn():
        with torch.no_grad():
            return model(x)

    return fn


def bench_resnet(args, tv) -> list[dict]:
    results = []
    gen = torch.Generator().manual_seed(1)
    for layout in ("contiguous", "channels_last"):
        ref, fast, fmt = _resnet_pair(tv, layout, seed=0)
        x = torch.randn(RESNET_BATCH, 3, RESNET_SIZE, RESNET_SIZE, generator=gen).to(memory_format=fmt)
        target = torch.randint(0, RESNET_CLASSES, (RESNET_BATCH,), generator=gen)
        # lr = 0: the step does all its work (momentum buffers, parameter updates) but the
        # weights stay put, so every round times the same computation (hundreds of steps
        # on one batch would otherwise drive the gradients toward underflow and denormals)
        opts = {"torch": torch.optim.SGD(ref.parameters(), lr=0.0, momentum=0.9),
                "fastbn": torch.optim.SGD(fast.parameters(), lr=0.0, momentum=0.9)}
        models = {"torch": ref, "fastbn": fast}
        # sanity check on the fresh pair: the logits of a training-mode forward
        with torch.no_grad():
            check = _max_diff(fast(x), ref(x))

        for what, mode in (("train step", "train"), ("eval forward", "eval")):
            for m in models.values():
                m.train(mode == "train")
            if mode == "train":
                fns = {name: _train_step(models[name], opts[name], x, target) for name in IMPLS}
            else:
                fns = {name: _eval_forward(models[name], x) for name in IMPLS}
            res = compare(fns, rounds=args.resnet_rounds, target_s=args.resnet_target_s,
                          warmup=args.warmup)
            res.update({
                "part": "resnet18",
                "case": f"resnet18 {RESNET_BATCH}x3x{RESNET_SIZE}x{RESNET_SIZE} {layout} {what}",
                "batch": RESNET_BATCH, "image": [3, RESNET_SIZE, RESNET_SIZE], "layout": layout,
                "what": what, "max_abs_logit_diff_train_forward": check,
            })
            results.append(res)
            _progress(res)
    return results


# ---------------------------------------------------------------------------------------
# 3. training curves
# ---------------------------------------------------------------------------------------
def synthetic_batches(steps: int, seed: int):
    """Learnable synthetic data: each class adds its own fixed random pattern to noise."""
    gen = torch.Generator().manual_seed(seed)
    shape = (3, RESNET_SIZE, RESNET_SIZE)
    patterns = torch.randn((RESNET_CLASSES, *shape), generator=gen)
    out = []
    for _ in range(steps):
        y = torch.randint(0, RESNET_CLASSES, (RESNET_BATCH,), generator=gen)
        x = torch.randn((RESNET_BATCH, *shape), generator=gen) + 0.5 * patterns[y]
        out.append((x, y))
    return out


def training_curves(args, tv) -> dict:
    torch.manual_seed(args.seed)
    init = tv.resnet18(num_classes=RESNET_CLASSES)
    data = synthetic_batches(args.curve_steps, args.seed + 1)
    runs = {
        "torch": ("contiguous", False),
        "torch_channels_last": ("channels_last", False),
        "fastbn": ("contiguous", True),
        "fastbn_channels_last": ("channels_last", True),
    }
    losses, seconds = {}, {}
    for name, (layout, use_fastbn) in runs.items():
        fmt = _memory_format(layout)
        model = copy.deepcopy(init)
        if use_fastbn:
            model = ft.convert(model)
        model = model.to(memory_format=fmt).train()
        opt = torch.optim.SGD(model.parameters(), lr=args.curve_lr, momentum=0.9)
        curve = []
        t0 = time.perf_counter()
        for x, y in data:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x.to(memory_format=fmt)), y)
            loss.backward()
            opt.step()
            curve.append(loss.item())
        seconds[name] = time.perf_counter() - t0
        losses[name] = curve
        print(f"  curve {name}: first {curve[0]:.4f} last {curve[-1]:.4f} ({seconds[name]:.1f} s)",
              file=sys.stderr, flush=True)

    pairs = {
        "fastbn_vs_torch": ("fastbn", "torch"),
        "fastbn_channels_last_vs_torch_channels_last": ("fastbn_channels_last", "torch_channels_last"),
        "torch_channels_last_vs_torch": ("torch_channels_last", "torch"),
    }
    per_step = {k: [abs(u - v) for u, v in zip(losses[a], losses[b])] for k, (a, b) in pairs.items()}
    diffs = {k: max(v) for k, v in per_step.items()}
    return {
        "steps": args.curve_steps,
        "batch": RESNET_BATCH,
        "image": [3, RESNET_SIZE, RESNET_SIZE],
        "lr": args.curve_lr,
        "momentum": 0.9,
        "seed": args.seed,
        "loss": losses,
        "seconds_total": seconds,
        "max_abs_loss_diff": diffs,
        "abs_loss_diff_per_step": per_step,
        # the target: fastbn's difference no larger than torch's own layout difference
        "fastbn_within_torch_layout_difference": (
            diffs["fastbn_vs_torch"] <= diffs["torch_channels_last_vs_torch"]
            and diffs["fastbn_channels_last_vs_torch_channels_last"] <= diffs["torch_channels_last_vs_torch"]
        ),
    }


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------
def _progress(res):
    t = res["impls"]
    r = res["ratio_fastbn_over_torch"]
    print(f"  {res['case']}: torch {fmt_time(t['torch']['median_s'])}, fastbn "
          f"{fmt_time(t['fastbn']['median_s'])}, ratio {r['median']:.2f}", file=sys.stderr, flush=True)


def markdown(report: dict) -> str:
    m = report["machine"]
    v = m["versions"]
    lines = [
        f"# fastbn.torch vs torch ({report['date']}{', quick' if report['quick'] else ''})",
        "",
        (f"CPU: {m['cpu_model']} ({m['cpus_available']} of {m['os_cpu_count']} CPUs available); "
         f"torch {v['torch']} with {m['torch_num_threads']} threads, numpy {v['numpy']}, "
         f"numba {v['numba']} with {m['numba_num_threads']} threads, fastbn {v['fastbn']}. "
         f"Load average (1, 5, 15 min) at start / end: {report['loadavg_start']} / {report['loadavg_end']}."),
        "",
        ("Times: medians over rounds of the time per call. fastbn / torch: median over rounds of "
         "the ratio measured within each round (< 1: fastbn faster); range: the smallest and "
         "largest per-round ratio."),
        "",
        "| case | torch | fastbn | fastbn / torch | range | rounds x reps |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for res in report["cases"]:
        t, r = res["impls"], res["ratio_fastbn_over_torch"]
        lines.append(
            f"| {res['case']} | {fmt_time(t['torch']['median_s'])} | {fmt_time(t['fastbn']['median_s'])} "
            f"| {r['median']:.2f} | {r['min']:.2f}-{r['max']:.2f} | {res['rounds']} x {res['reps_per_round']} |"
        )
    for note in report.get("skipped", []):
        lines.append(f"\nSkipped: {note}")
    curves = report.get("curves")
    if curves:
        d = curves["max_abs_loss_diff"]
        lo = curves["loss"]
        lines += [
            "",
            (f"Training curves: resnet18, {curves['steps']} SGD steps (lr {curves['lr']}, momentum "
             f"{curves['momentum']}), batch {curves['batch']}, 3x{curves['image'][1]}x{curves['image'][2]} "
             "synthetic data, same initial weights and batches."),
            "",
            "| run | first loss | last loss | max abs loss difference |",
            "|---|---:|---:|---|",
            f"| torch | {lo['torch'][0]:.5f} | {lo['torch'][-1]:.5f} | (reference) |",
            (f"| torch channels_last | {lo['torch_channels_last'][0]:.5f} | {lo['torch_channels_last'][-1]:.5f} "
             f"| {d['torch_channels_last_vs_torch']:.2e} vs torch |"),
            f"| fastbn | {lo['fastbn'][0]:.5f} | {lo['fastbn'][-1]:.5f} | {d['fastbn_vs_torch']:.2e} vs torch |",
            (f"| fastbn channels_last | {lo['fastbn_channels_last'][0]:.5f} | {lo['fastbn_channels_last'][-1]:.5f} "
             f"| {d['fastbn_channels_last_vs_torch_channels_last']:.2e} vs torch channels_last |"),
            "",
            ("fastbn's differences within torch's own contiguous-vs-channels_last difference: "
             f"{'yes' if curves['fastbn_within_torch_layout_difference'] else 'no'}."),
            "",
            "| abs loss difference per step | " + " | ".join(str(i) for i in range(curves["steps"])) + " |",
            "|---|" + "---:|" * curves["steps"],
        ]
        for key, label in (("fastbn_vs_torch", "fastbn vs torch"),
                           ("torch_channels_last_vs_torch", "torch channels_last vs torch")):
            row = curves["abs_loss_diff_per_step"][key]
            lines.append(f"| {label} | " + " | ".join(f"{d:.0e}" for d in row) + " |")
        lines += [
            "",
            ("Any two float32 runs drift apart step by step (rounding differences are amplified "
             "by the steps, and ReLU/max-pool decisions on values within rounding of a kink flip), "
             "so these differences are compared in order of magnitude."),
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--markdown", metavar="PATH", help="also write the Markdown table to PATH")
    p.add_argument("--quick", action="store_true",
                   help="few rounds and short blocks, 6 curve steps: checks the script, not the timings")
    p.add_argument("--rounds", type=int, help="rounds per module case (default 31; quick 3)")
    p.add_argument("--target-s", type=float,
                   help="seconds per timed block of a module case (default 0.05; quick 0.005)")
    p.add_argument("--resnet-rounds", type=int, help="rounds per resnet18 case (default 11; quick 2)")
    p.add_argument("--resnet-target-s", type=float,
                   help="seconds per timed block of a resnet18 case (default 0.5; quick 0: one call)")
    p.add_argument("--warmup", type=int, help="untimed calls per implementation first (default 5; quick 2)")
    p.add_argument("--curve-steps", type=int, help="SGD steps of the training curves (default 20; quick 6)")
    p.add_argument("--curve-lr", type=float, default=0.01, help="SGD learning rate of the curves")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", action="append", default=[], choices=["modules", "resnet", "curves"],
                   help="leave a part out (repeatable)")
    args = p.parse_args(argv)
    defaults = {  # name: (full, quick)
        "rounds": (31, 3), "target_s": (0.05, 0.005), "resnet_rounds": (11, 2),
        "resnet_target_s": (0.5, 0.0), "warmup": (5, 2), "curve_steps": (20, 6),
    }
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    load_start = _loadavg()
    report = {
        "schema": SCHEMA,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "markdown")},
        "machine": machine_info(),
        "loadavg_start": load_start,
        "cases": [],
        "skipped": [],
    }
    print(f"machine: {report['machine']['cpu_model']}, torch threads "
          f"{report['machine']['torch_num_threads']}", file=sys.stderr)
    if "modules" not in args.skip:
        report["cases"] += bench_modules(args)
    tv = None
    if not {"resnet", "curves"} <= set(args.skip):
        try:
            tv = load_torchvision()
            tv.load_resnet()
        except ImportError as exc:
            tv = None
            report["skipped"].append(f"resnet18 parts: torchvision's resnet cannot be loaded ({exc})")
    if tv is not None and "resnet" not in args.skip:
        report["cases"] += bench_resnet(args, tv)
    if tv is not None and "curves" not in args.skip:
        report["curves"] = training_curves(args, tv)
    report["loadavg_end"] = _loadavg()
    report["fastbn_threading"] = _threading_report()
    report["machine"]["numba_num_threads_end"] = _numba_threads()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(f"wrote {out}" + (f" and {args.markdown}" if args.markdown else ""), file=sys.stderr)
    return 0


def _loadavg():
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _numba_threads():
    try:
        import numba

        return numba.get_num_threads()
    except Exception:  # noqa: BLE001 - informational only
        return None


if __name__ == "__main__":
    sys.exit(main())
