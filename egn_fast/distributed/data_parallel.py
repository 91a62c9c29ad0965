"""Data-parallel EGN over torch.distributed (docs/design.md §6).

Each of the R ranks of a process group holds a shard of the global batch (b_r samples, shards may
differ in size, b = Σ_r b_r, m = b·s rows) and a replica of the parameters.

- "exact": every rank builds its layer factors, the ranks all-gather them (packed per dtype into
  one (b_r, n) buffer, padded to the largest shard: one all_gather per dtype) — except the layers
  that exist only as per-sample rows, sharded by parameter when that moves fewer bytes
  (egn_fast.distributed.shard) — and every rank then forms the global Gram K (m × m), solves
  (K + bλI)γ = w and back-projects. The result is the direction one process computes on the
  concatenated batch (ranks in order), the same bits on every rank; no all-reduce of d is needed.
- "local": each rank solves its own system (b_r, damping b_r·λ) and the ranks average their
  directions (one all-reduce, like DDP's gradient). An approximation of the exact direction.

Every local stage ends in `sync`: an all_gather of (failed, *metadata) from every rank, so an error
on one rank is raised on every rank, naming it, before anyone enters the next collective. In exact
mode one more sync runs inside `build_system`, after the capture and before the loss head
(`batch_share`): it gives every rank its `BatchShare` (offset, global b, global counted tokens),
so the per-token loss is the mean over every rank's tokens and Monte-Carlo draws are the global
batch's (egn_fast.distributed.global_batch); their gradient is all-reduced (`global_gradient`).
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..capture import Closure, Inputs, forward_of
from ..dtensors import is_dtensor, own_rows
from ..errors import NonFiniteError, SolveError
from ..losses import BatchShare, Loss
from ..rules import PerSampleFactors
from ..system.build import build_system
from ..system.jvp import row_jvp
from ..system.row_space import RowSpaceSystem, Solution
from .faults import named_collective_failures, on_every_rank, raised_on_every_rank
from .global_batch import generator_checksum, global_system, head_tensors, local_refusals, share_from
from .sendable import rebuilt_layers, sendable, tensors_of
from .shard import ShardedRows, shard_pays
from .sharded import check_sharded_batch

__all__ = ["DataParallel", "DataParallelSystem", "unwrap", "parameter_checksum"]

_META = 3  # ints each rank adds to a sync (zero-padded): every sync gathers the same shape
# Errors re-raised on every rank as the class the failing rank raised; any other as RuntimeError.
_ERROR_CLASSES = {c.__name__: c for c in (NonFiniteError, SolveError, ValueError, TypeError, RuntimeError)}


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel: EGN does its own communication, so DDP's forward
    (buffer broadcast, gradient-reduction bookkeeping) is bypassed; the parameters are the same."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def parameter_checksum(params: list[nn.Parameter]) -> int:
    """CRC32 of the parameters' bytes: equal on ranks whose replicas are bit-identical."""
    crc = 0
    for p in params:
        crc = zlib.crc32(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes(), crc)
    return crc


class DataParallel:
    """The process group, the mode and the device collectives run on (the parameters' device)."""

    def __init__(self, process_group: Any, mode: str, device: torch.device):
        self.group, self.mode, self.device = process_group, mode, device
        self.rank, self.world = dist.get_rank(process_group), dist.get_world_size(process_group)

    def named_failures(self) -> ContextManager[None]:
        """Within the block a failed collective names this rank (egn_fast.distributed.faults)."""
        return named_collective_failures(self.rank, self.world)

    @property
    def exact(self) -> bool:
        return self.mode == "exact"

    def sync(self, error: BaseException | None, meta: list[int] | None = None) -> Tensor:
        """All-gather (failed, *meta) from every rank → (R, 1 + _META) int64 on the CPU (meta: at
        most _META ints, zero-padded). If any rank failed, raise on every rank: the first failing
        rank's error class and message, named, marked `on_every_rank`. Every sync gathers the same
        shape, so a rank that failed before a sync its peers entered (the mid-build `batch_share`)
        meets them at its next sync, whichever that is, and every rank raises there."""
        meta = list(meta or [])
        local = torch.tensor([error is not None, *meta, *[0] * (_META - len(meta))], dtype=torch.int64, device=self.device)
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local, group=self.group)
        table = torch.stack(parts).cpu()
        failed = table[:, 0].nonzero().flatten().tolist()
        if failed:
            reports: list[Any] = [None] * self.world
            mine = None if error is None else (type(error).__name__, str(error))
            dist.all_gather_object(reports, mine, group=self.group)
            name, message = reports[failed[0]]
            others = f" (ranks {failed} failed)" if len(failed) > 1 else ""
            report = _ERROR_CLASSES.get(name, RuntimeError)(f"rank {failed[0]} of {self.world}: {message}{others}")
            raise on_every_rank(report) from error
        return table

    def from_rank0(self, value: int) -> int:
        """Rank 0's value of an int (a seed), on every rank."""
        return int(self.sync(None, [value])[0, 1])

    def batch_share(self, curvature: str, generator: torch.Generator | None, b: int, tokens: int) -> BatchShare:
        """The mid-build sync of exact mode (`build_system`'s batch_share, curvature and generator
        bound): (b_r, counted tokens, for "mc" a checksum of the state the draws will use, taken
        now: the forward may have drawn too) from every rank → this rank's BatchShare. Raises on
        every rank if a rank failed before it, or if the generator states differ (the draws of the
        global batch must be the same numbers on every rank)."""
        draws = generator_checksum(generator, self.device) if curvature == "mc" else 0
        table = self.sync(None, [b, tokens, draws])
        differ = (table[:, 3] != table[0, 3]).nonzero().flatten().tolist()
        if differ:
            raise on_every_rank(ValueError(
                f"curvature='mc': the generator state of rank(s) {differ} differs from rank 0's; every rank draws the "
                "global batch's labels and keeps its own, so seed the generator (torch's RNG when generator=None) "
                "identically on every rank"
            ))
        return share_from(table, self.rank)

    def check_replicated(self, params: list[nn.Parameter]) -> None:
        """Raise on every rank unless every rank's parameters are bit-identical to rank 0's; of
        sharded ones (DTensors), the ranks holding the same rows (HSDP's replicas) must agree."""
        plain, sharded = [p for p in params if not is_dtensor(p)], [p for p in params if is_dtensor(p)]
        rows = hash(tuple(own_rows(p).start for p in sharded)) % 2**62  # which rows this rank holds
        table = self.sync(None, [parameter_checksum(plain), rows, parameter_checksum([p.to_local() for p in sharded])])
        differ = (table[:, 1] != table[0, 1]).nonzero().flatten().tolist()
        if differ:
            raise ValueError(f"the parameters of rank(s) {differ} differ from rank 0's; data-parallel EGN needs replicas")
        for r in range(self.world):
            twins = ((table[:, 2] == table[r, 2]) & (table[:, 3] != table[r, 3])).nonzero().flatten().tolist()
            if twins:
                raise ValueError(f"rank(s) {twins} hold the same rows of the sharded parameters as rank {r} with other values; "
                                 "HSDP needs its replicas equal")

    def gather_rows(self, tensors: list[Tensor], sizes: list[int]) -> list[Tensor]:
        """Each tensor (b_r, *rest) of rank r → (Σ_r b_r, *rest), ranks in order, on every rank.

        The tensors of one dtype travel packed in one (max_r b_r, Σ n) buffer (n = numel / b_r per
        tensor): one all_gather per dtype. rest must agree across ranks (`build_system` checks it).
        """
        b_r, b_max, b = sizes[self.rank], max(sizes), sum(sizes)
        out: list[Tensor | None] = [None] * len(tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        for dtype, idx in by_dtype.items():
            widths = [math.prod(tensors[i].shape[1:]) for i in idx]
            buf = torch.zeros(b_max, sum(widths), dtype=dtype, device=self.device)
            buf[:b_r] = torch.cat([tensors[i].reshape(b_r, n) for i, n in zip(idx, widths)], 1)
            parts = [torch.empty_like(buf) for _ in range(self.world)]
            dist.all_gather(parts, buf, group=self.group)
            full = torch.cat([part[:n] for part, n in zip(parts, sizes)], 0)
            for i, piece in zip(idx, full.split(widths, 1)):
                out[i] = piece.reshape(b, *tensors[i].shape[1:])
        return out  # type: ignore[return-value]

    def all_reduce_sum(self, tensors: list[Tensor]) -> list[Tensor]:
        """The sum over ranks of each tensor (one all-reduce of them packed in one buffer)."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.group)
        return [x.view_as(t) for x, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def all_reduce_mean(self, tensors: list[Tensor]) -> list[Tensor]:
        """The mean over ranks of each tensor."""
        return [x / self.world for x in self.all_reduce_sum(tensors)]

    def global_gradient(self, local: list[Tensor]) -> list[Tensor]:
        """g = (1/b) Σ_i J_iᵀ r_i of the global batch from each rank's part (1/b) Σ_{i ∈ rank} J_iᵀ r_i
        (shaped like the parameters): their sum, the same on every rank. A sharded parameter's part
        is already that sum (FSDP's backward reduce-scattered it, egn_fast.dtensors.fsdp_gradient)."""
        plain = [i for i, g in enumerate(local) if not is_dtensor(g)]
        out = list(local)
        for i, g in zip(plain, self.all_reduce_sum([local[i] for i in plain]) if plain else []):
            out[i] = g
        return out

    def build_system(
        self,
        model: nn.Module,
        inputs: Inputs | None = None,
        targets: Tensor | None = None,
        *,
        closure: Closure | None = None,
        gram: bool = True,
        **options: Any,
    ) -> DataParallelSystem:
        """`egn_fast.build_system` on this rank's shard, then the cross-rank stage of the mode.

        options: those of `build_system` (params, loss, backend, seq_method, timings, curvature,
        mc_samples, generator). gram=False: no global Gram (exact mode: K None, every layer
        gathered; a metric forms its own Gram from per-sample rows).
        """
        model = unwrap(model)
        if any(is_dtensor(p) for p in model.parameters()):
            check_sharded_batch(self, targets)
        forward = forward_of(model, inputs, targets, closure)
        curvature = options.get("curvature", "exact")
        error: BaseException | None = None
        local: RowSpaceSystem | None = None
        head: list[Tensor] = []  # exact: the loss head's tensors to gather (head_tensors)
        tensors: list[Tensor] = []
        signature = 0
        try:
            if self.exact:
                share = functools.partial(self.batch_share, curvature, options.get("generator"))
                local = build_system(model, closure=forward, gram=False, batch_share=share, **options)
            else:
                local = build_system(model, closure=local_refusals(forward, curvature), gram=gram, **options)
            tensors = [local.head.per_sample.detach()]
            if self.exact:
                local.factors = [sendable(f, local.backend, local.w.dtype) for f in local.factors]
                head = head_tensors(local)
                tensors = head + [t for f in local.factors for t in tensors_of(f)]
                if any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensors):
                    raise NonFiniteError("non-finite layer factors (an input or output-gradient is nan/inf)")
                # the shapes past the batch dimension must agree across ranks (model, sequence lengths)
                layout = [(type(f).__name__, str(t.dtype), tuple(t.shape[1:])) for f in local.factors for t in tensors_of(f)]
                signature = zlib.crc32(repr(([tuple(t.shape[1:]) for t in head], layout)).encode())
        except Exception as err:  # noqa: BLE001 - re-raised on every rank by sync
            if raised_on_every_rank(err):  # a sync inside build_system already reported it everywhere
                raise
            error = err
        table = self.sync(error, [local.b if local is not None else 0, signature])
        assert local is not None
        if (table[:, 2] != table[0, 2]).any():
            raise ValueError("the ranks' shards differ past the batch dimension (shapes, sequence lengths or model)")
        sizes = table[:, 1].tolist()
        if self.exact:
            # layers whose rows travel as per-sample gradients are sharded by column where that moves fewer bytes
            rows = [f for f in local.factors if isinstance(f, PerSampleFactors)]
            if not gram or not shard_pays(sum(p.numel() for f in rows for p in f.params), sum(sizes) * local.s, self.world):
                rows = []
            kept = [f for f in local.factors if not any(f is g for g in rows)]
            n_head = len(head)
            with local.clock("communicate"):
                gathered = self.gather_rows(head + [t for f in kept for t in tensors_of(f)], sizes)
                sharded = [ShardedRows(self.group, rows, sizes, local.s, local.w.dtype)] if rows else []
            local.factors = []  # the local rows are inside the gathered and sharded ones
            factors = rebuilt_layers(kept, gathered[n_head:]) + sharded
            system = global_system(local, gathered[:n_head], factors, sum(sizes), gram, self.global_gradient)
            return DataParallelSystem(self, local, system, gathered[0])
        with local.clock("communicate"):
            (per_sample,) = self.gather_rows(tensors, sizes)
        return DataParallelSystem(self, local, None, per_sample)

    def loss_at(self, loss_fn: Loss, forward: Closure) -> float:
        """The global batch loss (1/b) Σ_i ℓ_i at the current parameters (same value on every rank;
        per token: the mean over every rank's counted tokens)."""
        error, f, targets, tokens = None, torch.zeros(0, 1, device=self.device), None, 0
        try:
            out, targets = forward()
            f = out.reshape(out.shape[0], -1)
            targets = loss_fn.check_targets(f, targets)
            tokens = loss_fn.count_tokens(targets)
        except Exception as err:  # noqa: BLE001 - re-raised on every rank by sync
            error = err
        table = self.sync(error, [f.shape[0], tokens])
        per_sample = loss_fn.with_share(share_from(table, self.rank)).per_sample(f, targets).detach()
        return float(self.gather_rows([per_sample], table[:, 1].tolist())[0].mean())


class DataParallelSystem:
    """The row-space system of the global batch, as the optimizers use it.

    local: this rank's system (b_r rows); glob: the gathered global system (exact mode, else None);
    per_sample (b,): the global batch's per-sample losses; samples: the global batch's drawn
    targets (k, b, …) for Monte-Carlo rows, else None; scale: D^{-1/2} under a diagonal metric
    (`with_metric`), else None. `loss`, `solve_and_backproject`, `gradient` and `curvature` are
    global and equal on every rank.
    """

    def __init__(
        self, dp: DataParallel, local: RowSpaceSystem, glob: RowSpaceSystem | None, per_sample: Tensor,
        scale: list[Tensor] | None = None,
    ):
        self.dp, self.local, self.glob, self.per_sample, self.scale = dp, local, glob, per_sample, scale
        self.params, self.b, self.clock = local.params, per_sample.shape[0], local.clock
        self.w = local.w if glob is None else glob.w  # m = w.shape[0]: rows of the system solved here
        self.samples = None if glob is None else glob.samples

    @property
    def loss(self) -> float:
        return float(self.per_sample.mean())

    @property
    def timings(self) -> dict[str, float]:
        return self.local.timings

    def with_metric(self, scale: list[Tensor]) -> DataParallelSystem:
        """The global system in the variables w' = D^{1/2}w (egn_fast.system.metric), exact mode:
        every rank rescales the same gathered rows and global gradient."""
        if self.glob is None:
            raise ValueError("a metric with distributed='local' is not supported: use distributed='exact'")
        return DataParallelSystem(self.dp, self.local, self.glob.with_metric(scale), self.per_sample, scale)

    def solve_and_backproject(self, damping: float, solve_dtype: torch.dtype | None = None) -> tuple[Solution, list[Tensor]]:
        """exact: the global solve on every rank. local: each rank's solve, directions averaged
        (the Solution's gtd and dHd are then NaN: they are not by-products of the mean direction)."""
        error, result = None, None
        try:
            result = (self.glob or self.local).solve_and_backproject(damping, solve_dtype)
        except Exception as err:  # noqa: BLE001 - re-raised on every rank by sync
            error = err
        self.dp.sync(error)
        assert result is not None
        if self.glob is not None:
            return result
        sol, d = result
        with self.local.clock("communicate"):
            jitter = torch.tensor([sol.jitter], dtype=torch.float64, device=self.dp.device)
            dist.all_reduce(jitter, dist.ReduceOp.MAX, group=self.dp.group)
            d = self.dp.all_reduce_mean(d)
        dnorm2 = float(sum(x.double().pow(2).sum() for x in d))
        return Solution(damping, sol.gamma, float(jitter), math.nan, math.nan, dnorm2), d

    def gradient(self) -> list[Tensor]:
        """g = (1/b) Σ_r J̃_rᵀw_r of the global batch-mean loss, shaped like the parameters."""
        if self.glob is not None:
            return self.glob.gradient()
        weighted = [g * self.local.b for g in self.local.gradient()]  # J̃_rᵀw_r
        return [x / self.b for x in self.dp.all_reduce_sum(weighted)]

    def curvature(self, forward: Closure, steps: list[Tensor]) -> float:
        """sᵀHs = ‖J̃s‖²/b (forward: this rank's closure; steps like `params`). exact: J̃s from the
        global factors (no model run, no double backward, which CPU attention lacks), as one
        process computes it; local mode and custom factors without `project`: (1/b) Σ_r ‖J̃_r s‖²
        by row JVPs on each rank's shard, all-reduced. Under a metric steps s' are in the
        variables w' = D^{1/2}w: J̃'s' = J̃(D^{-1/2}s')."""
        if self.glob is not None:
            try:
                return float(self.glob.project(steps).double().pow(2).sum()) / self.b
            except NotImplementedError:  # the same factor types on every rank: every rank falls back
                pass
        if self.scale is not None:
            steps = [x * c for x, c in zip(steps, self.scale)]
        local = row_jvp(self.local, forward, steps).double().pow(2).sum().reshape(1)
        dist.all_reduce(local, group=self.dp.group)
        return float(local) / self.b
