"""The `egn-fast` command.

    egn-fast demo                      EGN vs Adam vs SGD on scikit-learn's bundled diabetes
                                       (regression) and digits (classification); no download.
                                       Each optimizer's lr (EGN's damping) is tuned first on a
                                       validation split of the training rows (TUNING_GRIDS)
    egn-fast train --data PATH.npz --task regression|classification --optimizer egn,adam
    egn-fast bench                     the quick versions of benchmarks/convergence.py,
                                       step_time.py and step_time_sweep.py (needs the source checkout)

demo and train print a progress bar, a final table (train loss, test metric, wall time, steps/s), and write
the table (markdown), the curves (JSON) and a PNG plot into --out.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from . import training, tuning
from ..optim import EGN
from .training import Dataset, History

DEMO_DATASETS = ("diabetes", "digits")


def _default(fn: object, name: str) -> float:
    """The default value of argument `name` of `fn` (what a run gets when the option is not given)."""
    return inspect.signature(fn).parameters[name].default


DEFAULT_DAMPING = _default(EGN, "damping")
DEFAULT_LR = {"egn": _default(EGN, "lr"), "adam": _default(torch.optim.Adam, "lr"), "sgd": _default(torch.optim.SGD, "lr")}


def _optimizer_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in training.OPTIMIZERS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"optimizers must be a comma list of {training.OPTIMIZERS}, got {text!r}")
    return names


def _hidden(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hidden must be comma-separated integers, got {text!r}") from None
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"hidden widths must be ≥ 1, got {text!r}")
    return widths


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {text!r}")
    return value


def _number(text: str, positive: bool) -> float:
    """A finite float, > 0 (positive) or ≥ 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise argparse.ArgumentTypeError(f"expected a finite number {'> 0' if positive else '≥ 0'}, got {text!r}")
    return value


def _lr(text: str) -> float:
    return _number(text, positive=True)


def _damping(text: str) -> float:
    return _number(text, positive=False)


def _add_common(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--steps", type=_positive_int, default=steps, help="optimizer steps per run (default %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="mini-batch size (default %(default)s)")
    p.add_argument("--hidden", type=_hidden, default=(32,), help="hidden widths, e.g. 64,64 (default 32)")
    p.add_argument("--damping", type=_damping, default=None, help=f"EGN's initial λ ≥ 0 (default {DEFAULT_DAMPING}; 0 needs --line-search)")
    p.add_argument("--egn-lr", type=_lr, default=None, help="EGN step multiplier (default 1.0)")
    p.add_argument("--adam-lr", type=_lr, default=None, help="Adam lr (default torch's 1e-3)")
    p.add_argument("--sgd-lr", type=_lr, default=None, help="SGD lr (default torch's 1e-3)")
    p.add_argument("--line-search", action="store_true", help="EGN with Armijo line search")
    p.add_argument("--adaptive-damping", action="store_true", help="EGN with adaptive λ")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="directory for the table, curves and plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# options that only one optimizer reads: given while that optimizer does not run, they would be ignored
OPTIMIZER_OPTIONS = {"egn": ("damping", "egn_lr", "line_search", "adaptive_damping"), "adam": ("adam_lr",), "sgd": ("sgd_lr",)}


def _check_options(parser: argparse.ArgumentParser, args: argparse.Namespace, optimizers: list[str]) -> None:
    """Refuse (argparse error, exit 2) options that would be silently ignored, or that diverge."""
    for name, options in OPTIMIZER_OPTIONS.items():
        given = [f"--{o.replace('_', '-')}" for o in options if getattr(args, o) not in (None, False)]
        if given and name not in optimizers:
            parser.error(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to {name} only, which --optimizer does not include")
    if args.damping == 0 and not args.line_search:
        parser.error("--damping 0 takes undamped Gauss-Newton steps, which can diverge without a line search; "
                     "use --damping > 0 or add --line-search")
    out = args.out or args.out_default
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is an existing file; name a directory (created if missing)")


def disclosure(args: argparse.Namespace, optimizers: list[str], tuned: dict[str, float] | None = None) -> str:
    """One line: the settings each optimizer runs with, saying which were tuned (`tuned`: the value
    the demo chose for the optimizer's TUNING_GRIDS hyperparameter) and which are defaults (Adam
    and SGD at torch's default lr are not tuned)."""
    tuned = tuned or {}
    lrs = {n: getattr(args, f"{n}_lr") or DEFAULT_LR[n] for n in DEFAULT_LR}
    damping = DEFAULT_DAMPING if args.damping is None else args.damping
    for name, value in tuned.items():
        axis = tuning.TUNING_GRIDS[name][0]
        lrs[name] = value if axis == "lr" else lrs[name]
        damping = value if name == "egn" and axis == "damping" else damping
    mark = {n: " (tuned)" if n in tuned else "" for n in DEFAULT_LR}
    egn = f"lr {lrs['egn']:g}, damping {damping:g}{mark['egn']}"
    egn += (", Armijo line search" if args.line_search else "") + (", adaptive damping" if args.adaptive_damping else "")
    settings = {"egn": egn, "adam": f"lr {lrs['adam']:g}{mark['adam']}", "sgd": f"lr {lrs['sgd']:g}{mark['sgd']}"}
    untuned = [n for n in ("adam", "sgd") if n in optimizers and n not in tuned and getattr(args, f"{n}_lr") is None]
    note = f" ({' and '.join(untuned)} at torch's default lr, not tuned: set --adam-lr/--sgd-lr)" if untuned else ""
    return "Settings: " + "; ".join(f"{n} {settings[n]}" for n in optimizers) + note + "."


# The demo tunes on this fraction of each dataset's training rows (then trains on all of them).
DEMO_VALIDATION_FRACTION = 0.2
GIVEN_OPTION = {"egn": "damping", "adam": "adam_lr", "sgd": "sgd_lr"}  # given on the command line: not tuned


def tune_demo(data: Dataset, optimizers: list[str], args: argparse.Namespace, options: dict[str, dict]) -> tuple[dict[str, float], str]:
    """Tune, on a validation split of data's training rows, each optimizer's TUNING_GRIDS
    hyperparameter that the command line did not set. Returns the chosen values and a markdown
    table of every grid point's final validation metric."""
    validation = tuning.validation_split(data, DEMO_VALIDATION_FRACTION, seed=args.seed)
    chosen, lines = {}, [f"| {data.name}: tuning | grid: final validation {data.metric.split()[1]} | chosen |", "|---|---|---|"]
    for name in optimizers:
        if getattr(args, GIVEN_OPTION[name]) is not None:
            continue
        axis, grid = tuning.TUNING_GRIDS[name]
        fixed = {k: v for k, v in options[name].items() if k != axis}
        best, scores = tuning.tune(validation, name, axis, grid, args.steps, fixed, batch_size=args.batch_size,
                                     hidden=args.hidden, seed=args.seed)
        chosen[name] = best
        edge = " (grid edge)" if best in (min(grid), max(grid)) else ""
        lines.append(f"| {name} {axis} | " + ", ".join(f"{v:g}: {m:.4g}" for v, m in scores.items()) + f" | {best:g}{edge} |")
    return chosen, "\n".join(lines) if chosen else ""  # nothing tuned: no table


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egn-fast", description="Exact Gauss-Newton for PyTorch: demos and training runs")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="EGN vs Adam vs SGD on scikit-learn's bundled data (no download), each tuned "
                          "on a validation split (an optimizer whose --damping/--adam-lr/--sgd-lr is given is not tuned)")
    _add_common(demo, steps=300)
    demo.set_defaults(out_default=Path("egn_fast_demo"))
    tr = sub.add_parser("train", help="train an MLP on your own .npz (arrays X and y)")
    tr.add_argument("--data", type=Path, required=True, help=".npz file with X (n, features) and y (n,)")
    tr.add_argument("--task", choices=training.TASKS, required=True)
    tr.add_argument("--optimizer", type=_optimizer_list, default=["egn"], help="egn|adam|sgd or a comma list (default egn)")
    tr.add_argument("--x-key", default="X", help="name of the feature array in the .npz (default X)")
    tr.add_argument("--y-key", default="y", help="name of the target array in the .npz (default y)")
    tr.add_argument("--test-fraction", type=float, default=0.2)
    _add_common(tr, steps=500)
    tr.set_defaults(out_default=Path("egn_fast_train"))
    bench = sub.add_parser("bench", help="quick convergence + step-time benchmarks (from the source checkout)")
    bench.add_argument("--out", type=Path, default=Path("egn_fast_bench"), help="results directory (default %(default)s)")
    bench.add_argument("--data-dir", type=Path, default=None, help="directory with the datasets' .npz files "
                       "(default: $EGN_FAST_DATA; see benchmarks/README.md, 'Data')")
    return parser


def _run(datasets: list[Dataset], optimizers: list[str], args: argparse.Namespace, tune: bool) -> int:
    """Train and compare the optimizers on each dataset; with `tune` (the demo) first tune each
    optimizer's TUNING_GRIDS hyperparameter on a validation split (unless given)."""
    options = {
        "egn": dict(lr=args.egn_lr, damping=DEFAULT_DAMPING if args.damping is None else args.damping,
                    line_search="armijo" if args.line_search else None, adaptive_damping=args.adaptive_damping),
        "adam": dict(lr=args.adam_lr),
        "sgd": dict(lr=args.sgd_lr),
    }
    out = args.out or args.out_default
    out.mkdir(parents=True, exist_ok=True)
    results: list[tuple[Dataset, list[History]]] = []
    notes = []
    for data in datasets:
        chosen, tuning_table = tune_demo(data, optimizers, args, options) if tune else ({}, "")
        settings = disclosure(args, optimizers, chosen)
        print(f"{data.name}: {settings}" + (f"\n{tuning_table}" if tuning_table else ""), flush=True)
        notes.append(f"{data.name}: {settings}" + (f"\n\n{tuning_table}" if tuning_table else ""))
        data_options = {n: {**options[n], tuning.TUNING_GRIDS[n][0]: v} for n, v in chosen.items()}
        histories = training.compare(
            data, optimizers, args.steps, show_progress=not args.no_progress, options={**options, **data_options},
            batch_size=args.batch_size, hidden=args.hidden, seed=args.seed, eval_every=max(1, args.steps // 50),
        )
        results.append((data, histories))
    tables = "\n\n".join(training.summary_table(d, hs) for d, hs in results)
    tuned_note = (f"Each optimizer's hyperparameter was tuned first: {args.steps} steps per grid point on "
                  f"{1 - DEMO_VALIDATION_FRACTION:.0%} of the training rows, the best final metric on the other "
                  f"{DEMO_VALIDATION_FRACTION:.0%}; the table's runs then train on all training rows. ") if tune else ""
    header = (
        f"{args.steps} steps of batch {args.batch_size}, MLP hidden {list(args.hidden)}, seed {args.seed}, "
        f"torch {torch.__version__} on {torch.get_num_threads()} CPU thread(s). "
        "Train loss on the whole training set (mse = mean of ½‖f−y‖², standardized target); "
        f"wall time counts optimizer steps only (tuning excluded). {tuned_note}\n\n" + "\n\n".join(notes) + "\n\n"
    )
    (out / "results.md").write_text(header + tables + "\n")
    curves = {d.name: {"task": d.task, "runs": [asdict(h) for h in hs]} for d, hs in results}
    (out / "curves.json").write_text(json.dumps(curves, indent=1))
    plot = training.plot_curves(results, out / "curves.png")
    print()
    print(tables)
    print(f"\nwrote {out / 'results.md'}, {out / 'curves.json'} and {plot}")
    return 0


BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _bench(args: argparse.Namespace) -> int:
    """Run the quick versions of the benchmark scripts, one after the other, in this interpreter."""
    scripts = [BENCHMARKS / "convergence.py", BENCHMARKS / "step_time.py", BENCHMARKS / "step_time_sweep.py"]
    missing = [str(s) for s in scripts if not s.exists()]
    if missing:
        raise SystemExit(
            f"egn-fast bench: {missing} not found; the benchmarks live in the source checkout "
            "(git clone the repository and `pip install -e .` from it)"
        )
    extra = ["--out", str(args.out.resolve())] + ([] if args.data_dir is None else ["--data-dir", str(args.data_dir.resolve())])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCHMARKS.parent), os.environ.get("PYTHONPATH")]))}
    for script in scripts:
        print(f"egn-fast bench: {script.name} --quick", flush=True)
        code = subprocess.call([sys.executable, str(script), "--quick", *extra], env=env)
        if code:
            return code
    print(f"egn-fast bench: results in {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    optimizers = list(training.OPTIMIZERS) if args.command == "demo" else args.optimizer
    _check_options(parser, args, optimizers)
    if args.command == "demo":
        datasets = [training.sklearn_dataset(name, seed=args.seed) for name in DEMO_DATASETS]
        return _run(datasets, optimizers, args, tune=True)
    try:
        X, y = training.load_npz(args.data, args.x_key, args.y_key)
        data = training.prepare(args.data.stem, X, y, args.task, args.test_fraction, seed=args.seed)
    except (OSError, ValueError) as err:
        raise SystemExit(f"egn-fast train: {err}") from None
    return _run([data], optimizers, args, tune=False)


if __name__ == "__main__":
    sys.exit(main())
