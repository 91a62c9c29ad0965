"""The global batch of exact data-parallel EGN (docs/design.md §6): what turns the ranks' shards
into one batch beyond gathering rows — the `BatchShare` each rank takes from the mid-build sync
(offset, global b, global counted tokens), the checksum that checks the ranks draw from one
generator state, the loss head's tensors gathered (with the drawn targets of Monte-Carlo rows),
the global system they make (with the global gradient for the Woodbury step), and local mode's
refusals of what needs the global batch.
"""

from __future__ import annotations

import zlib

from typing import Callable

import torch
from torch import Tensor

from ..capture import Closure
from ..errors import NonFiniteError
from ..losses import BatchShare, LossHead
from ..rules import Factors
from ..system.row_space import RowSpaceSystem, WoodburySystem, project
from ..system.solve import dot

__all__ = ["generator_checksum", "share_from", "head_tensors", "global_system", "local_refusals"]


def generator_checksum(generator: torch.Generator | None, device: torch.device) -> int:
    """CRC32 of the state of the generator draws use: `generator`, or the global RNG of `device`."""
    if generator is not None:
        state = generator.get_state()
    else:
        state = torch.get_rng_state() if device.type == "cpu" else getattr(torch, device.type).get_rng_state(device)
    return zlib.crc32(state.numpy().tobytes())


def share_from(table: Tensor, rank: int) -> BatchShare:
    """This rank's BatchShare from a sync's table whose meta starts (b_r, counted tokens)."""
    sizes = table[:, 1].tolist()
    return BatchShare(offset=sum(sizes[:rank]), b=sum(sizes), tokens=int(table[:, 2].sum()))


def head_tensors(local: RowSpaceSystem) -> list[Tensor]:
    """The batch-first tensors of a rank's loss head that exact mode gathers: ℓ (b_r,), r (b_r, c),
    S (b_r, c, s), then w (b_r, s), or for Monte-Carlo rows the drawn targets (b_r, k, …)."""
    head = local.head
    last = head.w if head.w is not None else local.samples.transpose(0, 1)
    return [head.per_sample.detach(), head.r, head.S, last]


def global_system(
    local: RowSpaceSystem, head: list[Tensor], factors: list[Factors], b: int, gram: bool,
    global_gradient: Callable[[list[Tensor]], list[Tensor]],
) -> RowSpaceSystem:
    """The system of the concatenated batch on every rank: the gathered head (`head_tensors`) and
    the global factors (gram=False: no K). For Monte-Carlo rows, the Woodbury step's global
    gradient g = global_gradient(this rank's part, `local.grad`) — a collective — and z = J̃g from
    the global factors (a sharded layer's J̃v is one more collective)."""
    per_sample, r, S, *extra = head
    w = extra.pop(0) if local.head.w is not None else None
    samples = extra[0].transpose(0, 1) if extra else None  # (k, b, …)
    dtype, m, device = local.w.dtype, b * local.s, local.w.device
    K = None
    if gram:
        K = torch.zeros(m, m, dtype=dtype, device=device)
        with local.clock("gram"):
            for f in factors:
                f.add_gram(K, local.backend)
        if not torch.isfinite(K.diagonal().sum()):  # the same K on every rank: raised on every rank
            raise NonFiniteError("the global Gram has non-finite entries (overflow)")
    loss_head = LossHead(per_sample, r, S, w)
    if w is not None:
        return RowSpaceSystem(local.params, K, w.reshape(-1).to(dtype), b, local.s, loss_head, factors, local.backend, local.clock)
    assert isinstance(local, WoodburySystem) and local.grad is not None
    with local.clock("communicate"):
        grad = global_gradient(local.grad)
    z = torch.zeros(m, dtype=dtype, device=device)  # gram=False: no solve here, so no J̃g
    if gram:
        with local.clock("project"):
            z = project(factors, local.params, grad, local.backend, dtype, (b, local.s)).reshape(-1)
    return WoodburySystem(local.params, K, z, b, local.s, loss_head, factors, local.backend, local.clock, samples, grad, dot(grad, grad))


def local_refusals(forward: Closure, curvature: str) -> Closure:
    """forward, refusing in local mode what needs the global batch: estimated curvature (the
    Monte-Carlo step needs the global gradient and draws) and per-token targets (b, T) (each
    rank's loss would be the mean over its own tokens, not over the global batch's)."""

    def checked() -> tuple[Tensor, Tensor]:
        if curvature != "exact":
            raise ValueError(
                f"curvature={curvature!r} with distributed='local' is not supported: local mode averages the ranks' "
                "own directions, and estimated rows need the global batch (its gradient, draws and token count); "
                "use distributed='exact'"
            )
        out, targets = forward()
        if isinstance(targets, Tensor) and not targets.is_floating_point() and targets.dim() >= 2 and out.dim() >= 3:
            raise ValueError(
                "per-token targets (b, T) with distributed='local' are not supported: each rank's loss would be the mean "
                "over its own tokens, not over the global batch's; use distributed='exact'"
            )
        return out, targets

    return checked
