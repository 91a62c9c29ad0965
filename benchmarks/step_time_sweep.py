"""CPU step time, peak memory and direction error vs batch size and classes: egn_fast vs its peers.

MLP 784-32-32-c tanh on Fashion-MNIST, cross_entropy, float32, damping λ = 1, for b = 16…1024
and c ∈ {2, 10}. At each (b, c) every method runs on the same model and mini-batch, side by side
in one process: egn, egn_step (a full `egn_fast.EGN` step), sgd, adam, matJ and, when it
imports, the authors' JAX library somax (all in step_time_methods.py). Per method: the median
step time, the peak resident-set increase of one call, and the direction's relative error
against a float64 oracle; slow methods are capped by recorded skip rules (the constants below,
benchmarks/README.md). The three fixed cases with targets are step_time.py.

    PYTHONPATH=. .venv/bin/python benchmarks/step_time_sweep.py            # the full grid
    PYTHONPATH=. .venv/bin/python benchmarks/step_time_sweep.py --quick    # smoke run: b 16, 64, 256; c = 10

Writes <out>/step_time_sweep_cpu.{json,md,png} (default out: benchmarks/results;
step_time_sweep_cpu_reuse_cpu_memory.* with --reuse-cpu-memory).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from egn_fast.cli.training import make_mlp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import datasets  # noqa: E402  (benchmarks/datasets.py)
from common import (  # noqa: E402
    ROUNDS, add_cpu_run_options, machine_info, peak_rss_increase, rel_err, start_cpu_run, time_methods,
)
from step_time_methods import (  # noqa: E402
    DAMPING, SEED, Case, Method, make_method, oracle_direction, oracle_loss_factor, rows_per_sample, somax_missing,
    somax_version, trainable,
)

# The grid, the methods (in the report's column order) and the rules that cap slow methods
# (each skip is recorded with its reason).
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


def fashion_mnist_pool(data_dir: Path | None, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor, str]:
    """n random training images of Fashion-MNIST, flattened and standardized per pixel with the
    training split's mean and std; random data (with a printed note) when the file is missing.
    Returns X (n, 784) float32, y (n,) int64 in 0..9, the data name."""
    if datasets.data_file(data_dir, "fashion_mnist.npz") is None:
        arrays = ("X_train", "y_train", "X_test", "y_test")
        print(f"note: {datasets.missing(data_dir, 'fashion_mnist.npz', arrays)}; the sweep uses random data")
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


# --------------------------------------------------------------------------- one point of the sweep


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

# --------------------------------------------------------------------------- report

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
                        help="the most timed calls per method and point (default 30; 6 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="few repeats, one warm-up call, and the small grid (b 16, 64, 256; c = 10)")
    add_cpu_run_options(parser, "fashion_mnist.npz")
    parser.add_argument("--batches", type=lambda t: [int(x) for x in t.split(",")], default=None,
                        help="batch sizes, comma-separated (default 16,32,…,1024; 16,64,256 with --quick)")
    parser.add_argument("--classes", type=lambda t: [int(x) for x in t.split(",")], default=None,
                        help="class counts, comma-separated (default 2,10; 10 with --quick)")
    args = parser.parse_args()
    repeats, warmup, suffix = start_cpu_run(args)
    started = time.perf_counter()

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
