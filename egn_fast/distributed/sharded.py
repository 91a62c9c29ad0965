"""The process group and mode of a data-parallel step (`check_mode`, `resolve_distributed`), and
sharded parameters (FSDP2's `fully_shard`, HSDP; docs/design.md §6, "Sharded parameters"):
which shardings egn_fast serves, and which process group the step then runs over.

The exact data-parallel route needs no parameter values (the factors are the layers' inputs and
output-gradients, full width, per sample), so a sharded model runs through it unchanged: every
rank forms the global Gram and solve, and keeps only its own shard of the back-projection
(`Factors.backproject_rows`, egn_fast.dtensors.own_rows). Served: every DTensor parameter placed by `fully_shard` with
`Shard(0)` on one mesh dimension and `Replicate()` on any other (FSDP on a 1-D mesh, HSDP on a
replicate × shard mesh), all on one mesh. Refused, naming the parameter and its placement: any
other placement (`Shard(1)` from a `shard_placement_fn`, `Partial`, two sharded mesh
dimensions), a DTensor no `fully_shard` module manages (tensor parallelism: its activations are
sharded too, so a layer's recorded inputs would not be full width), a sharded parametrized
original (torch.nn.utils.parametrize: its rule re-evaluates W = P(original) on full values), and
the "local" mode.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..dtensors import is_dtensor, own_rows

__all__ = ["MODES", "check_mode", "resolve_distributed", "check_sharding", "check_sharded_batch"]

MODES = ("exact", "local")


def check_mode(process_group: Any, distributed: str | None) -> str | None:
    """The data-parallel mode: None without a process group, else `distributed` ("exact" by default)."""
    if process_group is None:
        if distributed is not None:
            raise ValueError(f"distributed={distributed!r} needs a process_group")
        return None
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group given but torch.distributed is not initialized (dist.init_process_group)")
    mode = "exact" if distributed is None else distributed
    if mode not in MODES:
        raise ValueError(f"unknown distributed mode {distributed!r}; expected 'exact' or 'local'")
    return mode


def resolve_distributed(model: nn.Module, process_group: Any, distributed: str | None) -> tuple[Any, str | None]:
    """(process group, mode) of a step on `model`: as given (egn_fast.distributed.check_mode), or,
    for a model whose parameters are sharded and no group given, the group of all the ranks of
    their device mesh (exact mode). (None, None) for one process."""
    sharded = [(n, p) for n, p in model.named_parameters() if is_dtensor(p)]
    if not sharded:
        return process_group, check_mode(process_group, distributed)
    mesh = check_sharding(model, sharded)
    mesh_ranks = sorted(mesh.mesh.flatten().tolist())
    if process_group is None:
        if mesh.ndim == 1:
            process_group = mesh.get_group(0)
        elif mesh_ranks == list(range(dist.get_world_size())):
            process_group = dist.group.WORLD
        else:
            raise ValueError(
                f"the parameters are sharded on a {mesh.ndim}-D mesh of ranks {mesh_ranks}, not the whole world: "
                "pass process_group= a group of exactly those ranks"
            )
    mode = check_mode(process_group, distributed)
    if mode != "exact":
        raise ValueError("distributed='local' averages full-size directions; with sharded parameters use distributed='exact'")
    group_ranks = sorted(dist.get_process_group_ranks(process_group))
    if group_ranks != mesh_ranks:
        raise ValueError(
            f"process_group has ranks {group_ranks} but the parameters are sharded over the mesh ranks {mesh_ranks}: "
            "every rank holding a shard must take part in the step (pass a group of the mesh's ranks, or none)"
        )
    return process_group, mode


def check_sharding(model: nn.Module, sharded: list[tuple[str, nn.Parameter]]) -> Any:
    """The one device mesh of the sharded parameters, after checking each one's placement, that
    a `fully_shard` module manages it, and that its local shard has the rows egn_fast expects."""
    from torch.distributed.tensor import Replicate, Shard

    managed = _fsdp_managed(model)
    parametrized = {id(p) for m in model.modules() if parametrize.is_parametrized(m) for p in m.parametrizations.parameters()}
    meshes = {}
    for name, p in sharded:
        placements = tuple(p.placements)
        shards = [q for q in placements if isinstance(q, Shard)]
        if len(shards) != 1 or shards[0].dim != 0 or not all(isinstance(q, (Shard, Replicate)) for q in placements):
            raise ValueError(
                f"parameter {name!r} is placed as {placements} on its mesh: egn_fast serves FSDP2/HSDP sharding "
                "(Shard(0) on one mesh dimension, Replicate() on the others)"
            )
        if id(p) not in managed:
            raise ValueError(
                f"parameter {name!r} is a DTensor {placements} that no fully_shard module manages (tensor "
                "parallelism?): egn_fast needs each layer's full-width inputs and output-gradients; shard with fully_shard"
            )
        if id(p) in parametrized:
            raise ValueError(
                f"parameter {name!r} is sharded and parametrized (torch.nn.utils.parametrize): its rule re-evaluates "
                "W = P(original) on full values, which is not built for sharded originals yet"
            )
        rows = own_rows(p)
        lo, hi = rows.start, rows.stop
        local = p.to_local()
        if tuple(local.shape) != (hi - lo, *p.shape[1:]):
            raise ValueError(
                f"parameter {name!r}: this rank's shard has shape {tuple(local.shape)}, expected rows [{lo}, {hi}) of "
                f"{tuple(p.shape)} (torch.chunk's split)"
            )
        meshes.setdefault(tuple(p.device_mesh.mesh.flatten().tolist()), p.device_mesh)
    if len(meshes) > 1:
        raise ValueError(f"the parameters are sharded over {len(meshes)} different device meshes; egn_fast needs one")
    placements = {tuple(p.placements) for _, p in sharded}
    if len(placements) > 1:
        raise ValueError(f"the parameters are placed in {len(placements)} different ways {sorted(map(str, placements))}; egn_fast needs one")
    return next(iter(meshes.values()))


def _fsdp_managed(model: nn.Module) -> set[int]:
    """ids of the parameters some `fully_shard` module manages: those under it that are not under
    a nested `fully_shard` module."""
    from torch.distributed.fsdp import FSDPModule

    managed: set[int] = set()

    def walk(m: nn.Module, inside: bool) -> None:
        inside = inside or isinstance(m, FSDPModule)
        if inside:
            managed.update(id(p) for p in m._parameters.values() if p is not None)
        for child in m.children():
            walk(child, inside)

    walk(model, False)
    return managed


def check_sharded_batch(dp: Any, targets: Tensor | None) -> None:
    """Refuse, on every rank of `dp` (a DataParallel), a step where some rank holds one sample
    while the parameters are sharded. FSDP all-gathers inside the capture's forward and backward
    passes, so those passes must be the same on every rank; with one sample the capture cannot
    tell an output broadcast over the batch from a batch of one, and may take one pass fewer than
    the other ranks (docs/design.md §6). Checked when the targets are given (their batch size)."""
    b_r = targets.shape[0] if isinstance(targets, Tensor) and targets.dim() else -1
    sizes = dp.sync(None, [b_r])[:, 1].tolist()
    if 1 in sizes:
        raise ValueError(
            f"rank {sizes.index(1)} of {dp.world} holds 1 sample: with sharded (FSDP) parameters every rank needs "
            "at least 2 samples per step (the capture's passes must match across ranks)"
        )
