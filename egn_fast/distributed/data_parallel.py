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
on one rank is raised on every rank, naming it, before anyone enters the next collective.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..capture import Closure, Inputs, forward_of
from ..dtensors import is_dtensor
from ..errors import NonFiniteError, SolveError
from ..losses import Loss, LossHead
from ..rules import Factors, PerSampleFactors
from ..system.build import build_system
from ..system.jvp import row_jvp
from ..system.row_space import RowSpaceSystem, Solution
from .sendable import rebuilt, sendable, tensors_of
from .shard import ShardedRows, shard_pays

__all__ = ["MODES", "DataParallel", "DataParallelSystem", "check_mode", "unwrap", "parameter_checksum"]

MODES = ("exact", "local")
# Errors re-raised on every rank as the class the failing rank raised; any other as RuntimeError.
_ERROR_CLASSES = {c.__name__: c for c in (NonFiniteError, SolveError, ValueError, TypeError, RuntimeError)}


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

    @property
    def exact(self) -> bool:
        return self.mode == "exact"

    def sync(self, error: BaseException | None, meta: list[int] | None = None) -> Tensor:
        """All-gather (failed, *meta) from every rank → (R, 1 + len(meta)) int64 on the CPU. If any
        rank failed, raise on every rank: the first failing rank's error class and message, named."""
        local = torch.tensor([error is not None, *(meta or [])], dtype=torch.int64, device=self.device)
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
            raise _ERROR_CLASSES.get(name, RuntimeError)(f"rank {failed[0]} of {self.world}: {message}{others}") from error
        return table

    def check_replicated(self, params: list[nn.Parameter]) -> None:
        """Raise on every rank unless every rank's parameters are bit-identical to rank 0's (the
        sharded ones, DTensors, hold different rows on each rank by design and are skipped)."""
        sums = self.sync(None, [parameter_checksum([p for p in params if not is_dtensor(p)])])[:, 1]
        differ = (sums != sums[0]).nonzero().flatten().tolist()
        if differ:
            raise ValueError(f"the parameters of rank(s) {differ} differ from rank 0's; data-parallel EGN needs replicas")

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

    def all_reduce_mean(self, tensors: list[Tensor]) -> list[Tensor]:
        """The mean over ranks of each tensor (one all-reduce of them packed in one buffer)."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.group)
        flat /= self.world
        return [x.view_as(t) for x, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def build_system(
        self,
        model: nn.Module,
        inputs: Inputs | None = None,
        targets: Tensor | None = None,
        *,
        closure: Closure | None = None,
        **options: Any,
    ) -> DataParallelSystem:
        """`egn_fast.build_system` on this rank's shard, then the cross-rank stage of the mode.

        options: those of `build_system` (params, loss, backend, seq_method, timings).
        """
        model = unwrap(model)
        if any(is_dtensor(p) for p in model.parameters()):
            self._check_sharded_batch(targets)
        forward = forward_of(model, inputs, targets, closure)
        error: BaseException | None = None
        local: RowSpaceSystem | None = None
        tensors: list[Tensor] = []
        signature = 0
        try:
            if options.get("curvature", "exact") != "exact":
                raise ValueError(f"curvature={options['curvature']!r} with a process_group is not supported yet; use curvature='exact'")
            local = build_system(model, closure=_refusing_token_targets(forward), gram=not self.exact, part_of_group=True, **options)
            head = local.head
            tensors = [head.per_sample.detach()]
            if self.exact:
                local.factors = [sendable(f, local.backend, local.w.dtype) for f in local.factors]
                tensors += [head.r, head.S, head.w] + [t for f in local.factors for t in tensors_of(f)]
                if any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensors):
                    raise NonFiniteError("non-finite layer factors (an input or output-gradient is nan/inf)")
                # the shapes past the batch dimension must agree across ranks (model, sequence lengths)
                layout = [(type(f).__name__, str(t.dtype), tuple(t.shape[1:])) for f in local.factors for t in tensors_of(f)]
                signature = zlib.crc32(repr(([tuple(t.shape[1:]) for t in tensors[:4]], layout)).encode())
        except Exception as err:  # noqa: BLE001 - re-raised on every rank by sync
            error = err
        table = self.sync(error, [local.b if local is not None else 0, signature])
        assert local is not None
        if (table[:, 2] != table[0, 2]).any():
            raise ValueError("the ranks' shards differ past the batch dimension (shapes, sequence lengths or model)")
        sizes = table[:, 1].tolist()
        if self.exact:
            # layers whose rows travel as per-sample gradients are sharded by column where that moves fewer bytes
            rows = [f for f in local.factors if isinstance(f, PerSampleFactors)]
            if not shard_pays(sum(p.numel() for f in rows for p in f.params), sum(sizes) * local.s, self.world):
                rows = []
            kept = [f for f in local.factors if not any(f is g for g in rows)]
            with local.clock("communicate"):
                gathered = self.gather_rows(tensors[:4] + [t for f in kept for t in tensors_of(f)], sizes)
                sharded = [ShardedRows(self.group, rows, sizes, local.s, local.w.dtype)] if rows else []
            local.factors = []  # the local rows are inside the gathered and sharded ones
            system = self._global_system(local, kept, sharded, gathered, sum(sizes))
            return DataParallelSystem(self, local, system, gathered[0])
        with local.clock("communicate"):
            (per_sample,) = self.gather_rows(tensors, sizes)
        return DataParallelSystem(self, local, None, per_sample)

    def _check_sharded_batch(self, targets: Tensor | None) -> None:
        """Refuse, on every rank, a step where some rank holds one sample while the parameters are
        sharded. FSDP all-gathers inside the capture's forward and backward passes, so those
        passes must be the same on every rank; with one sample the capture cannot tell an output
        broadcast over the batch from a batch of one, and may take one pass fewer than the other
        ranks (docs/design.md §6). Checked when the targets are given (their batch size)."""
        b_r = targets.shape[0] if isinstance(targets, Tensor) and targets.dim() else -1
        sizes = self.sync(None, [b_r])[:, 1].tolist()
        if 1 in sizes:
            raise ValueError(
                f"rank {sizes.index(1)} of {self.world} holds 1 sample: with sharded (FSDP) parameters every rank needs "
                "at least 2 samples per step (the capture's passes must match across ranks)"
            )

    def _global_system(
        self, local: RowSpaceSystem, kept: list[Factors], sharded: list[Factors], gathered: list[Tensor], b: int
    ) -> RowSpaceSystem:
        """The system of the concatenated batch: the gathered head, the `kept` layers rebuilt from
        their gathered tensors, and the sharded rows."""
        per_sample, r, S, w = gathered[:4]
        factors, rest = [], gathered[4:]
        for f in kept:
            n = len(tensors_of(f))
            factors.append(rebuilt(f, rest[:n]))
            rest = rest[n:]
        factors += sharded
        K = torch.zeros(b * local.s, b * local.s, dtype=local.w.dtype, device=self.device)
        with local.clock("gram"):
            for f in factors:
                f.add_gram(K, local.backend)
        if not torch.isfinite(K.diagonal().sum()):  # the same K on every rank: raised on every rank
            raise NonFiniteError("the global Gram has non-finite entries (overflow)")
        head = LossHead(per_sample, r, S, w)
        return RowSpaceSystem(local.params, K, w.reshape(-1).to(K.dtype), b, local.s, head, factors, local.backend, local.clock)

    def loss_at(self, loss_fn: Loss, forward: Closure) -> float:
        """The global batch loss (1/b) Σ_i ℓ_i at the current parameters (same value on every rank)."""
        error, per_sample = None, torch.zeros(0, device=self.device)
        try:
            out, targets = forward()
            f = out.reshape(out.shape[0], -1)
            per_sample = loss_fn.per_sample(f, loss_fn.check_targets(f, targets)).detach()
        except Exception as err:  # noqa: BLE001 - re-raised on every rank by sync
            error = err
        sizes = self.sync(error, [per_sample.shape[0]])[:, 1].tolist()
        return float(self.gather_rows([per_sample], sizes)[0].mean())


def _refusing_token_targets(forward: Closure) -> Closure:
    """forward, refusing per-token targets (b, T): each rank's loss would be a mean over its own
    tokens, and the ranks' token counts differ, so the global token mean is not their combination."""

    def checked() -> tuple[Tensor, Tensor]:
        out, targets = forward()
        if isinstance(targets, Tensor) and not targets.is_floating_point() and targets.dim() >= 2 and out.dim() >= 3:
            raise ValueError("per-token targets (b, T) with a process_group are not supported yet")
        return out, targets

    return checked


class DataParallelSystem:
    """The row-space system of the global batch, as the optimizers use it.

    local: this rank's system (b_r rows); glob: the gathered global system (exact mode, else None);
    per_sample (b,): the global batch's per-sample losses. `loss`, `solve_and_backproject`,
    `gradient` and `curvature` are global and equal on every rank.
    """

    def __init__(self, dp: DataParallel, local: RowSpaceSystem, glob: RowSpaceSystem | None, per_sample: Tensor):
        self.dp, self.local, self.glob, self.per_sample = dp, local, glob, per_sample
        self.params, self.b = local.params, per_sample.shape[0]
        self.w = local.w if glob is None else glob.w  # m = w.shape[0]: rows of the system solved here

    @property
    def loss(self) -> float:
        return float(self.per_sample.mean())

    @property
    def timings(self) -> dict[str, float]:
        return self.local.timings

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
        return [x * (self.dp.world / self.b) for x in self.dp.all_reduce_mean(weighted)]

    def curvature(self, forward: Closure, steps: list[Tensor]) -> float:
        """sᵀHs = (1/b) Σ_r ‖J̃_r s‖² (forward: this rank's closure; steps like `params`): from the
        global factors in exact mode, else (local mode, a factor type without `project`) by row
        JVPs on each rank's shard, all-reduced."""
        if self.glob is not None:
            try:
                return float(self.glob.project(steps).double().pow(2).sum()) / self.b
            except NotImplementedError:
                pass
        local = row_jvp(self.local, forward, steps).double().pow(2).sum().reshape(1)
        dist.all_reduce(local, group=self.dp.group)
        return float(local) / self.b
