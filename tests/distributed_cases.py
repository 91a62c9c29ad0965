"""What each rank runs in tests/test_distributed.py (module-level functions, so spawned processes
can import them). Every rank builds the same float64 model from one seed, the same global batch,
takes its shard and computes the reference itself: the single-process result on the whole batch."""

from __future__ import annotations

import copy
import warnings
import zlib

import torch
import torch.distributed as dist
from torch import Tensor, nn

import egn_fast
from egn_fast import resolve_loss
from egn_fast.distributed import MODES, DataParallel
from egn_fast.distributed.shard import ShardedRows
from models import make, targets
from oracle import dense_direction, rel_err
from token_models import TinyGPT, randomize, token_data

LOSSES = ["mse", "cross_entropy", "bce"]
# dense, sequence, embedding, norms, the generic rule (custom module, MultiheadAttention), a tied
# parameter across modules (merged rows), convolution
EXACT_KINDS = ["mlp", "seq_linear", "embedding", "norms", "custom_module", "multihead_attention", "shared_across_modules", "conv1d"]


def shard_sizes(world: int) -> list[int]:
    """Unequal shards of a global batch of 10: [4, 6] or [2, 3, 5]."""
    return {1: [10], 2: [4, 6], 3: [2, 3, 5]}[world]


def problem(kind: str, loss: str, seed: int) -> tuple[nn.Module, Tensor, Tensor]:
    """A float64 model and a global batch of 10 random samples with targets."""
    model, x0 = make(kind, True, seed)
    x1 = make(kind, True, seed + 1)[1]
    return model, torch.cat([x0, x1]), targets(loss, b=10, seed=seed)


def shard(rank: int, world: int, *tensors: Tensor) -> list[Tensor]:
    sizes = shard_sizes(world)
    start = sum(sizes[:rank])
    return [t[start:start + sizes[rank]] for t in tensors]


def exact_directions(rank: int, world: int, cases: list[tuple[str, str, bool]]) -> dict:
    """Per case, the exact distributed direction (flat) and, on rank 0, its rel. error vs the
    single-process direction on the whole batch (and the dense oracle for one case)."""
    out = {}
    for kind, loss, ddp in cases:
        seed = zlib.crc32(repr((kind, loss)).encode()) % 10_000
        model, x, y = problem(kind, loss, seed)
        xr, yr = shard(rank, world, x, y)
        wrapped = nn.parallel.DistributedDataParallel(model) if ddp else model
        got = egn_fast.direction(wrapped, xr, yr, loss=loss, damping=0.1, process_group=dist.group.WORLD)
        err = None
        if rank == 0:
            err = rel_err(got, egn_fast.direction(model, x, y, loss=loss, damping=0.1))
            if kind == "mlp" and loss == "cross_entropy":
                err = max(err, rel_err(got, dense_direction(model, x, y, resolve_loss(loss), 0.1)))
        out[(kind, loss, ddp)] = (torch.cat([t.reshape(-1) for t in got]), err)
        if kind == "multihead_attention":  # its generic-rule rows take the parameter-sharded route
            system = DataParallel(dist.group.WORLD, "exact", x.device).build_system(model, xr, yr, loss=loss)
            out[("sharded", kind, loss)] = sum(isinstance(f, ShardedRows) for f in system.glob.factors)
    return out


def local_mode(rank: int, world: int) -> dict:
    """The local mode vs the mean of each shard's single-process direction."""
    model, x, y = problem("seq_linear", "cross_entropy", 7)
    per_rank = [egn_fast.direction(model, *shard(r, world, x, y), loss="cross_entropy", damping=0.1) for r in range(world)]
    want = [sum(ds) / world for ds in zip(*per_rank)]
    xr, yr = shard(rank, world, x, y)
    got = egn_fast.direction(model, xr, yr, loss="cross_entropy", damping=0.1, process_group=dist.group.WORLD, distributed="local")
    exact = egn_fast.direction(model, x, y, loss="cross_entropy", damping=0.1)
    out = dict(err=rel_err(got, want), distance_to_exact=rel_err(got, exact))
    # the global gradient and sᵀHs the optimizer uses, in both modes, vs one process
    whole = egn_fast.build_system(model, x, y, loss="cross_entropy")
    steps = [torch.randn_like(p) for p in whole.params]
    want_curvature = float(egn_fast.row_jvp(whole, egn_fast.forward_of(model, x, y, None), steps).pow(2).sum()) / whole.b
    for mode in MODES:
        dp = DataParallel(dist.group.WORLD, mode, x.device)
        system = dp.build_system(model, xr, yr, loss="cross_entropy")
        curvature = system.curvature(egn_fast.forward_of(model, xr, yr, None), steps)
        out[mode] = (rel_err(system.gradient(), whole.gradient()), abs(curvature - want_curvature) / want_curvature,
                     abs(system.loss - whole.loss))
    return out


def bad_inputs(rank: int, world: int) -> dict:
    """A NaN in rank 1's inputs, then out-of-range targets on the last rank: every rank must raise,
    naming the rank; afterwards the group still works (Monte-Carlo rows and per-token targets,
    refused before, now equal one process: tests/test_distributed_lm.py checks them in depth)."""
    model, x, y = problem("mlp", "cross_entropy", 3)
    xr, yr = shard(rank, world, x, y)
    raised = {}
    if rank == 1:
        xr = xr.clone()
        xr[0, 1] = float("nan")
    for name, inputs, labels in [("nan", xr, yr), ("targets", shard(rank, world, x, y)[0], yr + 10 * (rank == world - 1))]:
        try:
            egn_fast.direction(model, inputs, labels, loss="cross_entropy", process_group=dist.group.WORLD)
            raised[name] = None
        except ValueError as err:
            raised[name] = (type(err).__name__, str(err))
    seq, xs, ys = problem("seq_linear", "mse", 5)  # a longer sequence on rank 0: refused everywhere
    xs = torch.cat([xs, xs[:, :1]], 1) if rank == 0 else xs
    replica = copy.deepcopy(model)  # rank 1's replica differs by one ulp-scale change: refused everywhere
    if rank == 1:
        with torch.no_grad():
            replica[0].weight[0, 0] += 1e-12
    lm = randomize(TinyGPT().double(), 1)
    ids, tokens = token_data(10, 6, 5, 2)
    for name, call in [("seq_len", lambda: egn_fast.direction(seq, *shard(rank, world, xs, ys), process_group=dist.group.WORLD)),
                       ("replicas", lambda: egn_fast.EGN(replica, process_group=dist.group.WORLD))]:
        try:
            call()
            raised[name] = None
        except ValueError as err:
            raised[name] = str(err)
    mc = lambda: dict(loss="cross_entropy", curvature="mc", generator=torch.Generator().manual_seed(1))
    raised["mc"] = rel_err(egn_fast.direction(model, *shard(rank, world, x, y), process_group=dist.group.WORLD, **mc()),
                           egn_fast.direction(model, x, y, **mc()))
    raised["per_token"] = rel_err(egn_fast.direction(lm, *shard(rank, world, ids, tokens), loss="cross_entropy",
                                                     process_group=dist.group.WORLD),
                                  egn_fast.direction(lm, ids, tokens, loss="cross_entropy"))
    opt = egn_fast.EGN(model, loss="cross_entropy", process_group=dist.group.WORLD, skip_nonfinite=True)
    bad = shard(rank, world, x, y)[0].clone()
    if rank == 0:
        bad[:] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = opt.step(bad, yr)
    raised["skipped"] = (info.accepted, info.reason)
    d = egn_fast.direction(model, *shard(rank, world, x, y), loss="cross_entropy", process_group=dist.group.WORLD)
    raised["after"] = rel_err(d, egn_fast.direction(model, x, y, loss="cross_entropy"))
    return raised


def _optimizer(model: nn.Module, momentum: float, group) -> egn_fast.EGN:
    return egn_fast.EGN(
        model, loss="cross_entropy", lr=1.0, damping=0.5, momentum=momentum, line_search="armijo",
        adaptive_damping=True, process_group=group,
    )


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def optimizer_steps(rank: int, world: int, path: str) -> dict:
    """5 EGN steps (Armijo, adaptive damping, with and without momentum) on shards vs one process on
    the whole batch; then rank 0 saves, every rank loads into a fresh copy, and 2 more steps must
    match continuing without the round trip."""
    out = {}
    for momentum in (0.0, 0.9):
        model, x, y = problem("norms", "cross_entropy", 11)
        if momentum:  # a wide LayerNorm: its rows take the parameter-sharded route (sᵀHs by row JVPs)
            model = nn.Sequential(nn.Linear(4, 48), nn.LayerNorm(48), nn.Tanh(), nn.Linear(48, 3)).double()
            x = x[:, 0]
        batches = [(x, y)] + [(xb[:, 0] if momentum else xb, yb) for xb, yb in (problem("norms", "cross_entropy", 12 + k)[1:] for k in range(4))]
        single, dp = copy.deepcopy(model), copy.deepcopy(model)
        ref, opt = _optimizer(single, momentum, None), _optimizer(dp, momentum, dist.group.WORLD)
        infos = []
        for xb, yb in batches:
            want = ref.step(xb, yb)
            got = opt.step(*shard(rank, world, xb, yb))
            infos.append((got.accepted == want.accepted, abs(got.loss - want.loss), got.damping == want.damping))
        out[momentum] = dict(err=rel_err([_flat(dp)], [_flat(single)]), infos=infos, params=_flat(dp))
        system = DataParallel(dist.group.WORLD, "exact", x.device).build_system(dp, *shard(rank, world, x, y), loss="cross_entropy")
        out[momentum]["sharded"] = sum(isinstance(f, ShardedRows) for f in system.glob.factors)
        if momentum:
            if rank == 0:
                torch.save(opt.state_dict(), path)
            dist.barrier()
            resumed = copy.deepcopy(dp)
            opt2 = _optimizer(resumed, momentum, dist.group.WORLD)
            opt2.load_state_dict(torch.load(path, weights_only=False))
            for xb, yb in batches[:2]:
                opt.step(*shard(rank, world, xb, yb))
                opt2.step(*shard(rank, world, xb, yb))
            out["resumed_equal"] = torch.equal(_flat(resumed), _flat(dp))
            out["state_damping"] = opt2.damping == opt.damping
    return out
