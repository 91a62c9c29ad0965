"""One rank's part of a global batch (data-parallel EGN, docs/design.md §6), and draws that do not
depend on how the batch is split.

A loss whose value involves the whole batch — per-token cross-entropy's mean over the N counted
tokens of all ranks, ℓ_i = (b/N) Σ_t ℓ_it — evaluates a rank's samples with the global b and N
(`Loss.with_share`). Monte-Carlo draws (`draw`) take the random numbers of the whole global batch
from one generator, in the same state on every rank, and keep this rank's samples: one process
with the concatenated batch draws exactly what the ranks draw together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["BatchShare", "draw"]


@dataclass(frozen=True)
class BatchShare:
    """This rank's samples [offset, offset + b_r) of a global batch of b samples with `tokens`
    counted tokens in all (per-token targets: those ≠ ignore_index; per-sample targets: b)."""

    offset: int
    b: int
    tokens: int


def draw(
    sampler: Callable[..., Tensor], shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor,
    share: BatchShare | None = None,
) -> Tensor:
    """sampler(shape) (torch.rand / torch.randn) in float64 for shape (k, b_r, …), moved to `like`'s
    device. The numbers come from the generator's device (the global RNG of `like`'s device when
    None), so they depend only on its state, not on where the model runs; with a share, the whole
    global batch's (k, b, …) is drawn and this rank's samples kept, so they do not depend on the
    split either."""
    k, b, *rest = shape
    total, offset = (b, 0) if share is None else (share.b, share.offset)
    device = like.device if generator is None else generator.device
    numbers = sampler((k, total, *rest), generator=generator, device=device, dtype=torch.float64)
    return numbers[:, offset : offset + b].to(like.device)
