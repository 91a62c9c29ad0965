"""The paper's reinforcement-learning experiments: DQN (CleanRL's setup, written in dqn_agent.py)
with EGN (plain, + momentum, + Armijo line search), Adam and SGD in the optimizer slot.

Protocol, the same for every optimizer of a task:
  1. tune: every point of the optimizer's grid trains seed 0 for the task's budget; the point with
     the best final return (mean return of the episodes ending in the last 10 % of the env steps;
     a diverged run ranks last) wins. A winner at the edge of its grid adds the next point beyond
     that edge (at most MAX_EXTENSIONS times), so the chosen point is inside its grid;
  2. measure: the chosen point trains the seeds 0, 1, 2, … (env, exploration, network init); seed
     0 is the tuning run itself.
Every finished run is appended to a cache (.cache/dqn_runs_<tag>.json), so a cut run resumes
where it stopped. dqn_report.py turns the results into the JSON's summaries, the markdown and
the plot; nothing there trains.

    PYTHONPATH=. python benchmarks/dqn.py                  # CPU budget: CartPole-v1 and Acrobot-v1
    PYTHONPATH=. python benchmarks/dqn.py --quick          # smoke run (< 3 min): short runs, 1 point, 1 seed
    PYTHONPATH=. python benchmarks/dqn.py --tasks freeway --jobs 2

Writes <out>/dqn_<tag>.{json,md,png} (tag "cpu" or "cpu_quick").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import comma_names, machine_info  # noqa: E402
from dqn_agent import Diverged, DQNConfig, MinAtarEnv, q_conv, q_mlp, run_dqn  # noqa: E402
from dqn_report import final_return, report  # noqa: E402

from egn_fast import EGN, NonFiniteError, SolveError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEEDS = 3
MAX_EXTENSIONS = 2


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """An environment, its Q-network and budget. target: the return whose first crossing (by the
    mean of the last 10 episodes) defines steps and time to target. config: DQN's settings at
    the CPU budget; --quick shortens the run to quick_steps (learning starts after 1/5 of it)."""

    name: str
    make_env: Callable[[], Any]
    make_net: Callable[[Any, int], nn.Module]
    target: float
    config: DQNConfig
    quick_steps: int


def _gym(name: str) -> Callable[[], Any]:
    def make() -> Any:
        import gymnasium

        return gymnasium.make(name)

    return make


def _classic_net(env: Any, seed: int) -> nn.Module:
    return q_mlp(env.observation_space.shape[0], int(env.action_space.n), seed)


def _minatar_net(env: MinAtarEnv, seed: int) -> nn.Module:
    return q_conv(env.obs_shape[0], env.num_actions, seed)


TASKS = {
    "CartPole-v1": Task("CartPole-v1", _gym("CartPole-v1"), _classic_net, 475.0, DQNConfig(total_steps=100_000), 6_000),
    "Acrobot-v1": Task("Acrobot-v1", _gym("Acrobot-v1"), _classic_net, -100.0, DQNConfig(total_steps=100_000), 6_000),
    # MinAtar (Young & Tian 2019): batch 32, target update every 1000 steps, train every step in
    # their DQN; here every 4th step to fit the CPU, ε over the first 10 % of the run.
    "MinAtar-Freeway": Task("MinAtar-Freeway", lambda: MinAtarEnv("freeway"), _minatar_net, 30.0,
                            DQNConfig(total_steps=100_000, batch_size=32, target_every=1000, exploration_fraction=0.1,
                                      learning_starts=5_000, train_every=4, buffer_size=100_000), 3_000),
}
DEFAULT_TASKS = ("CartPole-v1", "Acrobot-v1")


# --------------------------------------------------------------------------- optimizers


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer, its tuned hyperparameter `axis` and its grid; an extension multiplies (or
    divides) the edge value by `factor`."""

    name: str
    label: str
    make: Callable[..., torch.optim.Optimizer]
    axis: str
    grid: tuple[float, ...]
    factor: float


OPTIMIZERS = {
    "egn": OptimizerSpec("egn", "EGN (lr 1, damping λ)", lambda m, damping: EGN(m, loss="mse", damping=damping),
                         "damping", (1.0, 10.0, 100.0), 10.0),
    "egn_mom": OptimizerSpec("egn_mom", "EGN + momentum (ema β = 0.9)",
                             lambda m, damping: EGN(m, loss="mse", damping=damping, momentum=0.9),
                             "damping", (1.0, 10.0, 100.0), 10.0),
    "egn_ls": OptimizerSpec("egn_ls", "EGN + Armijo line search",
                            lambda m, damping: EGN(m, loss="mse", damping=damping, line_search="armijo"),
                            "damping", (1.0, 10.0, 100.0), 10.0),
    "adam": OptimizerSpec("adam", "Adam", lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr),
                          "lr", (1e-4, 3e-4, 1e-3), 3.0),
    "sgd": OptimizerSpec("sgd", "SGD (momentum 0.9)", lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
                         "lr", (1e-4, 1e-3, 1e-2), 10.0),
}


# --------------------------------------------------------------------------- one run


def run_key(task: str, optimizer: str, value: float, seed: int, steps: int) -> str:
    return f"{task}|{optimizer}|{value:g}|{seed}|{steps}"


def train_run(task_name: str, optimizer: str, value: float, seed: int, quick: bool) -> dict[str, Any]:
    """One DQN run (in a worker process, one torch thread): its episodes and timings, or why it
    diverged (non-finite TD targets, EGN's non-finite loss or failed solve)."""
    torch.set_num_threads(1)
    task, spec = TASKS[task_name], OPTIMIZERS[optimizer]
    config = quick_config(task) if quick else task.config
    env = task.make_env()
    diverged = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EGN's "solved with jitter" notes would flood the bars
        try:
            episodes = run_dqn(env, task.make_net(env, seed), lambda m: spec.make(m, **{spec.axis: value}), config, seed)
        except (NonFiniteError, SolveError, Diverged) as err:
            episodes, diverged = None, str(err).splitlines()[0]
    return {"task": task_name, "optimizer": optimizer, "value": value, "seed": seed, "steps": config.total_steps,
            "diverged": diverged, "episodes": None if episodes is None else asdict(episodes)}


def quick_config(task: Task) -> DQNConfig:
    return replace(task.config, total_steps=task.quick_steps, learning_starts=task.quick_steps // 5,
                   buffer_size=min(task.config.buffer_size, task.quick_steps))


# --------------------------------------------------------------------------- tuning and seeds


class Scheduler:
    """Runs every task's runs on a process pool, keeping the workers busy: each (task, optimizer)
    tunes its grid, extends it where the best point sits at an edge, then runs the chosen point's
    seeds, as soon as the runs it waits for are done. Finished runs go to the cache."""

    def __init__(self, pool: ProcessPoolExecutor, cache: dict[str, Any], cache_path: Path, quick: bool, seeds: int,
                 bar: tqdm) -> None:
        self.pool, self.cache, self.cache_path, self.quick, self.seeds, self.bar = pool, cache, cache_path, quick, seeds, bar
        self.pending: dict[Future, str] = {}

    def steps(self, task: Task) -> int:
        return quick_config(task).total_steps if self.quick else task.config.total_steps

    def key(self, task: Task, spec: OptimizerSpec, value: float, seed: int) -> str:
        return run_key(task.name, spec.name, value, seed, self.steps(task))

    def submit(self, task: Task, spec: OptimizerSpec, value: float, seed: int) -> None:
        key = self.key(task, spec, value, seed)
        if key not in self.cache and key not in self.pending.values():
            self.pending[self.pool.submit(train_run, task.name, spec.name, value, seed, self.quick)] = key

    def drain(self) -> None:
        """Wait for at least one pending run; store what finished."""
        done, _ = wait(list(self.pending), return_when=FIRST_COMPLETED)
        for future in done:
            key = self.pending.pop(future)
            self.cache[key] = future.result()
            self.cache_path.write_text(json.dumps(self.cache))
            self.bar.update()
            self.bar.set_postfix_str(key)

    def decide(self, task: Task, spec: OptimizerSpec, grid: list[float]) -> float | None:
        """With every grid run of seed 0 done: the chosen value, or None after adding the point
        beyond an edge that won (at most MAX_EXTENSIONS times; not after a diverged winner)."""
        scores = {v: final_return(self.cache[self.key(task, spec, v, 0)]) for v in grid}
        ordered = sorted(grid)
        best = max(ordered, key=lambda v: scores[v])
        extensions = len(grid) - (1 if self.quick else len(spec.grid))
        if len(grid) > 1 and best in (ordered[0], ordered[-1]) and extensions < MAX_EXTENSIONS and math.isfinite(scores[best]):
            grid.append(best * spec.factor if best == ordered[-1] else best / spec.factor)
            self.submit(task, spec, grid[-1], 0)
            return None
        return best

    def run(self, tasks: list[Task], specs: list[OptimizerSpec]) -> dict[str, Any]:
        """Tune every optimizer of every task (with extensions), run the chosen points' seeds; per
        task the steps and, per optimizer, every grid point's final return, the chosen value and
        the seeds' runs."""
        grids = {(t.name, s.name): list(s.grid[-1:] if self.quick else s.grid) for t in tasks for s in specs}
        chosen: dict[tuple[str, str], float] = {}
        for task in tasks:
            for spec in specs:
                for value in grids[task.name, spec.name]:
                    self.submit(task, spec, value, 0)
        while True:
            for task in tasks:
                for spec in specs:
                    grid = grids[task.name, spec.name]
                    if (task.name, spec.name) in chosen or any(self.key(task, spec, v, 0) not in self.cache for v in grid):
                        continue
                    value = self.decide(task, spec, grid)
                    if value is not None:
                        chosen[task.name, spec.name] = value
                        for seed in range(self.seeds):
                            self.submit(task, spec, value, seed)
            if not self.pending:
                break
            self.drain()
        return {t.name: {"steps": self.steps(t), "runs": {s.name: {
            "grid": {f"{v:g}": final_return(self.cache[self.key(t, s, v, 0)]) for v in sorted(grids[t.name, s.name])},
            "chosen": chosen[t.name, s.name],
            "runs": [self.cache[self.key(t, s, chosen[t.name, s.name], seed)] for seed in range(self.seeds)],
        } for s in specs}} for t in tasks}


# --------------------------------------------------------------------------- main


ALIASES = {"cartpole": "CartPole-v1", "acrobot": "Acrobot-v1", "freeway": "MinAtar-Freeway"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma list of {list(TASKS)} (default: the first two)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list (default: all)")
    parser.add_argument("--quick", action="store_true", help="smoke run: short runs, the last grid point (untuned), 1 seed")
    parser.add_argument("--seeds", type=int, default=SEEDS, help="seeds per chosen point (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one torch thread each (default %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="output directory")
    parser.add_argument("--cache", type=Path, default=None, help="the finished runs, read to resume "
                        "(default .cache/dqn_runs_<tag>.json; --quick starts afresh)")
    args = parser.parse_args(argv)
    tasks = [TASKS[n] for n in comma_names(args.tasks, TASKS, "task", "dqn.py", ALIASES)]
    specs = [OPTIMIZERS[n] for n in comma_names(args.optimizers, OPTIMIZERS, "optimizer", "dqn.py")]
    seeds = 1 if args.quick else args.seeds
    tag = "cpu_quick" if args.quick else "cpu"
    cache_path = args.cache or REPO / ".cache" / f"dqn_runs_{tag}.json"
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache = {} if args.quick or not cache_path.exists() else json.loads(cache_path.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    total = len(tasks) * sum((1 if args.quick else len(s.grid)) + seeds - 1 for s in specs)
    with ProcessPoolExecutor(args.jobs) as pool, tqdm(total=total, desc="dqn runs", unit="run") as bar:
        results = Scheduler(pool, cache, cache_path, args.quick, seeds, bar).run(tasks, specs)
    settings = {"quick": args.quick, "seeds": seeds, "jobs": args.jobs, "max_extensions": MAX_EXTENSIONS,
                "configs": {t.name: asdict(quick_config(t) if args.quick else t.config) for t in tasks},
                "targets": {t.name: t.target for t in tasks},
                "optimizers": {s.name: {"label": s.label, "axis": s.axis, "grid": list(s.grid)} for s in specs}}
    summary = report(results, settings, machine_info(), time.perf_counter() - started, args.out / f"dqn_{tag}")
    print(summary)


if __name__ == "__main__":
    main()
