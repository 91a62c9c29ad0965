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
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402  (benchmarks/datasets.py)
import lqr  # noqa: E402  (benchmarks/lqr.py)
from step_time import machine_info  # noqa: E402

from egn_fast import EGN, SGN, NonFiniteError, SolveError  # noqa: E402
from egn_fast.losses import resolve_loss  # noqa: E402
from egn_fast.training import Dataset, History, fit, make_mlp  # noqa: E402

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
    load: Callable[[Path], Dataset]
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


def lqr_dataset(data_dir: Path) -> Dataset:
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


def validation_split(data: Dataset, seed: int = 0) -> Dataset:
    """The training split divided into train' and a validation set (used as "test" for tuning)."""
    n = len(data.X_train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * VALIDATION_FRACTION))
    val, tr = order[:n_val], order[n_val:]
    return Dataset(data.name, data.task, data.X_train[tr], data.y_train[tr], data.X_train[val], data.y_train[val],
                   data.num_outputs)


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


def run_task(task: Task, optimizers: list[OptimizerSpec], steps: int, seeds: tuple[int, ...], data_dir: Path,
             device: torch.device) -> dict[str, Any]:
    """Tune every optimizer on the validation split, then train the chosen point on every seed."""
    data = task.load(data_dir)
    data = Dataset(data.name, data.task, *(x.to(device) for x in (data.X_train, data.y_train, data.X_test, data.y_test)),
                   data.num_outputs)
    tuning_data = validation_split(data)
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


# --------------------------------------------------------------------------- summary


def time_to_target(run: Run, task: Task) -> float | None:
    """Training seconds at the first evaluation whose metric reaches the target (None: never)."""
    for seconds, value in zip(run.history.seconds, run.history.test_metric):
        if (value >= task.target) if task.higher_is_better else (value <= task.target):
            return seconds
    return None


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def grid_edges(grid: list[dict[str, float]], point: dict[str, float]) -> list[str]:
    """The keys of `point` whose value is the smallest or largest of its axis in `grid` (axes with
    more than one value): a tuned value at an edge says the grid may be too narrow."""
    edges = []
    for key, value in point.items():
        axis = sorted({p[key] for p in grid})
        if len(axis) > 1 and value in (axis[0], axis[-1]):
            edges.append(key)
    return edges


def summarize(task: Task, result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per optimizer, over the test-split seeds: best and final metric (mean, std), time to target
    (mean over the seeds that reached it, and how many did), steps/s, divergences, and which tuned
    values sit at the edge of their grid."""
    rows = []
    for name, point in result["chosen"].items():
        grid = [r.point for r in result["runs"] if r.optimizer == name and r.split == "validation"]
        runs = [r for r in result["runs"] if r.optimizer == name and r.split == "test"]
        ok = [r for r in runs if r.diverged is None]
        times = [t for t in (time_to_target(r, task) for r in ok) if t is not None]
        rows.append({
            "optimizer": name,
            "point": point,
            "grid_edge": grid_edges(grid, point),
            "seeds": len(runs),
            "diverged": len(runs) - len(ok),
            "jittered_solves": sum(r.jittered_solves for r in runs),
            "best": _mean_std([r.best(task.higher_is_better) for r in ok]) if ok else None,
            "final": _mean_std([r.history.test_metric[-1] for r in ok]) if ok else None,
            "time_to_target": statistics.fmean(times) if times else None,
            "reached_target": len(times),
            "steps_per_s": statistics.fmean(r.history.steps[-1] / r.history.train_seconds for r in ok) if ok else None,
        })
    return rows


def task_report(task: Task, result: dict[str, Any], plot_path: Path) -> dict[str, Any]:
    """A task's entry of the report (JSON-ready): settings, chosen points, summary, verdict, the
    plot's file name and every run's curve."""
    summary = summarize(task, result)
    plot = plot_task(task, result, plot_path)
    return {
        **{k: v for k, v in result.items() if k != "runs"},
        "target": task.target, "metric": task.metric_name, "higher_is_better": task.higher_is_better,
        "summary": summary, "verdict": verdict(task, summary), "plot": plot.name,
        "runs": [{**asdict(r), "history": asdict(r.history)} for r in result["runs"]],
    }


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1e-2 else f"{x:.4f}"


def verdict(task: Task, rows: list[dict[str, Any]]) -> str:
    """One sentence from the numbers: the best optimizer; the best EGN variant against the best
    non-EGN one on the final metric (a difference within the larger of their two seed stds is a
    tie, otherwise EGN wins or loses); the first to reach the target in wall time, and EGN's first."""
    ok = [r for r in rows if r["final"] is not None]
    sign = 1 if task.higher_is_better else -1
    best = max(ok, key=lambda r: sign * r["final"][0])
    egn = [r for r in ok if r["optimizer"].startswith("egn")]
    if not egn:
        return f"Every EGN run diverged; best is {best['optimizer']}."
    best_egn = max(egn, key=lambda r: sign * r["final"][0])
    others = [r for r in ok if not r["optimizer"].startswith("egn")]
    best_other = max(others, key=lambda r: sign * r["final"][0]) if others else None
    text = f"Best final {task.metric_name}: {best['optimizer']} ({_fmt(best['final'][0])}); best EGN variant: " \
           f"{best_egn['optimizer']} ({_fmt(best_egn['final'][0])})"
    if best_other is not None:
        margin = sign * (best_egn["final"][0] - best_other["final"][0])
        spread = max(best_egn["final"][1], best_other["final"][1])
        outcome = ("EGN ties within the seed spread." if abs(margin) <= spread
                   else "EGN wins on the final metric." if margin > 0 else "**EGN loses on the final metric.**")
        text += f"; best non-EGN: {best_other['optimizer']} ({_fmt(best_other['final'][0])}) — {outcome}"
        fastest = sorted((r for r in ok if r["time_to_target"] is not None), key=lambda r: r["time_to_target"])
        if fastest:
            first = fastest[0]
            text += f" First to the target {_fmt(task.target)} in wall time: {first['optimizer']} ({first['time_to_target']:.2f} s)"
            first_egn = next((r for r in fastest if r["optimizer"].startswith("egn")), None)
            if first_egn is None:
                text += "; **no EGN variant reached it.**"
            elif first_egn is first:
                text += "."
            else:
                text += f"; EGN's first: {first_egn['optimizer']} ({first_egn['time_to_target']:.2f} s)."
        else:
            text += f" No optimizer reached the target {_fmt(task.target)}."
    return text


def markdown(report: dict[str, Any]) -> str:
    """The tables (one per task) and the verdicts."""
    mach = report["machine"]
    lines = [
        "# Convergence on real data: EGN vs SGD, Adam and SGN",
        "",
        f"Machine: {mach['cpu']}, {mach['torch_threads']} torch threads, device {report['settings']['device']}, "
        f"torch {mach['torch']}. Each optimizer tuned on its grid (seed 0, validation split, by the final metric), then the chosen "
        f"point run with seeds {report['settings']['seeds']}; mean ± std over seeds. Times are training seconds "
        "(optimizer steps only) on this machine. * after a chosen value: it is at the edge of its grid.",
        "",
    ]
    for entry in report["tasks"]:
        metric = entry["metric"]
        lines += [
            f"## {entry['title']}",
            "",
            f"{entry['n_train']} training / {entry['n_test']} test rows, {entry['steps']} steps of batch "
            f"{entry['batch_size']}; target {metric} {'≥' if entry['higher_is_better'] else '≤'} {_fmt(entry['target'])}.",
            "",
            f"| optimizer | chosen | best {metric} | final {metric} | time to target (s) | steps/s |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in entry["summary"]:
            pm = lambda v: "diverged" if v is None else f"{_fmt(v[0])} ± {_fmt(v[1])}"  # noqa: E731
            ttt = "—" if r["time_to_target"] is None else f"{r['time_to_target']:.2f} ({r['reached_target']}/{r['seeds']})"
            point = ", ".join(f"{k} {v:g}" + ("*" if k in r["grid_edge"] else "") for k, v in r["point"].items())
            rate = "—" if r["steps_per_s"] is None else f"{r['steps_per_s']:.0f}"
            div = f" ({r['diverged']} diverged)" if r["diverged"] else ""
            if r["jittered_solves"]:
                div += f" (jitter in {r['jittered_solves']} solves, {r['seeds'] * entry['steps']} steps)"
            lines.append(f"| {r['optimizer']}{div} | {point} | {pm(r['best'])} | {pm(r['final'])} | {ttt} | {rate} |")
        lines += ["", entry["verdict"], "", f"![{entry['task']}]({entry['plot']})", ""]
    return "\n".join(lines)


def plot_task(task: Task, result: dict[str, Any], path: Path) -> Path:
    """Train loss vs step, test metric vs step and test metric vs training time (log scale): mean
    over seeds, shaded min–max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for name in result["chosen"]:
        runs = [r for r in result["runs"] if r.optimizer == name and r.split == "test" and r.diverged is None]
        if not runs:
            continue
        n = min(len(r.history.steps) for r in runs)
        steps = np.array(runs[0].history.steps[:n])
        seconds = np.mean([r.history.seconds[:n] for r in runs], 0)
        for ax, key, x in ((axes[0], "train_loss", steps), (axes[1], "test_metric", steps), (axes[2], "test_metric", seconds)):
            y = np.array([getattr(r.history, key)[:n] for r in runs])
            (line,) = ax.plot(x, y.mean(0), label=name, lw=1.6, ls="-" if name.startswith("egn") else "--")
            ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.15)
    for ax, xlabel, ylabel in zip(axes, ["step", "step", "training time (s)"], ["train loss", task.metric_name, task.metric_name]):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    # Step costs differ by 10× and more between optimizers: a log time axis keeps the fast ones
    # readable (the evaluation at t = 0 falls off it).
    axes[2].set_xscale("log")
    if task.log_metric:
        axes[1].set_yscale("log")
        axes[2].set_yscale("log")
    for ax in axes[1:]:
        ax.axhline(task.target, color="k", lw=0.8, ls=":", label="target")
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.suptitle(task.title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main


def _names(text: str, known: dict[str, Any], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise SystemExit(f"convergence.py: unknown {what} {unknown}; choose from {list(known)}")
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma list (default: all): " + ", ".join(TASKS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list (default: all)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1/10 of the steps, the first grid point only, 1 seed")
    parser.add_argument("--full", action="store_true", help="the longer (GPU) budget: each task's full_steps")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds per chosen point (default 3)")
    parser.add_argument("--data-dir", type=Path, default=datasets.DEFAULT_DATA_DIR, help="directory with the .npz files")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="output directory")
    args = parser.parse_args(argv)
    if args.quick and args.full:
        raise SystemExit("convergence.py: --quick and --full exclude each other")
    tasks = [TASKS[n] for n in _names(args.tasks, TASKS, "task")]
    optimizers = [OPTIMIZERS[n] for n in _names(args.optimizers, OPTIMIZERS, "optimizer")]
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
        result = run_task(task, optimizers, steps, seeds, args.data_dir, device)
        entry = task_report(task, result, args.out / f"convergence_{tag}_{task.name}.png")
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
