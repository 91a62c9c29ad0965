"""benchmarks/fsdp.py's projection to 8 GPUs × 1–8 nodes (weak scaling: the benchmark's GPT-2 and
T, `per_gpu` sequences per GPU).

Byte model: every counted stage of EGN's sharded step is a measured constant times how the stage
scales with the ranks R, the per-rank batch b_r and the global row count m = b·k (`SCALING`):
parameter-sized collectives (FSDP's all-gathers and reduce-scatter, egn_fast's per-parameter
all-gathers, the shard route's back-projection) (R−1)/R; the factor all-gather (R−1)·b_r (every
rank receives every other rank's factors); the shard route's row all-to-all (R−1)/R·b_r, its
Gram all-reduce (R−1)/R·m², its projection all-reduce (R−1)/R·m; the syncs (R−1). The
constants are fitted on the 2-rank count and checked against the 4-rank count; the projection
uses the largest measured R. It keeps the routes the code chose at the measured sizes. Time =
bytes / NCCL bus bandwidth + calls × latency (NVLink in one node, InfiniBand across nodes), with
benchmarks/distributed.py's constants (and their sources). FSDP's first-order communication is
the analytic formula (fsdp_ranks.adamw_bytes, equal to the count). The Gram (the layers' multiply-
adds by the method the code picks, distributed._gram_macs, on the global m rows) and the Cholesky
(m³/3) are what every rank does redundantly, at distributed.GPU_FLOPS. Compute of the forward and
backward passes and any overlap of communication with compute are not modelled.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

import distributed
import egn_fast
import fsdp_ranks
from distributed import GPU_FLOPS, IB_BUSBW, IB_LATENCY, NVLINK_BUSBW, NVLINK_LATENCY
from fsdp_ranks import Config

NODES = (1, 2, 4, 8)
PER_GPU = (4, 32)  # sequences per GPU


def scaling(stage: str, R: int, b_r: int, m: int) -> float:
    """How a stage's bytes grow with R ranks, b_r sequences per rank and m global rows."""
    if "factor all-gather" in stage:
        return (R - 1) * b_r
    if "row all-to-all" in stage:
        return (R - 1) / R * b_r
    if "Gram all-reduce" in stage:
        return (R - 1) / R * m * m
    if "projection all-reduce" in stage:
        return (R - 1) / R * m
    if "sync" in stage or "seed" in stage:
        return R - 1
    return (R - 1) / R  # parameter-sized


def fit(run: dict, cfg: Config, s: int) -> dict[str, float]:
    """Per stage: counted bytes / scaling at the run's R."""
    R = run["world"]
    return {st: b / scaling(st, R, cfg.per_rank, R * cfg.per_rank * s) for st, b in run["stages"].items()}


def predict(unit: dict[str, float], R: int, b_r: int, s: int) -> dict[str, float]:
    """Per stage: the fitted constant times the stage's scaling at R ranks, b_r sequences per rank."""
    return {st: u * scaling(st, R, b_r, R * b_r * s) for st, u in unit.items()}


def gram_flops(cfg: Config) -> tuple[int, Callable[[int, int], float]]:
    """(s, flops(m, b)): rows per sequence and the global Gram's flops, from the layers' factors
    of a one-process build on 2 sequences."""
    model = fsdp_ranks.gpt2(cfg)
    ids, y = fsdp_ranks.batch(replace(cfg, per_rank=2), 0, 0)
    system = egn_fast.build_system(model, ids, y, loss="cross_entropy", curvature="mc", mc_samples=cfg.mc_samples,
                                   generator=torch.Generator().manual_seed(0), gram=False)
    factors = list(system.factors)
    return system.s, lambda m, b: 2 * sum(distributed._gram_macs(f, m, b) for f in factors)


def projection(cfg: Config, report: dict) -> dict:
    """The byte model's check against the counts and the projected seconds per step."""
    runs = {(r["world"], r["mode"]): r for r in report["runs"]}
    worlds = sorted(report["worlds"])
    s, flops = gram_flops(cfg)
    first, last = runs[(worlds[0], "egn_sharded")], runs[(worlds[-1], "egn_sharded")]
    check = None
    if len(worlds) > 1:
        predicted = sum(predict(fit(first, cfg, s), worlds[-1], cfg.per_rank, s).values())
        check = dict(fit_on=worlds[0], checked_on=worlds[-1], predicted=predicted, counted=last["bytes"], ratio=predicted / last["bytes"])
    unit, calls = fit(last, cfg, s), sum(last["calls"].values())
    adamw_calls = sum(runs[(worlds[-1], "adamw_sharded")]["calls"].values())
    shapes = fsdp_ranks.parameter_shapes(cfg)
    rows = []
    for per_gpu in PER_GPU:
        for nodes in NODES:
            R = 8 * nodes
            b, m = R * per_gpu, R * per_gpu * s
            bw, lat = (NVLINK_BUSBW, NVLINK_LATENCY) if nodes == 1 else (IB_BUSBW, IB_LATENCY)
            egn_bytes = sum(predict(unit, R, per_gpu, s).values())
            fsdp_bytes = sum(fsdp_ranks.adamw_bytes(shapes, R).values())
            gram, chol = flops(m, b) / GPU_FLOPS, m**3 / 3 / GPU_FLOPS
            egn_s, fsdp_s = egn_bytes / bw + calls * lat, fsdp_bytes / bw + adamw_calls * lat
            rows.append(dict(per_gpu=per_gpu, nodes=nodes, gpus=R, m=m, egn_bytes=egn_bytes, fsdp_bytes=fsdp_bytes, egn_comm_s=egn_s,
                             fsdp_comm_s=fsdp_s, gram_s=gram, cholesky_s=chol, compute_s=gram + chol, comm_over_compute=egn_s / (gram + chol)))
    return dict(check=check, s=s, egn_calls=calls, adamw_calls=adamw_calls, rows=rows)


def markdown(proj: dict) -> str:
    """The projection's section of fsdp_cpu.md."""
    lines = ["## Projection: 8 GPUs per node, 1–8 nodes (weak scaling, same model and T)", "",
             f"Per step and rank: EGN's sharded communication from the byte model ({proj['egn_calls']} collective calls per step) vs "
             f"FSDP's first-order communication (AdamW, {proj['adamw_calls']} calls) vs the Gram + Cholesky every rank does redundantly "
             f"(m = b·k global rows, {proj['s']} per sequence). Bandwidths and latency: NVLink 450 GB/s bus bandwidth, 10 µs per call "
             "in a node; 400 Gb/s InfiniBand at 90 % (45 GB/s), 25 µs across nodes; GPU: H100 fp32 at 50 % of 67 TFLOP/s "
             "(benchmarks/distributed.py, sources cited there). No overlap of communication with compute is modelled; "
             "forward/backward compute is not included.", ""]
    if proj["check"]:
        c = proj["check"]
        lines += [f"Byte model check: fitted on the {c['fit_on']}-rank count, it predicts {c['predicted'] / 2**20:,.2f} MiB for "
                  f"{c['checked_on']} ranks, counted {c['counted'] / 2**20:,.2f} MiB (ratio {c['ratio']:.3f}).", ""]
    lines += ["| seq/GPU | nodes | GPUs | m | EGN comm MiB | FSDP 1st-order MiB | EGN comm (s) | FSDP comm (s) | Gram (s) | Cholesky (s) | EGN comm / (Gram + Cholesky) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in proj["rows"]:
        lines.append(f"| {r['per_gpu']} | {r['nodes']} | {r['gpus']} | {r['m']} | {r['egn_bytes'] / 2**20:,.1f} | {r['fsdp_bytes'] / 2**20:,.1f} | "
                     f"{r['egn_comm_s']:.2e} | {r['fsdp_comm_s']:.2e} | {r['gram_s']:.2e} | {r['cholesky_s']:.2e} | {r['comm_over_compute']:.2f} |")
    lines.append("")
    for per_gpu in PER_GPU:
        mine = [r for r in proj["rows"] if r["per_gpu"] == per_gpu]
        over = ", ".join(str(r["gpus"]) for r in mine if r["comm_over_compute"] > 1)
        under = ", ".join(str(r["gpus"]) for r in mine if r["comm_over_compute"] <= 1)
        lines.append(f"- {per_gpu} sequences per GPU: EGN's communication exceeds the Gram + Cholesky "
                     f"{'at ' + over + ' GPUs' if over else 'at no size'}; the Gram + Cholesky exceeds it "
                     f"{'at ' + under + ' GPUs' if under else 'at no size'}. EGN / FSDP first-order bytes: "
                     + ", ".join(f"{r['egn_bytes'] / r['fsdp_bytes']:.1f}× ({r['gpus']} GPUs)" for r in mine) + ".")
    return "\n".join(lines)


def plot(proj: dict, path: Path) -> None:
    """Projected seconds per step against nodes: EGN comm, FSDP comm, Gram + Cholesky."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for per_gpu, style in zip(PER_GPU, ("--", "-")):
        mine = [r for r in proj["rows"] if r["per_gpu"] == per_gpu]
        nodes = [r["nodes"] for r in mine]
        for key, label, color in (("egn_comm_s", "EGN sharded: communication", "C3"), ("fsdp_comm_s", "FSDP first-order: communication", "C2"),
                                  ("compute_s", "EGN: Gram + Cholesky (every rank)", "k")):
            ax.loglog(nodes, [r[key] for r in mine], style, color=color, marker="o", label=f"{label}, {per_gpu} seq/GPU")
    ax.set(title="Projected seconds per step (8 H100 per node)", xlabel="nodes (8 GPUs each)", ylabel="seconds")
    ax.set_xticks(list(NODES), [str(n) for n in NODES])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
