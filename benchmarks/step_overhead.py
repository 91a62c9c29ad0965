"""What an EGN step costs next to a first-order step, on the cases of the per-step overhead issue.

Each case times an egn_fast call and its first-order baseline side by side in one process, on the
same model and mini-batch (alternating rounds, medians), and records egn_fast's own stage times
(`timings=True`, separate calls). The ratio is the claim; absolute times are this CPU's.

| case | egn_fast | baseline | target |
|---|---|---|---|
| paper_mlp_direction | `direction`, MLP 8-32-64-32-1 ReLU, b 128, mse | SGD backward (zero_grad, forward, loss, backward) | ≤ 3× |
| paper_mlp_step | `EGN.step` (defaults, but lr 1e-3 as the baseline's: see below) | SGD step (the backward + `step`) | ≤ 3.5× |
| mlp784_direction | `direction`, MLP 784-256-256-10 tanh, b 64, cross_entropy (m = 576) | SGD backward | ≤ 7× |
| char_gpt_mc | `EGN(curvature="mc", mc_samples=1).step`, char-GPT 2 layers d 128 T 64 V 64, b 16 | AdamW step | ≤ 1.6× |
| gpt_mc | the same on a 4.9M-parameter GPT (6 layers, d 256, T 256, V 256), b 8 (not with --quick) | AdamW step | ≤ 1.3× |
| char_gpt_adam_metric | `EGN(curvature="mc", metric="adam").step` on the char-GPT | AdamW step | ≤ 2× |
| review_exact | `EGN.step` exact, 5-class review classifier (1 block, d 64, T 64, V 96), b 32 | AdamW step | ≤ 4× |

Inputs are random (fixed seeds): step times do not depend on the values. Steps use lr 1e-3 for
EGN and the baseline alike, so that the hundreds of timed steps on one batch stay finite. float32,
torch's threads as set (--threads, default 2).

    PYTHONPATH=. .venv/bin/python benchmarks/step_overhead.py            # full run (a few minutes)
    PYTHONPATH=. .venv/bin/python benchmarks/step_overhead.py --quick    # smoke run, no 4.9M GPT
    git worktree add /tmp/before <commit>
    PYTHONPATH=. .venv/bin/python benchmarks/step_overhead.py --before /tmp/before   # and that commit, same rounds

Writes <out>/step_overhead_cpu.{json,md} (default out: benchmarks/results; with --reuse-cpu-memory,
step_overhead_cpu_reuse_cpu_memory.*).
"""

from __future__ import annotations

import argparse
import atexit
import copy
import importlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import egn_fast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from char_gpt import CharGPT, ReviewClassifier  # noqa: E402
from common import machine_info, time_methods  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STAGES = ["forward", "loss_head", "gradient", "backward", "gram", "project", "metric", "solve", "backproject"]


@dataclass
class Case:
    """One comparison: egn[label]() (this egn_fast, and with --before the other tree) and
    baseline() each run one timed call; stages() returns this egn_fast's stage times (seconds) of
    one call; calls: timed calls per method (fewer for slow cases)."""

    name: str
    what: str
    target: float
    egn: dict[str, Callable[[], object]]
    baseline: Callable[[], object]
    baseline_name: str
    stages: Callable[[], dict[str, float]]
    calls: int


def _first_order(model: nn.Module, batch: Callable[[], Tensor], opt: torch.optim.Optimizer | None) -> Callable[[], None]:
    """zero_grad, forward, loss, backward (and opt.step() when given)."""

    def run() -> None:
        model.zero_grad(set_to_none=True)
        batch().backward()
        if opt is not None:
            opt.step()

    return run


def _mlp(widths: list[int], act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers += [nn.Linear(a, b)] + ([act()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def _direction_case(name: str, what: str, target: float, model: nn.Module, x: Tensor, y: Tensor, loss: str, calls: int,
                    packages: dict[str, ModuleType]) -> Case:
    loss_fn = {"mse": lambda out: 0.5 * (out - y).square().sum(1).mean(), "cross_entropy": lambda out: F.cross_entropy(out, y)}[loss]
    return Case(
        name, what, target,
        egn={label: partial(pkg.direction, model, x, y, loss=loss, damping=1.0) for label, pkg in packages.items()},
        baseline=_first_order(model, lambda: loss_fn(model(x)), None), baseline_name="SGD backward",
        stages=lambda: egn_fast.direction_with_info(model, x, y, loss=loss, damping=1.0, timings=True).timings,
        calls=calls,
    )


def _step_case(name: str, what: str, target: float, model: nn.Module, x: Tensor, y: Tensor, egn_options: dict,
               baseline_opt: str, calls: int, packages: dict[str, ModuleType]) -> Case:
    """EGN.step (its own copy of the model, so both optimizers keep training their own) vs a
    first-order step on the same batch."""
    loss = egn_options.get("loss", "mse")
    # lr 1e-3 for both optimizers: hundreds of timed steps on one batch must stay finite (at EGN's
    # full step the Adam-metric runs diverge on a batch they keep fitting); a step's cost does not
    # depend on lr
    optimizers = {label: pkg.EGN(copy.deepcopy(model), lr=1e-3, **egn_options) for label, pkg in packages.items()}
    timed = egn_fast.EGN(copy.deepcopy(model), lr=1e-3, timings=True, **egn_options)
    first = torch.optim.SGD(model.parameters(), lr=1e-3) if baseline_opt == "SGD" else torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss_of() -> Tensor:
        out = model(x)
        if loss == "mse":
            return 0.5 * (out - y).square().sum(1).mean()
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    return Case(
        name, what, target,
        egn={label: partial(opt.step, x, y) for label, opt in optimizers.items()},
        baseline=_first_order(model, loss_of, first), baseline_name=f"{baseline_opt} step",
        stages=lambda: timed.step(x, y).timings,
        calls=calls,
    )


def cases(quick: bool, packages: dict[str, ModuleType]) -> list[Case]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    out: list[Case] = []
    paper = _mlp([8, 32, 64, 32, 1], nn.ReLU)
    x, y = torch.randn(128, 8, generator=g), torch.randn(128, 1, generator=g)
    out.append(_direction_case("paper_mlp_direction", "direction, MLP 8-32-64-32-1, b 128, mse", 3.0, paper, x, y, "mse", 300, packages))
    out.append(_step_case("paper_mlp_step", "EGN.step, MLP 8-32-64-32-1, b 128, mse", 3.5, paper, x, y, {"loss": "mse"}, "SGD", 300, packages))
    wide = _mlp([784, 256, 256, 10], nn.Tanh)
    x, y = torch.randn(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g)
    out.append(_direction_case("mlp784_direction", "direction, MLP 784-256-256-10, b 64, cross_entropy", 7.0, wide, x, y,
                               "cross_entropy", 60, packages))
    gpt = CharGPT(64, d=128, layers=2, heads=4, T=64)
    ids, nxt = torch.randint(0, 64, (16, 64), generator=g), torch.randint(0, 64, (16, 64), generator=g)
    mc = {"loss": "cross_entropy", "curvature": "mc", "mc_samples": 1, "generator": torch.Generator().manual_seed(1)}
    out.append(_step_case("char_gpt_mc", "EGN mc k=1 step, char-GPT 2×128, T 64, b 16", 1.6, gpt, ids, nxt, mc, "AdamW", 12, packages))
    out.append(_step_case("char_gpt_adam_metric", "EGN mc + Adam metric step, char-GPT", 2.0, gpt, ids, nxt,
                          {**mc, "generator": torch.Generator().manual_seed(2), "metric": "adam"}, "AdamW", 12, packages))
    if not quick:
        big = CharGPT(256, d=256, layers=6, heads=4, T=256)
        ids, nxt = torch.randint(0, 256, (8, 256), generator=g), torch.randint(0, 256, (8, 256), generator=g)
        out.append(_step_case("gpt_mc", f"EGN mc k=1 step, GPT {sum(p.numel() for p in big.parameters()) / 1e6:.1f}M, T 256, b 8",
                              1.3, big, ids, nxt, {**mc, "generator": torch.Generator().manual_seed(3)}, "AdamW", 6, packages))
    review = ReviewClassifier(96, 5, 96, 64, 1, 4, 64)
    ids, labels = torch.randint(0, 96, (32, 64), generator=g), torch.randint(0, 5, (32,), generator=g)
    out.append(_step_case("review_exact", "EGN exact step, 5-class review classifier, b 32", 4.0, review, ids, labels,
                          {"loss": "cross_entropy"}, "AdamW", 12, packages))
    return out


def run_case(case: Case, quick: bool) -> dict:
    calls = max(3, case.calls // (5 if quick else 1))
    samples = time_methods({**case.egn, "baseline": case.baseline}, calls, 2, case.name)
    stage_runs = [case.stages() for _ in range(max(3, calls // 3))]
    stages = {k: statistics.median(r.get(k, 0.0) for r in stage_runs) * 1e3 for k in STAGES if any(k in r for r in stage_runs)}
    base_ms = samples["baseline"].median
    result = {"case": case.name, "what": case.what, "baseline": case.baseline_name, "baseline_ms": base_ms, "target": case.target,
              "stages_ms": stages, "calls": calls}
    for label in case.egn:  # "egn" (this tree) and, with --before, "before"
        ms = samples[label].median
        result.update({f"{label}_ms": ms, f"{label}_ratio" if label != "egn" else "ratio": ms / base_ms})
    result["met"] = result["ratio"] <= case.target
    return result


def write_report(results: list[dict], info: dict, out: Path, suffix: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"step_overhead_cpu{suffix}.json").write_text(json.dumps({"machine": info, "cases": results}, indent=2) + "\n")
    before = info.get("before")
    lines = [
        "# EGN step vs first-order step on the CPU (per-step overhead)", "",
        f"{info['cpu']}, {info['torch_threads']} torch threads, torch {info['torch']}"
        f"{', egn_fast.reuse_cpu_memory()' if info['reuse_cpu_memory'] else ', default glibc malloc settings'}. float32, random inputs; medians "
        "of calls timed side by side in one process (3 alternating rounds). Stage times from separate calls "
        "with `timings=True`." + (f" *before*: egn_fast at {before}, timed in the same rounds." if before else ""), "",
        "| case | egn_fast ms | baseline | baseline ms | ratio | target | met |" + (" before ms | before ratio |" if before else ""),
        "|---|---:|---|---:|---:|---:|---|" + ("---:|---:|" if before else ""),
    ]
    for r in results:
        lines.append(f"| {r['what']} | {r['egn_ms']:.3f} | {r['baseline']} | {r['baseline_ms']:.3f} | {r['ratio']:.2f}× | "
                     f"≤ {r['target']}× | {'yes' if r['met'] else '**no**'} |"
                     + (f" {r['before_ms']:.3f} | {r['before_ratio']:.2f}× |" if before else ""))
    lines += ["", "Stages of this egn_fast (ms, median):", "", "| case | " + " | ".join(STAGES) + " |", "|---|" + "---:|" * len(STAGES)]
    for r in results:
        lines.append(f"| {r['case']} | " + " | ".join(f"{r['stages_ms'][k]:.2f}" if k in r["stages_ms"] else "" for k in STAGES) + " |")
    (out / f"step_overhead_cpu{suffix}.md").write_text("\n".join(lines) + "\n")


def load_before(tree: Path) -> ModuleType:
    """The egn_fast package of another source tree (an earlier commit's checkout), importable
    beside this one as `egn_fast_before`: a copy of its package folder under that name (its
    imports are relative; its compiled extension is left out, as the CPU does not use it)."""
    source = tree / "egn_fast"
    if not (source / "__init__.py").exists():
        raise SystemExit(f"--before: {tree} has no egn_fast/ package")
    absolute = [p for p in source.rglob("*.py") if re.search(r"^\s*(from|import) egn_fast\b", p.read_text(), re.M)]
    if absolute:
        raise SystemExit(f"--before: {absolute[0]} imports egn_fast by its absolute name; it cannot be loaded beside this one")
    root = Path(tempfile.mkdtemp(prefix="egn_fast_before_"))
    atexit.register(shutil.rmtree, root, True)  # the copy lives as long as this process
    shutil.copytree(source, root / "egn_fast_before", ignore=shutil.ignore_patterns("__pycache__", "_C*.so"))
    sys.path.insert(0, str(root))
    return importlib.import_module("egn_fast_before")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls, no 4.9M GPT")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--only", default="", help="comma list of case names to run (default: all)")
    parser.add_argument("--before", type=Path, default=None,
                        help="a source tree of an earlier egn_fast (e.g. a `git worktree` of a commit): timed in the same rounds")
    parser.add_argument("--reuse-cpu-memory", action="store_true",
                        help="call egn_fast.reuse_cpu_memory() first (glibc keeps freed blocks); results get the suffix _reuse_cpu_memory")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.reuse_cpu_memory and not egn_fast.reuse_cpu_memory():
        raise SystemExit("egn_fast.reuse_cpu_memory() is not available here (not glibc)")
    torch.set_num_threads(args.threads)
    packages = {"egn": egn_fast}
    if args.before is not None:
        packages["before"] = load_before(args.before)
    only = {n for n in args.only.split(",") if n}
    selected = [c for c in cases(args.quick, packages) if not only or c.name in only]
    if only - {c.name for c in selected}:
        raise SystemExit(f"unknown case(s): {sorted(only - {c.name for c in selected})}")
    results = [run_case(c, args.quick) for c in selected]
    info = {**machine_info(), "reuse_cpu_memory": args.reuse_cpu_memory}
    if args.before is not None:
        info["before"] = _describe(args.before)
    write_report(results, info, args.out, "_reuse_cpu_memory" if args.reuse_cpu_memory else "")
    for r in results:
        before = f"; before {r['before_ratio']:.2f}×" if "before_ratio" in r else ""
        print(f"{r['case']:22s} {r['egn_ms']:9.3f} ms / {r['baseline_ms']:9.3f} ms = {r['ratio']:.2f}× (target ≤ {r['target']}×){before}")
    return 0


def _describe(tree: Path) -> str:
    """The tree's commit (short hash) when it is a git checkout, else its path."""
    try:
        return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(tree)


if __name__ == "__main__":
    raise SystemExit(main())
