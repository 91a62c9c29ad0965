"""torch.compile and EGN on the CPU: an EGN step on a compiled model against the eager one, and
what compiling egn_fast's own row-space stages (Gram, solve, back-projection) buys.

1. **Model compiled.** Two copies of the same model (float32), one as it is and one through
   `torch.compile(model)` (inductor, the default backend), each with its own `egn_fast.EGN`
   (Armijo line search). egn_fast's capture runs the eager forward of a compiled model
   (egn_fast/capture/compiled.py); the line search's trial losses run the compiled forward. Timed,
   alternating call by call in one process after warm-up: a plain forward, forward + backward
   (what an SGD step pays) and one EGN step; the report gives the medians and compiled / eager.
   The first step's directions of both copies are compared (relative error).
2. **Row-space stages compiled.** On one system of the same model (`build_system`), each stage as
   a function of tensors, eager and through `torch.compile` (inductor): the Gram (K from the
   layer factors), the damped Cholesky solve (K + bλI)γ = w (egn_fast.system.solve.damped_solve),
   the back-projection d = −J̃ᵀγ. Timed alternating, medians; compile time and relative error
   of each compiled stage against the eager one.

Models: an MLP 784-256-256-10 (b = 64, cross-entropy, exact rows: m = 64·9) and a GPT-like char
model (`tests/token_models.TinyGPT`: V = 64, d = 64, 2 blocks, T = 32, b = 8, per-token
cross-entropy with Monte-Carlo rows, k = 2).

    PYTHONPATH=. .venv/bin/python benchmarks/compile.py [--quick] [--repeats N] [--threads 1]

Writes <out>/compile_cpu.{json,md} (default out: benchmarks/results). CPU numbers only.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import egn_fast
from egn_fast.ops import get_backend
from egn_fast.system.solve import damped_solve

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import REPO, machine_info, rel_err  # noqa: E402
from token_models import TinyGPT, token_data  # noqa: E402

SEED = 0
DAMPING = 1.0


def mlp_case() -> dict:
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    return {"name": "mlp 784-256-256-10, b=64, exact CE", "model": model, "x": x, "y": y,
            "loss": lambda f, t: F.cross_entropy(f, t), "options": {}}


def gpt_case() -> dict:
    torch.manual_seed(SEED)
    model = TinyGPT(vocab=64, d=64, layers=2, heads=4, T=32)
    ids, y = token_data(8, 32, 64, SEED, ignored=0)
    return {"name": "TinyGPT V=64 d=64 2 blocks T=32, b=8, per-token CE, mc k=2", "model": model, "x": ids, "y": y,
            "loss": lambda f, t: F.cross_entropy(f.reshape(-1, f.shape[-1]), t.reshape(-1)),
            "options": {"curvature": "mc", "mc_samples": 2}}


def alternate(methods: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Warm-up calls of every method, then `repeats` rounds of one timed call of each in turn (ms)."""
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    ms: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(repeats):
        for k, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            ms[k].append((time.perf_counter() - t0) * 1e3)
    return ms


def quartiles(ms: list[float]) -> list[float]:
    """The 25th and 75th percentiles: how much the calls spread (the machine is shared)."""
    q = statistics.quantiles(ms, n=4)
    return [q[0], q[2]]


def spread(row: dict, k: str, digits: int) -> str:
    lo, hi = row[f"{k}_quartiles"]
    return f"{row[k]:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def compile_seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def model_part(case: dict, repeats: int, warmup: int) -> dict:
    """Plain forward, forward + backward and one EGN step: eager model against compiled model."""
    eager = case["model"]
    compiled = torch.compile(copy.deepcopy(eager))
    x, y, loss = case["x"], case["y"], case["loss"]
    first_compile = compile_seconds(lambda: compiled(x))
    opts = {k: egn_fast.EGN(m, loss="cross_entropy", damping=DAMPING, line_search="armijo",
                            generator=torch.Generator().manual_seed(SEED), **case["options"])
            for k, m in (("eager", eager), ("compiled", compiled))}
    # the first step's directions, same parameters and same draws
    dirs = {k: egn_fast.direction(m, x, y, loss="cross_entropy", damping=DAMPING,
                                  generator=torch.Generator().manual_seed(SEED), **case["options"])
            for k, m in (("eager", eager), ("compiled", compiled))}
    err = rel_err(dirs["compiled"], dirs["eager"])

    def fwd_bwd(m: nn.Module) -> None:
        loss(m(x), y).backward()
        m.zero_grad(set_to_none=True)

    rows = {}
    for what, fns in {
        "forward": {k: (lambda m=m: m(x)) for k, m in (("eager", eager), ("compiled", compiled))},
        "forward + backward": {k: (lambda m=m: fwd_bwd(m)) for k, m in (("eager", eager), ("compiled", compiled))},
        "EGN step": {k: (lambda o=o: o.step(x, y)) for k, o in opts.items()},
    }.items():
        with torch.no_grad() if what == "forward" else torch.enable_grad():
            ms = alternate(fns, repeats, warmup)
        rows[what] = {**{k: statistics.median(v) for k, v in ms.items()}, **{f"{k}_quartiles": quartiles(v) for k, v in ms.items()}}
        rows[what]["ratio"] = rows[what]["compiled"] / rows[what]["eager"]
    return {"first_compile_s": first_compile, "direction_rel_err": err, "ms": rows}


def stages_part(case: dict, repeats: int, warmup: int) -> dict:
    """Gram, solve and back-projection of one system: eager against torch.compile (inductor)."""
    model, x, y = case["model"], case["x"], case["y"]
    system = egn_fast.build_system(model, x, y, loss="cross_entropy", backend="torch",
                                   generator=torch.Generator().manual_seed(SEED), **case["options"])
    ops = get_backend("torch", system.w.device)
    m = system.w.shape[0]

    def gram() -> Tensor:
        K = torch.zeros(m, m, dtype=system.w.dtype)
        for f in system.factors:
            f.add_gram(K, ops)
        return K

    def solve() -> Tensor:
        return damped_solve(system.K, system.w, system.b * DAMPING, ops).gamma

    gamma = solve()

    def backproject() -> list[Tensor]:
        return system.backproject(gamma)

    out = {"m": m}
    for name, fn in (("gram", gram), ("solve", solve), ("backproject", backproject)):
        torch._dynamo.reset()
        compiled = torch.compile(fn)
        try:
            seconds = compile_seconds(compiled)
            err = rel_err(compiled(), fn())
        except Exception as exc:  # a stage inductor cannot compile is reported, not hidden
            out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            continue
        ms = alternate({"eager": fn, "compiled": compiled}, repeats, warmup)
        med = {k: statistics.median(v) for k, v in ms.items()}
        out[name] = {**med, **{f"{k}_quartiles": quartiles(v) for k, v in ms.items()},
                     "ratio": med["compiled"] / med["eager"], "compile_s": seconds, "rel_err": err}
    return out


def write_markdown(path: Path, result: dict) -> None:
    info = result["machine"]
    lines = [
        "# torch.compile and EGN (CPU)",
        "",
        f"{info['cpu']}, {info['torch_threads']} torch threads, torch {info['torch']}, float32, inductor (the default "
        f"backend). Medians of {result['repeats']} calls per method, the methods alternating call by call after "
        f"{result['warmup']} warm-up calls each, in one process; compile times with inductor's caches off. Ratio = compiled / eager (< 1: compiling is faster). "
        f"Load average (1 min) before/after: {result['load'][0]:.1f}/{result['load'][1]:.1f} (a shared machine). "
        f"Run time {result['seconds']:.0f} s. `benchmarks/compile.py`.",
        "",
        "egn_fast captures a compiled model by running its eager forward (docs/design.md, \"Compiled models\"); the "
        "EGN step's line-search losses run the compiled forward.",
        "",
        "## EGN step on a compiled model",
        "",
        "| model | what | eager ms (p25–p75) | compiled ms (p25–p75) | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for case in result["cases"]:
        for what, row in case["model"]["ms"].items():
            lines.append(f"| {case['name']} | {what} | {spread(row, 'eager', 2)} | {spread(row, 'compiled', 2)} | {row['ratio']:.2f} |")
    lines += ["", "| model | first compile s | first direction, compiled vs eager (rel err) |", "|---|---:|---:|"]
    for case in result["cases"]:
        lines.append(f"| {case['name']} | {case['model']['first_compile_s']:.1f} | {case['model']['direction_rel_err']:.1e} |")
    lines += ["", "## Row-space stages compiled (torch.compile of egn_fast's own Gram / solve / back-projection)", "",
              "| model | m | stage | eager ms (p25–p75) | compiled ms (p25–p75) | ratio | compile s | rel err |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    for case in result["cases"]:
        st = case["stages"]
        for stage in ("gram", "solve", "backproject"):
            row = st[stage]
            if "error" in row:
                lines.append(f"| {case['name']} | {st['m']} | {stage} | — | failed: {row['error']} | | | |")
                continue
            lines.append(f"| {case['name']} | {st['m']} | {stage} | {spread(row, 'eager', 3)} | {spread(row, 'compiled', 3)} | "
                         f"{row['ratio']:.2f} | {row['compile_s']:.1f} | {row['rel_err']:.1e} |")
    lines += ["", "## Verdict", "", result["verdict"], ""]
    path.write_text("\n".join(lines))


def verdict(cases: list[dict]) -> str:
    step = ", ".join(f"{c['model']['ms']['EGN step']['ratio']:.2f}" for c in cases)
    ratios = [c["stages"][s].get("ratio", float("nan")) for c in cases for s in ("gram", "solve", "backproject")]
    stages = ", ".join(f"{s} {r:.2f}" for s, r in zip(("gram", "solve", "backproject") * len(cases), ratios))
    if all(r < 0.95 for r in ratios):
        word = "compiling them pays on every stage measured"
    elif all(r > 1.05 for r in ratios):
        word = "compiling them slows every stage measured"
    else:
        word = "no consistent gain (faster on some stages, slower on others), so egn_fast leaves them eager"
    return (f"EGN step compiled / eager: {step} (MLP, TinyGPT). The step's capture, batched backward, Gram and "
            f"solve run eagerly either way, so compiling the model can only speed up the forwards the line search "
            f"runs. Compiled row-space stages / eager: {stages} (MLP, then TinyGPT): {word}. These stages are a "
            f"few large GEMMs and a Cholesky solve already in ATen kernels, with Python control flow (the jitter "
            f"retry, per-layer factor types) that splits the graph; each costs seconds to compile.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per method (default 41, 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 timed calls, 1 warm-up")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine more threads than free cores spin)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._inductor.config.force_disable_caches = True  # compile times from scratch, not from the disk cache
    repeats = args.repeats or (3 if args.quick else 41)
    warmup = 1 if args.quick else 3
    start, load = time.perf_counter(), os.getloadavg()[0]
    cases = []
    for make in (mlp_case, gpt_case):
        case = make()
        print(case["name"], flush=True)
        cases.append({"name": case["name"], "model": model_part(case, repeats, warmup),
                      "stages": stages_part(make(), repeats, warmup)})
    result = {"machine": machine_info(), "device": "cpu", "repeats": repeats, "warmup": warmup, "cases": cases,
              "seconds": time.perf_counter() - start,
              "load": [load, os.getloadavg()[0]]}
    result["verdict"] = verdict(cases)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_cpu.json").write_text(json.dumps(result, indent=2))
    write_markdown(args.out / "compile_cpu.md", result)
    print((args.out / "compile_cpu.md").read_text())


if __name__ == "__main__":
    main()
