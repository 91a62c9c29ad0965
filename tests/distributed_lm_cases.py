"""What each rank runs in tests/test_distributed_lm.py (module-level functions, so spawned processes
can import them): language-model rows across ranks — per-token cross-entropy over the global token
count, Monte-Carlo and empirical rows, the Adam metric — and the errors raised before the mid-build
sync. Every rank builds the same float64 models and global batches from fixed seeds and takes its
shard; the test compares the results with one process on the whole batch (docs/design.md §6)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

import egn_fast
from egn_fast.distributed import DataParallel, ShardedRows
from token_models import TinyGPT, randomize, token_data

B, T, V, LAM = 6, 6, 5, 0.3
STEPS = 5


def splits(world: int) -> list[list[int]]:
    """Two different splits of the global batch of B = 6 sequences over `world` ranks."""
    return {1: [[6]], 2: [[2, 4], [5, 1]], 3: [[1, 2, 3], [3, 2, 1]]}[world]


def lm_problem() -> tuple[nn.Module, Tensor, Tensor]:
    """A float64 TinyGPT and B sequences whose targets have ignored tokens: sequence 0 entirely (a
    shard of it alone counts no token), 5 more scattered, so the shards' counts differ."""
    model = randomize(TinyGPT(V, 8, 1, 2, T).double(), 21)
    ids, y = token_data(B, T, V, 22, ignored=5)
    y[0] = -100
    return model, ids, y


def sample_problem(loss: str) -> tuple[nn.Module, Tensor, Tensor]:
    """A float64 MLP (b, 4) outputs and B samples with targets for `loss`."""
    g = torch.Generator().manual_seed(23)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = torch.randn(B, 3, generator=g, dtype=torch.float64)
    y = {"cross_entropy": torch.randint(4, (B,), generator=g), "mse": torch.randn(B, 4, generator=g, dtype=torch.float64),
         "bce": torch.rand(B, 4, generator=g, dtype=torch.float64)}[loss]
    return model, x, y


# name → (problem, loss, curvature, mc_samples)
CASES = {
    "token_exact": (lambda: lm_problem(), "cross_entropy", "exact", 1),
    "token_mc": (lambda: lm_problem(), "cross_entropy", "mc", 2),
    "token_empirical": (lambda: lm_problem(), "cross_entropy", "empirical", 1),
    "sample_mc_ce": (lambda: sample_problem("cross_entropy"), "cross_entropy", "mc", 2),
    "sample_mc_mse": (lambda: sample_problem("mse"), "mse", "mc", 2),
    "sample_mc_bce": (lambda: sample_problem("bce"), "bce", "mc", 2),
    "sample_empirical": (lambda: sample_problem("cross_entropy"), "cross_entropy", "empirical", 1),
}


def direction_of(name: str, lo: int, hi: int, group=None) -> egn_fast.DirectionResult:
    """Case `name`'s direction on samples [lo, hi) of its global batch (one process: the whole)."""
    problem, loss, curvature, k = CASES[name]
    model, x, y = problem()
    return egn_fast.direction_with_info(model, x[lo:hi], y[lo:hi], loss=loss, damping=LAM, curvature=curvature,
                                        mc_samples=k, generator=torch.Generator().manual_seed(7), process_group=group)


def flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def lm_optimizer(model: nn.Module, group) -> egn_fast.EGN:
    return egn_fast.EGN(model, loss="cross_entropy", curvature="mc", mc_samples=2, metric="adam", damping=20.0, momentum=0.9,
                        line_search="armijo", adaptive_damping=True, process_group=group)


def step_batches() -> list[tuple[Tensor, Tensor]]:
    """STEPS global batches for the optimizer (the first one with a fully ignored sequence)."""
    batches = [lm_problem()[1:]]
    for k in range(STEPS - 1):
        batches.append(token_data(B, T, V, 30 + k, ignored=3))
    return batches


def run_steps(opt: egn_fast.EGN, batches: list[tuple[Tensor, Tensor]], lo: int, hi: int) -> list[tuple]:
    """(loss, accepted, damping) of each step on samples [lo, hi) of each batch."""
    infos = [opt.step(ids[lo:hi], y[lo:hi]) for ids, y in batches]
    return [(info.loss, info.accepted, info.damping) for info in infos]


def lm_ranks(rank: int, world: int) -> dict:
    """Every case on each split; the optimizer's steps; the errors before the mid-build sync."""
    group = dist.group.WORLD
    out: dict = {}
    for split in splits(world):
        lo, hi = sum(split[:rank]), sum(split[: rank + 1])
        for name in CASES:
            info = direction_of(name, lo, hi, group)
            out[(tuple(split), name)] = (flat(info.direction), info.samples, info.loss)
    # the Monte-Carlo system's global z = J̃g through the parameter-sharded rows too
    model, ids, y = lm_problem()
    lo, hi = sum(splits(world)[0][:rank]), sum(splits(world)[0][: rank + 1])
    system = DataParallel(group, "exact", ids.device).build_system(
        model, ids[lo:hi], y[lo:hi], loss="cross_entropy", curvature="mc", mc_samples=2, generator=torch.Generator().manual_seed(7))
    out["sharded"] = sum(isinstance(f, ShardedRows) for f in system.glob.factors)

    torch.manual_seed(100 + rank)  # different global RNGs: the default generator must still be rank 0's
    opt = lm_optimizer(model, group)
    out["generator"] = opt.generator.get_state()
    out["steps"] = run_steps(opt, step_batches(), lo, hi)
    out["params"] = flat(list(model.parameters()))
    out["raised"] = failures(rank, world)
    return out


def failures(rank: int, world: int) -> dict:
    """Errors on one rank before the mid-build sync (targets out of range, a raising forward), the
    generator check, local mode's refusals; every rank must raise, naming the rank. Then a correct
    direction: the group still works."""
    group = dist.group.WORLD
    model, ids, y = lm_problem()
    lo, hi = sum(splits(world)[0][:rank]), sum(splits(world)[0][: rank + 1])
    ids_r, y_r = ids[lo:hi], y[lo:hi]
    bad_y = y_r.clone()
    if rank == 1:
        bad_y[:, 1] = V + 2  # out of range: raised in check_targets, before the mid-build sync

    def raising_forward():
        if rank == world - 1:
            raise RuntimeError("this rank's data loader broke")
        return model(ids_r), y_r

    def mc(targets=y_r, closure=None, generator=None, **options):
        generator = generator or torch.Generator().manual_seed(7)
        if closure is not None:
            return DataParallel(group, "exact", ids.device).build_system(
                model, closure=closure, loss="cross_entropy", curvature="mc", mc_samples=2, generator=generator)
        return egn_fast.direction(model, ids_r, targets, loss="cross_entropy", curvature="mc", mc_samples=2, damping=LAM,
                                  generator=generator, process_group=group, **options)

    calls = {
        "targets": lambda: mc(bad_y),
        "forward": lambda: mc(closure=raising_forward),
        "generator": lambda: mc(generator=torch.Generator().manual_seed(7 + (rank == 1))),
        "local_mc": lambda: mc(distributed="local"),
        "local_token": lambda: egn_fast.direction(model, ids_r, y_r, loss="cross_entropy", process_group=group, distributed="local"),
        "local_metric": lambda: egn_fast.EGN(model, loss="cross_entropy", metric="adam", process_group=group, distributed="local"),
    }
    raised = {}
    for name, call in calls.items():
        try:
            call()
            raised[name] = None
        except (ValueError, RuntimeError) as err:
            raised[name] = (type(err).__name__, str(err))
    raised["after"] = flat(mc())
    return raised
