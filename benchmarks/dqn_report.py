"""The report of benchmarks/dqn.py: per run its final return, steps and time to the target return
and a return curve; per optimizer the mean ± std over seeds; the markdown table and the plot.

`report` builds the JSON from dqn.py's runs and then writes the markdown and the PNG from that
JSON only (`python benchmarks/dqn_report.py benchmarks/results/dqn_cpu.json` rewrites them).
Nothing here trains.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

FINAL_FRACTION = 0.1  # the final return: episodes ending in the last 10 % of the env steps
SMOOTHING = 10  # episodes in the moving average of the curves and of the target crossing
CURVE_POINTS = 100


def final_return(run: dict[str, Any]) -> float:
    """Mean return of the episodes that end in the last FINAL_FRACTION of the run's env steps (the
    last episode if none does); −inf for a diverged run or one without a finished episode."""
    episodes = run["episodes"]
    if run["diverged"] or not episodes or not episodes["returns"]:
        return -math.inf
    start = (1 - FINAL_FRACTION) * run["steps"]
    last = [r for s, r in zip(episodes["steps"], episodes["returns"]) if s > start]
    return statistics.fmean(last or episodes["returns"][-1:])


def moving_average(returns: list[float], window: int = SMOOTHING) -> np.ndarray:
    """Mean of the last `window` returns (fewer at the start) after each episode."""
    r = np.asarray(returns, dtype=float)
    sums = np.cumsum(np.concatenate([[0.0], r]))
    idx = np.arange(1, len(r) + 1)
    lo = np.maximum(idx - window, 0)
    return (sums[idx] - sums[lo]) / (idx - lo)


def to_target(run: dict[str, Any], target: float) -> tuple[int | None, float | None]:
    """(env step, wall seconds) at which the mean of the last SMOOTHING episodes first reaches
    `target`; (None, None) if it never does."""
    episodes = run["episodes"]
    if not episodes or len(episodes["returns"]) < SMOOTHING:
        return None, None
    smoothed = moving_average(episodes["returns"])
    for i in range(SMOOTHING - 1, len(smoothed)):
        if smoothed[i] >= target:
            return episodes["steps"][i], episodes["seconds"][i]
    return None, None


def curve(run: dict[str, Any]) -> dict[str, list[float]]:
    """The smoothed return after CURVE_POINTS evenly spaced env steps (None before the first
    episode), with the run's wall time at those steps (interpolated between episode ends)."""
    episodes = run["episodes"] or {"steps": [], "seconds": [], "returns": []}
    points = np.linspace(run["steps"] / CURVE_POINTS, run["steps"], CURVE_POINTS)
    ends = np.asarray(episodes["steps"], dtype=float)
    smoothed = moving_average(episodes["returns"])
    finished = np.searchsorted(ends, points, side="right")  # episodes ended by each point
    returns = [float(smoothed[k - 1]) if k else None for k in finished]
    seconds = np.interp(points, np.concatenate([[0.0], ends]), np.concatenate([[0.0], episodes["seconds"]]))
    return {"steps": [int(p) for p in points], "seconds": [round(float(s), 3) for s in seconds],
            "return": [None if r is None else round(r, 2) for r in returns]}


def _finite(x: float) -> float | None:
    """x, or None for ±inf (a diverged run): JSON has no infinities."""
    return x if math.isfinite(x) else None


def _mean_std(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(task_runs: dict[str, Any], target: float) -> dict[str, Any]:
    """One optimizer of one task: per seed (final return, steps/time to target, timings, curve)
    and the mean ± std over seeds (steps/time to target: over the seeds that reach it)."""
    seeds = []
    for run in task_runs["runs"]:
        steps, seconds = to_target(run, target)
        episodes = run["episodes"] or {}
        seeds.append({
            "seed": run["seed"], "diverged": run["diverged"], "final_return": _finite(final_return(run)),
            "steps_to_target": steps, "seconds_to_target": seconds,
            "total_seconds": episodes.get("total_seconds"), "optimizer_seconds": episodes.get("optimizer_seconds"),
            "optimizer_steps": episodes.get("optimizer_steps"), "episodes": len(episodes.get("returns", [])),
            "curve": curve(run),
        })
    finite = [s["final_return"] for s in seeds if s["final_return"] is not None]
    reached = [s for s in seeds if s["steps_to_target"] is not None]
    step_ms = [1e3 * s["optimizer_seconds"] / s["optimizer_steps"] for s in seeds if s["optimizer_steps"]]
    return {
        "chosen": task_runs["chosen"], "tuning": {v: _finite(r) for v, r in task_runs["grid"].items()}, "seeds": seeds,
        "final_return": _mean_std(finite), "diverged": sum(1 for s in seeds if s["diverged"]),
        "reached_target": len(reached),
        "steps_to_target": _mean_std([s["steps_to_target"] for s in reached]),
        "seconds_to_target": _mean_std([s["seconds_to_target"] for s in reached]),
        "total_seconds": _mean_std([s["total_seconds"] for s in seeds if s["total_seconds"] is not None]),
        "optimizer_step_ms": _mean_std(step_ms),
    }


def report(results: dict[str, Any], settings: dict[str, Any], machine: dict[str, Any], seconds: float,
           stem: Path) -> str:
    """Write stem.json (summaries and curves), then stem.md and stem.png from that JSON; return
    the markdown."""
    data = {"machine": machine, "settings": settings, "seconds": seconds, "tasks": {
        task: {name: summarize(runs, settings["targets"][task]) for name, runs in result["runs"].items()}
        for task, result in results.items()}}
    for task, result in results.items():
        data["settings"]["configs"][task]["total_steps"] = result["steps"]
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    return write_outputs(stem.with_suffix(".json"))


# --------------------------------------------------------------------------- from the JSON


def _fmt(stat: dict[str, float] | None, digits: int = 0, scale: float = 1.0) -> str:
    if stat is None:
        return "—"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def markdown(data: dict[str, Any]) -> str:
    """Per task: the table (chosen point and its grid, final return, target, timings)."""
    s = data["settings"]
    lines = [f"# DQN: EGN vs Adam vs SGD{' (quick smoke run, not tuned)' if s['quick'] else ''}", "",
             f"{s['seeds']} seed(s) per optimizer (seed 0 is the tuning run), {s['jobs']} runs in parallel with "
             f"one torch thread each on {data['machine']['cpu']}, torch {data['machine']['torch']}; "
             f"this invocation took {data['seconds'] / 60:.1f} min (runs it found in the cache of earlier "
             "invocations not counted). Final return: mean return of the episodes "
             f"ending in the last {FINAL_FRACTION:.0%} of the env steps. Steps/time to target: first time the mean "
             f"of the last {SMOOTHING} episodes reaches the target, over the seeds that reach it; time is the "
             "run's wall time (env steps, action selection and optimizer steps). Optimizer step: ms per "
             "update (batch of the task's size). `*`: the tuned value is at an edge of its grid.", ""]
    for task, optimizers in data["tasks"].items():
        config, target = s["configs"][task], s["targets"][task]
        lines += [f"## {task}", "",
                  f"{config['total_steps']:,} env steps; buffer {config['buffer_size']:,}, batch {config['batch_size']}, "
                  f"γ {config['gamma']}, target update every {config['target_every']} steps, one update every "
                  f"{config['train_every']} steps after {config['learning_starts']:,}, ε {config['start_epsilon']} → "
                  f"{config['end_epsilon']} over {config['exploration_fraction']:.0%} of the run. Target return {target:g}.", "",
                  "| optimizer | tuned (grid: final return on seed 0) | final return | reached target | env steps to target "
                  "| time to target (s) | run time (s) | optimizer step (ms) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, row in optimizers.items():
            axis = s["optimizers"][name]["axis"]
            grid = ", ".join(f"{v}: {'diverged' if r is None else f'{r:.0f}'}" for v, r in row["tuning"].items())
            values = [float(v) for v in row["tuning"]]
            edge = "*" if len(values) > 1 and row["chosen"] in (min(values), max(values)) else ""
            lines.append(
                f"| {name} | {axis} = {row['chosen']:g}{edge} ({grid}) | {_fmt(row['final_return'], 1)} | "
                f"{row['reached_target']}/{len(row['seeds'])} | {_fmt(row['steps_to_target'])} | "
                f"{_fmt(row['seconds_to_target'], 1)} | {_fmt(row['total_seconds'], 1)} | {_fmt(row['optimizer_step_ms'], 2)} |")
        lines.append("")
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> Path:
    """One row per task: smoothed return vs env steps and vs wall time, mean ± std over seeds
    (the wall-time axis: the seeds' mean wall time at each env step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = data["tasks"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 3.8 * len(tasks)), squeeze=False)
    for row, (task, optimizers) in zip(axes, tasks.items()):
        for name, summary in optimizers.items():
            curves = [s["curve"] for s in summary["seeds"]]
            returns = np.array([[np.nan if r is None else r for r in c["return"]] for c in curves], dtype=float)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-nan columns before the first episode
                mean, std = np.nanmean(returns, 0), np.nanstd(returns, 0)
            steps = np.asarray(curves[0]["steps"])
            seconds = np.mean([c["seconds"] for c in curves], axis=0)
            for ax, x in zip(row, (steps, seconds)):
                (line,) = ax.plot(x, mean, label=name)
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        for ax, xlabel in zip(row, ("env steps", "wall time (s)")):
            ax.axhline(data["settings"]["targets"][task], color="gray", ls=":", lw=1)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"return (mean of last {SMOOTHING} episodes)")
            ax.set_title(task)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(json_path: Path) -> str:
    """The markdown and the PNG next to a dqn.py JSON, made from it alone."""
    data = json.loads(json_path.read_text())
    table = markdown(data)
    json_path.with_suffix(".md").write_text(table + "\n")
    plot(data, json_path.with_suffix(".png"))
    return table


if __name__ == "__main__":
    print(write_outputs(Path(sys.argv[1])))
