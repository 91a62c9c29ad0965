"""CPU step time and memory: egn_fast's EGN direction vs SGD, Adam, materialized J and somax.

Two parts, each timed side by side in one process on the same model and mini-batch (float32,
damping λ = 1):

Fixed cases (three models, with targets):

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

Sweep (b = 16…1024, c ∈ {2, 10}; MLP 784-32-32-c tanh on Fashion-MNIST, cross_entropy): egn,
egn_step (a full `egn_fast.EGN` step), sgd, adam, matJ and, when it imports, the authors' JAX
library somax; per method the median step time, the peak resident-set increase of one call, and
the direction's relative error against a float64 oracle; slow methods are capped by recorded
skip rules (SWEEP section below, benchmarks/README.md).

    PYTHONPATH=. .venv/bin/python benchmarks/step_time.py            # full run: fixed cases + sweep
    PYTHONPATH=. .venv/bin/python benchmarks/step_time.py --quick    # smoke run: + small sweep

Writes <out>/step_time_cpu.{json,md} and <out>/step_time_sweep_cpu.{json,md,png}
(default out: benchmarks/results).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import gc
import json
import math
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import egn_fast
from egn_fast.losses import resolve_loss
from egn_fast.training import make_mlp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402  (benchmarks/datasets.py)

REPO = Path(__file__).resolve().parents[1]
DAMPING = 1.0
SEED = 0
ROUNDS = 3
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


def california_batch(data_dir: Path, b: int, gen: torch.Generator) -> tuple[Tensor, Tensor, str]:
    """b random rows of California Housing, features and target standardized; random data
    (with a printed note) when the file is missing. Returns X (b, 8), y (b, 1), the data name."""
    path = data_dir / "california_housing.npz"
    if not path.exists():
        print(f"note: {path} not found; the regression case uses random data")
        return torch.randn(b, 8, generator=gen), torch.randn(b, 1, generator=gen), "random"
    with np.load(path) as data:
        X, y = torch.from_numpy(data["X"]).float(), torch.from_numpy(data["y"]).float()
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    rows = torch.randperm(X.shape[0], generator=gen)[:b]
    return X[rows], y[rows, None], "california_housing"


@dataclass
class Case:
    """One benchmark case: a model, a mini-batch and the loss (an egn_fast loss name)."""

    key: str
    title: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor
    loss: str
    data: str


def make_cases(data_dir: Path) -> list[Case]:
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


# --------------------------------------------------------------------------- the three methods


def torch_loss(loss: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """The batch-mean loss in egn_fast's convention (mse: ½‖f − y‖² per sample)."""
    if loss == "mse":
        return 0.5 * (outputs - targets).square().sum(1).mean()
    return F.cross_entropy(outputs, targets)


FIRST_ORDER = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


def make_optimizer_step(case: Case, name: str = "sgd") -> Callable[[], None]:
    """One first-order step (`name` in FIRST_ORDER, lr = 1e-3): zero_grad + forward + loss +
    backward + step, on a private copy of the model (so the other methods see fixed parameters)."""
    model = copy.deepcopy(case.model)
    opt = FIRST_ORDER[name](model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad()
        torch_loss(case.loss, model(case.inputs), case.targets).backward()
        opt.step()

    return step


def egn_direction(case: Case) -> list[Tensor]:
    """egn_fast's direction: the method under test."""
    return egn_fast.direction(case.model, case.inputs, case.targets, loss=case.loss, damping=DAMPING)


def materialized_direction(case: Case) -> list[Tensor]:
    """The EGN direction from a materialized J̃ = SᵀJ (m × d), with the same loss head as egn_fast.

    Rows by `torch.func.jacrev` of θ ↦ (S_iᵀ f_i(θ))_i (S held constant), then K = J̃J̃ᵀ,
    (K + bλI)γ = w by Cholesky, d = −J̃ᵀγ split back into parameter shapes.
    """
    params = {n: p.detach() for n, p in case.model.named_parameters()}
    b = case.inputs.shape[0]

    def outputs(ps: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(case.model, ps, (case.inputs,)).reshape(b, -1)

    with torch.no_grad():
        f = outputs(params)
    loss = resolve_loss(case.loss)
    head = loss.head(f, loss.check_targets(f, case.targets))

    def rows(ps: dict[str, Tensor]) -> Tensor:  # (m,): S_iᵀ f_i for every sample, sample-major
        return torch.einsum("bc,bcs->bs", outputs(ps), head.S).reshape(-1)

    jac = torch.func.jacrev(rows)(params)
    J = torch.cat([jac[n].flatten(1) for n in params], 1)  # (m, d)
    K = J @ J.T
    K.diagonal().add_(b * DAMPING)
    gamma = torch.cholesky_solve(head.w.reshape(-1, 1), torch.linalg.cholesky(K))
    d = -(J.T @ gamma).squeeze(1)
    return [x.view_as(p) for x, p in zip(d.split([p.numel() for p in params.values()]), params.values())]


def rel_err(got: list[Tensor], want: list[Tensor]) -> float:
    """‖got − want‖ / ‖want‖ over all parameters, in float64."""
    g = torch.cat([x.double().reshape(-1) for x in got])
    w = torch.cat([x.double().reshape(-1) for x in want])
    return float((g - w).norm() / w.norm())


# --------------------------------------------------------------------------- timing


@dataclass
class Samples:
    """Wall times (ms) and minor page faults of the timed calls of one method."""

    ms: list[float] = field(default_factory=list)
    faults: int = 0

    def time_calls(self, fn: Callable[[], object], calls: int) -> None:
        """Time `calls` back-to-back calls of fn, one perf_counter interval each."""
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            self.ms.append((time.perf_counter() - t0) * 1e3)
        self.faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    @property
    def median(self) -> float:
        return statistics.median(self.ms)


def time_methods(
    methods: dict[str, Callable[[], object]],
    repeats: int | dict[str, int],
    warmup: int | dict[str, int],
    desc: str,
) -> dict[str, Samples]:
    """ROUNDS rounds; in each, every method gets `warmup` untimed calls, then its share of
    `repeats` timed calls back to back (warm caches, as in a training loop). Rounds spread
    slow drift of the machine over all methods alike. `repeats` and `warmup` are one number for
    all methods or one per method (the sweep gives slow methods fewer calls)."""
    repeats = repeats if isinstance(repeats, dict) else dict.fromkeys(methods, repeats)
    warmup = warmup if isinstance(warmup, dict) else dict.fromkeys(methods, warmup)
    samples = {k: Samples() for k in methods}
    with tqdm(total=ROUNDS * len(methods), desc=desc, leave=False) as bar:
        for _ in range(ROUNDS):
            for k, fn in methods.items():
                for _ in range(warmup[k]):
                    fn()
                samples[k].time_calls(fn, math.ceil(repeats[k] / ROUNDS))
                bar.update()
    return samples


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


def machine_info() -> dict:
    """Platform, CPU model, torch version and thread count."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


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


# --------------------------------------------------------------------------- SWEEP: peers vs b and c
#
# MLP 784-32-32-c (tanh), cross_entropy, Fashion-MNIST images; every method on the same model
# and mini-batch at each (b, c), with peak memory and the direction's error against a float64
# oracle. Slow methods are capped by the rules below (each skip is recorded with its reason).

SWEEP_BATCHES = (16, 32, 64, 128, 256, 512, 1024)
SWEEP_CLASSES = (2, 10)
QUICK_SWEEP_BATCHES = (16, 64, 256)
QUICK_SWEEP_CLASSES = (10,)
SWEEP_HIDDEN = (32, 32)
SWEEP_METHODS = ("egn", "egn_step", "sgd", "adam", "matJ", "somax")
REPORT_B = 256  # the batch size of the ratio sentences (or the nearest one below it in the sweep)
MATJ_MAX_BYTES = 128 << 20  # matJ runs only where its float32 J̃ (m × d) fits in this
ORACLE_MAX_BYTES = 256 << 20  # the oracle runs only where its float64 J̃ (m × d) fits in this
MAX_CALL_S = 3.0  # a method whose median call takes longer is skipped at the larger b (same c)
CALL_BUDGET_S = 1.0  # timed calls per method and point: about this many seconds' worth ...
MIN_REPEATS = 3  # ... but at least this many (and at most --repeats)
SLOW_PROBE_S = 0.25  # methods slower than this get no warm-up calls per round (the probe warmed them)


def fashion_mnist_pool(data_dir: Path, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor, str]:
    """n random training images of Fashion-MNIST, flattened and standardized per pixel with the
    training split's mean and std; random data (with a printed note) when the file is missing.
    Returns X (n, 784) float32, y (n,) int64 in 0..9, the data name."""
    path = data_dir / "fashion_mnist.npz"
    if not path.exists():
        print(f"note: {path} not found; the sweep uses random data")
        return torch.randn(n, 784, generator=gen), torch.randint(0, 10, (n,), generator=gen), "random"
    data = datasets.fashion_mnist(data_dir)
    rows = torch.randperm(len(data.X_train), generator=gen)[:n]
    return data.X_train[rows], data.y_train[rows], "fashion_mnist"


def sweep_case(X: Tensor, y: Tensor, b: int, classes: int, hidden: tuple[int, ...], data: str) -> Case:
    """The first b rows of the pool X (n, features), labels relabeled y mod c, and a fresh MLP."""
    model = make_mlp(X.shape[1], hidden, classes, SEED)  # tanh, torch's default init
    arch = "-".join(str(w) for w in (X.shape[1], *hidden, classes))
    return Case(f"c{classes}_b{b}", f"MLP {arch} tanh, b={b}, cross_entropy", model,
                X[:b].contiguous(), y[:b] % classes, "cross_entropy", data)


def rows_per_sample(case: Case) -> int:
    """s, the rows of J̃ per sample of egn_fast's (and matJ's) system: c − 1 for cross-entropy."""
    with torch.no_grad():
        f = case.model(case.inputs).reshape(case.inputs.shape[0], -1)
    loss = resolve_loss(case.loss)
    return loss.head(f, loss.check_targets(f, case.targets)).S.shape[2]


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with requires_grad, in model order (the order of every direction)."""
    return [p for p in model.parameters() if p.requires_grad]


def step_change(params: list[Tensor], before: list[Tensor]) -> list[Tensor]:
    """θ' − θ per parameter: the direction of a step taken with lr = 1 (float32 rounding of θ
    adds about 1e-7·‖θ‖/‖d‖ to its relative error)."""
    return [p.detach() - q for p, q in zip(params, before)]


def make_egn_step(case: Case) -> Callable[[], object]:
    """One `egn_fast.EGN` optimizer step (forward, direction, update; lr = 1, λ = DAMPING, no
    line search or momentum) on a private copy of the model."""
    model = copy.deepcopy(case.model)
    opt = egn_fast.EGN(model, loss=case.loss, lr=1.0, damping=DAMPING)
    return lambda: opt.step(case.inputs, case.targets)


def egn_step_direction(case: Case) -> list[Tensor]:
    """The change of the parameters by one fresh EGN step with lr = 1 (= its direction)."""
    model = copy.deepcopy(case.model)
    before = [p.detach().clone() for p in trainable(model)]
    egn_fast.EGN(model, loss=case.loss, lr=1.0, damping=DAMPING).step(case.inputs, case.targets)
    return step_change(trainable(model), before)


# The oracle: per-sample loss functions ℓ(f_i, y_i) in egn_fast's conventions, in plain torch.
ORACLE_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross_entropy": lambda f, y: F.cross_entropy(f, y),
    "mse": lambda f, y: 0.5 * (f - y).square().sum(),
}


def oracle_loss_factor(case: Case) -> tuple[Tensor, Tensor]:
    """S (b, c, s) and w (b, s) with S_i S_iᵀ = Q_i and S_i w_i = r_i, in float64, independent of
    egn_fast: r_i = ∂ℓ_i/∂f_i and Q_i = ∂²ℓ_i/∂f_i² by autograd of ORACLE_LOSSES, Q_i = U Λ Uᵀ by
    eigh; S_i = U Λ^½ without the eigen-directions that are null for every sample (the softmax
    Hessian's all-ones vector), w_i = Λ^-½ Uᵀ r_i (0 where λ is 0)."""
    per_sample = ORACLE_LOSSES[case.loss]
    model = copy.deepcopy(case.model).double()
    with torch.no_grad():
        f = model(case.inputs.double()).reshape(case.inputs.shape[0], -1)
    y = case.targets.double().reshape(f.shape) if case.targets.is_floating_point() else case.targets
    r = torch.func.vmap(torch.func.grad(per_sample))(f, y)  # (b, c)
    Q = torch.func.vmap(torch.func.hessian(per_sample))(f, y)  # (b, c, c)
    evals, evecs = torch.linalg.eigh(Q)  # ascending
    tol = 1e-12 * float(evals.max())
    null = int((evals <= tol).all(0).sum())  # leading columns null for every sample
    evals, evecs = evals[:, null:], evecs[:, :, null:]
    root = evals.clamp_min(0).sqrt()
    w = torch.where(evals > tol, (evecs.mT @ r[..., None])[..., 0] / root.clamp_min(tol), 0.0)
    return evecs * root[:, None, :], w


def oracle_direction(case: Case, S: Tensor, w: Tensor) -> list[Tensor]:
    """The LM direction d = −(H + λI)⁻¹g, H = (1/b)JᵀQJ, g = (1/b)Jᵀr, in float64 from a
    materialized J̃ = SᵀJ (m = b·s rows; per-sample Jacobians by vmap of jacrev), through the
    identity d = −J̃ᵀ(J̃J̃ᵀ + bλI)⁻¹w (exact; the d × d system would not fit), Cholesky in float64.
    S, w from `oracle_loss_factor`."""
    model = copy.deepcopy(case.model).double()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    b, s = w.shape

    def rows(ps: dict[str, Tensor], x: Tensor, S_i: Tensor) -> Tensor:  # (s,): S_iᵀ f_i
        return S_i.T @ torch.func.functional_call(model, ps, (x[None],)).reshape(-1)

    jac = torch.func.vmap(torch.func.jacrev(rows), in_dims=(None, 0, 0))(params, case.inputs.double(), S)
    J = torch.cat([jac[n].reshape(b * s, -1) for n in params], 1)  # (m, d), sample-major
    K = J @ J.T
    K.diagonal().add_(b * DAMPING)
    gamma = torch.cholesky_solve(w.reshape(-1, 1), torch.linalg.cholesky(K))
    d = -(J.T @ gamma).squeeze(1)
    return list(d.split([p.numel() for p in params.values()]))


def somax_missing() -> str | None:
    """None when somax (python-somax) and JAX import, else why not."""
    try:
        import jax  # noqa: F401
        import somax  # noqa: F401
    except Exception as err:  # ImportError, or a broken JAX install
        return f"somax: not installed, not measured ({type(err).__name__}: {err})"
    return None


def somax_version() -> str | None:
    """'python-somax X, jax Y' when both import, else None."""
    if somax_missing():
        return None
    import jax
    import somax

    return f"python-somax {somax.__version__}, jax {jax.__version__}"


def make_somax(case: Case) -> tuple[Callable[[], object], Callable[[], list[Tensor]]]:
    """The authors' library on the same network, weights and batch: `somax.egn_ce` (EGN for
    softmax cross-entropy, row-space Cholesky, λ = DAMPING, learning_rate 1, JAX on the CPU,
    float32). Returns (one jitted `method.step` from the initial weights, blocked until done;
    its direction θ' − θ as torch tensors in the model's parameter order).

    Its conventions match egn_fast's: mean loss, μ = bλ in the row space, update −lr·J̃ᵀu.
    Differences: somax factors Q_i + 1e-6·I (c rows per sample, m = b·c) and builds
    K by m JVP/VJP pairs. Only nn.Sequential of nn.Linear and nn.Tanh is translated.
    """
    import jax
    import jax.numpy as jnp
    import somax

    if case.loss != "cross_entropy":
        raise ValueError("make_somax: only cross_entropy is wired up")
    linears = [m for m in case.model if isinstance(m, nn.Linear)]
    if not all(isinstance(m, (nn.Linear, nn.Tanh)) for m in case.model):
        raise ValueError("make_somax: only nn.Sequential of nn.Linear and nn.Tanh is translated")
    params = {f"{i}": {"W": jnp.asarray(m.weight.detach().T.numpy()), "b": jnp.asarray(m.bias.detach().numpy())}
              for i, m in enumerate(linears)}

    def predict(ps: dict, x: jax.Array) -> jax.Array:  # (b, features) -> logits (b, c)
        for i in range(len(linears)):
            x = x @ ps[f"{i}"]["W"] + ps[f"{i}"]["b"]
            if i < len(linears) - 1:
                x = jnp.tanh(x)
        return x

    method = somax.egn_ce(predict_fn=predict, lam0=DAMPING, learning_rate=1.0)
    state = method.init(params)
    batch = {"x": jnp.asarray(case.inputs.numpy()), "y": jnp.asarray(case.targets.numpy().astype(np.int32))}
    step = jax.jit(lambda p, st, key: method.step(p, batch, st, key))
    key = jax.random.PRNGKey(SEED)

    def run() -> object:
        return jax.block_until_ready(step(params, state, key))

    def direction() -> list[Tensor]:
        new = run()[0]
        out = []
        for i in range(len(linears)):
            for name, transpose in (("W", True), ("b", False)):
                delta = torch.from_numpy(np.asarray(new[f"{i}"][name]) - np.asarray(params[f"{i}"][name]))
                out.append(delta.T.contiguous() if transpose else delta)
        return out  # weight, bias of each Linear: the model's parameter order

    return run, direction


# --------------------------------------------------------------------------- peak memory of one call


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None


def _status_bytes(field_name: str) -> int:
    """A `kB` line of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field_name)


def peak_rss_increase(fn: Callable[[], object]) -> int | None:
    """Peak resident-set increase (bytes) during one call of fn, or None where the kernel's peak
    cannot be reset. gc.collect() and glibc's malloc_trim(0) first (freed memory goes back to
    the system, so the call must touch fresh pages for what it allocates), then "5" written to
    /proc/self/clear_refs resets VmHWM to the current VmRSS; peak = VmHWM after − VmRSS before.
    Memory a library keeps cached across calls (e.g. a JIT's buffers) is not counted."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _status_bytes("VmRSS")
    result = fn()
    peak = _status_bytes("VmHWM")
    del result
    return peak - before


# --------------------------------------------------------------------------- one point of the sweep


@dataclass
class Method:
    """A method of the sweep: `call` is what is timed; `direction` (None for SGD/Adam) gives its
    direction, like the parameters, for the oracle check."""

    call: Callable[[], object]
    direction: Callable[[], list[Tensor]] | None


def make_method(case: Case, name: str) -> Method:
    """The sweep's method `name` (one of SWEEP_METHODS) on this case."""
    if name == "egn":
        return Method(lambda: egn_direction(case), lambda: egn_direction(case))
    if name == "egn_step":
        return Method(make_egn_step(case), lambda: egn_step_direction(case))
    if name in FIRST_ORDER:
        return Method(make_optimizer_step(case, name), None)
    if name == "matJ":
        return Method(lambda: materialized_direction(case), lambda: materialized_direction(case))
    if name == "somax":
        return Method(*make_somax(case))
    raise ValueError(f"unknown method {name!r}")


def bench_point(case: Case, skipped: dict[str, str], repeats: int, warmup: int) -> dict:
    """Time, peak memory and rel err vs the oracle of every method at one (b, c).

    `skipped` maps methods not to run to the reason. Each runnable method is called once
    (untimed: warm-up, JIT compilation) and once more timed (the probe, t); it then gets
    clamp(⌈CALL_BUDGET_S / t⌉, MIN_REPEATS, repeats) timed calls in ROUNDS rounds, with `warmup`
    untimed calls per round unless t > SLOW_PROBE_S. Then one call each for peak memory, then
    the directions against the oracle.
    """
    b, d = case.inputs.shape[0], sum(p.numel() for p in trainable(case.model))
    s = rows_per_sample(case)
    m = b * s
    result: dict = {"b": b, "c": case.model[-1].out_features, "s": s, "m": m, "params": d,
                    "data": case.data, "title": case.title, "methods": {}}
    status = dict(skipped)
    if "matJ" not in status and m * d * 4 > MATJ_MAX_BYTES:
        status["matJ"] = f"skipped: J would be {m * d * 4 / 1e9:.2f} GB (> {MATJ_MAX_BYTES / 1e9:.2f} GB budget)"
    wanted = [k for k in SWEEP_METHODS if k not in status]
    methods: dict[str, Method] = {}
    for k in wanted:
        try:
            methods[k] = make_method(case, k)
        except Exception as err:  # a peer that fails to set up is reported, not fatal
            status[k] = f"failed: {type(err).__name__}: {err}"

    probe: dict[str, float] = {}
    for k, method in list(methods.items()):
        try:
            method.call()
            t0 = time.perf_counter()
            method.call()
            probe[k] = time.perf_counter() - t0
        except Exception as err:
            status[k] = f"failed: {type(err).__name__}: {err}"
            del methods[k]
    reps = {k: min(repeats, max(MIN_REPEATS, math.ceil(CALL_BUDGET_S / probe[k]))) for k in methods}
    warm = {k: 0 if probe[k] > SLOW_PROBE_S else warmup for k in methods}
    samples = time_methods({k: mth.call for k, mth in methods.items()}, reps, warm, case.key)
    peaks = {k: peak_rss_increase(mth.call) for k, mth in methods.items()}

    S, w = oracle_loss_factor(case)
    oracle_bytes = S.shape[0] * S.shape[2] * d * 8
    if oracle_bytes > ORACLE_MAX_BYTES:
        oracle = None
        result["oracle"] = {"computed": False, "reason": f"skipped: float64 J would be {oracle_bytes / 1e9:.2f} GB "
                            f"(> {ORACLE_MAX_BYTES / 1e9:.2f} GB budget)"}
    else:
        oracle = oracle_direction(case, S, w)
        result["oracle"] = {"computed": True, "rows": S.shape[0] * S.shape[2], "bytes": oracle_bytes}
    del S, w

    for k in SWEEP_METHODS:
        if k not in methods:
            result["methods"][k] = {"status": status[k]}
            continue
        entry = {
            "status": "measured",
            "median_ms": samples[k].median,
            "quartiles_ms": statistics.quantiles(samples[k].ms, n=4)[::2] if len(samples[k].ms) > 1
            else [samples[k].ms[0]] * 2,
            "timed_calls": len(samples[k].ms),
            "probe_ms": probe[k] * 1e3,
            "peak_bytes": peaks[k],
            "rel_err": None,
        }
        if methods[k].direction is not None and oracle is not None:
            entry["rel_err"] = rel_err(methods[k].direction(), oracle)
        result["methods"][k] = entry
    result["ratios"] = point_ratios(result)
    return result


def point_ratios(point: dict) -> dict[str, float]:
    """Quotients of medians: egn and egn_step over sgd and adam; matJ and somax over egn."""
    med = {k: v["median_ms"] for k, v in point["methods"].items() if v["status"] == "measured"}
    pairs = [("egn", "sgd"), ("egn", "adam"), ("egn_step", "sgd"), ("egn_step", "adam"),
             ("matJ", "egn"), ("somax", "egn"), ("somax", "egn_step")]
    return {f"{a}_over_{b}": med[a] / med[b] for a, b in pairs if a in med and b in med}


def run_sweep(X: Tensor, y: Tensor, data: str, batches: list[int], classes: list[int],
              hidden: tuple[int, ...], repeats: int, warmup: int) -> list[dict]:
    """Every (c, b) in order of increasing b per c. A method whose median call exceeded
    MAX_CALL_S is skipped at the larger b of the same c; somax is skipped when it does not import."""
    missing = somax_missing()
    points = []
    with tqdm(total=len(batches) * len(classes), desc="sweep") as bar:
        for c in classes:
            skipped: dict[str, str] = {"somax": missing} if missing else {}
            for b in sorted(batches):
                bar.set_postfix_str(f"c={c} b={b}")
                point = bench_point(sweep_case(X, y, b, c, hidden, data), skipped, repeats, warmup)
                points.append(point)
                for k, v in point["methods"].items():
                    if v["status"] == "measured" and v["median_ms"] > MAX_CALL_S * 1e3:
                        skipped[k] = (f"skipped: {v['median_ms'] / 1e3:.1f} s per call at b={b} "
                                      f"(> {MAX_CALL_S:g} s cap)")
                bar.update()
    return points


# --------------------------------------------------------------------------- sweep report

METHOD_LABELS = {
    "egn": "egn_fast direction",
    "egn_step": "egn_fast EGN step",
    "sgd": "SGD step",
    "adam": "Adam step",
    "matJ": "materialized J",
    "somax": "somax EGN step",
}


def _report_point(points: list[dict], c: int) -> dict:
    """The point of class count c at b = REPORT_B, else the largest b below it, else the smallest."""
    mine = sorted((p for p in points if p["c"] == c), key=lambda p: p["b"])
    below = [p for p in mine if p["b"] <= REPORT_B]
    return below[-1] if below else mine[0]


def than_egn(ratio: float, what: str = "egn_fast") -> str:
    """'3.2× slower than egn_fast' for a time ratio peer/egn ≥ 1, '1.5× faster than egn_fast' below 1."""
    return f"{ratio:.1f}× slower than {what}" if ratio >= 1 else f"{1 / ratio:.1f}× faster than {what}"


def ratio_sentence(points: list[dict], c: int) -> str:
    """'At b=256, c=10: egn_fast direction = N× an SGD step, = M× an Adam step; …' from the medians
    (at REPORT_B, or the nearest b below it); a peer skipped there is quoted at its largest b."""
    p = _report_point(points, c)
    r, meth = p["ratios"], p["methods"]
    parts = []
    if "egn_over_sgd" in r:
        parts.append(f"egn_fast direction = {r['egn_over_sgd']:.1f}× an SGD step")
    if "egn_over_adam" in r:
        parts.append(f"= {r['egn_over_adam']:.1f}× an Adam step")
    if "egn_step_over_sgd" in r:
        parts.append(f"a full EGN optimizer step = {r['egn_step_over_sgd']:.1f}× an SGD step")
    text = f"At b={p['b']}, c={c}: " + (", ".join(parts) or "egn_fast not measured")

    def peer(name: str, label: str) -> str:
        key = f"{name}_over_egn"
        if name == "somax" and "somax_over_egn_step" in r:
            return (f"somax's EGN step = {than_egn(r['somax_over_egn_step'], 'egn_fast.EGN.step')} "
                    f"({than_egn(r[key], 'the egn_fast direction')})")
        if key in r:
            return f"{label} = {than_egn(r[key])}"
        status = meth[name]["status"]
        if status.startswith("somax: not installed"):
            return "somax not installed, not measured"
        ran = [q for q in points if q["c"] == c and key in q["ratios"]]
        where = f"; at b={ran[-1]['b']} it was {than_egn(ran[-1]['ratios'][key])}" if ran else ""
        return f"{label} {status}{where}"

    return f"{text}; {peer('matJ', 'materialized J')}; {peer('somax', 'somax')}."


SOMAX_NOTE = (
    "Note on somax's rel err: python-somax 1.0.1's `egn_ce` factors Q_i + 1e-6·I = L_iL_iᵀ but applies "
    "J̃ = L·J (not LᵀJ), so it solves with the curvature JᵀLᵀLJ instead of the Gauss-Newton JᵀQJ; its "
    "direction matches that formula to float32 precision and differs from the LM direction by the error shown. "
    "Its time is still that of EGN's work (K from m = b·c JVP/VJP pairs, Cholesky, back-projection)."
)


def _number(value: float) -> str:
    """3 significant digits, without exponents: 0.0412, 9.14, 454, 12,345."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _cell(entry: dict, key: str, fmt: Callable[[float], str]) -> str:
    """One table cell: the formatted value, or — for a method not measured or a missing value."""
    if entry["status"] != "measured":
        return "—"
    value = entry.get(key)
    return "—" if value is None else fmt(value)


def sweep_markdown(report: dict) -> str:
    """Per c: step time, peak memory and rel err tables (rows b, columns methods), the ratio
    sentence, and every skip with its reason."""
    mach, st = report["machine"], report["settings"]
    points = report["points"]
    head = "| b | m | " + " | ".join(SWEEP_METHODS) + " |"
    rule = "|---:|---:|" + "---:|" * len(SWEEP_METHODS)
    lines = [
        "# Step time vs batch size: egn_fast and its peers, side by side",
        "",
        f"{mach['cpu']}, {mach['torch_threads']} torch threads, torch {mach['torch']}, {mach['platform']}. "
        f"{st['model']}, cross_entropy, {st['data']} (flattened, standardized; labels y mod c), float32, "
        f"damping {st['damping']}. Medians of ≥ {MIN_REPEATS} timed calls per method "
        f"(about {st['call_budget_s']:g} s of calls, at most {st['repeats']}; {st['rounds']} rounds). "
        + ("glibc malloc tuned by `egn_fast.reuse_cpu_memory()`. " if st["reuse_cpu_memory"] else "")
        + (f"somax: {st['somax']}." if st["somax"] else "somax: not installed, not measured."),
        "",
        "Methods: " + "; ".join(f"`{k}` = {v}" for k, v in METHOD_LABELS.items()) + ". "
        "Peak memory = the resident-set increase of one call; rel err = ‖d − d_oracle‖/‖d_oracle‖ against "
        "the float64 materialized-J direction (— for SGD/Adam, which have none, and where the oracle is skipped).",
        "",
    ]
    for c in sorted({p["c"] for p in points}):
        mine = sorted((p for p in points if p["c"] == c), key=lambda p: p["b"])
        lines += [f"## c = {c}", "", ratio_sentence(points, c), "", "Step time (ms, median):", "", head, rule]
        lines += [f"| {p['b']} | {p['m']} | " + " | ".join(_cell(p["methods"][k], "median_ms", _number)
                  for k in SWEEP_METHODS) + " |" for p in mine]
        lines += ["", "Peak memory of one call (MB):", "", head, rule]
        lines += [f"| {p['b']} | {p['m']} | " + " | ".join(
            _cell(p["methods"][k], "peak_bytes", lambda v: _number(v / 1e6)) for k in SWEEP_METHODS) + " |" for p in mine]
        lines += ["", "Relative error of the direction against the float64 oracle:", "", head, rule]
        lines += [f"| {p['b']} | {p['m']} | " + " | ".join(
            _cell(p["methods"][k], "rel_err", lambda v: f"{v:.1e}") for k in SWEEP_METHODS) + " |" for p in mine]
        notes = [f"- b={p['b']}: {k}: {v['status']}" for p in mine for k, v in p["methods"].items()
                 if v["status"] != "measured" and not v["status"].startswith("somax: not installed")]
        notes += [f"- b={p['b']}: oracle {p['oracle']['reason']}" for p in mine if not p["oracle"]["computed"]]
        if notes:
            lines += ["", "Skipped:", ""] + notes
        lines.append("")
    if any(p["methods"]["somax"]["status"] == "measured" for p in points):
        lines += [SOMAX_NOTE, ""]
    return "\n".join(lines)


def plot_sweep(report: dict, path: Path) -> None:
    """Step time (ms) vs b and peak memory (MB) vs b, log-log, one line per method, one column per c."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report["points"]
    classes = sorted({p["c"] for p in points})
    fig, axes = plt.subplots(2, len(classes), figsize=(5.5 * len(classes), 8), squeeze=False)
    for col, c in enumerate(classes):
        mine = sorted((p for p in points if p["c"] == c), key=lambda p: p["b"])
        for row, (key, scale, ylabel) in enumerate([("median_ms", 1.0, "step time (ms)"),
                                                     ("peak_bytes", 1e-6, "peak memory of one call (MB)")]):
            ax = axes[row][col]
            for k in SWEEP_METHODS:
                xy = [(p["b"], p["methods"][k][key] * scale) for p in mine
                      if p["methods"][k]["status"] == "measured" and p["methods"][k].get(key)]
                if xy:
                    ax.plot(*zip(*xy), marker="o", label=METHOD_LABELS[k])
            ax.set_xscale("log", base=2)
            ax.set_xticks([p["b"] for p in mine], [str(p["b"]) for p in mine])
            ax.minorticks_off()
            ax.set_yscale("log")
            ax.set_xlabel("batch size b")
            ax.set_ylabel(ylabel)
            ax.set_title(f"c = {c}: {ylabel.split(' (')[0]}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"{report['settings']['model']}, {report['settings']['data']}, {report['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_report(points: list[dict], settings: dict) -> dict:
    return {"machine": machine_info(), "settings": settings, "points": points}


def write_sweep(report: dict, stem: Path) -> str:
    """Write stem.json, stem.md and stem.png; return the markdown."""
    table = sweep_markdown(report)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table)
    plot_sweep(report, stem.with_suffix(".png"))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per method and case (default 30; 6 with --quick); the sweep's cap")
    parser.add_argument("--quick", action="store_true",
                        help="few repeats, one warm-up call, and the small sweep (b 16, 64, 256; c = 10)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="output directory")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data",
                        help="directory with california_housing.npz and fashion_mnist.npz (default: ../shared/data from the repo root)")
    parser.add_argument("--reuse-cpu-memory", action="store_true",
                        help="call egn_fast.reuse_cpu_memory() first (glibc keeps freed blocks; applies to every "
                             "method); runs the fixed cases only, unless --sweep-only")
    parser.add_argument("--no-sweep", action="store_true", help="the fixed cases only")
    parser.add_argument("--sweep-only", action="store_true", help="the sweep only")
    parser.add_argument("--batches", type=lambda t: [int(x) for x in t.split(",")], default=None,
                        help="sweep batch sizes, comma-separated (default 16,32,…,1024; 16,64,256 with --quick)")
    parser.add_argument("--classes", type=lambda t: [int(x) for x in t.split(",")], default=None,
                        help="sweep class counts, comma-separated (default 2,10; 10 with --quick)")
    args = parser.parse_args()
    if args.no_sweep and args.sweep_only:
        raise SystemExit("--no-sweep and --sweep-only exclude each other")
    if args.reuse_cpu_memory and not egn_fast.reuse_cpu_memory():
        raise SystemExit("egn_fast.reuse_cpu_memory() is not available here (not glibc)")
    suffix = "_reuse_cpu_memory" if args.reuse_cpu_memory else ""
    repeats = args.repeats or (6 if args.quick else 30)
    warmup = 1 if args.quick else 2
    run_fixed = not args.sweep_only
    run_sweep_now = args.sweep_only or not (args.no_sweep or args.reuse_cpu_memory)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    if run_fixed:
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

    if run_sweep_now:
        batches = args.batches or list(QUICK_SWEEP_BATCHES if args.quick else SWEEP_BATCHES)
        classes = args.classes or list(QUICK_SWEEP_CLASSES if args.quick else SWEEP_CLASSES)
        X, y, data = fashion_mnist_pool(args.data_dir, max(batches), torch.Generator().manual_seed(SEED))
        sweep_started = time.perf_counter()
        points = run_sweep(X, y, data, batches, classes, SWEEP_HIDDEN, repeats, warmup)
        arch = "-".join(str(w) for w in (X.shape[1], *SWEEP_HIDDEN)) + "-c"
        settings = {
            "model": f"MLP {arch} tanh", "data": data, "labels": "y mod c", "dtype": "float32",
            "damping": DAMPING, "batches": batches, "classes": classes, "repeats": repeats,
            "min_repeats": MIN_REPEATS, "call_budget_s": CALL_BUDGET_S, "rounds": ROUNDS, "warmup": warmup,
            "slow_probe_s": SLOW_PROBE_S, "max_call_s": MAX_CALL_S, "matJ_max_bytes": MATJ_MAX_BYTES,
            "oracle_max_bytes": ORACLE_MAX_BYTES, "seed": SEED, "quick": args.quick,
            "reuse_cpu_memory": args.reuse_cpu_memory, "somax": somax_version(),
            "sweep_seconds": time.perf_counter() - sweep_started,
        }
        stem = args.out / f"step_time_sweep_cpu{suffix}"
        print(write_sweep(sweep_report(points, settings), stem))
        print(f"wrote {stem}.json, {stem}.md and {stem}.png")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
