"""Review classification with a small transformer: exact EGN (curvature "exact", the default)
against AdamW and SGD with momentum 0.9, each tuned on a small grid, on the women's reviews.

Model: ReviewClassifier (benchmarks/char_gpt.py; d 64, 1 block, 4 heads, bidirectional attention
with a padding key mask, mean-pool over the non-padding tokens, Linear head). Input: each
review's first T = 64 characters (text_data.review_tensors; V = 64 + the padding id). Label:
rating − 1 (5 classes; `--label recommended` for the binary one). Reviews split 80/10/10; b = 32
reviews per step, each seed's order an epoch-wise permutation, the same for every optimizer.

Protocol, the same for every optimizer (text_bench.py): every grid point trains seed 0 and is
evaluated on the validation reviews; the lowest final validation loss wins (an lr or damping
chosen at the edge of its grid widens it by one value, up to 3 times); the chosen point trains
`--seeds` seeds, evaluated on the test reviews (loss and accuracy) every `eval_every` steps.
Training time counts optimizer steps only. Then the step-time table: EGN, AdamW and SGD on
copies of one model and one batch, side by side (median ms, EGN's stages, EGN ÷ AdamW, peak RSS).

    PYTHONPATH=. .venv/bin/python benchmarks/review_classifier.py --data-dir DIR          # ~10-15 min on 2 cores
    PYTHONPATH=. .venv/bin/python benchmarks/review_classifier.py --data-dir DIR --quick  # smoke run (< 60 s)

Writes <out>/review_classifier_cpu{,_quick}{,_recommended}.{json,md,png}.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import text_data  # noqa: E402
from char_gpt import ReviewClassifier  # noqa: E402
from common import machine_info  # noqa: E402
from text_bench import (OptSpec, Run, breakdown_markdown, final_value, fmt, make_egn, points,  # noqa: E402
                        results_json, run_all, budget, chosen_cell, select_specs, step_breakdown, torch_specs, train, write_outputs,
                        add_run_options)

REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH, T = 200, 32, 64
D, LAYERS, HEADS = 64, 1, 4
EVALUATIONS = 15
KEYS = ["loss", "accuracy", "best_accuracy"]


def specs() -> list[OptSpec]:
    """Exact EGN (lr 1, damping grid), AdamW and SGD + momentum 0.9 (lr grids)."""
    egn = OptSpec("egn", "EGN (exact, lr 1)", lambda model, seed, damping: make_egn(model, seed, curvature="exact",
                                                                                     lr=1.0, damping=damping),
                  points(damping=[0.1, 1.0, 10.0]), {"damping": 1.0}, egn=True, widen="damping")
    return [egn] + torch_specs([3e-4, 1e-3, 3e-3, 1e-2], [1e-2, 3e-2, 1e-1, 3e-1], 3e-3, 1e-1)


@torch.no_grad()
def evaluate(model: nn.Module, ids: Tensor, y: Tensor, chunk: int = 512) -> dict[str, float]:
    """Mean cross-entropy and accuracy over (n, T) ids and (n,) labels, in chunks."""
    loss, correct = 0.0, 0
    for i in range(0, len(y), chunk):
        logits = model(ids[i:i + chunk])
        loss += float(F.cross_entropy(logits, y[i:i + chunk], reduction="sum"))
        correct += int((logits.argmax(1) == y[i:i + chunk]).sum())
    return {"loss": loss / len(y), "accuracy": correct / len(y)}


def review_batches(ids: Tensor, y: Tensor, batch: int, steps: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """`steps` mini-batches (ids (batch, T), labels (batch,)) from epoch-wise random permutations."""
    order = torch.empty(0, dtype=torch.int64)
    for _ in range(steps):
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(len(y), generator=generator)])
        rows, order = order[:batch], order[batch:]
        yield ids[rows], y[rows]


def markdown(report: dict[str, Any], labels: dict[str, str]) -> str:
    """Results table, majority baseline, step-time table."""
    st = report["settings"]
    lines = [f"# Review classification ({st['label']}, {st['classes']} classes; ReviewClassifier d {st['d']}, "
             f"{st['layers']} block(s), T {st['T']}; b {st['batch_size']}, {st['steps']} steps, {len(st['seeds'])} seeds)"
             f"{' — QUICK smoke run' if st['quick'] else ''}\n",
             "| optimizer | chosen | test loss | test accuracy | best test accuracy | train s | steps/s |",
             "|---|---|---|---|---|---|---|"]
    for name, res in report["optimizers"].items():
        sm = res["summary"]
        chosen = chosen_cell(res)
        stop = f" ({len(sm['stopped'])} stopped)" if sm["stopped"] else ""
        lines.append(f"| {labels[name]}{stop} | {chosen} | {fmt(sm['loss'])} | {fmt(sm['accuracy'])} | "
                     f"{fmt(sm['best_accuracy'])} | {sm.get('seconds', math.nan):.1f} | {sm.get('steps_per_s', math.nan):.1f} |")
    lines += ["", f"Majority class on the test reviews: accuracy {st['majority_accuracy']:.3f}. `*`: chosen at a grid edge.", ""]
    lines += ["## Step time (same batch, medians)", "", breakdown_markdown(report["step_time"], labels)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 steps, 1 seed, 1 grid point, 3 timed steps")
    add_run_options(parser, STEPS, 20, text_data.FILE, BATCH, REPO / "benchmarks" / "results")
    parser.add_argument("--label", default="rating", choices=sorted(text_data.LABELS), help="target (default rating)")
    args = parser.parse_args(argv)
    chosen_specs = select_specs(specs(), args.optimizers, "review_classifier.py")
    steps, seeds, eval_every = budget(args, STEPS, 20, EVALUATIONS)
    corpus = text_data.corpus_or_exit(args.data_dir, "review_classifier.py")
    split = {k: text_data.review_tensors(corpus, k, T, args.label) for k in ("train", "val", "test")}
    classes = text_data.LABELS[args.label]
    train_ids, _, train_y = split["train"]

    def make_model(seed: int) -> ReviewClassifier:
        torch.manual_seed(seed)
        return ReviewClassifier(corpus.vocab.size, classes, text_data.PAD_ID, D, LAYERS, HEADS, T)

    def run_point(spec: OptSpec, point: dict, seed: int, purpose: str, progress: Callable[[int], None]) -> Run:
        model, run = make_model(seed), Run(spec.name, point, seed, purpose)
        ids, _, y = split["val" if purpose == "tune" else "test"]
        opt = spec.make(model, seed, **point)
        batches = review_batches(train_ids, train_y, args.batch_size, steps, torch.Generator().manual_seed(seed))
        train(model, opt, batches, steps, F.cross_entropy, lambda m: evaluate(m, ids, y), eval_every, run, progress)
        if not run.stopped:
            run.final = {"loss": final_value(run, "loss"), "accuracy": run.curve["accuracy"][-1],
                         "best_accuracy": max(run.curve["accuracy"])}
        return run

    started = time.perf_counter()
    results = run_all(chosen_specs, run_point, steps, seeds, args.quick, "loss", "review_classifier")
    labels = {s.name: s.label for s in specs()}
    makers = {s.name: (lambda model, s=s: s.make(model, 0, **results[s.name]["chosen"])) for s in chosen_specs}
    batch = next(review_batches(train_ids, train_y, args.batch_size, 1, torch.Generator().manual_seed(0)))
    step_time = step_breakdown(lambda: make_model(0), makers, batch, F.cross_entropy, args.reps or (3 if args.quick else 20),
                               1 if args.quick else 2)
    test_y = split["test"][2]
    tag = ("cpu_quick" if args.quick else "cpu") + ("" if args.label == "rating" else f"_{args.label}")
    report: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {"quick": args.quick, "label": args.label, "classes": classes, "steps": steps, "batch_size": args.batch_size,
                     "T": T, "d": D, "layers": LAYERS, "heads": HEADS, "seeds": seeds, "eval_every": eval_every,
                     "split_reviews": {k: len(v) for k, v in corpus.rows.items()},
                     "truncated_fraction": float((split["train"][1].sum(1) == T).double().mean()),
                     "majority_accuracy": float(test_y.bincount().max() / len(test_y)),
                     "grids": {s.name: s.grid for s in chosen_specs}, "labels": labels},
        "optimizers": results_json(results, KEYS), "step_time": step_time,
    }
    write_outputs(report, markdown, results, labels, [("loss", "test loss"), ("accuracy", "test accuracy")],
                  f"ReviewClassifier, {args.label} ({steps} steps, b {args.batch_size}, T {T}; mean, min–max over seeds)",
                  args.out, f"review_classifier_{tag}", started)

if __name__ == "__main__":
    main()
