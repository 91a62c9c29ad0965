"""EGN on a model sharded with FSDP2 (docs/design.md §6): bytes per rank per step by stage, peak
memory, step time, and a projection to 8 GPUs × 1–8 nodes.

A GPT-2 (Hugging Face, from a GPT2Config: 8 layers, 512 wide, vocabulary 16384, tied embedding
and head, T = 64: 33.6M parameters) sharded with `fully_shard` per block and at the root, 4
sequences per rank, on 2 and 4 CPU ranks (gloo, one thread each, spawned processes; fsdp_ranks.py):

1. bytes each rank sends per step, counted from every collective the process calls during one
   step (collective_count.py: torch.distributed's and the functional collectives' functions
   wrapped, each call converted to ring bytes, tagged by stage from the call's stack): EGN
   (Monte-Carlo rows, k = mc_samples) vs AdamW under the same sharding (its count is asserted
   equal to the analytic FSDP formula, fsdp_ranks.adamw_bytes) and vs EGN on the unsharded model
   (process_group=WORLD);
2. peak RSS per rank (VmHWM: everything in the process), each configuration in fresh processes;
3. step time, median of the timed steps after a warm-up, EGN vs AdamW from the same run;
4. a projection to 8 GPUs × 1–8 nodes (fsdp_projection.py): EGN's communication from the byte
   model fitted on the counts vs FSDP's first-order communication vs the Gram + Cholesky every
   rank does redundantly, with benchmarks/distributed.py's NCCL and GPU constants.

    PYTHONPATH=. python benchmarks/fsdp.py                   # ~10 min on 2 cores; writes results/fsdp_cpu.{json,md}, fsdp_projection.png
    PYTHONPATH=. python benchmarks/fsdp.py --quick           # tiny GPT-2, 2 forked ranks (~20 s); writes nothing
    PYTHONPATH=. python benchmarks/fsdp.py --quick --out DIR # the same, written to DIR (tests/test_fsdp_benchmark.py)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import fsdp_projection  # noqa: E402
import fsdp_ranks  # noqa: E402
from fsdp_ranks import Config  # noqa: E402

MODES = ("adamw_sharded", "egn_sharded", "egn_replicated")
LABELS = {"adamw_sharded": "AdamW, sharded", "egn_sharded": "EGN mc, sharded", "egn_replicated": "EGN mc, replicated"}


def measure(cfg: Config, worlds: list[int], start_method: str) -> list[dict]:
    """Every (world, mode) in fresh processes: rank 0's step time and stage bytes (checked equal on
    every rank), every rank's peak RSS; AdamW's count checked against the analytic formula."""
    shapes = fsdp_ranks.parameter_shapes(cfg)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            for mode in MODES:
                t0 = time.perf_counter()
                reports = fsdp_ranks.run_config(cfg, world, mode, Path(tmp), start_method)
                first = reports[0]
                assert all(r["stages"] == first["stages"] for r in reports), f"{mode}, {world} ranks: stage bytes differ across ranks"
                run = dict(world=world, mode=mode, step_s=first["step_s"], step_s_ranks=[r["step_s"] for r in reports],
                           stages=first["stages"], calls=first["calls"], bytes=first["bytes"],
                           peak_rss_mib=max(r["peak_rss_mib"] for r in reports), peak_rss_mib_ranks=[r["peak_rss_mib"] for r in reports])
                if mode == "adamw_sharded":
                    run["analytic"] = fsdp_ranks.adamw_bytes(shapes, world)
                    assert run["stages"] == run["analytic"], f"AdamW counted {run['stages']} != analytic {run['analytic']}"
                runs.append(run)
                print(f"{world} ranks, {LABELS[mode]}: step {run['step_s']:.3f} s, {run['bytes']:,} B/rank/step, "
                      f"peak RSS {run['peak_rss_mib']:.0f} MiB ({time.perf_counter() - t0:.0f} s)", flush=True)
    return runs


def run_of(report: dict, world: int, mode: str) -> dict:
    """The run of `mode` on `world` ranks."""
    return next(r for r in report["runs"] if r["world"] == world and r["mode"] == mode)


def mib(n: float) -> str:
    """Bytes as MiB, 3 decimals."""
    return f"{n / 2**20:,.3f}"


def markdown(report: dict) -> str:
    """The report's tables; every number from `report`."""
    cfg, worlds = report["config"], report["worlds"]
    lines = [
        "# EGN on an FSDP2-sharded GPT-2: communication, memory, step time (CPU, gloo)", "",
        f"GPT-2 from a GPT2Config: {cfg['n_layer']} layers, width {cfg['n_embd']}, {cfg['n_head']} heads, vocabulary {cfg['vocab']}, "
        f"T = {cfg['T']}, tied embedding/head, **{report['params']:,} parameters** (float32); `fully_shard` per block and at the root; "
        f"{cfg['per_rank']} sequences per rank; EGN `curvature=\"mc\"`, `mc_samples={cfg['mc_samples']}`, damping {cfg['damping']}, no line "
        f"search; AdamW lr 1e-4. Ranks are gloo processes with one thread each on a {report['machine'].get('cpu', 'CPU')}; "
        f"{report['machine'].get('cores', '?')} cores.", "",
        "## Bytes sent per rank per step, by stage (MiB)", "",
        "Counted from every collective call of one step (torch.distributed's and the functional collectives' functions wrapped; "
        "ring algorithm: all-gather (R−1)·n, all-reduce 2(R−1)/R·N, reduce-scatter and all-to-all (R−1)/R·N); stage from the "
        "call's stack. AdamW's count equals the analytic FSDP formula (asserted).", "",
    ]
    stages = sorted({s for r in report["runs"] for s in r["stages"]})
    head = [f"{w} ranks: {LABELS[m]}" for w in worlds for m in MODES]
    lines += ["| stage | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for s in stages:
        cells = [mib(run_of(report, w, m)["stages"][s]) + f" ({run_of(report, w, m)['calls'][s]})" if s in run_of(report, w, m)["stages"] else "" for w in worlds for m in MODES]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    for name, test in (("FSDP (parameter all-gathers, gradient reduce-scatter)", lambda st: st.startswith("FSDP")),
                       ("egn_fast's own collectives", lambda st: st.startswith("egn"))):
        lines.append(f"| *subtotal: {name}* | " + " | ".join(
            mib(sum(b for st, b in run_of(report, w, m)["stages"].items() if test(st))) for w in worlds for m in MODES) + " |")
    lines.append("| **total** | " + " | ".join(f"**{mib(run_of(report, w, m)['bytes'])}**" for w in worlds for m in MODES) + " |")
    lines += ["", "(n) = collective calls in the step. EGN sharded / AdamW sharded, total bytes: " + ", ".join(
        f"{w} ranks **{run_of(report, w, 'egn_sharded')['bytes'] / run_of(report, w, 'adamw_sharded')['bytes']:.2f}×**" for w in worlds) + ".", ""]
    lines += ["## Peak memory per rank: peak RSS (VmHWM, MiB; everything in the process: torch, transformers, model, "
              "activations, optimizer state, buffers), max over ranks, each configuration in fresh processes", "",
              "| ranks | EGN sharded | EGN replicated | sharded / replicated | AdamW sharded |", "|---|---|---|---|---|"]
    for w in worlds:
        es, er, a = (run_of(report, w, m)["peak_rss_mib"] for m in ("egn_sharded", "egn_replicated", "adamw_sharded"))
        lines.append(f"| {w} | {es:,.0f} | {er:,.0f} | {es / er:.2f} | {a:,.0f} |")
    lines += ["", "## Step time (median s of the timed steps after warm-up; rank 0)", "",
              f"The machine has {report['machine'].get('cores', '?')} cores: 4 ranks oversubscribe them, so 4-rank times are not scaling "
              "numbers; compare EGN with AdamW within a row (same run, same load). Load average of the machine (1 min) at the "
              f"start and end of the run: {report['loadavg'][0]:.1f}, {report['loadavg'][1]:.1f} (other work on the machine slows "
              "every configuration).", "",
              "| ranks | EGN sharded | AdamW sharded | EGN / AdamW | EGN replicated |", "|---|---|---|---|---|"]
    for w in worlds:
        e, a, r = (run_of(report, w, m)["step_s"] for m in ("egn_sharded", "adamw_sharded", "egn_replicated"))
        lines.append(f"| {w} | {e:.3f} | {a:.3f} | **{e / a:.1f}×** | {r:.3f} |")
    lines += ["", fsdp_projection.markdown(report["projection"]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny GPT-2, 2 ranks, forked processes; writes nothing unless --out")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; --quick: none)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    parser.add_argument("--render", type=Path, default=None, help="re-render the markdown and plot of a saved fsdp_cpu.json into --out")
    args = parser.parse_args()
    if args.render is not None:
        report = json.loads(args.render.read_text())
        out = args.out or args.render.parent
        (out / "fsdp_cpu.md").write_text(markdown(report))
        fsdp_projection.plot(report["projection"], out / "fsdp_projection.png")
        return
    cfg = fsdp_ranks.QUICK if args.quick else Config()
    if args.steps:
        cfg = replace(cfg, steps=args.steps)
    worlds = [2] if args.quick else [2, 4]
    t0, load = time.perf_counter(), os.getloadavg()[0]
    shapes = fsdp_ranks.parameter_shapes(cfg)
    machine = {**common.machine_info(), "cores": os.cpu_count()}
    report = dict(machine=machine, config=asdict(cfg), params=shapes["params"], worlds=worlds,
                  runs=measure(cfg, worlds, "fork" if args.quick else "spawn"))
    report["projection"] = fsdp_projection.projection(cfg, report)
    report["seconds"], report["loadavg"] = time.perf_counter() - t0, [load, os.getloadavg()[0]]
    out = args.out if args.out is not None or args.quick else common.REPO / "benchmarks" / "results"
    text = markdown(report)
    if out is None:
        print(text)
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "fsdp_cpu.json").write_text(json.dumps(report, indent=1))
    (out / "fsdp_cpu.md").write_text(text)
    fsdp_projection.plot(report["projection"], out / "fsdp_projection.png")
    print(text)


if __name__ == "__main__":
    main()
