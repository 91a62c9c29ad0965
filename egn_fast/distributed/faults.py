"""Errors in data-parallel EGN (docs/design.md §6, "Faults"): which were raised on every rank
alike, and a collective that failed because a peer is gone.

- `sync` (egn_fast.distributed.data_parallel) reports a rank's error on every rank; those reports,
  and decisions every rank takes on the same gathered table, are marked `on_every_rank`, so a
  surrounding try/except passes them on instead of reporting them in one more sync.
- A rank that dies or hangs cannot report: the others meet the failure inside a collective (gloo:
  "Connection reset/closed by peer" at once; a hung peer: the process group's timeout).
  `named_collective_failures` raises that as one RuntimeError naming this rank and what it means.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch.distributed as dist

__all__ = ["on_every_rank", "raised_on_every_rank", "named_collective_failures"]

# What the backends' messages say when a peer is gone or late (gloo's transport errors, NCCL's
# watchdog, the process group's timeout); torch raises most of them as plain RuntimeError.
_COLLECTIVE_SIGNS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer")


def on_every_rank(error: Exception) -> Exception:
    """Mark an error that every rank raises at the same point (a sync's report, or a decision on a
    gathered table)."""
    error.on_every_rank = True  # type: ignore[attr-defined]
    return error


def raised_on_every_rank(error: BaseException) -> bool:
    return getattr(error, "on_every_rank", False)


@contextlib.contextmanager
def named_collective_failures(rank: int, world: int) -> Iterator[None]:
    """Within the block, a collective that fails because another rank died, hung past the
    timeout or called a different collective is raised as RuntimeError("rank k of R: a collective
    of the EGN step failed …"); every other error passes unchanged."""
    try:
        yield
    except RuntimeError as err:
        text = str(err).strip()
        if raised_on_every_rank(err) or not (isinstance(err, dist.DistError) or any(s in text.lower() for s in _COLLECTIVE_SIGNS)):
            raise
        first = text.splitlines()[0] if text else type(err).__name__
        raise RuntimeError(
            f"rank {rank} of {world}: a collective of the EGN step failed — another rank died, hung past the process "
            f"group's timeout, or called a different collective (its own log says why): {first}"
        ) from err
