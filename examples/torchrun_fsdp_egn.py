"""EGN on a sharded model under torchrun: a character-level GPT-2 (from a config) with its
parameters sharded by FSDP2's `fully_shard` per transformer block and at the root, trained with
Monte-Carlo rows (`curvature="mc"`). Each rank holds 1/R of every parameter and passes its own
sequences; every rank gets its own shard of the exact step of the whole batch. Runs on the CPU
(gloo) as written:

    torchrun --standalone --nproc_per_node=2 examples/torchrun_fsdp_egn.py
    torchrun --standalone --nproc_per_node=2 examples/torchrun_fsdp_egn.py --steps 50 --checkpoint ckpt

The text is any file (default: this repository's README.md); the last 10 % is held out. On GPUs:
init_process_group("nccl"), torch.cuda.set_device(local rank), init_device_mesh("cuda", ...), the
model and batches .cuda().
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch
import torch.distributed as dist
# before init_process_group: its `group=group.WORLD` defaults, bound at import, would otherwise hold
# the group past destroy_process_group() (see examples/torchrun_egn.py)
import torch.distributed.nn  # noqa: F401
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import GPT2Config, GPT2LMHeadModel

import egn_fast

REPO = Path(__file__).resolve().parents[1]


def batch(data: torch.Tensor, T: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n random windows of T + 1 characters: inputs (n, T), next-character targets (n, T)."""
    g = torch.Generator().manual_seed(seed)  # the same global batch on every rank
    starts = torch.randint(len(data) - T - 1, (n,), generator=g)
    windows = torch.stack([data[s : s + T + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--text", default=str(REPO / "README.md"), help="a text file to model (default: README.md)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="sequences per step, all ranks together")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--checkpoint", default=None, help="save model and optimizer with torch.distributed.checkpoint here")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    text = Path(args.text).read_text(encoding="utf-8")
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    cut = int(0.9 * len(data))
    train, held_out = data[:cut], data[cut:]

    torch.manual_seed(0)  # fully_shard keeps each rank's rows of its own copy: initialize identically
    config = GPT2Config(vocab_size=len(chars), n_positions=args.seq_len, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the embeddings, the final norm and the tied head

    # no process_group: a sharded model runs over its mesh's ranks; the Monte-Carlo labels come
    # from one generator whose seed rank 0 chose, so the draws do not depend on the split
    opt = egn_fast.EGN(model, loss="cross_entropy", curvature="mc", mc_samples=2, damping=1.0,
                       line_search="armijo", adaptive_damping=True)
    n_local = args.batch // world + (rank < args.batch % world)
    first = sum(args.batch // world + (r < args.batch % world) for r in range(rank))

    def loss_on(ids: torch.Tensor, targets: torch.Tensor) -> float:
        mine = slice(first, first + n_local)
        with torch.no_grad():
            logits = model(input_ids=ids[mine]).logits
        total = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[mine].flatten(), reduction="sum").reshape(1)
        dist.all_reduce(total)
        return float(total) / targets.numel()

    val_ids, val_y = batch(held_out, args.seq_len, args.batch, seed=2**31 - 1)
    before = loss_on(val_ids, val_y)
    for step in range(args.steps):
        ids, y = batch(train, args.seq_len, args.batch, seed=step)
        mine = slice(first, first + n_local)
        info = opt.step(closure=lambda: (model(input_ids=ids[mine]).logits, y[mine]))  # info.loss: the whole batch's
        if rank == 0:
            print(f"step {step}: loss {info.loss:.4f} -> {info.loss_after:.4f}, damping {info.damping:.3g}, accepted {info.accepted}")
    # each rank holds its own rows of every parameter (an EGN step leaves FSDP's modules resharded)
    sharded = all(isinstance(p, DTensor) and p.to_local().shape[0] < p.shape[0] for p in model.parameters())
    after = loss_on(val_ids, val_y)
    if rank == 0:
        print(f"held-out loss {before:.4f} -> {after:.4f}")
        print(f"{world} ranks, parameters still sharded: {sharded}")
    if args.checkpoint:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=args.checkpoint)
        if rank == 0:
            print(f"saved {args.checkpoint}")
    # Nothing may hold the group at destroy_process_group() (see examples/torchrun_egn.py): FSDP's
    # modules, the mesh and the optimizer do, some through reference cycles, hence the collection.
    # Otherwise gloo's threads can abort the process at exit (2 runs in 8 here; 0 in 18 with this).
    del opt, model, mesh, loss_on
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
