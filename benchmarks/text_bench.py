"""What the text benchmarks (char_lm.py, review_classifier.py) share: optimizer specs and EGN's
construction under the curvature contract, the training loop with its evaluations and timing,
tuning on a grid (widened where the choice is at an edge), summaries, plots and the side-by-side
step-time breakdown.

* `OptSpec`: an optimizer, make(model, seed, **point), its grid and --quick point; `make_egn`
  builds EGN (curvature "exact" passes no curvature arguments, so it works with any EGN).
* `train`: a fresh run; evaluates before the first step and every `eval_every` steps; training
  seconds count the optimizer steps only. Non-finite losses and failed solves stop a run
  ("diverged"), and so does any other error of an EGN step ("failed"), recorded, not raised.
* `tune` / `run_all`: seed 0 on every grid point, the lowest final value of a curve key wins,
  then the chosen point on every seed.
* `step_breakdown`: copies of one model, the same batch, common.time_methods; EGN's stages from
  StepInfo.timings; ratio to the reference (AdamW) step; common.peak_rss_increase.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_increase, time_methods  # noqa: E402

from egn_fast import EGN, NonFiniteError, SolveError  # noqa: E402

Batch = tuple[Tensor, Tensor]
EGN_HAS_CURVATURE = "curvature" in inspect.signature(EGN.__init__).parameters  # the sampled-curvature contract


# --------------------------------------------------------------------------- optimizers


@dataclass
class OptSpec:
    """An optimizer of a benchmark: make(model, seed, **point), its grid and its --quick point.
    `widen`: the grid key extended when the chosen value sits at an edge (None: not widened);
    `inherit`: the name of an earlier spec whose chosen point this one uses untuned."""

    name: str
    label: str
    make: Callable[..., Any]
    grid: list[dict[str, float]]
    quick: dict[str, float]
    egn: bool = False
    widen: str | None = None
    inherit: str | None = None  # take this spec's chosen point instead of tuning (when it runs first)


def points(**axes: list[float]) -> list[dict[str, float]]:
    """The Cartesian product of the axes, as keyword dicts."""
    out: list[dict[str, float]] = [{}]
    for key, values in axes.items():
        out = [{**p, key: v} for p in out for v in values]
    return out


def make_egn(model: nn.Module, seed: int, *, curvature: str, mc_samples: int = 1, lr: float, damping: float,
             momentum: float = 0.0, adaptive: bool = False, metric: str | None = None) -> EGN:
    """EGN with the curvature contract (curvature, mc_samples, generator: its own seeded stream);
    curvature="exact" passes none of them (the exact step, available before the contract)."""
    extra: dict[str, Any] = {}
    if curvature != "exact":
        extra = dict(curvature=curvature, generator=torch.Generator().manual_seed(10_000 + seed))
        if curvature == "mc":
            extra["mc_samples"] = mc_samples
    if metric is not None:
        extra["metric"] = metric
    return EGN(model, loss="cross_entropy", lr=lr, damping=damping, momentum=momentum,
               adaptive_damping=adaptive, timings=True, **extra)


def torch_specs(adamw_lrs: list[float], sgd_lrs: list[float], adamw_quick: float, sgd_quick: float) -> list[OptSpec]:
    """AdamW (torch defaults: weight decay 0.01) and SGD + momentum 0.9 on lr grids."""
    return [
        OptSpec("adamw", "AdamW", lambda model, seed, lr: torch.optim.AdamW(model.parameters(), lr=lr),
                points(lr=adamw_lrs), {"lr": adamw_quick}, widen="lr"),
        OptSpec("sgd", "SGD + momentum 0.9", lambda model, seed, lr: torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9),
                points(lr=sgd_lrs), {"lr": sgd_quick}, widen="lr"),
    ]


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One training run: curve (step, seconds, train_loss and the evaluation's metrics at each
    evaluation), its final held-out numbers, and why it stopped early (None: it did not)."""

    optimizer: str
    point: dict[str, float]
    seed: int
    purpose: str  # "tune" or "seed"
    curve: dict[str, list[float]] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)
    stopped: str | None = None


def one_step(model: nn.Module, opt: Any, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Any:
    """One optimizer step on (x, y); returns EGN's StepInfo, or the batch loss (float) of a torch step."""
    if isinstance(opt, EGN):
        return opt.step(x, y)
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def train(model: nn.Module, opt: Any, batches: Iterable[Batch], steps: int, loss_fn: Callable[[Tensor, Tensor], Tensor],
          evaluate: Callable[[nn.Module], dict[str, float]], eval_every: int, run: Run,
          progress: Callable[[int], None]) -> Run:
    """Train for `steps` batches, evaluating before the first step and every `eval_every` steps.
    A non-finite loss, a failed solve or any error of an EGN step stops the run (`run.stopped`)."""
    clock, losses, done = 0.0, [], 0

    def record(step: int) -> None:
        # train_loss: the mean batch loss since the last evaluation (None before the first step)
        for key, value in {"step": step, "seconds": clock, "train_loss": statistics.fmean(losses) if losses else None,
                           **evaluate(model)}.items():
            run.curve.setdefault(key, []).append(None if value is None else float(value))
        losses.clear()

    record(0)
    for x, y in batches:
        t0 = time.perf_counter()
        try:
            out = one_step(model, opt, x, y, loss_fn)
        except (NonFiniteError, SolveError) as err:
            run.stopped = f"diverged at step {done + 1}: {err}"
        except Exception as err:  # noqa: BLE001  (an EGN bug must not end the whole benchmark)
            if not isinstance(opt, EGN):
                raise
            run.stopped = f"failed at step {done + 1}: {type(err).__name__}: {err}"
        clock += time.perf_counter() - t0
        if run.stopped:
            break
        loss = float(out.loss) if not isinstance(out, float) else out
        if not math.isfinite(loss):
            run.stopped = f"diverged at step {done + 1}: non-finite loss"
            break
        losses.append(loss)
        done += 1
        progress(1)
        if done % eval_every == 0 or done == steps:
            record(done)
    progress(steps - done)
    return run


def final_value(run: Run, key: str) -> float:
    """The run's last value of curve[key]; +inf if it stopped early (ranks last)."""
    return math.inf if run.stopped or not run.curve.get(key) else run.curve[key][-1]


def tune(spec: OptSpec, run_point: Callable[[dict[str, float]], Run], key: str, max_widen: int = 3) -> tuple[dict, list[Run], bool]:
    """Run every grid point, choose the lowest final curve[key]; where `spec.widen` is set and the
    choice is at the grid's edge, add the next value beyond that edge (geometric step) and repeat.
    Returns the chosen point, the runs and whether the choice is still at an edge."""
    runs = [run_point(p) for p in spec.grid]
    for _ in range(max_widen + 1):
        best = min(runs, key=lambda r: final_value(r, key))
        if spec.widen is None:
            return best.point, runs, False
        values = sorted({r.point[spec.widen] for r in runs})
        v = best.point[spec.widen]
        if len(values) < 2 or values[0] < v < values[-1]:
            return best.point, runs, False
        if len(runs) >= len(spec.grid) + max_widen:
            return best.point, runs, True
        new = v * v / values[1] if v == values[0] else v * v / values[-2]
        runs.append(run_point({**best.point, spec.widen: new}))
    return best.point, runs, True


# --------------------------------------------------------------------------- summaries, plots


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(seed_runs: list[Run], keys: list[str]) -> dict[str, Any]:
    """Mean ± std over the finished seed runs of each final key, training seconds and steps/s."""
    ok = [r for r in seed_runs if not r.stopped]
    out: dict[str, Any] = {"seeds": len(seed_runs), "stopped": [r.stopped for r in seed_runs if r.stopped]}
    for key in keys:
        out[key] = mean_std([r.final[key] for r in ok]) if ok else None
    if ok:
        out["seconds"] = statistics.fmean(r.curve["seconds"][-1] for r in ok)
        out["steps_per_s"] = statistics.fmean(r.curve["step"][-1] / max(r.curve["seconds"][-1], 1e-9) for r in ok)
    return out


def fmt(ms: tuple[float, float] | None, digits: int = 3) -> str:
    return "—" if ms is None else f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def plot_curves(results: dict[str, dict], labels: dict[str, str], metrics: list[tuple[str, str]], title: str, path: Path) -> None:
    """Rows: metrics; columns: vs step, vs training seconds. Mean over the finished seed runs,
    shaded min–max; EGN variants solid, the others dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(metrics), 2, figsize=(12, 4 * len(metrics)), squeeze=False)
    for name, res in results.items():
        runs = [r for r in res["seed_runs"] if not r.stopped]
        if not runs:
            continue
        n = min(len(r.curve["step"]) for r in runs)
        style = "-" if name.startswith("egn") else "--"
        for row, (key, ylabel) in enumerate(metrics):
            ys = torch.tensor([r.curve[key][:n] for r in runs])
            for col, x_key in enumerate(("step", "seconds")):
                xs = torch.tensor([r.curve[x_key][:n] for r in runs]).mean(0)
                ax = axes[row][col]
                ax.plot(xs, ys.mean(0), style, label=labels[name])
                ax.fill_between(xs, ys.min(0).values, ys.max(0).values, alpha=0.15)
                ax.set_xlabel("step" if x_key == "step" else "training seconds")
                ax.set_ylabel(ylabel)
                if x_key == "seconds":
                    ax.set_xscale("symlog", linthresh=1.0)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def step_breakdown(make_model: Callable[[], nn.Module], makers: dict[str, Callable[[nn.Module], Any]], batch: Batch,
                   loss_fn: Callable[[Tensor, Tensor], Tensor], reps: int, warmup: int, reference: str = "adamw") -> dict:
    """Each optimizer on its own copy of one model and the same batch, timed side by side
    (common.time_methods): median ms per step, EGN's median seconds per StepInfo.timings stage,
    the ratio to the `reference` step and the peak RSS increase of one step (bytes)."""
    base = make_model()
    opts, stages, fns, failed = {}, {}, {}, {}
    for name, make in makers.items():
        model = copy.deepcopy(base)
        try:
            opts[name] = (model, make(model))
            one_step(model, opts[name][1], *batch, loss_fn)  # fail here rather than inside the timer
        except Exception as err:  # noqa: BLE001
            failed[name] = f"{type(err).__name__}: {err}"
            opts.pop(name, None)
            continue
        stages[name] = []

        def fn(model=model, opt=opts[name][1], log=stages[name]):
            out = one_step(model, opt, *batch, loss_fn)
            if not isinstance(out, float) and out.timings:
                log.append(dict(out.timings))

        fns[name] = fn
    samples = time_methods(fns, reps, warmup, "step time") if fns else {}
    out: dict[str, Any] = {"reps": reps, "warmup": warmup, "failed": failed, "methods": {}}
    for name, s in samples.items():
        log = stages[name][warmup:] or stages[name]
        keys = sorted({k for t in log for k in t})
        out["methods"][name] = {
            "median_ms": s.median, "quartiles_ms": statistics.quantiles(s.ms, n=4)[::2] if len(s.ms) > 1 else [s.median] * 2,
            "stages_s": {k: statistics.median(t.get(k, 0.0) for t in log) for k in keys},
            "peak_rss_bytes": peak_rss_increase(fns[name]),
        }
    ref = out["methods"].get(reference)
    for m in out["methods"].values():
        m["ratio_to_" + reference] = m["median_ms"] / ref["median_ms"] if ref else None
    return out


def breakdown_markdown(bd: dict, labels: dict[str, str], reference: str = "adamw") -> str:
    """The step-time table: median ms, ratio, peak memory, then EGN's stages (median ms)."""
    stage_names = ["forward", "loss_head", "backward", "gradient", "project", "gram", "solve", "backproject"]
    present = [s for s in stage_names if any(s in m["stages_s"] for m in bd["methods"].values())]
    extra = sorted({k for m in bd["methods"].values() for k in m["stages_s"]} - set(present))
    cols = present + extra
    lines = [f"| optimizer | step ms | ÷ {reference} step | peak RSS MB |" + "".join(f" {c} ms |" for c in cols),
             "|---|---|---|---|" + "---|" * len(cols)]
    for name, m in bd["methods"].items():
        peak = "—" if m["peak_rss_bytes"] is None else f"{m['peak_rss_bytes'] / 1e6:.1f}"
        ratio = "—" if m[f"ratio_to_{reference}"] is None else f"{m[f'ratio_to_{reference}']:.1f}×"
        st = [f"{m['stages_s'][c] * 1e3:.1f}" if c in m["stages_s"] else "—" for c in cols]
        lines.append(f"| {labels.get(name, name)} | {m['median_ms']:.1f} | {ratio} | {peak} |" + "".join(f" {x} |" for x in st))
    lines += [f"\n{labels.get(n, n)}: failed: {e}" for n, e in bd["failed"].items()]
    return "\n".join(lines) + "\n"


def run_all(specs: list[OptSpec], run_point: Callable[[OptSpec, dict, int, str, Callable], Run], steps: int,
            seeds: list[int], quick: bool, key: str, desc: str) -> dict[str, dict]:
    """Tune every spec (seed 0; --quick: its quick point only; an `inherit` spec: the chosen point
    of the spec it names, if that ran before it), then run the chosen point on every seed."""
    names = [s.name for s in specs]

    def inherits(spec: OptSpec) -> bool:
        return spec.inherit in names[:names.index(spec.name)]

    total = steps * sum((0 if quick or inherits(s) else len(s.grid)) + len(seeds) for s in specs)
    results: dict[str, dict] = {}
    with tqdm(total=total, desc=desc, unit="step") as bar:
        for spec in specs:
            bar.set_postfix_str(f"{spec.name}: tuning")
            if quick:
                chosen, tuning, edge = spec.quick, [], False
            elif inherits(spec):
                chosen, tuning, edge = results[spec.inherit]["chosen"], [], results[spec.inherit]["edge"]
            else:
                chosen, tuning, edge = tune(spec, lambda p: run_point(spec, p, 0, "tune", bar.update), key)
                bar.total += steps * (len(tuning) - len(spec.grid))
            bar.set_postfix_str(f"{spec.name}: seeds")
            seed_runs = [run_point(spec, chosen, s, "seed", bar.update) for s in seeds]
            results[spec.name] = {"chosen": chosen, "edge": edge, "tuning": tuning, "seed_runs": seed_runs,
                                  "inherited_from": spec.inherit if inherits(spec) and not quick else None}
            for r in tuning + seed_runs:
                if r.stopped:
                    tqdm.write(f"{spec.name} {r.point} seed {r.seed}: {r.stopped}")
    return results


def results_json(results: dict[str, dict], keys: list[str]) -> dict[str, Any]:
    """The JSON form of `run_all`'s results, with each optimizer's summary."""
    return {name: {"chosen": res["chosen"], "chosen_at_grid_edge": res["edge"], "inherited_from": res["inherited_from"],
                   "summary": summarize(res["seed_runs"], keys),
                   "tuning": [asdict(r) for r in res["tuning"]], "seed_runs": [asdict(r) for r in res["seed_runs"]]}
            for name, res in results.items()}


def write_outputs(report: dict[str, Any], table: Callable[[dict[str, Any], dict[str, str]], str], results: dict[str, dict],
                  labels: dict[str, str], metrics: list[tuple[str, str]], title: str, out: Path, stem: str, started: float) -> None:
    """Finish the report (run seconds, the load average: other processes on the machine), write
    <out>/<stem>.{png,md,json} (the plot of `metrics` vs step and seconds) and print the table."""
    report["seconds"] = time.perf_counter() - started
    report["machine"]["load_average_1_5_15_min_at_end"] = list(os.getloadavg())
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(results, labels, metrics, title, out / f"{stem}.png")
    text = table(report, labels)
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(text)
    print(f"wrote {out}/{stem}.{{json,md,png}} ({report['seconds']:.0f} s)")


def add_run_options(parser: Any, steps: int, quick_steps: int, data_file: str, batch: int, out: Path) -> None:
    """The options both text benchmarks take: --seeds, --steps, --optimizers, --data-dir, --out,
    --batch-size, --reps (--quick and the script's own options are added by the script)."""
    parser.add_argument("--seeds", type=int, default=3, help="seeds per chosen point (default 3)")
    parser.add_argument("--steps", type=int, default=None, help=f"steps per run (default {steps}; --quick {quick_steps})")
    parser.add_argument("--optimizers", default=None, help="comma list (default: all)")
    parser.add_argument("--data-dir", type=Path, default=None, help=f"directory with {data_file} (default: $EGN_FAST_DATA)")
    parser.add_argument("--out", type=Path, default=out, help="output directory")
    parser.add_argument("--batch-size", type=int, default=batch, help=f"mini-batch size (default {batch})")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per optimizer in the step-time table (20; --quick 3)")


def select_specs(specs: list[OptSpec], optimizers: str | None, script: str) -> list[OptSpec]:
    """The specs named in the comma list `optimizers` (all when None); SystemExit naming the choices."""
    if not optimizers:
        return specs
    names = [n.strip() for n in optimizers.split(",") if n.strip()]
    unknown = set(names) - {s.name for s in specs}
    if unknown:
        raise SystemExit(f"{script}: unknown optimizers {sorted(unknown)}; choose from {[s.name for s in specs]}")
    return [s for s in specs if s.name in names]


def budget(args: Any, steps: int, quick_steps: int, evaluations: int) -> tuple[int, list[int], int]:
    """(steps per run, seeds, steps between evaluations) from --steps/--seeds/--quick (5 evaluations)."""
    n = args.steps or (quick_steps if args.quick else steps)
    return n, list(range(1 if args.quick else args.seeds)), max(1, n // (5 if args.quick else evaluations))


def chosen_cell(res: dict[str, Any]) -> str:
    """A results table's "chosen" cell: the grid point, `*` at a grid edge, the spec it came from."""
    cell = ", ".join(f"{k} {v:g}" for k, v in res["chosen"].items()) + (" *" if res["chosen_at_grid_edge"] else "")
    return cell + (f" (from {res['inherited_from']})" if res.get("inherited_from") else "")

