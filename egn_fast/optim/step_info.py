"""`StepInfo`: what one step of EGN (or EGNPreconditioner) did."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["StepInfo"]


@dataclass
class StepInfo:
    """What one `EGN.step` did.

    loss: batch loss before the step; loss_after: after it (None when not evaluated: no line
    search and no adaptive damping); damping: λ used; next_damping: λ for the next step;
    step_size: t·lr of the first group (0 when rejected); rho: gain ratio (None when not
    computed); accepted: whether the parameters changed; direction_norm: ‖d‖ of the LM
    direction; jitter: diagonal jitter the solve needed; line_search_tries; timings: seconds per
    stage (when asked); reason: why a step was rejected.
    """

    loss: float
    damping: float
    next_damping: float
    accepted: bool
    loss_after: float | None = None
    step_size: float = 0.0
    rho: float | None = None
    direction_norm: float = 0.0
    jitter: float = 0.0
    line_search_tries: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    reason: str = ""
