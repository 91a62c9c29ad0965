"""Data-parallel EGN under torchrun: every rank steps on its own shard of the batch and gets the
exact direction of the whole batch. Runs on the CPU (gloo) as written:

    torchrun --standalone --nproc_per_node=2 examples/torchrun_egn.py
    torchrun --standalone --nproc_per_node=2 examples/torchrun_egn.py --mode local

On GPUs: init_process_group("nccl"), torch.cuda.set_device(local rank), model and data .cuda().
"""

from __future__ import annotations

import argparse
import zlib

import torch
import torch.distributed as dist
# before init_process_group: its `group=group.WORLD` defaults, bound at import (the first torch
# optimizer imports it), would otherwise hold the group past destroy_process_group()
import torch.distributed.nn  # noqa: F401
from torch import nn

import egn_fast


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["exact", "local"], default="exact")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    torch.manual_seed(0)  # the same initial parameters on every rank (or broadcast them, or wrap in DDP)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 3))
    g = torch.Generator().manual_seed(1)  # one global data set; each rank reads its shard
    x = torch.randn(96, 20, generator=g)
    y = (x[:, :3] @ torch.randn(3, 3, generator=g)).argmax(1)
    x_local, y_local = x[rank::world], y[rank::world]

    opt = egn_fast.EGN(
        model, loss="cross_entropy", damping=1.0, line_search="armijo", adaptive_damping=True,
        process_group=dist.group.WORLD, distributed=args.mode,
    )
    for step in range(args.steps):
        info = opt.step(x_local, y_local)  # info.loss is the global batch's loss, equal on every rank
        if rank == 0:
            print(f"step {step}: loss {info.loss:.6f} -> {info.loss_after:.6f}, damping {info.damping:.3g}, accepted {info.accepted}")

    # every rank ends with bit-identical parameters
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    crcs: list[int] = [0] * world
    dist.all_gather_object(crcs, zlib.crc32(flat.numpy().tobytes()))
    if rank == 0:
        print(f"{world} ranks, identical parameters: {len(set(crcs)) == 1}")
    # destroy_process_group() stops gloo's worker threads only when nothing else holds the group:
    # drop the optimizer first (and see the import at the top). A worker left alive can free the
    # last collective's tensors during interpreter shutdown and abort the process ("terminate
    # called without an active exception", pytorch/pytorch#117762).
    del opt
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
