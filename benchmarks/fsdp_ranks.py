"""What each rank of benchmarks/fsdp.py runs: a GPT-2 (Hugging Face, from a GPT2Config) sharded
with FSDP2's `fully_shard` per block and at the root (tied embedding/head in the root's group), or
replicated, trained one step at a time by EGN (Monte-Carlo rows) or AdamW; step times, one step's
collectives counted by stage (`collective_count.CollectiveCounter`), and the process's peak RSS.

Each configuration runs in freshly spawned processes (gloo on 127.0.0.1, one thread each), so the
peak RSS (VmHWM) is that configuration's alone: everything in the process (torch, transformers,
the model, activations, optimizer state, communication buffers)."""

from __future__ import annotations

import datetime
import json
import socket
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from collective_count import CollectiveCounter


@dataclass(frozen=True)
class Config:
    """The model (GPT-2 shape), the per-rank batch and the EGN options."""

    n_layer: int = 8
    n_embd: int = 512
    n_head: int = 8
    vocab: int = 16384
    T: int = 64
    per_rank: int = 4  # sequences per rank
    mc_samples: int = 1
    damping: float = 1.0
    warmup: int = 1
    steps: int = 3  # timed steps (median) after the warm-up


QUICK = Config(n_layer=2, n_embd=32, n_head=2, vocab=256, T=16, per_rank=4, steps=2)


class Logits(nn.Module):
    """A Hugging Face causal LM's logits (b, T, V) from its stock forward."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm(input_ids=input_ids).logits


def gpt2(cfg: Config) -> nn.Module:
    """The benchmark's GPT-2 (dropout off, tied embedding and head), float32, seed 0."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    conf = GPT2Config(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, vocab_size=cfg.vocab, n_positions=cfg.T,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                      bos_token_id=0, eos_token_id=0)
    return Logits(GPT2LMHeadModel(conf)).eval()


def shard(model: Logits, mesh) -> nn.Module:
    """fully_shard per transformer block, then the root (embeddings, final norm, tied head).

    Gloo has no ReduceOp.AVG, FSDP2's fp32 gradient reduce-scatter by default, so every group
    sums and divides locally (`set_force_sum_reduction_for_comms`): the same bytes on the wire
    (NCCL needs no such setting; egn_fast's own gradient backward sets it for its duration)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for block in model.lm.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)
    return model


def batch(cfg: Config, rank: int, step: int) -> tuple[Tensor, Tensor]:
    """This rank's ids (per_rank, T) and next-token targets, different for every rank and step."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(cfg.vocab, (cfg.per_rank, cfg.T + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def peak_rss_mib() -> float:
    """The process's peak resident set (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _worker(rank: int, world: int, port: int, cfg: Config, mode: str, out_dir: str) -> None:
    """mode: "egn_sharded" | "adamw_sharded" | "egn_replicated"."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        from torch.distributed.device_mesh import init_device_mesh

        model = gpt2(cfg)
        if mode.endswith("sharded"):
            model = shard(model, init_device_mesh("cpu", (world,)))
        if mode.startswith("egn"):
            group = None if mode == "egn_sharded" else dist.group.WORLD
            opt = __import__("egn_fast").EGN(model, loss="cross_entropy", curvature="mc", mc_samples=cfg.mc_samples,
                                             damping=cfg.damping, generator=torch.Generator().manual_seed(7), process_group=group)
            step = lambda ids, y: opt.step(ids, y)  # noqa: E731
        else:
            adamw = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step(ids: Tensor, y: Tensor) -> None:
                loss = nn.functional.cross_entropy(model(ids).reshape(-1, cfg.vocab), y.reshape(-1))
                loss.backward()
                adamw.step()
                adamw.zero_grad(set_to_none=True)

        times = []
        for k in range(cfg.warmup + cfg.steps):
            ids, y = batch(cfg, rank, k)
            dist.barrier()
            t0 = time.perf_counter()
            step(ids, y)
            times.append(time.perf_counter() - t0)
        ids, y = batch(cfg, rank, cfg.warmup + cfg.steps)
        dist.barrier()
        with CollectiveCounter() as counter:
            step(ids, y)
        out = dict(rank=rank, world=world, mode=mode, step_s=statistics.median(times[cfg.warmup:]), times=times,
                   stages=dict(counter.stages), calls=dict(counter.calls), bytes=counter.total(), peak_rss_mib=peak_rss_mib())
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_config(cfg: Config, world: int, mode: str, out_dir: Path, start_method: str = "spawn") -> list[dict]:
    """One configuration on `world` fresh processes (spawned, or forked: faster, for --quick);
    every rank's report, rank order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("rank*.json"):
        old.unlink()
    mp.start_processes(_worker, args=(world, free_port(), cfg, mode, str(out_dir)), nprocs=world, start_method=start_method)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


def parameter_shapes(cfg: Config) -> dict:
    """Parameter shapes of the model, split into the root's FSDP group and the blocks' groups."""
    model = gpt2(cfg)
    root, blocks = [], []
    for name, p in model.named_parameters():
        (blocks if ".h." in name else root).append(tuple(p.shape))
    return dict(root=root, blocks=blocks, params=sum(p.numel() for p in model.parameters()), config=asdict(cfg))


def padded_numel(shapes: list[tuple[int, ...]], world: int) -> int:
    """Elements of FSDP2's all-gather buffer for these parameters: dim 0 padded to a multiple of R."""
    total = 0
    for shape in shapes:
        rest = 1
        for n in shape[1:]:
            rest *= n
        total += -(-shape[0] // world) * world * rest
    return total


def adamw_bytes(shapes: dict, world: int, itemsize: int = 4) -> dict:
    """The analytic bytes per rank of a first-order step under this fully_shard layout: every
    group all-gathered in the forward, the blocks again in the backward (the root keeps its
    parameters unsharded after the forward: FSDP2's default for the root), every gradient
    reduce-scattered; ring: (R−1)/R of each padded buffer."""
    R, root, blocks = world, padded_numel(shapes["root"], world), padded_numel(shapes["blocks"], world)
    share = lambda n: (R - 1) * n * itemsize // R  # noqa: E731
    return {"FSDP param all-gather, forward": share(root + blocks), "FSDP param all-gather, batched/other backward": share(blocks),
            "FSDP grad reduce-scatter, batched/other backward": share(root + blocks)}
