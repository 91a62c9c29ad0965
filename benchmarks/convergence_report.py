"""The report of benchmarks/convergence.py: per task the summary over seeds (best and final metric,
time to target, steps/s), a one-sentence verdict and the plot; the markdown of all tasks.

convergence.py runs the tasks and writes what these return; nothing here trains.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # convergence.py imports this module: its types only for the annotations
    from convergence import Run, Task


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


def task_report(task: Task, result: dict[str, Any], plot_path: Path, quick: bool = False) -> dict[str, Any]:
    """A task's entry of the report (JSON-ready): settings, chosen points, summary, verdict (worded
    for an untuned smoke run when `quick`), the plot's file name and every run's curve."""
    summary = summarize(task, result)
    plot = plot_task(task, result, plot_path)
    return {
        **{k: v for k, v in result.items() if k != "runs"},
        "target": task.target, "metric": task.metric_name, "higher_is_better": task.higher_is_better,
        "summary": summary, "verdict": verdict(task, summary, quick), "plot": plot.name,
        "runs": [{**asdict(r), "history": asdict(r.history)} for r in result["runs"]],
    }


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1e-2 else f"{x:.4f}"


QUICK_RUN = "one grid point per optimizer, untuned, 1 seed, 1/10 of the steps"


def verdict(task: Task, rows: list[dict[str, Any]], quick: bool = False) -> str:
    """One sentence from the numbers: the best optimizer; the best EGN variant against the best
    non-EGN one on the final metric (a difference within the larger of their two seed stds is a
    tie, otherwise EGN wins or loses); the first to reach the target in wall time, and EGN's first.
    quick: a smoke run (QUICK_RUN), so it says so and claims no winner of a tuned comparison."""
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
        if quick:
            outcome = f"EGN {'ahead' if margin > 0 else 'behind' if margin < 0 else 'level'} in this smoke run ({QUICK_RUN}), not a tuned comparison."
        else:
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
        f"torch {mach['torch']}. "
        + (f"Quick smoke run: {QUICK_RUN} (the last point of each grid); not a tuned comparison. "
           if report["settings"].get("quick") else
           f"Each optimizer tuned on its grid (seed 0, validation split, by the final metric), then the chosen "
           f"point run with seeds {report['settings']['seeds']}; mean ± std over seeds. ")
        + "Times are training seconds "
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
