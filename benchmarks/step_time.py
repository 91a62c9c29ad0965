"""CPU step time and memory on three fixed cases: egn_fast's EGN direction vs SGD vs materialized J.

Timed side by side in one process on the same model and mini-batch (float32, damping λ = 1), on
three models, with targets:

* egn    `egn_fast.direction(...)`: capture, loss head, batched backward, Gram, solve,
         back-projection (never builds J).
* sgd    zero_grad + forward + loss + backward + `torch.optim.SGD.step`.
* matJ   the same direction from a materialized J̃ = SᵀJ (m = b·s rows by `torch.func.jacrev`
         over `functional_call`), K = J̃J̃ᵀ, Cholesky of K + bλI, d = −J̃ᵀγ.

The materialized direction is checked against egn_fast's (relative error), so the comparison is
honest. Each method is timed in blocks of back-to-back calls (warm caches, as in a training
loop), in several rounds so that drift of the machine hits all methods alike; we report medians.
egn and sgd are timed for every case before matJ runs at all: matJ's huge temporaries change
how glibc's malloc behaves afterwards (see benchmarks/README.md). egn_fast's own per-stage
timings (`direction_with_info(..., timings=True)`) and minor page faults per call are recorded too.
The methods are in step_time_methods.py; the sweep over batch size and classes (with Adam, a
full EGN step and somax) is step_time_sweep.py.

    PYTHONPATH=. .venv/bin/python benchmarks/step_time.py                      # full run
    PYTHONPATH=. .venv/bin/python benchmarks/step_time.py --quick              # smoke run
    PYTHONPATH=. .venv/bin/python benchmarks/step_time.py --reuse-cpu-memory   # with egn_fast.reuse_cpu_memory()

Writes <out>/step_time_cpu.{json,md} (default out: benchmarks/results;
step_time_cpu_reuse_cpu_memory.* with --reuse-cpu-memory).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import egn_fast

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402  (benchmarks/datasets.py)
from common import (  # noqa: E402
    ROUNDS, Samples, add_cpu_run_options, machine_info, rel_err, start_cpu_run, time_methods,
)
from step_time_methods import (  # noqa: E402
    DAMPING, SEED, Case, egn_direction, make_optimizer_step, materialized_direction,
)

STAGES = ["forward", "loss_head", "backward", "gram", "solve", "backproject"]
# Targets: EGN direction / SGD step (per case, where set), and matJ / EGN (every case).
EGN_OVER_SGD_TARGET = {"mlp": 7.0, "regression": 4.0}
MATJ_OVER_EGN_TARGET = 100.0


# --------------------------------------------------------------------------- models and data


class TransformerClassifier(nn.Module):
    """One pre-LN transformer block on (b, T, width), mean-pooled over T, then a linear head.

    x ← x + Wo·attn(LN(x)),  x ← x + MLP(LN(x)) with MLP width→hidden→width (GELU);
    attention is plain softmax attention over `heads` heads, written in torch ops.
    """

    def __init__(self, width: int = 64, heads: int = 4, hidden: int = 256, classes: int = 10):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        b, T, width = x.shape
        dh = width // self.heads
        h = self.ln1(x)
        q, k, v = (z.view(b, T, self.heads, dh).transpose(1, 2) for z in (self.q(h), self.k(h), self.v(h)))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dh), dim=-1)  # (b, heads, T, T)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, T, width))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(1))


def california_batch(data_dir: Path | None, b: int, gen: torch.Generator) -> tuple[Tensor, Tensor, str]:
    """b random rows of California Housing, features and target standardized; random data
    (with a printed note) when the file is missing. Returns X (b, 8), y (b, 1), the data name."""
    path = datasets.data_file(data_dir, "california_housing.npz")
    if path is None:
        print(f"note: {datasets.missing(data_dir, 'california_housing.npz', ('X', 'y'))}; the regression case uses random data")
        return torch.randn(b, 8, generator=gen), torch.randn(b, 1, generator=gen), "random"
    with np.load(path) as data:
        X, y = torch.from_numpy(data["X"]).float(), torch.from_numpy(data["y"]).float()
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    rows = torch.randperm(X.shape[0], generator=gen)[:b]
    return X[rows], y[rows, None], "california_housing"



def make_cases(data_dir: Path | None) -> list[Case]:
    """The three cases of the benchmark, float32, with fixed seeds."""
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    mlp = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    reg = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1)
    )
    X_reg, y_reg, reg_data = california_batch(data_dir, 128, gen)
    return [
        Case("mlp", "MLP 784-256-256-10 tanh, b=64, cross_entropy", mlp,
             torch.randn(64, 784, generator=gen), torch.randint(0, 10, (64,), generator=gen), "cross_entropy", "random"),
        Case("regression", "MLP 8-32-64-32-1 ReLU, b=128, mse", reg, X_reg, y_reg, "mse", reg_data),
        Case("transformer", "pre-LN transformer block, b=8 T=16 width=64 4 heads, cross_entropy",
             TransformerClassifier(), torch.randn(8, 16, 64, generator=gen),
             torch.randint(0, 10, (8,), generator=gen), "cross_entropy", "random"),
    ]



# --------------------------------------------------------------------------- timing


def bench_egn_sgd(case: Case, repeats: int, warmup: int) -> dict:
    """Time egn and sgd, and egn's stages (from separate `direction_with_info(..., timings=True)`
    calls timed the same way)."""
    stage_ms: dict[str, list[float]] = {k: [] for k in STAGES}

    def egn_with_stages() -> None:
        info = egn_fast.direction_with_info(
            case.model, case.inputs, case.targets, loss=case.loss, damping=DAMPING, timings=True
        )
        for k in STAGES:
            stage_ms[k].append(info.timings[k] * 1e3)

    samples = time_methods(
        {"egn": lambda: egn_direction(case), "sgd": make_optimizer_step(case, "sgd"), "egn_stages": egn_with_stages},
        repeats, warmup, case.key,
    )
    # egn_with_stages logged every call; per round, the first `warmup` of each block are untimed.
    block = warmup + math.ceil(repeats / ROUNDS)
    stages = {k: statistics.median(x for i, x in enumerate(v) if i % block >= warmup) for k, v in stage_ms.items()}
    return {"samples": samples, "stages": stages}


def bench_matj(case: Case, repeats: int, warmup: int) -> dict:
    """Check the materialized direction against egn_fast's, then time it."""
    err = rel_err(materialized_direction(case), egn_direction(case))
    samples = time_methods({"matJ": lambda: materialized_direction(case)}, repeats, warmup, case.key)
    return {"samples": samples, "rel_err": err}


def case_result(case: Case, egn_sgd: dict, matj: dict) -> dict:
    """One case's entry of the report: sizes, medians, ratios, stage times, target checks."""
    samples: dict[str, Samples] = {**egn_sgd["samples"], **matj["samples"]}
    med = {k: samples[k].median for k in ("egn", "sgd", "matJ")}
    b = case.inputs.shape[0]
    m = egn_fast.build_system(case.model, case.inputs, case.targets, loss=case.loss).K.shape[0]
    result = {
        "case": case.key,
        "title": case.title,
        "data": case.data,
        "loss": case.loss,
        "b": b,
        "s": m // b,
        "m": m,
        "params": sum(p.numel() for p in case.model.parameters()),
        "timed_calls": len(samples["egn"].ms),
        "matJ_rel_err": matj["rel_err"],
        "median_ms": med,
        "quartiles_ms": {k: statistics.quantiles(samples[k].ms, n=4)[::2] for k in med},
        "page_faults_per_call": {k: samples[k].faults / len(samples[k].ms) for k in med},
        "egn_stages_median_ms": egn_sgd["stages"],
        "egn_stages_sum_ms": sum(egn_sgd["stages"].values()),
        "egn_over_sgd": med["egn"] / med["sgd"],
        "matJ_over_egn": med["matJ"] / med["egn"],
        "targets": {},
    }
    if case.key in EGN_OVER_SGD_TARGET:
        goal = EGN_OVER_SGD_TARGET[case.key]
        result["targets"]["egn_over_sgd"] = {"max": goal, "met": result["egn_over_sgd"] <= goal}
    result["targets"]["matJ_over_egn"] = {
        "min": MATJ_OVER_EGN_TARGET,
        "met": result["matJ_over_egn"] >= MATJ_OVER_EGN_TARGET,
    }
    return result


# --------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    """The result tables (times and ratios; egn stage times) and the target checks, as markdown."""
    mach, settings = report["machine"], report["settings"]
    lines = [
        "# Step time on the CPU: EGN direction vs SGD step vs materialized J",
        "",
        f"{mach['cpu']}, {mach['torch_threads']} torch threads, torch {mach['torch']}, {mach['platform']}. "
        f"float32, damping {settings['damping']}; medians of {report['cases'][0]['timed_calls']} timed calls "
        f"per method ({settings['rounds']} rounds, {settings['warmup']} warm-up calls per method and round). "
        + ("glibc malloc tuned by `egn_fast.reuse_cpu_memory()` for every method." if settings["reuse_cpu_memory"]
           else "Default glibc malloc settings."),
        "",
        "| case | params | b | m | SGD ms | EGN ms | matJ ms | EGN/SGD | matJ/EGN | matJ rel err |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["cases"]:
        t = r["median_ms"]
        lines.append(
            f"| {r['title']} | {r['params']:,} | {r['b']} | {r['m']} | {t['sgd']:.3f} | {t['egn']:.3f} | "
            f"{t['matJ']:.1f} | {r['egn_over_sgd']:.2f} | {r['matJ_over_egn']:.1f} | {r['matJ_rel_err']:.1e} |"
        )
    lines += [
        "",
        "EGN stages (`direction_with_info(..., timings=True)`, separate calls), median ms, and minor "
        "page faults per call:",
        "",
        "| case | " + " | ".join(STAGES) + " | sum | faults EGN | faults SGD |",
        "|---|" + "---:|" * (len(STAGES) + 3),
    ]
    for r in report["cases"]:
        st, pf = r["egn_stages_median_ms"], r["page_faults_per_call"]
        lines.append(
            f"| {r['case']} | " + " | ".join(f"{st[k]:.3f}" for k in STAGES)
            + f" | {r['egn_stages_sum_ms']:.3f} | {pf['egn']:.0f} | {pf['sgd']:.0f} |"
        )
    lines += ["", "Targets:", ""]
    for r in report["cases"]:
        for name, t in r["targets"].items():
            bound = f"≤ {t['max']:g}" if "max" in t else f"≥ {t['min']:g}"
            lines.append(f"- {r['case']}: {name} = {r[name]:.2f} (target {bound}): **{'met' if t['met'] else 'NOT met'}**")
    return "\n".join(lines) + "\n"




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per method and case (default 30; 6 with --quick)")
    parser.add_argument("--quick", action="store_true", help="few repeats and one warm-up call")
    add_cpu_run_options(parser, "california_housing.npz")
    args = parser.parse_args()
    repeats, warmup, suffix = start_cpu_run(args)
    started = time.perf_counter()

    cases = make_cases(args.data_dir)
    # egn and sgd for every case first: matJ's huge temporaries change how the allocator
    # behaves afterwards (see README), and egn should be measured as a training process sees it.
    egn_sgd = [bench_egn_sgd(case, repeats, warmup) for case in tqdm(cases, desc="egn, sgd")]
    matj = [bench_matj(case, repeats, warmup) for case in tqdm(cases, desc="matJ")]
    results = [case_result(*args) for args in zip(cases, egn_sgd, matj)]
    report = {
        "machine": machine_info(),
        "settings": {"dtype": "float32", "damping": DAMPING, "repeats": repeats, "rounds": ROUNDS,
                     "warmup": warmup, "seed": SEED, "quick": args.quick,
                     "reuse_cpu_memory": args.reuse_cpu_memory},
        "cases": results,
    }
    table = markdown(report)
    print(table)
    stem = args.out / f"step_time_cpu{suffix}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table)
    print(f"wrote {stem}.json and {stem}.md")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
