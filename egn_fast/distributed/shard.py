"""The parameter-sharded route of exact data-parallel EGN (docs/design.md §6), for the layers whose
rows travel as per-sample gradients (norms, the generic rule, sequence layers where rows are
smaller than factors).

Their rows, N = Σ_l n_l columns, are split by column across the R ranks: one all-to-all gives rank
q columns [lo_q, hi_q) of all m global rows; each rank adds its partial Gram P_q P_qᵀ and one
all-reduce sums the m × m partials. The back-projection is each rank's slice −P_qᵀγ, then an
all-gather of the slices. Per rank that sends m_r·N·(R−1)/R numbers for the rows, 2(R−1)/R·m² for
the Gram and (R−1)·N/R per back-projection, instead of (R−1)·m_r·N for all-gathering the rows.
J̃v (Monte-Carlo rows' z = J̃g) is each rank's partial P_q v_q, all-reduced.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops import Backend
from ..rules import Factors, PerSampleFactors

__all__ = ["ShardedRows", "shard_pays"]


def shard_pays(n_columns: int, m: int, world: int) -> bool:
    """Whether sharding N columns of per-sample rows moves fewer bytes in all than all-gathering
    them, for m global rows on `world` ranks (one back-projection per step counted):
    m·N/R + 2m² + N < m·N (both sides × (R−1), summed over ranks)."""
    return world > 1 and m * n_columns / world + 2 * m * m + n_columns < m * n_columns


class ShardedRows(Factors):
    """Per-sample rows of several layers, column-sharded: this rank holds P_q (m, N_q), columns
    [lo_q, hi_q) of the rows of all m = Σ_r b_r·s global samples (ranks in order).

    layers: this rank's PerSampleFactors (rows (b_r, s, *p.shape)); sizes: b_r of every rank.
    """

    def __init__(self, group: Any, layers: list[PerSampleFactors], sizes: list[int], s: int, dtype: torch.dtype):
        self.group, self.s, self.b = group, s, sum(sizes)
        self.rank = rank = dist.get_rank(group)
        world = dist.get_world_size(group)
        self.params = [p for f in layers for p in f.params]
        local = torch.cat([P.to(dtype).reshape(P.shape[0] * s, -1) for f in layers for P in f.P], 1)  # (m_r, N)
        n = local.shape[1]
        self.bounds = [n * q // world for q in range(world + 1)]
        self.width = max(hi - lo for lo, hi in zip(self.bounds, self.bounds[1:]))
        send = local.new_zeros(world, max(sizes) * s, self.width)  # block q → rank q, padded
        for q, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:])):
            send[q, : local.shape[0], : hi - lo] = local[:, lo:hi]
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=group)  # block r: rank r's rows of my columns
        mine = self.bounds[rank + 1] - self.bounds[rank]
        self.P = torch.cat([received[r, : sizes[r] * s, :mine] for r in range(world)], 0).view(self.b, s, mine)

    def add_gram(self, K: Tensor, backend: Backend) -> None:
        partial = torch.zeros_like(K)
        backend.gram_per_sample(partial, self.P)
        dist.all_reduce(partial, group=self.group)  # the same sum on every rank
        K += partial

    def backproject(self, u: Tensor, backend: Backend) -> list[Tensor]:
        slice_ = u.new_zeros(self.width)
        slice_[: self.P.shape[2]] = backend.backproject_per_sample(self.P, u)
        parts = [torch.empty_like(slice_) for _ in self.bounds[1:]]
        dist.all_gather(parts, slice_, group=self.group)
        full = torch.cat([part[: hi - lo] for part, lo, hi in zip(parts, self.bounds, self.bounds[1:])])
        return [x.view(p.shape) for x, p in zip(full.split([p.numel() for p in self.params]), self.params)]

    def project(self, v: list[Tensor], backend: Backend, dtype: torch.dtype) -> Tensor:
        rank = dist.get_rank(self.group)
        lo, hi = self.bounds[rank], self.bounds[rank + 1]
        partial = backend.project_per_sample(self.P, torch.cat([x.reshape(-1) for x in v])[lo:hi], dtype)
        dist.all_reduce(partial, group=self.group)  # the same sum on every rank
        return partial

    def per_sample_grads(self, backend: Backend, dtype: torch.dtype) -> list[Tensor]:
        raise NotImplementedError("sharded rows are split across ranks; no rank holds a parameter's full rows")
