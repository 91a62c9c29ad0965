"""What each rank runs in tests/test_fsdp.py: models sharded with FSDP2's `fully_shard` (per
child module and at the root) on a 1-D mesh (FSDP) or a replicate × shard mesh (HSDP). Every rank
builds the same float64 model from one seed and the same global batch, takes its own samples, and
computes the reference itself: one process on the whole batch with an unsharded copy."""

from __future__ import annotations

import copy
import zlib

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import egn_fast
from egn_fast import resolve_loss
from distributed_cases import problem
from oracle import dense_direction, rel_err
import hf_tiny
from hf_tiny import gpt2
from token_models import TinyGPT, causal_lm_logits, randomize

# unequal shards of a global batch of 10 (a rank with one sample is refused under sharding)
SIZES = {2: [4, 6], 4: [2, 2, 3, 3]}


def mesh_of(world: int, hsdp: bool):
    if hsdp:
        return init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh("cpu", (world,))


def shard_model(model: nn.Module, mesh, per_child: bool = True) -> nn.Module:
    """fully_shard on every child (every block of a ModuleList) that holds parameters (not those holding a tied one: tied
    parameters must share one FSDP group, here the root's), then on the root."""
    children = [c for top in model.children() for c in (top if isinstance(top, nn.ModuleList) else [top])]
    children = [c for c in children if any(True for _ in c.parameters())]  # a ModuleList's blocks one by one
    ids = [{id(p) for p in c.parameters()} for c in children]
    for c, own in zip(children, ids):
        if per_child and not any(own & other for other in ids if other is not own):
            fully_shard(c, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def mine(rank: int, world: int, *tensors: Tensor) -> list[Tensor]:
    sizes = SIZES[world]
    start = sum(sizes[:rank])
    return [t[start:start + sizes[rank]] for t in tensors]


def gathered(ds: list[Tensor]) -> list[Tensor]:
    return [d.full_tensor() if isinstance(d, DTensor) else d for d in ds]


def lm_problem(seed: int) -> tuple[nn.Module, Tensor, Tensor]:
    """TinyGPT (SDPA attention, LayerNorm, an embedding tied to the head) with squared-error targets
    on its logits (b, T, V); per-token cross-entropy is in test_distributed_lm."""
    model = randomize(TinyGPT(), seed).double()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, (10, 6), generator=g)
    return model, ids, torch.randn(10, 6, 5, generator=g, dtype=torch.float64)


def gpt2_problem(seed: int) -> tuple[nn.Module, Tensor, Tensor]:
    """A Hugging Face GPT-2 from a config (transformers' Conv1D layers, its attention, tied
    embedding and head) as a logits model, squared-error targets on the logits."""
    model = causal_lm_logits(gpt2(seed), seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(hf_tiny.V, (10, hf_tiny.T), generator=g)
    return model, ids, torch.randn(10, hf_tiny.T, hf_tiny.V, generator=g, dtype=torch.float64)


def shard_gpt2(model: nn.Module, mesh) -> nn.Module:
    """fully_shard per transformer block, then the root (embeddings, final norm, tied head)."""
    for block in model.lm.transformer.h:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def directions(rank: int, world: int, cases: list[tuple[str, str]], hsdp: bool) -> dict:
    """Per case: the sharded direction's error against one process on the whole batch (and, for
    one case, the dense oracle), whether it is placed like the parameters, and the full direction."""
    mesh = mesh_of(world, hsdp)
    out = {}
    for kind, loss in cases:
        seed = zlib.crc32(repr((kind, loss)).encode()) % 10_000
        make = {"tiny_gpt": lm_problem, "gpt2": gpt2_problem}.get(kind, lambda seed: problem(kind, loss, seed))
        model, x, y = make(seed)
        want = egn_fast.direction(model, x, y, loss=loss, damping=0.1)
        sharded = (shard_gpt2 if kind == "gpt2" else shard_model)(copy.deepcopy(model), mesh)
        got = egn_fast.direction(sharded, *mine(rank, world, x, y), loss=loss, damping=0.1)
        placed = all(isinstance(d, DTensor) and d.placements == p.placements and d.to_local().shape == p.to_local().shape
                     for d, p in zip(got, sharded.parameters()))
        err = rel_err(gathered(got), want)
        if kind == "mlp" and loss == "cross_entropy":
            err = max(err, rel_err(gathered(got), dense_direction(model, x, y, resolve_loss(loss), 0.1)))
        out[(kind, loss)] = (err, placed, torch.cat([d.reshape(-1) for d in gathered(got)]))
    if hsdp:  # a replica whose shard differs from its twin's is refused on every rank
        model = shard_model(problem("mlp", "mse", 1)[0], mesh)
        if rank == world - 1:
            with torch.no_grad():
                next(model.parameters()).to_local()[0, 0] += 1e-9
        try:
            egn_fast.EGN(model)
            out["replicas"] = None
        except ValueError as err:
            out["replicas"] = str(err)
    return out


def preconditioner_and_refusals(rank: int, world: int) -> dict:
    """EGNPreconditioner's .grad = −d (its own shard); the refusals, each one line."""
    mesh = mesh_of(world, False)
    model, x, y = problem("norms", "mse", 5)
    want = egn_fast.direction(model, x, y, damping=0.3)
    sharded = shard_model(copy.deepcopy(model), mesh)
    egn_fast.EGNPreconditioner(sharded, damping=0.3).step(*mine(rank, world, x, y))
    out = {"preconditioner": rel_err(gathered([-p.grad for p in sharded.parameters()]), want),
           "grad_placed": all(p.grad.placements == p.placements for p in sharded.parameters())}
    replica = copy.deepcopy(model)  # the replicated mode takes process_group= too
    egn_fast.EGNPreconditioner(replica, damping=0.3, process_group=dist.group.WORLD).step(*mine(rank, world, x, y))
    out["preconditioner_replicated"] = rel_err([-p.grad for p in replica.parameters()], want)
    xr, yr = mine(rank, world, x, y)
    row = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    attempts = {
        "local": lambda: egn_fast.direction(sharded, xr, yr, distributed="local"),
        "table": lambda: egn_fast.direction(fully_shard(_TableFeatures(), mesh=mesh), *mine(rank, world, *_table_batch())),
        "one_sample": lambda: egn_fast.direction(sharded, xr[: 1 + rank], yr[: 1 + rank]),
        "alone": lambda: egn_fast.build_system(sharded, xr, yr),
        "shard_dim_1": lambda: egn_fast.EGN(fully_shard(copy.deepcopy(row), mesh=mesh, shard_placement_fn=lambda p: Shard(p.dim() - 1))),
        "not_fully_shard": lambda: egn_fast.EGN(_tensor_parallel_like(copy.deepcopy(row), mesh)),
        "parametrized": lambda: egn_fast.EGN(fully_shard(_parametrized(copy.deepcopy(row)), mesh=mesh)),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
            out[name] = None
        except ValueError as err:
            out[name] = str(err)
    return out


class _TableFeatures(nn.Module):
    """A constant (5, 4) table through a layer, broadcast by the model itself (row-wise
    output-gradients, tests/test_no_false_refusals.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.randn(5, 4, dtype=torch.float64))
        self.pf, self.inp, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.inp(x) + self.pf(self.table)[None]).mean(1))


def _table_batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(10, 5, 4, generator=g, dtype=torch.float64), torch.randn(10, 3, generator=g, dtype=torch.float64)


class _Symmetrized(nn.Module):
    def forward(self, W: Tensor) -> Tensor:
        return W + 0.5 * W.flip(0)


def _parametrized(model: nn.Module) -> nn.Module:
    torch.nn.utils.parametrize.register_parametrization(model[0], "weight", _Symmetrized())
    return model


def _tensor_parallel_like(model: nn.Module, mesh) -> nn.Module:
    """A weight made a DTensor Shard(0) by hand, as tensor parallelism does, with no fully_shard."""
    layer = model[0]
    layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(0)]))
    return model


def _optimizer(model: nn.Module) -> egn_fast.EGN:
    return egn_fast.EGN(model, loss="cross_entropy", lr=1.0, damping=0.5, momentum=0.9, line_search="armijo", adaptive_damping=True)


def optimizer_steps(rank: int, world: int, path: str) -> dict:
    """5 EGN steps (Armijo, adaptive damping, momentum) on a sharded model vs one process; then a
    DCP save after 3 steps, a fresh sharded model and optimizer loading it, and 2 more steps on
    both must give the same bits."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    mesh = mesh_of(world, False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 48), nn.LayerNorm(48), nn.Tanh(), nn.Linear(48, 3)).double()
    batches = [(torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))) for _ in range(5)]
    single, sharded = copy.deepcopy(model), shard_model(copy.deepcopy(model), mesh)
    ref, opt = _optimizer(single), _optimizer(sharded)
    infos = []
    for k, (xb, yb) in enumerate(batches):
        want, got = ref.step(xb, yb), opt.step(*mine(rank, world, xb, yb))
        infos.append((got.accepted == want.accepted, abs(got.loss - want.loss), got.damping == want.damping))
        if k == 2:
            msd, osd = get_state_dict(sharded, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    out = dict(err=rel_err(gathered(list(sharded.parameters())), list(single.parameters())), infos=infos,
               still_sharded=all(isinstance(p, DTensor) for p in sharded.parameters()),
               buffers_sharded=all(isinstance(s["momentum_buffer"], DTensor) for s in opt.state.values()))
    dist.barrier()
    resumed = shard_model(copy.deepcopy(model), mesh)
    opt2 = _optimizer(resumed)
    msd, osd = get_state_dict(resumed, opt2)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(resumed, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    replay = shard_model(copy.deepcopy(model), mesh)  # the uninterrupted run, again from the start
    opt3 = _optimizer(replay)
    for xb, yb in batches[:3]:
        opt3.step(*mine(rank, world, xb, yb))
    for xb, yb in batches[3:]:
        opt2.step(*mine(rank, world, xb, yb))
        opt3.step(*mine(rank, world, xb, yb))
    out["resumed_equal"] = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(resumed.parameters(), replay.parameters()))
    out["damping_equal"] = opt2.damping == opt3.damping
    return out


def token_problem(kind: str, seed: int) -> tuple[nn.Module, Tensor, Tensor]:
    """TinyGPT or GPT-2 (from a config) with next-token targets (10, T), some ignored (−100), so
    the shards count different numbers of tokens."""
    model, ids, _ = (gpt2_problem if kind == "gpt2" else lm_problem)(seed)
    y = torch.roll(ids, -1, 1)
    g = torch.Generator().manual_seed(seed + 1)
    y.view(-1)[torch.randperm(y.numel(), generator=g)[:7]] = -100
    return model, ids, y


def lm_rows(rank: int, world: int, cases: list[tuple[str, str]], hsdp: bool) -> dict:
    """Per (model, curvature): per-token cross-entropy with ignored tokens, the direction of a
    sharded model against one process on the whole batch drawing with the same generator."""
    mesh = mesh_of(world, hsdp)
    out = {}
    for kind, curvature in cases:
        model, ids, y = token_problem(kind, 11)
        options = dict(loss="cross_entropy", damping=0.3, curvature=curvature)
        if curvature == "mc":
            options["mc_samples"] = 2
        draws = (lambda: dict(generator=torch.Generator().manual_seed(5))) if curvature == "mc" else dict
        want = egn_fast.direction(model, ids, y, **options, **draws())
        sharded = (shard_gpt2 if kind == "gpt2" else shard_model)(copy.deepcopy(model), mesh)
        got = egn_fast.direction(sharded, *mine(rank, world, ids, y), **options, **draws())
        out[(kind, curvature)] = (rel_err(gathered(got), want), all(isinstance(d, DTensor) for d in got),
                                  torch.cat([d.reshape(-1) for d in gathered(got)]))
    return out


def _lm_optimizer(model: nn.Module) -> egn_fast.EGN:
    return egn_fast.EGN(model, loss="cross_entropy", damping=0.5, momentum=0.9, line_search="armijo", adaptive_damping=True,
                        curvature="mc", mc_samples=2, metric="adam", generator=torch.Generator().manual_seed(9))


def lm_steps(rank: int, world: int) -> dict:
    """5 EGN steps with Monte-Carlo rows (new draws every step), the Adam metric, momentum, Armijo
    and adaptive damping on a sharded TinyGPT (per-token cross-entropy) vs one process on the
    whole batch."""
    mesh = mesh_of(world, False)
    model, ids, y = token_problem("tiny_gpt", 13)
    batches = [(ids, y)] * 5  # one training batch: with fresh random ones, momentum predicts no decrease
    single, sharded = copy.deepcopy(model), shard_model(copy.deepcopy(model), mesh)
    ref, opt = _lm_optimizer(single), _lm_optimizer(sharded)
    infos, accepted = [], 0
    for ids, y in batches:
        want, got = ref.step(ids, y), opt.step(*mine(rank, world, ids, y))
        infos.append((got.accepted == want.accepted, abs(got.loss - want.loss), got.damping == want.damping))
        accepted += want.accepted
    return dict(err=rel_err(gathered(list(sharded.parameters())), list(single.parameters())), infos=infos, accepted=accepted,
                metric_sharded=all(isinstance(s["metric_sq"], DTensor) for s in opt.state.values()))


def dead_rank(rank: int, world: int, how: str) -> tuple[float, str] | None:
    """One good step on a sharded model; in the second, rank 1 exits (how="exit") or hangs
    (how="hang") inside its forward. Rank 0 reports how long it took to fail and the message."""
    import os
    import time

    mesh = mesh_of(world, False)
    torch.manual_seed(0)
    model = shard_model(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double(), mesh)
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    xr, yr = mine(rank, world, x, y)
    opt = egn_fast.EGN(model, loss="cross_entropy")
    opt.step(xr, yr)

    def closure() -> tuple[Tensor, Tensor]:
        if rank == 1 and how == "exit":
            os._exit(3)  # the process dies: no exception, no goodbye to the group
        if rank == 1:
            time.sleep(3600)  # alive but stuck: the others wait for the process group's timeout
        return model(xr), yr

    start = time.monotonic()
    try:
        opt.step(closure=closure)
        return time.monotonic() - start, "no error"
    except RuntimeError as err:
        return time.monotonic() - start, str(err)
