"""Convergence on real data: EGN (plain, + line search, + adaptive damping, + momentum) against
SGD with momentum, Adam and SGN (Gauss-Newton with conjugate gradients), each tuned on a small grid.

Protocol, the same for every optimizer of a task:
  1. tune: every grid point of the optimizer trains seed 0 for the task's step budget on a
     validation split (10 % of the training split); the point with the best final validation
     metric (after the last step; diverged runs rank last) is chosen;
  2. measure: the chosen point trains seeds 0, 1, 2 (network init and batch order; the data split
     is fixed) on the full training split, evaluated on the test split.
Reported per task: test metric vs steps and vs training wall time (PNG), and a markdown table with
the best and the final test metric (mean ± std over seeds), the training time to reach the task's
target metric, and steps/s. Training time counts optimizer steps only (evaluations excluded).
This file trains and tunes; convergence_report.py makes the summaries, verdicts, tables and plots.

    PYTHONPATH=. .venv/bin/python benchmarks/convergence.py                 # CPU budget (~25 min on 2 cores)
    PYTHONPATH=. .venv/bin/python benchmarks/convergence.py --quick         # smoke run (~1 min)
    PYTHONPATH=. .venv/bin/python benchmarks/convergence.py --tasks california_housing,lqr
    python benchmarks/convergence.py --full --device cuda                   # longer GPU version

Writes <out>/convergence_<tag>.{json,md} and <out>/convergence_<tag>_<task>.png
(tag: "cpu", "cpu_quick", or "full_<device>").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402  (benchmarks/datasets.py)
import lqr  # noqa: E402  (benchmarks/lqr.py)
from common import comma_names, machine_info  # noqa: E402
from convergence_report import markdown, task_report  # noqa: E402

from egn_fast import EGN, SGN, NonFiniteError, SolveError, resolve_loss  # noqa: E402
from egn_fast.cli.training import Dataset, History, fit, make_mlp  # noqa: E402
from egn_fast.cli.tuning import validation_split  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
VALIDATION_FRACTION = 0.1
EVALUATIONS = 25  # per run, evenly spaced in steps


# --------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """One benchmark task: data, a model factory, its metric and budget.

    metric(model, X, y) -> float on held-out data; `higher_is_better` orders it; `target` is the
    metric value whose first crossing defines "time to target". steps/batch_size: the CPU budget;
    full_steps: the --full budget. eval_rows caps the rows the metric and the train loss are
    computed on (None: all), to keep evaluations cheap on the CPU."""

    name: str
    title: str
    load: Callable[[Path | None], Dataset]
    model: Callable[[Dataset, int], nn.Module]
    metric_name: str
    metric: Callable[[nn.Module, Tensor, Tensor], float]
    higher_is_better: bool
    target: float
    batch_size: int
    steps: int
    full_steps: int
    eval_rows: int | None = None
    log_metric: bool = False


@torch.no_grad()
def test_mse(model: nn.Module, X: Tensor, y: Tensor) -> float:
    """Mean squared error on the standardized target (1.0 = predicting the mean)."""
    return float((model(X) - y).pow(2).mean())


@torch.no_grad()
def accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    return float((model(X).argmax(1) == y).double().mean())


def mlp(sizes: list[int], seed: int) -> nn.Sequential:
    """Linear-ReLU-…-Linear with the given layer widths, initialized from `seed`."""
    return make_mlp(sizes[0], tuple(sizes[1:-1]), sizes[-1], seed, activation=nn.ReLU)


def small_cnn(seed: int) -> nn.Sequential:
    """(b, 784) → (b, 1, 28, 28) → conv 5×5/2 (8 ch) → ReLU → conv 5×5/2 (16 ch) → ReLU → 256 → 10."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(),  # 28 → 12
        nn.Conv2d(8, 16, 5, stride=2), nn.ReLU(),  # 12 → 4
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )


LQR_PROBLEM = lqr.make_problem()


def lqr_dataset(data_dir: Path | None) -> Dataset:
    """Initial states x0 ~ N(0, I) as inputs, zero residual targets (data_dir is not used)."""
    task = lqr.make_task(problem=LQR_PROBLEM)
    return Dataset("lqr", "regression", task.X_train, task.y_train, task.X_test, task.y_test, task.y_train.shape[1])


def lqr_gain_error(model: nn.Module, X: Tensor, y: Tensor) -> float:
    """‖K − K*‖_F / ‖K*‖_F, K* from the discrete Riccati equation (the data is not needed)."""
    return lqr.gain_error(LQR_PROBLEM, model.gain.weight.detach())


def regression_mlp(data: Dataset, seed: int) -> nn.Module:
    return mlp([data.X_train.shape[1], 32, 64, 32, 1], seed)


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("california_housing", "California Housing, MLP 8-32-64-32-1 ReLU, mse", datasets.california_housing,
             regression_mlp, "test MSE", test_mse, False, target=0.30, batch_size=128, steps=600, full_steps=6000),
        Task("diamonds", "Diamonds, MLP 26-32-64-32-1 ReLU, mse", datasets.diamonds,
             regression_mlp, "test MSE", test_mse, False, target=0.025, batch_size=128, steps=600, full_steps=6000),
        Task("fashion_mlp", "Fashion-MNIST, MLP 784-128-10 ReLU, cross-entropy", lambda d: datasets.fashion_mnist(d),
             lambda data, seed: mlp([784, 128, 10], seed), "test accuracy", accuracy, True, target=0.82,
             batch_size=64, steps=400, full_steps=5000, eval_rows=5000),
        Task("fashion_cnn", "Fashion-MNIST, CNN conv8-conv16-fc10, cross-entropy", lambda d: datasets.fashion_mnist(d),
             lambda data, seed: small_cnn(seed), "test accuracy", accuracy, True, target=0.80,
             batch_size=32, steps=300, full_steps=5000, eval_rows=2000),
        Task("womens_reviews", "Women's reviews (TF-IDF + SVD 300-d), MLP 300-64-2 ReLU, cross-entropy",
             datasets.womens_reviews, lambda data, seed: mlp([300, 64, 2], seed), "test accuracy", accuracy, True,
             target=0.86, batch_size=64, steps=400, full_steps=5000),
        Task("lqr", "LQR control (linear policy, Riccati optimum), mse on the cost residuals", lqr_dataset,
             lambda data, seed: lqr.LinearPolicy(LQR_PROBLEM, seed=seed), "gain error ‖K−K*‖/‖K*‖", lqr_gain_error,
             False, target=1e-3, batch_size=8, steps=100, full_steps=1000, log_metric=True),
    ]
}


# --------------------------------------------------------------------------- optimizers


@dataclass
class OptimizerSpec:
    """An optimizer of the benchmark: `make(model, loss, **point)` and its tuning grid."""

    name: str
    label: str
    make: Callable[..., torch.optim.Optimizer]
    grid: list[dict[str, float]]


def _points(**axes: list[float]) -> list[dict[str, float]]:
    """The Cartesian product of the axes, as a list of keyword dicts."""
    points: list[dict[str, float]] = [{}]
    for key, values in axes.items():
        points = [{**p, key: v} for p in points for v in values]
    return points


OPTIMIZERS: dict[str, OptimizerSpec] = {
    s.name: s
    for s in [
        OptimizerSpec("egn", "EGN (lr 1, fixed λ)",
                      lambda model, loss, damping: EGN(model, loss=loss, lr=1.0, damping=damping),
                      _points(damping=[1e-2, 1e-1, 1.0, 10.0, 100.0])),
        OptimizerSpec("egn_ls", "EGN + Armijo line search",
                      lambda model, loss, damping: EGN(model, loss=loss, damping=damping, line_search="armijo"),
                      _points(damping=[1e-2, 1e-1, 1.0, 10.0, 100.0])),
        OptimizerSpec("egn_ad", "EGN + adaptive damping",
                      lambda model, loss, damping: EGN(model, loss=loss, damping=damping, adaptive_damping=True),
                      _points(damping=[1e-2, 1.0])),
        OptimizerSpec("egn_mom", "EGN + momentum (ema)",
                      lambda model, loss, damping, momentum: EGN(model, loss=loss, damping=damping, momentum=momentum),
                      _points(damping=[1e-1, 1.0, 10.0, 100.0], momentum=[0.5, 0.9])),
        OptimizerSpec("sgn", "SGN (CG, 10 iterations)",
                      lambda model, loss, damping: SGN(model, loss=loss, lr=1.0, damping=damping, cg_iters=10),
                      _points(damping=[1e-1, 1.0, 10.0, 100.0])),
        OptimizerSpec("sgd", "SGD + momentum 0.9",
                      lambda model, loss, lr: torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9),
                      _points(lr=[1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0])),
        OptimizerSpec("adam", "Adam",
                      lambda model, loss, lr: torch.optim.Adam(model.parameters(), lr=lr),
                      _points(lr=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1])),
    ]
}


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One training run: its configuration, its curve, whether it diverged (step, reason), and how
    many of its Cholesky solves needed a diagonal jitter (egn_fast warns of each)."""

    task: str
    optimizer: str
    point: dict[str, float]
    seed: int
    split: str  # "validation" (tuning) or "test"
    history: History
    diverged: str | None = None
    jittered_solves: int = 0

    def best(self, higher_is_better: bool) -> float:
        """Best metric over the run's evaluations; the worst possible value (−inf or +inf) if the
        run diverged, so that a diverged run ranks last however good its early evaluations were."""
        worst = -math.inf if higher_is_better else math.inf
        if self.diverged:
            return worst
        return (max if higher_is_better else min)(self.history.test_metric, default=worst)

    def final(self, higher_is_better: bool) -> float:
        """The metric after the last step; the worst possible value if the run diverged."""
        if self.diverged or not self.history.test_metric:
            return -math.inf if higher_is_better else math.inf
        return self.history.test_metric[-1]


def evaluator(task: Task, data: Dataset) -> Callable[[nn.Module], tuple[float, float]]:
    """model ↦ (train loss on ≤ eval_rows training rows, metric on ≤ eval_rows held-out rows)."""
    rows = task.eval_rows or max(len(data.X_train), len(data.X_test))
    X_tr, y_tr, X_te, y_te = data.X_train[:rows], data.y_train[:rows], data.X_test[:rows], data.y_test[:rows]
    loss = resolve_loss(data.loss)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> tuple[float, float]:
        return float(loss.batch_mean(model(X_tr), y_tr)), task.metric(model, X_te, y_te)

    return evaluate


def train_run(task: Task, spec: OptimizerSpec, point: dict[str, float], data: Dataset, split: str, seed: int,
              steps: int, device: torch.device, progress: Callable[[int], None]) -> Run:
    """Train a fresh model (init from `seed`) with one optimizer configuration. A run whose loss or
    solve turns non-finite is stopped and marked diverged (its remaining steps count as done)."""
    model = task.model(data, seed).to(device)
    opt = spec.make(model, data.loss, **point)
    eval_every = max(1, steps // EVALUATIONS)
    done = 0

    def count(k: int) -> None:
        nonlocal done
        done += k
        progress(k)

    # Jitter warnings are counted into the report instead of flooding the progress bar.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            history = fit(model, opt, data, steps, task.batch_size, seed, eval_every, count, evaluator(task, data), spec.name)
            diverged = None if all(math.isfinite(v) for v in history.train_loss) else "non-finite train loss"
        except (NonFiniteError, SolveError) as err:
            history, diverged = History(spec.name), f"after {done} steps: {err}"
            progress(steps - done)
    jittered = [w for w in caught if "solved with jitter" in str(w.message)]
    for w in caught:
        if w not in jittered:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return Run(task.name, spec.name, point, seed, split, history, diverged, len(jittered))


def run_task(task: Task, optimizers: list[OptimizerSpec], steps: int, seeds: tuple[int, ...], data_dir: Path | None,
             device: torch.device) -> dict[str, Any]:
    """Tune every optimizer on the validation split, then train the chosen point on every seed."""
    data = task.load(data_dir)
    data = Dataset(data.name, data.task, *(x.to(device) for x in (data.X_train, data.y_train, data.X_test, data.y_test)),
                   data.num_outputs)
    tuning_data = validation_split(data, VALIDATION_FRACTION)
    total = steps * sum(len(s.grid) + len(seeds) for s in optimizers)
    runs: list[Run] = []
    chosen: dict[str, dict[str, float]] = {}
    with tqdm(total=total, desc=task.name, unit="step") as bar:
        for spec in optimizers:
            bar.set_postfix_str(f"{spec.name}: tuning")
            tuning = [train_run(task, spec, p, tuning_data, "validation", 0, steps, device, bar.update) for p in spec.grid]
            # By the final metric, as the table's verdict: a run that peaks and then collapses is not chosen.
            ranked = sorted(tuning, key=lambda r: r.final(task.higher_is_better), reverse=task.higher_is_better)
            chosen[spec.name] = ranked[0].point
            bar.set_postfix_str(f"{spec.name}: {len(seeds)} seeds")
            runs += tuning
            runs += [train_run(task, spec, chosen[spec.name], data, "test", s, steps, device, bar.update) for s in seeds]
    return {"task": task.name, "title": task.title, "n_train": len(data.X_train), "n_test": len(data.X_test),
            "steps": steps, "batch_size": task.batch_size, "chosen": chosen, "runs": runs}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma list (default: all): " + ", ".join(TASKS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list (default: all)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1/10 of the steps, the last grid point only (untuned), 1 seed")
    parser.add_argument("--full", action="store_true", help="the longer (GPU) budget: each task's full_steps")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds per chosen point (default 3)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"directory with the .npz files (default: ${datasets.DATA_ENV})")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="output directory")
    args = parser.parse_args(argv)
    if args.quick and args.full:
        raise SystemExit("convergence.py: --quick and --full exclude each other")
    tasks = [TASKS[n] for n in comma_names(args.tasks, TASKS, "task", "convergence.py")]
    optimizers = [OPTIMIZERS[n] for n in comma_names(args.optimizers, OPTIMIZERS, "optimizer", "convergence.py")]
    seeds = tuple(range(1 if args.quick else args.seeds))
    if args.quick:
        optimizers = [OptimizerSpec(s.name, s.label, s.make, s.grid[-1:]) for s in optimizers]
    device = torch.device(args.device)
    tag = f"full_{device.type}" if args.full else "cpu_quick" if args.quick else device.type

    report: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {"device": str(device), "seeds": list(seeds), "quick": args.quick, "full": args.full,
                     "validation_fraction": VALIDATION_FRACTION, "evaluations_per_run": EVALUATIONS,
                     "grids": {s.name: s.grid for s in optimizers}, "labels": {s.name: s.label for s in optimizers}},
        "tasks": [],
    }
    if device.type == "cuda":
        report["machine"]["gpu"] = torch.cuda.get_device_name(device)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for task in tasks:
        steps = task.full_steps if args.full else max(10, task.steps // 10) if args.quick else task.steps
        try:
            result = run_task(task, optimizers, steps, seeds, args.data_dir, device)
        except datasets.DataMissing as err:
            raise SystemExit(f"convergence.py: {err}") from None
        entry = task_report(task, result, args.out / f"convergence_{tag}_{task.name}.png", args.quick)
        report["tasks"].append(entry)
        print(entry["verdict"])
    report["seconds"] = time.perf_counter() - started
    table = markdown(report)
    (args.out / f"convergence_{tag}.md").write_text(table)
    (args.out / f"convergence_{tag}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table)
    print(f"wrote {args.out}/convergence_{tag}.{{md,json}} and the plots ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
