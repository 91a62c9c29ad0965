"""Adaptive damping: the trust-region rule that updates λ from the gain ratio
ρ = actual decrease / decrease predicted by the LM model (docs/design.md §1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["AdaptiveDamping", "resolve_adaptive_damping", "gain_ratio"]


@dataclass(frozen=True)
class AdaptiveDamping:
    """The trust-region rule for λ from ρ = actual / predicted decrease."""

    rho_low: float = 0.25
    rho_high: float = 0.75
    increase: float = 1.5
    decrease: float = 0.5
    min_damping: float = 1e-12
    max_damping: float = 1e6

    def __post_init__(self) -> None:
        if not (self.rho_low <= self.rho_high and self.increase > 1 and 0 < self.decrease < 1):
            raise ValueError(f"invalid adaptive damping settings {self}: need rho_low≤rho_high, increase>1, 0<decrease<1")
        if not 0 < self.min_damping <= self.max_damping:
            raise ValueError(f"invalid damping range [{self.min_damping}, {self.max_damping}]")

    def next(self, damping: float, rho: float) -> float:
        """λ for the next step after a step with gain ratio ρ (nan counts as a failure)."""
        if not rho >= self.rho_low:
            damping *= self.increase
        elif rho > self.rho_high:
            damping *= self.decrease
        return min(max(damping, self.min_damping), self.max_damping)


def resolve_adaptive_damping(value: object) -> AdaptiveDamping | None:
    """False (off) | True (the defaults) | an AdaptiveDamping."""
    if value is True:
        return AdaptiveDamping()
    if not (value is False or isinstance(value, AdaptiveDamping)):
        raise ValueError(f"adaptive_damping must be a bool or an AdaptiveDamping, got {value!r}")
    return value or None


def gain_ratio(loss: float, loss_after: float, predicted: float) -> tuple[float, str]:
    """(ρ, why the step is rejected or ""): ρ = (loss − loss_after) / predicted decrease (nan when
    the model predicts none); a step with ρ < 0, a non-finite loss_after or no predicted decrease
    is rejected."""
    rho = (loss - loss_after) / predicted if predicted > 0 else math.nan
    if not math.isfinite(loss_after):
        return rho, "non-finite loss after the step"
    if not predicted > 0:
        return rho, "the LM model predicts no decrease for this step (step multiplier too large)"
    if rho < 0:
        return rho, f"the loss went up (rho = {rho:.3g} < 0)"
    return rho, ""
