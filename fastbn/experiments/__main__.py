"""Command line: ``fastbn-experiments`` / ``python -m fastbn.experiments``.

Runs the batch-norm experiments and writes the report folder. ``--quick`` (the default)
runs all seven at reduced size in a few minutes on a 2-core CPU; ``--full`` at the real
sizes. Bad configuration is reported as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import math
import platform
import sys
import time

from . import EXPERIMENTS

__all__ = ["main", "build_parser", "ConfigError"]

PROG = "fastbn-experiments"
DEFAULT_SEEDS = {"tiny": 2, "quick": 3, "full": 5}


class ConfigError(ValueError):
    """A bad command-line configuration (reported in one line, no traceback)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        raise ConfigError(message)


def build_parser():
    """Return the :class:`argparse.ArgumentParser` of the command."""
    p = _Parser(prog=PROG, description="Measure what batch normalization does to training: seven "
                "experiments with and without BN, written up as report.html, report.md, "
                "figures/ and metrics.json.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="tier", action="store_const", const="quick",
                      help="all seven experiments at reduced size, a few minutes on a 2-core CPU (default)")
    size.add_argument("--full", dest="tier", action="store_const", const="full",
                      help="the real sizes (much longer; a GPU helps)")
    size.add_argument("--tiny", dest="tier", action="store_const", const="tiny", help=argparse.SUPPRESS)
    p.add_argument("--only", action="append", metavar="NAME", default=None,
                   help=f"run only these experiments (repeatable or comma-separated): {', '.join(EXPERIMENTS)}")
    p.add_argument("--device", default="cpu", help="cpu (NumPy, Numba kernels) or gpu (CuPy, CUDA kernels)")
    p.add_argument("--dataset", default="mnist1d", help="mnist1d (default), digits or spirals")
    p.add_argument("--seed", type=int, default=0, help="first seed; runs use seed, seed+1, ... (default 0)")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="number of seeds per arm (default: 3 quick, 5 full)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate for the experiments that train at one learning rate")
    p.add_argument("--batch-size", type=int, default=None, help="mini-batch size (default 128)")
    p.add_argument("--out", default="fastbn-report", help="output folder (default: fastbn-report)")
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="always show progress bars (default: only on a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress bars")
    return p


def _parse(argv):
    from ..nn import DATASETS, DEVICES

    args = build_parser().parse_args(argv)
    args.tier = args.tier or "quick"
    names = []
    for item in args.only or []:
        for name in item.split(","):
            name = name.strip()
            if name and name not in names:
                if name not in EXPERIMENTS:
                    raise ConfigError(f"unknown experiment {name!r} (choose from {', '.join(EXPERIMENTS)})")
                names.append(name)
    if args.only is not None and not names:
        raise ConfigError("--only needs at least one experiment name")
    args.names = names or list(EXPERIMENTS)
    if args.device not in DEVICES:
        raise ConfigError(f"unknown device {args.device!r} (choose from {', '.join(DEVICES)})")
    if args.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {args.dataset!r} (choose from {', '.join(DATASETS)})")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ConfigError(f"--lr must be a positive finite number, got {args.lr}")
    if args.batch_size is not None and args.batch_size < 2:
        raise ConfigError(f"--batch-size must be at least 2: batch norm needs more than one example "
                          f"per batch to compute statistics, got {args.batch_size}")
    if args.seeds is None:
        args.seeds = DEFAULT_SEEDS[args.tier]
    if args.seeds < 2:
        raise ConfigError(f"--seeds must be at least 2 (the report gives a spread over seeds), got {args.seeds}")
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")
    return args


def _check_dependencies(dataset):
    needed = ["matplotlib", "tqdm"] + {"mnist1d": ["mnist1d"], "digits": ["sklearn"]}.get(dataset, [])
    for mod in needed:
        try:
            importlib.import_module(mod)
        except Exception as exc:
            raise ConfigError(f"the experiments need {mod!r} ({type(exc).__name__}: {exc}); "
                              f"install them with: pip install 'fastbn[experiments]'") from None


def run(argv=None, *, out=sys.stdout):
    """Parse `argv`, run the experiments and write the report; return the report paths.

    Raises
    ------
    ConfigError
        On bad configuration (unknown experiment or device, lr <= 0, batch size < 2, ...).
    """
    import numpy as np

    import fastbn

    from ..nn import array_module, load_dataset, progress_bar
    from . import report, run_experiment, runs_of
    from ._common import Context

    args = _parse(argv)
    try:
        array_module(args.device)
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from None
    _check_dependencies(args.dataset)
    data = load_dataset(args.dataset)
    if args.batch_size is not None and args.batch_size > data.x_train.shape[0]:
        raise ConfigError(f"--batch-size {args.batch_size} exceeds the {data.x_train.shape[0]} training examples")

    seeds = list(range(args.seed, args.seed + args.seeds))
    ctx = Context(tier=args.tier, data=data, device=args.device, seeds=seeds, lr=args.lr,
                  batch_size=args.batch_size, progress=args.progress)
    t0 = time.perf_counter()
    results = []
    print(f"{PROG}: {len(args.names)} experiment(s), {args.tier} budget, dataset {args.dataset}, "
          f"device {args.device}, seeds {seeds}", file=out, flush=True)
    for i, name in enumerate(args.names, 1):
        bar = progress_bar(runs_of(name, ctx), f"[{i}/{len(args.names)}] {name}", enabled=args.progress)
        ctx.tick = lambda bar=bar: bar.update(1)
        try:
            r = run_experiment(name, ctx)
        finally:
            bar.close()
        results.append(r)
        print(f"[{i}/{len(args.names)}] {name}: {report.VERDICT_TEXT[r.verdict]} ({r.seconds:.1f} s)",
              file=out, flush=True)
    meta = {
        "tier": args.tier, "dataset": args.dataset, "device": args.device, "seeds": seeds,
        "lr_override": args.lr, "batch_size_override": args.batch_size,
        "experiments": args.names, "total_seconds": time.perf_counter() - t0,
        "train_size": int(data.x_train.shape[0]), "test_size": int(data.x_test.shape[0]),
        "fastbn_version": fastbn.__version__, "numpy_version": np.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "backends": fastbn.available_backends(),
    }
    paths = report.write_report(results, meta, args.out)
    print(f"report: {paths['html']} (also {paths['md'].name}, {paths['metrics'].name}, figures/)",
          file=out, flush=True)
    return paths


def main(argv=None):
    """Entry point of ``fastbn-experiments``; returns the exit status (0 ok, 2 bad configuration)."""
    try:
        run(argv)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
