"""Parameters sharded as DTensors (FSDP2's `fully_shard`; docs/design.md §6, "Sharded parameters").

A sharded parameter p is a DTensor: its `shape` is the full (global) shape, each rank holds rows
[lo, hi) of dimension 0 (`Shard(0)` on one mesh dimension, `Replicate()` on any other: FSDP on a
1-D mesh, HSDP on a 2-D one). The layer factors never need parameter values, so most of the
pipeline is unchanged. Where a sharded parameter meets a full-width quantity:

- `full_value(p)`: p's full values, for the rules that re-run a module (torch.func, recurrent,
  embedding bags) and for vectors shaped like one layer's parameters (J̃v): an all-gather of that
  one tensor, for the moment it is needed (every rank runs the same stages in the same order, so
  the collectives match);
- `own_rows(p)`, `as_shard(p, rows)`: the rows of p this rank holds, and a tensor of those rows
  as a DTensor placed like p — the back-projection computes only its own rows, layer by layer
  (`Factors.backproject_rows`);
- `fsdp_gradient`: the gradient by an ordinary backward through FSDP (its reduce-scatter).

Where egn_fast meets FSDP2's own machinery (its modules, hooks and parameter records):
`reshard_fsdp`, `fsdp_aliases`, `fsdp_hooks_off` (docs/design.md §6 says why each is needed).
All are no-ops for ordinary tensors and models. Which shardings egn_fast serves is checked once,
by egn_fast.distributed.sharded.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "is_dtensor", "full_value", "own_rows", "as_shard", "sum_over_shards", "reshard_fsdp", "fsdp_aliases", "fsdp_hooks_off",
    "fsdp_gradient",
]


def is_dtensor(x: object) -> bool:
    """Whether x is a DTensor (without importing torch.distributed.tensor when nothing made one)."""
    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def full_value(x: Tensor) -> Tensor:
    """x's full value, detached: a DTensor all-gathered (a collective), else x itself."""
    return x.detach().full_tensor() if is_dtensor(x) else x.detach()


def own_rows(p: Tensor) -> slice:
    """The rows of dimension 0 of the full p that this rank holds: all of them for an ordinary
    tensor; for a DTensor torch.chunk's split (ceil(n / R) rows per rank, the last ranks fewer or
    none). Placements are checked beforehand (egn_fast.distributed.sharded: Shard(0) on one mesh
    dimension, Replicate() on the others)."""
    if not is_dtensor(p):
        return slice(None)
    from torch.distributed.tensor import Shard

    lo, hi = 0, p.shape[0]
    for dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard):
            size, coord = p.device_mesh.size(dim), p.device_mesh.get_local_rank(dim)
            chunk = -(-(hi - lo) // size)
            lo, hi = min(lo + coord * chunk, hi), min(lo + (coord + 1) * chunk, hi)
    return slice(lo, hi)


def sum_over_shards(t: Tensor, like: Tensor) -> Tensor:
    """t summed in place over the ranks that hold different rows of `like` (a DTensor): the mesh
    dimension it is sharded on (under HSDP the replicas hold the same rows and are not added)."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    dim = next(d for d, q in enumerate(like.placements) if isinstance(q, Shard))
    dist.all_reduce(t, group=like.device_mesh.get_group(dim))
    return t


def as_shard(p: Tensor, rows: Tensor) -> Tensor:
    """`rows` (this rank's rows of a tensor shaped like p, `own_rows(p)`) as a DTensor placed like
    p; `rows` itself when p is not a DTensor."""
    if not is_dtensor(p):
        return rows
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(rows.contiguous(), p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _fsdp_modules(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """The distinct `fully_shard` modules among these modules and their submodules (none when
    FSDP was never imported: then no module can be one, and importing it costs start-up)."""
    if "torch.distributed.fsdp" not in sys.modules:
        return []
    from torch.distributed.fsdp import FSDPModule

    found: dict[int, nn.Module] = {}
    for top in modules:
        found.update((id(m), m) for m in top.modules() if isinstance(m, FSDPModule))
    return list(found.values())


def reshard_fsdp(model: nn.Module) -> None:
    """Every `fully_shard` module of `model` back to its sharded state. FSDP2 keeps the root's
    parameters unsharded after its forward (the module attributes are then plain tensors, not
    the DTensors the optimizer holds); resharded, every rule sees the registered parameters. The
    backward passes that follow all-gather what they need again (FSDP's pre-backward hooks)."""
    for m in _fsdp_modules([model]):
        m.reshard()


def fsdp_aliases(model: nn.Module) -> dict[int, int]:
    """id of the unsharded parameter FSDP2 computes with → id of the sharded one registered on
    the module, for every `fully_shard` module of `model` that has been unsharded. The autograd
    graph of a forward holds the unsharded tensors; the plan's graph walk names parameters by the
    registered ones. (FSDP2 keeps one unsharded parameter per sharded one across unshard/reshard;
    this reads its `FSDPParam` records, the only place the pairing is kept.)"""
    out: dict[int, int] = {}
    for group in _fsdp_param_groups(model):
        for fsdp_param in group.fsdp_params:
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            if unsharded is not None:
                out[id(unsharded)] = id(fsdp_param.sharded_param)
    return out


def _fsdp_param_groups(model: nn.Module) -> list:
    """FSDP2's parameter groups (`FSDPParamGroup`) of every `fully_shard` module of `model`."""
    groups = []
    for m in _fsdp_modules([model]):
        state = m._get_fsdp_state()
        groups += [g for g in getattr(state, "_fsdp_param_groups", None) or [state._fsdp_param_group] if g is not None]
    return groups


def fsdp_gradient(model: nn.Module, outputs: Tensor, params: list[Tensor], cotangent: Tensor) -> list[Tensor]:
    """Σ_i J_iᵀ cotangent_i summed over every rank's samples, this rank's shard of each sharded
    parameter (a DTensor placed like it; zeros where unused). One ordinary backward through FSDP,
    whose reduce-scatter (and, under HSDP, all-reduce across replicas) of the gradients is the
    communication of a first-order step, with its divide factor set to 1 for the moment so the
    ranks' parts are summed, not averaged. Every parameter's .grad is left as it was. The graph
    is kept for the batched backward."""
    groups = _fsdp_param_groups(model)
    settings = [(g.gradient_divide_factor, g.force_sum_reduction_for_comms) for g in groups]
    held = [(p, p.grad) for p in model.parameters()]
    try:
        for p, _ in held:
            p.grad = None
        for g in groups:  # a plain SUM (fp32's divide-by-1 would be a PREMUL_SUM, which gloo lacks)
            g.gradient_divide_factor, g.force_sum_reduction_for_comms = 1.0, True
        torch.autograd.backward(outputs, cotangent, retain_graph=True)
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in params]
    finally:
        for g, (factor, force_sum) in zip(groups, settings):
            g.gradient_divide_factor, g.force_sum_reduction_for_comms = factor, force_sum
        for p, grad in held:
            p.grad = grad


@contextlib.contextmanager
def fsdp_hooks_off(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block, FSDP2's forward hooks on these modules and their submodules do not run.

    The rules re-run modules on full parameter values (`full_value`) by torch.func; FSDP's
    pre-forward hook would replace those values with its own unsharded parameters (and
    all-gather inside vmap). Autograd hooks on recorded outputs (FSDP's pre-backward) are not
    touched. The hook tables are restored as they were, order included."""
    saved: list[tuple[dict, dict]] = []
    for m in _fsdp_modules(modules):
        state = m._get_fsdp_state()
        for handle in {state._pre_forward_hook_handle, state._post_forward_hook_handle}:
            for h in getattr(handle, "handles", (handle,)):
                refs = h.hooks_dict_ref if isinstance(h.hooks_dict_ref, tuple) else (h.hooks_dict_ref,)
                for ref in refs:
                    table = ref()
                    if table is not None and h.id in table:
                        saved.append((table, dict(table)))
                        del table[h.id]
    try:
        yield
    finally:
        for table, before in reversed(saved):
            table.clear()
            table.update(before)
