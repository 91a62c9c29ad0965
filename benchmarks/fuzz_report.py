"""Fuzz report: many random architectures per layer family against the dense float64 oracle.

Runs the generators of tests/fuzz_models.py (seeded, no hypothesis) through the property of
tests/fuzz_check.py and writes per-family counts of exact / refused-clearly / silently-wrong /
unclear-crash / changed-model, the largest errors, and the most frequent failure messages to
benchmarks/results/fuzz_report.{json,md}.

    python benchmarks/fuzz_report.py               # 60 architectures per family (600 in all)
    python benchmarks/fuzz_report.py --quick       # 3 per family, a smoke run
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import torch  # noqa: E402

from fuzz_check import KINDS, Outcome, check  # noqa: E402
from fuzz_models import FAMILIES, MIXING, RandomDraw, build_case  # noqa: E402

LABELS = {"exact": "exact", "refused": "refused clearly", "wrong": "silently wrong", "crash": "unclear crash", "changed": "changed model"}


def pattern(message: str) -> str:
    """A message with its numbers and shapes blanked, to group failures of one kind."""
    return re.sub(r"\d+(\.\d+)?(e[-+]\d+)?", "N", message)[:220]


def variant(case) -> str:
    """The drawn options that most decide the outcome, e.g. 'kind=LSTM batch_first=False +PReLU'."""
    m = case.model
    tags = [f"{k}={getattr(m, k)}" for k in ("variant", "kind", "batch_first", "positions") if hasattr(m, k)]
    if getattr(m, "mask", None) is not None:
        tags.append("mask")
    tags += [f"+{t.__name__}" for t in (torch.nn.PReLU, torch.nn.modules.conv._ConvTransposeNd) if any(isinstance(x, t) for x in m.modules())]
    return " ".join(tags) or "-"


def run_family(family: str, n: int, seed: int) -> dict:
    counts = collections.Counter({k: 0 for k in KINDS})
    by_variant: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    messages: collections.Counter[tuple[str, str]] = collections.Counter()
    examples: dict[tuple[str, str], str] = {}
    max_exact, max_wrong, failures = 0.0, 0.0, 0
    for i in range(n):
        case = build_case(family, RandomDraw(seed * 1_000_003 + i * 7919 + sum(map(ord, family))))
        try:
            outcome = check(case)
        except Exception as err:  # noqa: BLE001 - the oracle itself failed: report, don't stop
            outcome = Outcome("crash", None, f"oracle/harness {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        counts[outcome.kind] += 1
        by_variant[variant(case)][outcome.kind] += 1
        if outcome.kind == "exact":
            max_exact = max(max_exact, outcome.error or 0.0)
        if outcome.kind == "wrong" and outcome.error is not None:
            max_wrong = max(max_wrong, outcome.error)
        if not outcome.ok(case.must_refuse):
            failures += 1
        if outcome.kind != "exact":
            key = (outcome.kind, pattern(outcome.message))
            messages[key] += 1
            examples.setdefault(key, case.description[:300])
    top = [{"kind": k, "count": c, "message": m, "example": examples[(k, m)]} for (k, m), c in messages.most_common(6)]
    return {
        "n": n, "expected": "refused" if family in MIXING else "exact or refused", "counts": dict(counts),
        "failures": failures, "max_error_exact": max_exact, "max_error_wrong": max_wrong, "top_messages": top,
        "by_variant": {v: dict(c) for v, c in sorted(by_variant.items())},
    }


def markdown(report: dict) -> str:
    lines = [
        "# Fuzz report: random architectures against the dense float64 oracle",
        "",
        f"{report['total']} architectures ({report['per_family']} per family, seed {report['seed']}), "
        f"{report['seconds']:.0f} s on {report['threads']} thread(s), torch {report['torch']}. "
        "A failure is anything but exact-or-refused-clearly (for `mixing`, anything but refused).",
        "",
        "| family | expected | " + " | ".join(LABELS[k] for k in KINDS) + " | failures | max err (exact) | max err (wrong) |",
        "|---|---|" + "---:|" * (len(KINDS) + 3),
    ]
    for fam, r in report["families"].items():
        cells = " | ".join(str(r["counts"][k]) for k in KINDS)
        lines.append(f"| {fam} | {r['expected']} | {cells} | {r['failures']} | {r['max_error_exact']:.1e} | {r['max_error_wrong']:.1e} |")
    t = report["totals"]
    lines.append("| **all** | | " + " | ".join(str(t[k]) for k in KINDS) + f" | {report['failures']} | | |")
    lines += ["", "## By variant (the drawn options that decide most outcomes)", "",
              "| family | variant | " + " | ".join(LABELS[k] for k in KINDS) + " |", "|---|---|" + "---:|" * len(KINDS)]
    for fam, r in report["families"].items():
        for v, c in r["by_variant"].items():
            lines.append(f"| {fam} | {v} | " + " | ".join(str(c.get(k, 0)) for k in KINDS) + " |")
    lines += ["", "## Most frequent non-exact outcomes per family", ""]
    for fam, r in report["families"].items():
        if not r["top_messages"]:
            continue
        lines.append(f"### {fam}")
        for m in r["top_messages"]:
            lines.append(f"- {m['count']}× **{LABELS[m['kind']]}**: `{m['message']}`  \n  e.g. {m['example']}")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 architectures per family (smoke run)")
    ap.add_argument("--per-family", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "fuzz_report"))
    args = ap.parse_args()
    n = 3 if args.quick else args.per_family
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    families = {}
    for fam in FAMILIES:
        t0 = time.perf_counter()
        families[fam] = run_family(fam, n, args.seed)
        families[fam]["seconds"] = round(time.perf_counter() - t0, 2)
        print(f"{fam:16s} {families[fam]['counts']} failures={families[fam]['failures']} ({families[fam]['seconds']:.1f} s)", flush=True)
    totals = {k: sum(r["counts"][k] for r in families.values()) for k in KINDS}
    report = {
        "per_family": n, "total": n * len(FAMILIES), "seed": args.seed, "seconds": time.perf_counter() - start,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "totals": totals,
        "failures": sum(r["failures"] for r in families.values()), "families": families,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(report, fh, indent=1)
    with open(args.out + ".md", "w") as fh:
        fh.write(markdown(report))
    print(f"{report['total']} architectures, {report['failures']} failures, {report['seconds']:.0f} s -> {args.out}.{{json,md}}")


if __name__ == "__main__":
    main()
