"""Character-level language modelling on the women's reviews: EGN with sampled curvature (MC, k = 1
and 4 samples; empirical Fisher), plain, + momentum 0.9 (ema) and + adaptive damping, against
AdamW and SGD with momentum 0.9, each tuned on a small grid.

Model: CharGPT (benchmarks/char_gpt.py; d 128, 2 layers, 4 heads, T 64, head tied to the token
embedding through an nn.Linear sharing its weight; `--untied` for a separate head), per-token cross-entropy (mean over the b·T tokens).
Data: benchmarks/text_data.py (V = 64 characters, reviews split 80/10/10); mini-batches of
b = 16 windows of T + 1 characters from the training stream, the same for every optimizer of a seed.

Protocol, the same for every optimizer:
  1. tune: every grid point trains seed 0 for the step budget; the point with the lowest final
     validation loss (diverged or failed runs last) is chosen. EGN: the plain variant of each
     curvature is tuned (lr x damping); its + momentum and + adaptive damping variants reuse
     its choice. A chosen lr at the edge of an
     AdamW/SGD grid widens the grid by one value beyond it (up to 3 times);
  2. measure: the chosen point trains `--seeds` seeds (init, batches, MC samples).
Validation loss (nats/char) on a fixed set of validation windows every `eval_every` steps, the
test loss on fixed test windows after the last step. Training time counts optimizer steps only.
Then a step-time breakdown: every EGN variant and AdamW on copies of one model and one batch,
side by side in this process (common.time_methods), median seconds per stage of EGN's
StepInfo.timings, the EGN step ÷ AdamW step ratio and the peak RSS increase of one step.

    PYTHONPATH=. .venv/bin/python benchmarks/char_lm.py --data-dir DIR            # ~25 min on 2 cores
    PYTHONPATH=. .venv/bin/python benchmarks/char_lm.py --data-dir DIR --quick    # smoke run (< 60 s)

Writes <out>/char_lm_cpu{,_quick}.{json,md} and <out>/char_lm_cpu{,_quick}.png. The training loop,
tuning, summaries, plots and step timing are in text_bench.py (shared with review_classifier.py).
Without the sampled-curvature EGN (curvature=, mc_samples=, generator=) the EGN variants are
skipped with a note.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import text_data  # noqa: E402
from char_gpt import CharGPT  # noqa: E402
from common import machine_info  # noqa: E402
from text_bench import (EGN_HAS_CURVATURE, OptSpec, Run, breakdown_markdown, final_value, fmt, make_egn,  # noqa: E402
                        points, results_json, run_all, budget, chosen_cell, select_specs, step_breakdown, summarize, torch_specs, train,
                        write_outputs, add_run_options)

REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH, T = 200, 16, 64
D, LAYERS, HEADS = 128, 2, 4
EVALUATIONS = 15  # per run, evenly spaced in steps
VAL_WINDOWS = TEST_WINDOWS = 128  # fixed windows of T + 1 characters
KEYS = ["val_loss", "best_val_loss", "test_loss"]


EGN_GRID = points(lr=[1.0], damping=[1.0, 10.0, 100.0])  # λ widened beyond an edge choice
# With metric="adam" the step off the rows' span is Adam's g/(λD): λ plays 1/Adam's lr.
METRIC_GRID = points(lr=[1.0], damping=[100.0, 300.0, 1000.0])


def lm_specs() -> list[OptSpec]:
    """The nine EGN variants of this benchmark, two with the Adam metric (egn_fast.system.metric), then AdamW and SGD. The plain variant of each
    curvature is tuned on EGN_GRID; its + momentum and + adaptive damping variants take its
    chosen (lr, λ) (λ as adaptive damping's λ₀), and tune on EGN_GRID only when it does not run."""
    specs = []
    for key, label, curv, k in [("mc1", "MC k=1", "mc", 1), ("mc4", "MC k=4", "mc", 4), ("emp", "empirical", "empirical", 1)]:
        def plain(model, seed, lr, damping, c=curv, k=k):
            return make_egn(model, seed, curvature=c, mc_samples=k, lr=lr, damping=damping)

        def mom(model, seed, lr, damping, c=curv, k=k):
            return make_egn(model, seed, curvature=c, mc_samples=k, lr=lr, damping=damping, momentum=0.9)

        def ad(model, seed, lr, damping, c=curv, k=k):
            return make_egn(model, seed, curvature=c, mc_samples=k, lr=lr, damping=damping, adaptive=True)

        quick = {"lr": 1.0, "damping": 1.0}
        specs += [OptSpec(f"egn_{key}", f"EGN {label}", plain, EGN_GRID, quick, True, widen="damping"),
                  OptSpec(f"egn_{key}_mom", f"EGN {label} + momentum 0.9", mom, EGN_GRID, quick, True, inherit=f"egn_{key}"),
                  OptSpec(f"egn_{key}_ad", f"EGN {label} + adaptive damping", ad, EGN_GRID, quick, True, inherit=f"egn_{key}")]

    def metric(model, seed, lr, damping):
        return make_egn(model, seed, curvature="mc", lr=lr, damping=damping, metric="adam")

    def metric_mom(model, seed, lr, damping):
        return make_egn(model, seed, curvature="mc", lr=lr, damping=damping, metric="adam", momentum=0.9)

    quick = {"lr": 1.0, "damping": 300.0}
    specs += [OptSpec("egn_mc1_adam", "EGN MC k=1 + Adam metric", metric, METRIC_GRID, quick, True, widen="damping"),
              OptSpec("egn_mc1_adam_mom", "EGN MC k=1 + Adam metric + momentum 0.9", metric_mom, METRIC_GRID, quick, True,
                      inherit="egn_mc1_adam")]
    return specs + torch_specs([3e-4, 1e-3, 3e-3, 1e-2], [3e-2, 1e-1, 3e-1, 1.0], 3e-3, 1e-1)




def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token cross-entropy: logits (b, T, V), targets (b, T) → mean over the b·T tokens."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def window_loss(model: nn.Module, windows: Tensor, chunk: int = 64) -> float:
    """Mean next-character loss (nats/char) over (n, T + 1) windows, in chunks of `chunk` windows."""
    total, count = 0.0, 0
    for w in windows.split(chunk):
        x, y = text_data.split_window(w)
        total += float(lm_loss(model(x), y)) * y.numel()
        count += y.numel()
    return total / count


def verdict(results: dict[str, dict], labels: dict[str, str]) -> str:
    """Sentences from the numbers: the best optimizer by final validation loss, the best EGN variant
    against AdamW at equal steps and at equal training time."""
    finals = {n: summarize(r["seed_runs"], KEYS) for n, r in results.items()}
    done = {n: f["val_loss"][0] for n, f in finals.items() if f["val_loss"] is not None}
    if not done:
        return "No run finished."
    best = min(done, key=done.get)
    text = [f"Lowest final validation loss: {labels[best]} ({done[best]:.3f} nats/char)."]
    egn = {n: v for n, v in done.items() if n.startswith("egn")}
    if egn and "adamw" in done:
        e = min(egn, key=egn.get)
        text.append(f"Best EGN variant {labels[e]}: {egn[e]:.3f} vs AdamW {done['adamw']:.3f} after the same steps; "
                    f"EGN took {finals[e]['seconds']:.0f} s of training, AdamW {finals['adamw']['seconds']:.0f} s.")
        adamw_seconds = finals["adamw"]["seconds"]
        runs = [r for r in results[e]["seed_runs"] if not r.stopped]
        at = [min((v for v, t in zip(r.curve["val_loss"], r.curve["seconds"]) if t <= adamw_seconds), default=math.nan) for r in runs]
        text.append(f"Within AdamW's {adamw_seconds:.0f} s, EGN ({labels[e]}) reached {sum(at) / len(at):.3f} (mean best so far).")
    return " ".join(text)


def markdown(report: dict[str, Any], labels: dict[str, str]) -> str:
    """The results table, the verdict and the step-time table."""
    st = report["settings"]
    lines = [f"# Character-level LM (CharGPT d {st['d']}, {st['layers']} layers, T {st['T']}, b {st['batch_size']}, "
             f"{st['steps']} steps, {len(st['seeds'])} seeds){' — QUICK smoke run' if st['quick'] else ''}\n",
             "| optimizer | chosen | final val loss | best val loss | test loss | train s | steps/s |",
             "|---|---|---|---|---|---|---|"]
    for name, res in report["optimizers"].items():
        sm = res["summary"]
        chosen = chosen_cell(res)
        stop = f" ({len(sm['stopped'])} stopped)" if sm["stopped"] else ""
        lines.append(f"| {labels[name]}{stop} | {chosen} | {fmt(sm['val_loss'])} | {fmt(sm['best_val_loss'])} | "
                     f"{fmt(sm['test_loss'])} | {sm.get('seconds', math.nan):.1f} | {sm.get('steps_per_s', math.nan):.1f} |")
    lines += ["", report["verdict"], ""]
    lines += [f"- {n}: {note}" for n, note in report["notes"].items()]
    lines += ["", f"## Step time (same batch, {report['step_time']['reps']} timed steps each, medians)", "",
              breakdown_markdown(report["step_time"], labels)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 steps, 1 seed, 1 grid point, 3 timed steps (plain EGN variants only)")
    add_run_options(parser, STEPS, 10, text_data.FILE, BATCH, REPO / "benchmarks" / "results")
    parser.add_argument("--untied", action="store_true", help="a separate nn.Linear head instead of the tied embedding")
    parser.add_argument("--d", type=int, default=D, help=f"model width (default {D})")
    parser.add_argument("--layers", type=int, default=LAYERS, help=f"blocks (default {LAYERS})")
    args = parser.parse_args(argv)
    specs, notes = select_specs(lm_specs(), args.optimizers, "char_lm.py"), {}
    if not EGN_HAS_CURVATURE:
        notes.update({s.name: "skipped: this egn_fast.EGN has no curvature= argument" for s in specs if s.egn})
        specs = [s for s in specs if not s.egn]
    steps, seeds, eval_every = budget(args, STEPS, 10, EVALUATIONS)
    corpus = text_data.corpus_or_exit(args.data_dir, "char_lm.py")
    vocab, train_stream = corpus.vocab.size, corpus.streams["train"]
    val = text_data.fixed_windows(corpus.streams["val"], VAL_WINDOWS, T, seed=1234)
    test = text_data.fixed_windows(corpus.streams["test"], TEST_WINDOWS, T, seed=4321)

    def make_model(seed: int) -> CharGPT:
        torch.manual_seed(seed)
        return CharGPT(vocab, args.d, args.layers, HEADS, T, tie=not args.untied)

    def batches(seed: int, n: int):
        windows = text_data.char_batches(train_stream, args.batch_size, T, n, torch.Generator().manual_seed(seed))
        return (text_data.split_window(w) for w in windows)

    def run_point(spec: OptSpec, point: dict, seed: int, purpose: str, progress: Callable[[int], None]) -> Run:
        model, run = make_model(seed), Run(spec.name, point, seed, purpose)
        try:
            opt = spec.make(model, seed, **point)
        except Exception as err:  # noqa: BLE001  (EGN refusing the model is a result, reported)
            if not spec.egn:
                raise
            run.stopped = f"failed to construct: {type(err).__name__}: {err}"
            progress(steps)
            return run
        train(model, opt, batches(seed, steps), steps, lm_loss, lambda m: {"val_loss": window_loss(m, val)},
              eval_every, run, progress)
        if not run.stopped:
            run.final = {"val_loss": final_value(run, "val_loss"), "best_val_loss": min(run.curve["val_loss"]),
                         "test_loss": window_loss(model, test)}
        return run

    started = time.perf_counter()
    results = run_all(specs, run_point, steps, seeds, args.quick, "val_loss", "char_lm")
    labels = {s.name: s.label for s in lm_specs()}
    chosen = {s.name: results[s.name]["chosen"] for s in specs}
    timed = [s for s in specs if not (args.quick and s.inherit)]  # --quick: the plain EGN variants only
    makers = {s.name: (lambda model, s=s: s.make(model, 0, **chosen[s.name])) for s in timed}
    reps = args.reps or (3 if args.quick else 20)
    step_time = step_breakdown(lambda: make_model(0), makers, next(batches(0, 1)), lm_loss, reps, 1 if args.quick else 2)
    tag = "cpu_quick" if args.quick else "cpu"
    report: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {"quick": args.quick, "steps": steps, "batch_size": args.batch_size, "T": T, "d": args.d, "layers": args.layers,
                     "heads": HEADS, "tied_head": not args.untied, "vocab": vocab, "vocab_chars": corpus.vocab.chars,
                     "seeds": seeds, "eval_every": eval_every, "val_windows": VAL_WINDOWS, "test_windows": TEST_WINDOWS,
                     "split_reviews": {k: len(v) for k, v in corpus.rows.items()},
                     "grids": {s.name: s.grid for s in specs}, "labels": labels},
        "optimizers": results_json(results, KEYS), "step_time": step_time, "notes": notes,
        "verdict": verdict(results, labels),
    }
    write_outputs(report, markdown, results, labels, [("val_loss", "validation loss (nats/char)")],
                  f"CharGPT on women's reviews ({steps} steps, b {args.batch_size}, T {T}; mean, min–max over seeds)",
                  args.out, f"char_lm_{tag}", started)

if __name__ == "__main__":
    main()
