"""Does the per-layer cost model `choose_seq_method` pick the faster Gram method for GPT-like layers?

A linear layer applied at T positions (`SeqFactors`, A (b, T, in), G (b, s, T, out)) adds its
Gram to K (m × m, m = b·s) by one of two methods, and
`egn_fast.rules.factors.choose_seq_method(b, s, T, in, out)` picks one per layer by counting
multiply-adds:

* ghost       `gram_seq`: (G Gᵀ) ∘ (A Aᵀ) summed over t, t' (no per-sample gradient stored),
              model cost m²T²·out + b²T²·in;
* per_sample  `per_sample_seq` + `gram_per_sample`: the m per-sample gradients Σ_t G_ik,t a_i,tᵀ
              (m·out·in numbers), then P Pᵀ, model cost m·T·out·in + m²·out·in.

This benchmark times `SeqFactors(weight, bias, [(A, G)], seq_method=...).add_gram(K, Backend())`
for both methods (float32, torch backend, random A and G, with a bias) on a grid of the
attention and MLP projections of a d = 128 GPT: b ∈ {8, 16}, s ∈ {1, 4} (1: Monte-Carlo rows,
4: 5-class classification), T ∈ {16, 64, 256, 1024}, (in, out) ∈ {(128, 128), (128, 512),
(512, 128)}. At each point it checks that both methods give the same K (relative error < 1e-4),
and records both times, the model's choice, the faster method, whether the choice is right and
the slowdown of the choice against the faster method (1.0 when right). Points whose ghost
temporaries (the largest strip of `_ghost`) or per-sample gradients would exceed 2 GiB are
skipped, with the reason. The report also evaluates a proposed corrected cost model on the
measured points (`proposed_choice`: a memory term for the per-sample gradients; egn_fast itself
is not changed).

    PYTHONPATH=. .venv/bin/python benchmarks/seq_method.py            # full grid (several minutes)
    PYTHONPATH=. .venv/bin/python benchmarks/seq_method.py --quick    # smoke run: b = 8, T ≤ 256

Writes <out>/seq_method_cpu.{json,md} (default out: benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from egn_fast.ops import Backend, torch_backend
from egn_fast.rules.factors import SeqFactors, choose_seq_method

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Samples, machine_info, rel_err  # noqa: E402

METHODS = ("ghost", "per_sample")
BATCHES = (8, 16)
ROWS = (1, 4)
LENGTHS = (16, 64, 256, 1024)
SHAPES = ((128, 128), (128, 512), (512, 128))  # (in, out): q/k/v/o, MLP up, MLP down of d = 128
QUICK_BATCHES, QUICK_LENGTHS = (8,), (16, 64, 256)
SEED = 0
MAX_BYTES = 2 << 30  # skip a point whose ghost temporaries or per-sample gradients exceed this
MAX_REL_ERR = 1e-4  # ghost and per-sample K must agree to this
CALL_BUDGET_S = 1.0  # timed calls per method: clamp(⌈CALL_BUDGET_S / probe⌉, 1, repeats)
SLOW_S = 5.0  # a probe slower than this is the method's only sample (no second call)
BYTES = 4  # float32
# The proposed correction (not applied to egn_fast): multiply-add equivalents per per-sample
# gradient element (the m·out·in numbers per_sample_seq writes and gram_per_sample reads back:
# memory-bound passes that the multiply-add count omits). Chosen from the scan in the report.
PROPOSED_PER_SAMPLE_ELEMENT_COST = 24


# --------------------------------------------------------------------------- the points


def grid(quick: bool) -> list[tuple[int, int, int, int, int]]:
    """(b, s, T, in, out) of the grid, cheapest first within each (b, s)."""
    batches, lengths = (QUICK_BATCHES, QUICK_LENGTHS) if quick else (BATCHES, LENGTHS)
    return [(b, s, T, n_in, n_out) for b in batches for s in ROWS for T in lengths for n_in, n_out in SHAPES]


def model_macs(b: int, s: int, T: int, n_in: int, n_out: int) -> dict[str, int]:
    """The multiply-add counts of `choose_seq_method`'s docstring."""
    m = b * s
    return {"ghost": m * m * T * T * n_out + b * b * T * T * n_in,
            "per_sample": m * T * n_out * n_in + m * m * n_out * n_in}


def ghost_temp_bytes(b: int, s: int, T: int) -> int:
    """The largest temporaries of `torch_backend._ghost` for a linear layer: the last strip's
    (strip·s·T) × (b·s·T) product G Gᵀ and its (strip·T) × (b·T) input kernel A Aᵀ."""
    i0, i1 = next(torch_backend._strips(b, s, s * s * T * T))
    strip = i1 - i0
    return (strip * s * T * b * s * T + strip * T * b * T) * BYTES


def per_sample_bytes(b: int, s: int, n_in: int, n_out: int) -> int:
    """The m·out·in per-sample gradients of `per_sample_seq`."""
    return b * s * n_out * n_in * BYTES


def skip_reason(b: int, s: int, T: int, n_in: int, n_out: int, max_bytes: int = MAX_BYTES) -> str | None:
    """Why the point is skipped (a method's temporaries over max_bytes), or None."""
    reasons = []
    if (g := ghost_temp_bytes(b, s, T)) > max_bytes:
        reasons.append(f"ghost temporaries would be {g / 2**30:.1f} GiB")
    if (p := per_sample_bytes(b, s, n_in, n_out)) > max_bytes:
        reasons.append(f"per-sample gradients would be {p / 2**30:.1f} GiB")
    return f"skipped: {' and '.join(reasons)} (> {max_bytes / 2**30:g} GiB)" if reasons else None


def make_layer(b: int, s: int, T: int, n_in: int, n_out: int, seed: int = SEED):
    """weight (out, in), bias (out,) as nn.Parameters and random float32 A (b, T, in), G (b, s, T, out)."""
    gen = torch.Generator().manual_seed(seed)
    weight = nn.Parameter(torch.randn(n_out, n_in, generator=gen))
    bias = nn.Parameter(torch.randn(n_out, generator=gen))
    A = torch.randn(b, T, n_in, generator=gen)
    G = torch.randn(b, s, T, n_out, generator=gen)
    return weight, bias, A, G


def gram_fn(method: str, weight: Tensor, bias: Tensor, A: Tensor, G: Tensor) -> Callable[[], Tensor]:
    """A call that adds the layer's Gram by `method` to a fresh K = zeros(m, m) and returns K."""
    factors = SeqFactors(weight, bias, [(A, G)], seq_method=method)
    backend = Backend()
    m = G.shape[0] * G.shape[1]

    def call() -> Tensor:
        K = torch.zeros(m, m)
        factors.add_gram(K, backend)
        return K

    return call


# --------------------------------------------------------------------------- timing


def time_methods(fns: dict[str, Callable[[], Tensor]], repeats: int, call_budget_s: float = CALL_BUDGET_S,
                 slow_s: float = SLOW_S) -> dict[str, dict]:
    """Per method one probe call (warm-up; its K is kept for the agreement check), then
    clamp(⌈call_budget_s / probe⌉, 1, repeats) perf_counter-timed calls, the methods interleaved
    call by call (so that other load on the machine hits both alike). A probe slower than slow_s
    is that method's only sample (a second call would add nothing but minutes)."""
    runs = {}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        K = fn()
        probe = time.perf_counter() - t0
        runs[k] = {"K": K, "probe_ms": probe * 1e3,
                   "calls": 0 if probe > slow_s else max(1, min(repeats, math.ceil(call_budget_s / max(probe, 1e-9)))),
                   "samples": Samples()}
    for r in range(max(v["calls"] for v in runs.values())):
        for k, fn in fns.items():
            if r < runs[k]["calls"]:
                runs[k]["samples"].time_calls(fn, 1)
    for v in runs.values():
        ms = v.pop("samples").ms or [v["probe_ms"]]
        v.update(ms=ms, median_ms=statistics.median(ms), min_ms=min(ms), timed_calls=v.pop("calls"))
    return runs


def proposed_choice(b: int, s: int, T: int, n_in: int, n_out: int, element_cost: int = PROPOSED_PER_SAMPLE_ELEMENT_COST) -> str:
    """The corrected cost model this benchmark proposes (not applied to egn_fast): the per-sample
    count gains element_cost multiply-add equivalents per per-sample gradient element,
    m·T·out·in + m²·out·in + element_cost·m·out·in; the ghost count is unchanged."""
    m = b * s
    ghost = m * m * T * T * n_out + b * b * T * T * n_in
    per_sample = m * T * n_out * n_in + m * m * n_out * n_in + element_cost * m * n_out * n_in
    if m * n_out * n_in > 1 << 28:
        return "ghost"
    return "ghost" if ghost <= per_sample else "per_sample"


def measure_point(b: int, s: int, T: int, n_in: int, n_out: int, repeats: int,
                  max_bytes: int = MAX_BYTES) -> dict:
    """Both methods at one point: times, agreement of K, the model's choice and its slowdown."""
    point = {"b": b, "s": s, "m": b * s, "T": T, "in": n_in, "out": n_out,
             "model_macs": model_macs(b, s, T, n_in, n_out),
             "ghost_temp_bytes": ghost_temp_bytes(b, s, T),
             "per_sample_bytes": per_sample_bytes(b, s, n_in, n_out),
             "choice": choose_seq_method(b, s, T, n_in, n_out),
             "proposed_choice": proposed_choice(b, s, T, n_in, n_out)}
    if (reason := skip_reason(b, s, T, n_in, n_out, max_bytes)) is not None:
        return {**point, "status": reason}
    layer = make_layer(b, s, T, n_in, n_out)
    runs = time_methods({k: gram_fn(k, *layer) for k in METHODS}, repeats)
    err = rel_err(runs["ghost"]["K"], runs["per_sample"]["K"])
    ms = {k: runs[k]["median_ms"] for k in METHODS}
    fastest = min(METHODS, key=ms.get)
    return {
        **point,
        "status": "measured",
        "median_ms": ms,
        "min_ms": {k: runs[k]["min_ms"] for k in METHODS},
        "ms": {k: runs[k]["ms"] for k in METHODS},
        "probe_ms": {k: runs[k]["probe_ms"] for k in METHODS},
        "timed_calls": {k: runs[k]["timed_calls"] for k in METHODS},
        "rel_err": err,
        "agree": err < MAX_REL_ERR,
        "fastest": fastest,
        "ghost_over_per_sample": ms["ghost"] / ms["per_sample"],
        "right": point["choice"] == fastest,
        "slowdown": ms[point["choice"]] / ms[fastest],
        "proposed_right": point["proposed_choice"] == fastest,
        "proposed_slowdown": ms[point["proposed_choice"]] / ms[fastest],
    }


def run_grid(points: list[tuple[int, int, int, int, int]], repeats: int, max_bytes: int = MAX_BYTES) -> list[dict]:
    results = []
    with tqdm(points, desc="seq method") as bar:
        for b, s, T, n_in, n_out in bar:
            bar.set_postfix_str(f"b={b} s={s} T={T} {n_in}->{n_out}")
            r = measure_point(b, s, T, n_in, n_out, repeats, max_bytes)
            if r["status"] == "measured":
                tqdm.write(f"b={b:2d} s={s} T={T:4d} {n_in:3d}->{n_out:3d}: ghost {r['median_ms']['ghost']:9.2f} ms, "
                           f"per_sample {r['median_ms']['per_sample']:8.2f} ms, rel err {r['rel_err']:.1e}, "
                           f"model {r['choice']} ({'right' if r['right'] else 'WRONG'})")
            else:
                tqdm.write(f"b={b:2d} s={s} T={T:4d} {n_in:3d}->{n_out:3d}: {r['status']}")
            results.append(r)
    return results


# --------------------------------------------------------------------------- report


def summary(points: list[dict]) -> dict:
    """Counts of right choices and the worst slowdowns, of the model and of the proposal."""
    measured = [p for p in points if p["status"] == "measured"]
    out = {"points": len(points), "measured": len(measured), "skipped": len(points) - len(measured),
           "all_agree": all(p["agree"] for p in measured),
           "max_rel_err": max((p["rel_err"] for p in measured), default=None)}
    for key, right, slow in (("model", "right", "slowdown"), ("proposed", "proposed_right", "proposed_slowdown")):
        wrong = [p for p in measured if not p[right]]
        worst = max(measured, key=lambda p: p[slow], default=None)
        out[key] = {"right": len(measured) - len(wrong), "wrong": len(wrong),
                    "worst_slowdown": worst[slow] if worst else None,
                    "worst_point": {k: worst[k] for k in ("b", "s", "T", "in", "out")} if worst and wrong else None,
                    "geomean_slowdown": math.exp(statistics.fmean(math.log(p[slow]) for p in measured)) if measured else None}
    return out


SCAN_COSTS = (0, 4, 8, 16, 24, 32, 48, 64, 128)


def element_cost_scan(points: list[dict], costs: tuple[int, ...] = SCAN_COSTS) -> list[dict]:
    """For each candidate element cost c of `proposed_choice` (c = 0: egn_fast's model), how
    many measured points it gets right and its worst and geometric-mean slowdown."""
    measured = [p for p in points if p["status"] == "measured"]
    rows = []
    for c in costs:
        slow = [p["median_ms"][proposed_choice(p["b"], p["s"], p["T"], p["in"], p["out"], c)] / p["median_ms"][p["fastest"]]
                for p in measured]
        rows.append({"element_cost": c, "right": sum(x == 1.0 for x in slow), "of": len(measured),
                     "worst_slowdown": max(slow, default=None),
                     "geomean_slowdown": math.exp(statistics.fmean(map(math.log, slow))) if slow else None})
    return rows


def _shape(p: dict) -> str:
    return f"b={p['b']} s={p['s']} T={p['T']} {p['in']}→{p['out']}"


def _regime(wrong: list[dict], pts: list[dict]) -> str:
    """Where the wrong points lie: their T values and model MAC ratios, against the right points'."""
    ratio = lambda p: p["model_macs"]["ghost"] / p["model_macs"]["per_sample"]  # noqa: E731
    Ts = sorted({p["T"] for p in wrong})
    lo, hi = min(map(ratio, wrong)), max(map(ratio, wrong))
    inside = [p for p in pts if lo <= ratio(p) <= hi]
    return (f"All wrong points are at T ∈ {{{', '.join(map(str, Ts))}}}, with model MAC ratios ghost/per-sample "
            f"{lo:.2f}–{hi:.2f} (near the crossover): all {len(pts) - len(inside)} points outside that band are right, "
            f"{sum(p['right'] for p in inside)} of the {len(inside)} inside it. ")


def verdict(report: dict) -> str:
    """The paragraph under the table: how often the model is right, where it is wrong, the proposal."""
    sm, pts = report["summary"], [p for p in report["points"] if p["status"] == "measured"]
    mo, pr = sm["model"], sm["proposed"]
    text = (f"The cost model picks the faster method at {mo['right']} of {sm['measured']} measured points"
            + (f" ({sm['skipped']} skipped)" if sm["skipped"] else "") + ". ")
    if mo["wrong"]:
        wrong = [p for p in pts if not p["right"]]
        kinds = sorted({(p["choice"], p["fastest"]) for p in wrong})
        text += (f"It is wrong at {mo['wrong']} point(s), "
                 + "; ".join(f"{sum(1 for p in wrong if (p['choice'], p['fastest']) == k)} choosing {k[0]} where {k[1]} is faster"
                             for k in kinds)
                 + ": " + ", ".join(f"{_shape(p)} ({p['slowdown']:.2f}×)" for p in wrong) + ". "
                 + _regime(wrong, pts) +
                 f"The worst slowdown of its choice against the faster method is {mo['worst_slowdown']:.2f}× "
                 f"(at {_shape(mo['worst_point'])}); geometric-mean slowdown over all points {mo['geomean_slowdown']:.3f}×. ")
    else:
        text += "Its choice is never slower than the alternative. "
    text += (f"The proposed model (per-sample cost m·T·out·in + m²·out·in + {PROPOSED_PER_SAMPLE_ELEMENT_COST}·m·out·in, ghost unchanged) "
             f"is right at {pr['right']} of {sm['measured']}, worst slowdown {pr['worst_slowdown']:.2f}×"
             + (f" (at {_shape(pr['worst_point'])})" if pr["worst_point"] else "") + ". ")
    text += (f"Ghost and per-sample K agree everywhere (largest relative error {sm['max_rel_err']:.1e})."
             if sm["all_agree"] else f"Ghost and per-sample K DISAGREE at some point (largest relative error {sm['max_rel_err']:.1e}).")
    return text


def markdown(report: dict) -> str:
    mach, st = report["machine"], report["settings"]
    lines = [
        "# Sequence-layer Gram: ghost vs per-sample, and `choose_seq_method`'s choice (CPU)",
        "",
        f"{mach['cpu']}, {mach['torch_threads']} torch threads, torch {mach['torch']}, {mach['platform']}. "
        f"float32, torch backend, `SeqFactors(weight, bias, [(A, G)], seq_method=…).add_gram(K, Backend())` "
        f"with random A (b, T, in), G (b, s, T, out), K = zeros(m, m), m = b·s. Per method: one probe call "
        f"(warm-up), then clamp(⌈{st['call_budget_s']:g} s / probe⌉, 1, {st['repeats']}) timed calls, median; "
        f"a probe over {st['slow_s']:g} s is the only sample; the methods' calls interleaved. Load average (1 min) before/after: {st['load_average_1_5_15_min']['before'][0]:.1f}/{st['load_average_1_5_15_min']['after'][0]:.1f} on {os.cpu_count()} CPUs. Model MACs: ghost m²T²·out + b²T²·in, "
        f"per-sample m·T·out·in + m²·out·in. `proposed`: see the verdict. Run time {report['run_s']:.0f} s.",
        "",
        "| b | s | T | in→out | ghost ms | per-sample ms | ghost/per-sample | model MAC ratio g/p | rel err | "
        "model | fastest | right | slowdown | proposed | proposed slowdown |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---|---|---:|---|---:|",
    ]
    for p in report["points"]:
        macs = p["model_macs"]
        head = f"| {p['b']} | {p['s']} | {p['T']} | {p['in']}→{p['out']} |"
        if p["status"] != "measured":
            lines.append(head + f" {p['status']} |" + " |" * 5 + f" {p['choice']} |" + " |" * 4)
            continue
        t = p["median_ms"]
        lines.append(
            head + f" {t['ghost']:.2f} | {t['per_sample']:.2f} | {p['ghost_over_per_sample']:.2f} | "
            f"{macs['ghost'] / macs['per_sample']:.2f} | {p['rel_err']:.1e} | {p['choice']} | {p['fastest']} | "
            f"{'yes' if p['right'] else '**no**'} | {p['slowdown']:.2f} | {p['proposed_choice']} | {p['proposed_slowdown']:.2f} |"
        )
    lines += ["", "**Verdict.** " + verdict(report), "",
              "Per-sample cost with c multiply-add equivalents per per-sample gradient element, m·T·out·in + m²·out·in + c·m·out·in "
              "(c = 0 is egn_fast's model), on the measured points:", "",
              "| c | right | worst slowdown | geo-mean slowdown |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['element_cost']} | {r['right']}/{r['of']} | {r['worst_slowdown']:.2f} | {r['geomean_slowdown']:.3f} |"
              for r in report["element_cost_scan"] if r["worst_slowdown"] is not None]
    skipped = [p for p in report["points"] if p["status"] != "measured"]
    if skipped:
        lines += ["", "Skipped:", ""] + [f"- {_shape(p)}: {p['status']}" for p in skipped]
    return "\n".join(lines) + "\n"


def rescore(report: dict) -> dict:
    """The report again from its measured times, with the current `proposed_choice` (after a
    change of PROPOSED_PER_SAMPLE_ELEMENT_COST; nothing is re-timed)."""
    points = []
    for p in report["points"]:
        p = {**p, "proposed_choice": proposed_choice(p["b"], p["s"], p["T"], p["in"], p["out"])}
        if p["status"] == "measured":
            p["proposed_right"] = p["proposed_choice"] == p["fastest"]
            p["proposed_slowdown"] = p["median_ms"][p["proposed_choice"]] / p["median_ms"][p["fastest"]]
        points.append(p)
    settings = {**report["settings"], "proposed_per_sample_element_cost": PROPOSED_PER_SAMPLE_ELEMENT_COST}
    return {**report, "settings": settings, "summary": summary(points),
            "element_cost_scan": element_cost_scan(points), "points": points}


def build_report(points: list[dict], settings: dict, run_s: float) -> dict:
    """The JSON report (without the raw K)."""
    return {"machine": machine_info(), "settings": settings, "run_s": run_s,
            "summary": summary(points), "element_cost_scan": element_cost_scan(points), "points": points}


def write_report(report: dict, stem: Path) -> str:
    table = markdown(report)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"small grid (b ∈ {QUICK_BATCHES}, T ∈ {QUICK_LENGTHS}), 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="most timed calls per method and point (default 7; 3 with --quick)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="output directory")
    parser.add_argument("--rescore", type=Path, default=None, metavar="JSON",
                        help="re-score a report's measured times with the current proposed model (no timing)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.rescore:
        print(write_report(rescore(json.loads(args.rescore.read_text())), args.out / "seq_method_cpu"))
        return
    repeats = args.repeats or (3 if args.quick else 7)
    started, load_before = time.perf_counter(), os.getloadavg()
    points = run_grid(grid(args.quick), repeats)
    settings = {"dtype": "float32", "backend": "torch", "bias": True, "seed": SEED, "quick": args.quick,
                "repeats": repeats, "call_budget_s": CALL_BUDGET_S, "slow_s": SLOW_S, "max_bytes": MAX_BYTES,
                "max_rel_err": MAX_REL_ERR, "proposed_per_sample_element_cost": PROPOSED_PER_SAMPLE_ELEMENT_COST,
                "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
                "grid": {"b": QUICK_BATCHES if args.quick else BATCHES, "s": ROWS,
                         "T": QUICK_LENGTHS if args.quick else LENGTHS, "in_out": SHAPES}}
    report = build_report(points, settings, time.perf_counter() - started)
    stem = args.out / "seq_method_cpu"
    print(write_report(report, stem))
    print(f"wrote {stem}.json and {stem}.md")
    print(f"total {report['run_s']:.0f} s")


if __name__ == "__main__":
    main()
