"""Where the samples lie in each recorded tensor (docs/design.md §2.1).

A rule reads per-sample rows from a module's input a and output-gradient G, so it must know
which slices of a and z belong to sample i. The plan finds out once (egn_fast.capture.plan), with
one backward from two samples' outputs (`probe_grads`): for a recorded tensor z, sample i's slice
is the one whose entries move f_i and no other f_j. A z that moves neither probed sample's output
(its path is dead for them: ReLUs off) is probed again from the other samples' outputs
(`probe_layouts`), so a path that is dead only for some samples still gets its layout read.
Three outcomes:

- a batch dimension `BatchDim(dim, fold, minor)`: z.shape[dim] = b·fold, sample i at
  [i·fold, (i+1)·fold) (sample-major; fold = 1 is the plain case, fold = T is x.reshape(-1, D)
  of (b, T, D)) or at i, i + b, … (minor: the reshape of a seq-first (T, b, D));
- shared: z is the same for every sample (a position embedding of (1, T) ids, a Linear on a
  (T, d) buffer), so each sample's output depends on all of it. The capture then hands the
  model z expanded to (b, …) (`expand_shared`), which broadcasting makes equal in value, and
  the expanded copy carries per-sample gradients;
- mixed: z still moves other samples' outputs after expansion (x − x.mean(0), batch
  statistics): per-sample rows do not exist and the plan refuses the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BatchDim", "to_batch_first", "find_batch_dim", "expand_shared", "probe_grads", "probe_layouts"]


@dataclass(frozen=True)
class BatchDim:
    """Samples along dimension `dim` of a tensor: b·fold entries, sample-major unless `minor`."""

    dim: int
    fold: int = 1
    minor: bool = False

    def shifted(self, k: int) -> "BatchDim":
        """The same layout in a tensor with k more leading dimensions (e.g. the s cotangents)."""
        return BatchDim(self.dim + k, self.fold, self.minor)


PLAIN = BatchDim(0)


def to_batch_first(x: Tensor, layout: BatchDim, b: int) -> Tensor:
    """x with its samples on dimension 0: (b, *rest), where a folded dimension keeps its fold
    in place of the samples, e.g. (b·T, D) -> (b, T, D) and seq-first (T, b, D) -> (b, T, D)."""
    k = layout.dim
    if layout.fold != 1:
        x = x.unflatten(k, (layout.fold, b) if layout.minor else (b, layout.fold))
        if layout.minor:
            k += 1
    return x if k == 0 else x.movedim(k, 0)


def _sample_indices(nonzero: Tensor, dim: int) -> Tensor:
    """Indices along `dim` where a boolean tensor has any True entry."""
    return nonzero.movedim(dim, 0).reshape(nonzero.shape[dim], -1).any(1).nonzero().flatten()


def find_batch_dim(grads: Tensor, samples: list[int], b: int) -> BatchDim | None:
    """The batch layout read off probe gradients of a tensor z: grads[k] = ∂(v·f_i)/∂z for
    i = samples[k] (random v). None when no dimension confines every probed sample to its own
    slice (z is shared, or samples mix downstream of it)."""
    shape = grads.shape[1:]
    nonzero = grads != 0
    alive = [(i, nonzero[k]) for k, i in enumerate(samples) if bool(nonzero[k].any())]
    plain, folded = [], []
    for k, size in enumerate(shape):
        if size % b == 0:
            (plain if size == b else folded).append(k)
    if not alive:
        # No probed sample's output depends on z (a dead path: LayerNorm over one feature, all
        # ReLUs off): nothing to read. Take the first dimension that can hold the samples; if z
        # is dead for every sample its rows are zero whatever the choice.
        return BatchDim(plain[0]) if plain else BatchDim(folded[0], shape[folded[0]] // b) if folded else None
    for k in plain + folded:
        fold = shape[k] // b
        where = [(i, _sample_indices(nz, k)) for i, nz in alive]
        if all(bool(((idx >= i * fold) & (idx < (i + 1) * fold)).all()) for i, idx in where):
            return BatchDim(k, fold)
        if fold > 1 and all(bool((idx % b == i).all()) for i, idx in where):
            return BatchDim(k, fold, minor=True)
    return None


def expand_shared(z: Tensor, b: int) -> Tensor:
    """A shared tensor as b identical samples: (1, *rest) -> (b, *rest), else (*shape) ->
    (b, *shape). A copy, so a consumer's in-place op cannot write through overlapping memory."""
    expanded = z.expand(b, *z.shape[1:]) if z.dim() and z.shape[0] == 1 else z.unsqueeze(0).expand(b, *z.shape)
    return expanded.contiguous()


def probe_grads(f_flat: Tensor, zs: list[Tensor], samples: list[int]) -> list[Tensor | None]:
    """∂(v_k·f_i)/∂z for i = samples[k] and every z, v_k random: one backward with len(samples)
    batched cotangents -> per z (len(samples), *z.shape), None for a z that f does not depend on.
    The graph is kept for later passes."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.zeros(len(samples), *f_flat.shape, dtype=f_flat.dtype, device=f_flat.device)
    for k, i in enumerate(samples):
        # values in [1, 2): no cancellation to an exact zero that would hide a dependence
        v[k, i] = (1 + torch.rand(f_flat.shape[1], generator=gen, dtype=torch.float64)).to(v)
    return list(torch.autograd.grad(f_flat, zs, v, is_grads_batched=True, allow_unused=True, retain_graph=True))


# The re-probe of tensors dead for the first two probed samples asks this many samples at once.
_REPROBE_SAMPLES = 16


def probe_layouts(f_flat: Tensor, xs: list[Tensor]) -> tuple[list[BatchDim | None], set[int], set[int]]:
    """(the batch layout of every x (BatchDim(0) for one f does not depend on), the ids of the x
    some sample's output depends on, the ids of the x f depends on but no sample's output does
    (dead: their layout is a guess)). Samples 0 and b − 1 are probed first; an x dead for both
    is probed again from the other samples, a chunk at a time."""
    b = f_flat.shape[0]
    grads = probe_grads(f_flat, xs, [0, b - 1]) if xs else []
    found = [BatchDim(0) if g is None else find_batch_dim(g, [0, b - 1], b) for g in grads]
    dead = {k for k, g in enumerate(grads) if g is not None and not g.any()}
    for i0 in range(1, b - 1, _REPROBE_SAMPLES):
        if not dead:
            break
        samples = list(range(i0, min(b - 1, i0 + _REPROBE_SAMPLES)))
        ks = sorted(dead)
        for k, g in zip(ks, probe_grads(f_flat, [xs[k] for k in ks], samples)):
            if g.any():
                found[k] = find_batch_dim(g, samples, b)
                dead.discard(k)
    dead_ids = {id(xs[k]) for k in dead}
    reaching = {id(x) for x, g in zip(xs, grads) if g is not None and id(x) not in dead_ids}
    return found, reaching, dead_ids
