"""The global batch of exact data-parallel EGN for language-model rows (docs/design.md §6): what
turns the ranks' shards into one batch beyond the gathered rows — the `BatchShare` each rank
takes from the mid-build sync (offset, global b, global counted tokens), the checksum that checks
the ranks draw from one generator state, the loss head's tensors gathered (with the drawn targets
of Monte-Carlo rows), and local mode's refusals of what needs the global batch.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

from ..capture import Closure
from ..losses import BatchShare
from ..system.row_space import RowSpaceSystem

__all__ = ["generator_checksum", "share_from", "head_tensors", "local_refusals"]


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


def local_refusals(forward: Closure, curvature: str) -> Closure:
    """forward, refusing in local mode what needs the global batch: estimated curvature (the
    Monte-Carlo step needs the global gradient) and per-token targets (b, T) (each rank's loss
    would be the mean over its own tokens, not over the global batch's)."""

    def checked() -> tuple[Tensor, Tensor]:
        if curvature != "exact":
            raise ValueError(
                f"curvature={curvature!r} with distributed='local' is not supported: each rank would solve its own "
                "estimated rows without the global gradient; use distributed='exact'"
            )
        out, targets = forward()
        if isinstance(targets, Tensor) and not targets.is_floating_point() and targets.dim() >= 2 and out.dim() >= 3:
            raise ValueError(
                "per-token targets (b, T) with distributed='local' are not supported: each rank's loss would be the mean "
                "over its own tokens, not over the global batch's; use distributed='exact'"
            )
        return out, targets

    return checked
