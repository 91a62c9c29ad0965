"""Data-parallel EGN (egn_fast.distributed, docs/design.md §6): communication and step time.

1. Bytes sent per rank per step, per layer, by the two exact routes and by DDP's gradient
   all-reduce, counted from the real layer factors of a shard (R ranks, ring collectives: an
   all-gather of n numbers per rank sends (R−1)·n, an all-reduce of N sends 2(R−1)/R·N):
   - gather: all-gather each layer's factors, or its per-sample rows where those are smaller
     (`sendable`), plus the loss head (ℓ, r, S, w);
   - shard: all-to-all of every layer's per-sample rows by parameter slice (each rank keeps 1/R
     of the columns of all m rows: m_r·n_l·(R−1)/R) and one all-reduce of the m × m Gram;
   - chosen (what the code does): gather, except that the layers whose rows travel as per-sample
     gradients are sharded when `shard_pays` (+ the all-gather of their back-projected slices);
   - DDP: all-reduce of the gradient (d numbers).
2. Step time with 1 and 2 processes (gloo, one thread each), exact vs local.
3. A projection to 8 GPUs × 1–8 nodes (weak scaling, 64 samples per GPU): communication time
   = bytes sent per rank / NCCL bus bandwidth vs the Gram + Cholesky that every rank does on the
   global m × m system, at a stated fraction of the GPU's fp32 peak.

    PYTHONPATH=. python benchmarks/distributed.py            # writes results/distributed_cpu.{json,md}
    PYTHONPATH=. python benchmarks/distributed.py --quick    # smoke run, nothing written
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import egn_fast  # noqa: E402
from egn_fast.distributed import factor_bytes, row_bytes, sendable  # noqa: E402
from egn_fast.distributed.shard import shard_pays  # noqa: E402

# NCCL bus bandwidths (nccl-tests "busbw"): 8×H100 SXM NVLink-4 all-reduce 460–480 GB/s
# (docs.alayanew.com/en/docs/tech-blog/2026-05-06-nccl-tests); across nodes one 400 Gb/s NDR
# InfiniBand NIC per GPU, 50 GB/s line rate, taken at 90 %. Latency per collective: 10 µs in a node,
# 25 µs across nodes (orders of magnitude of nccl-tests small-message times).
NVLINK_BUSBW, IB_BUSBW = 450e9, 45e9
NVLINK_LATENCY, IB_LATENCY = 10e-6, 25e-6
# H100 SXM fp32 (non-tensor-core) peak 67 TFLOP/s (NVIDIA H100 datasheet), taken at 50 %.
GPU_FLOPS = 0.5 * 67e12


class TinyTransformer(nn.Module):
    """Embedding(256, 64) → one TransformerEncoderLayer (4 heads, ff 128) → mean over T → Linear(64, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, 64)
        self.block = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.emb(tokens)).mean(1))


def problem(name: str, b: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model (same parameters for every seed-0 caller), inputs and cross-entropy targets."""
    torch.manual_seed(0)
    if name == "mlp":
        model: nn.Module = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    else:
        model = TinyTransformer()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(b, 784, generator=g) if name == "mlp" else torch.randint(0, 256, (b, 32), generator=g)
    return model, x, torch.randint(0, 10, (b,), generator=g)


def bytes_per_step(name: str, b: int, world: int) -> dict:
    """Per layer and in total: bytes each rank sends per step by each route (shard b/world)."""
    model, x, y = problem(name, b // world)
    system = egn_fast.build_system(model, x, y, loss="cross_entropy", gram=False)
    m_r, s, dtype = system.b * system.s, system.s, system.w.dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    names = {id(p): n for n, p in model.named_parameters()}
    head = system.head
    layers, head_bytes = [], sum(t.numel() * t.element_size() for t in (head.per_sample, head.r, head.S, head.w))
    for f in system.factors:
        sent = sendable(f, system.backend, dtype)
        gather_form = "rows" if isinstance(sent, egn_fast.PerSampleFactors) else "factors"
        n_params = sum(p.numel() for p in f.params)
        layers.append(dict(
            layer=",".join(names[id(p)] for p in f.params), params=n_params, form=gather_form,
            rows_bytes=row_bytes(f, dtype) if not isinstance(f, egn_fast.PerSampleFactors) else factor_bytes(f),
            gather=(world - 1) * factor_bytes(sent), shard=int(m_r * n_params * itemsize * (world - 1) / world),
            ddp=int(2 * (world - 1) / world * n_params * itemsize),
        ))
    m = m_r * world
    rows_n = sum(layer["params"] for layer in layers if layer["form"] == "rows")
    sharded = shard_pays(rows_n, m, world)  # the code's choice for the per-sample-row layers
    for layer in layers:
        layer["chosen"] = "shard" if sharded and layer["form"] == "rows" else "gather"
    total = dict(
        chosen=sum(layer[layer["chosen"]] for layer in layers) + (world - 1) * head_bytes
        + (int(2 * (world - 1) / world * m * m * itemsize) + (world - 1) * -(-rows_n // world) * itemsize if sharded else 0),
        gather=sum(l["gather"] for l in layers) + (world - 1) * head_bytes,
        shard=sum(l["shard"] for l in layers) + int(2 * (world - 1) / world * m * m * itemsize) + (world - 1) * head_bytes,
        ddp=sum(l["ddp"] for l in layers),
    )
    return dict(model=name, b=b, world=world, m=m, s=s, layers=layers, head_bytes=head_bytes, total=total)


def _timed_worker(rank: int, world: int, port: int, name: str, b: int, mode: str | None, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    if mode is not None:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model, x, y = problem(name, b)
    xr, yr = x[rank * b // world:(rank + 1) * b // world], y[rank * b // world:(rank + 1) * b // world]
    opt = egn_fast.EGN(model, loss="cross_entropy", damping=1.0, lr=0.5, process_group=dist.group.WORLD if mode else None, distributed=mode)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        opt.step(xr, yr)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps(statistics.median(times[1:])))
    if mode is not None:
        dist.destroy_process_group()


def step_time(name: str, b: int, world: int, mode: str | None, steps: int) -> float:
    """Median seconds of one EGN step (no line search) on `world` processes, one thread each."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"egn_dist_{os.getpid()}.json"
    if mode is None:  # one process: this one
        _timed_worker(0, 1, 0, name, b, None, steps, str(out))
    else:
        mp.spawn(_timed_worker, args=(world, free_port(), name, b, mode, steps, str(out)), nprocs=world)
    seconds = json.loads(out.read_text())
    out.unlink()
    return seconds


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def projection(name: str) -> list[dict]:
    """Weak scaling to 8 GPUs × N nodes, 4 or 64 samples per GPU: communication vs the global
    Gram + Cholesky every rank does (fp32)."""
    rows = []
    for per_gpu, nodes in [(p, n) for p in (4, 64) for n in (1, 2, 4, 8)]:
        world = 8 * nodes
        counted = bytes_per_step(name, per_gpu * world, world)
        m, b = counted["m"], per_gpu * world
        model, x, y = problem(name, per_gpu)
        system = egn_fast.build_system(model, x, y, loss="cross_entropy", gram=False)
        # the Gram's multiply-adds, from the layers' per-sample widths (dense: m²·out + b²·in)
        gram = sum(_gram_macs(f, m, b) for f in system.factors)
        compute = (2 * gram + m**3 / 3) / GPU_FLOPS
        bw, lat = (NVLINK_BUSBW, NVLINK_LATENCY) if nodes == 1 else (IB_BUSBW, IB_LATENCY)
        comm = {route: counted["total"][route] / bw + 4 * lat for route in ("chosen", "gather", "shard", "ddp")}
        rows.append(dict(per_gpu=per_gpu, nodes=nodes, gpus=world, m=m, compute_s=compute, **{f"{k}_s": v for k, v in comm.items()},
                         comm_over_compute=comm["chosen"] / compute))
    return rows


def _gram_macs(f: egn_fast.Factors, m: int, b: int) -> float:
    """Multiply-adds of a layer's share of the global Gram (m rows), by the method the code picks."""
    if isinstance(f, egn_fast.SeqFactors):
        A, G = f.groups[0]
        T, n_in, n_out = G.shape[2], A.shape[2], G.shape[3]
        ghost = T * T * (m * m * n_out + b * b * n_in)
        per_sample = m * T * n_out * n_in + m * m * n_out * n_in
        return len(f.groups) * (ghost if T == 1 else min(ghost, per_sample))
    if isinstance(f, egn_fast.EmbeddingFactors):
        return m * m * f.G.shape[2] ** 2 * f.G.shape[3]
    return m * m * sum(p.numel() for p in f.params)


def markdown(report: dict) -> str:
    lines = ["# Data-parallel EGN: communication per step and step time (CPU, gloo)", ""]
    for counted in report["bytes"]:
        lines += [f"## {counted['model']}, b = {counted['b']}, {counted['world']} ranks (m = {counted['m']}), bytes sent per rank per step", "",
                  "| layer | params | gathered as | gather | shard | chosen | DDP all-reduce |", "|---|---|---|---|---|---|---|"]
        for l in counted["layers"]:
            lines.append(f"| {l['layer']} | {l['params']} | {l['form']} | {l['gather']:,} | {l['shard']:,} | {l['chosen']} | {l['ddp']:,} |")
        t = counted["total"]
        lines += [f"| **total** (+ loss head {counted['head_bytes']:,} B/rank; shard: + m×m all-reduce) | | | **{t['gather']:,}** | **{t['shard']:,}** | **{t['chosen']:,}** | **{t['ddp']:,}** |", ""]
    lines += ["## Step time (median s, EGN step without line search, one thread per process)", "",
              "| model | b | 1 process | 2 processes exact | 2 processes local |", "|---|---|---|---|---|"]
    for r in report["step_time"]:
        lines.append(f"| {r['model']} | {r['b']} | {r['single']:.4f} | {r['exact']:.4f} | {r['local']:.4f} |")
    lines += ["", f"Local mode's distance to the exact direction (relative, MLP, b = 64, 2 ranks): {report['local_distance']:.3g}", ""]
    for name, rows in report["projection"].items():
        lines += [f"## Projection, {name}, 8 GPUs per node (weak scaling)", "",
                  "| samples/GPU | nodes | GPUs | m | Gram + Cholesky (s) | chosen comm (s) | gather comm (s) | shard comm (s) | DDP comm (s) | chosen / compute |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['per_gpu']} | {r['nodes']} | {r['gpus']} | {r['m']} | {r['compute_s']:.2e} | {r['chosen_s']:.2e} | {r['gather_s']:.2e} | "
                         f"{r['shard_s']:.2e} | {r['ddp_s']:.2e} | {r['comm_over_compute']:.3g} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Projected seconds per step against GPUs: compute vs each route's communication."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report["projection"]), figsize=(6 * len(report["projection"]), 4), squeeze=False)
    for ax, (name, rows) in zip(axes[0], report["projection"].items()):
        for per_gpu, style in ((4, "--"), (64, "-")):
            mine = [r for r in rows if r["per_gpu"] == per_gpu]
            gpus = [r["gpus"] for r in mine]
            for key, label, color in (("compute_s", "Gram + Cholesky", "k"), ("chosen_s", "EGN exact (chosen routes)", "C3"),
                                      ("gather_s", "gather", "C0"), ("shard_s", "shard", "C1"), ("ddp_s", "DDP all-reduce", "C2")):
                ax.loglog(gpus, [r[key] for r in mine], style, color=color, marker="o", label=f"{label}, {per_gpu}/GPU")
        ax.set(title=f"{name}: projected s per step (8 GPUs/node)", xlabel="GPUs", ylabel="seconds")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def local_distance() -> float:
    """‖d_local − d_exact‖/‖d_exact‖ for the MLP, b = 64 split in 2: the mean of the two shards'
    single-process directions (what local mode returns) vs the whole batch's."""
    model, x, y = problem("mlp", 64)
    halves = [egn_fast.direction(model, x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32], loss="cross_entropy") for i in (0, 1)]
    local = [(a + c) / 2 for a, c in zip(*halves)]
    return common.rel_err(local, egn_fast.direction(model, x, y, loss="cross_entropy"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: the MLP's byte count and one timed config; writes nothing")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=common.REPO / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = ["mlp"] if args.quick else ["mlp", "transformer"]
    report: dict = dict(machine=common.machine_info(), bytes=[bytes_per_step(n, 64, 2) for n in models])
    report["step_time"] = []
    for name in models:
        b = 64 if name == "mlp" else 16
        steps = 1 if args.quick else args.steps
        row = dict(model=name, b=b, single=step_time(name, b, 1, None, steps))
        if not args.quick:
            row.update(exact=step_time(name, b, 2, "exact", steps), local=step_time(name, b, 2, "local", steps))
        report["step_time"].append(row)
        print(row, flush=True)
    if args.quick:
        print(json.dumps(report["bytes"][0]["total"]))
        return
    report["local_distance"] = local_distance()
    report["projection"] = {name: projection(name) for name in models}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distributed_cpu.json").write_text(json.dumps(report, indent=1))
    (args.out / "distributed_cpu.md").write_text(markdown(report))
    plot(report, args.out / "distributed_projection.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
