r"""The EGN step as plain functions, one concern each; `EGN.step` keeps the state and calls them
in this order (the update rule: egn_fast.optim.egn):

    system, sol, d = lm_direction(system, λ, solve_dtype, scale)   d = −(H + λI)⁻¹g, or −(H + λD)⁻¹g
    d̂, buffers     = momentum_direction(d, buffers, β, kind, t)     egn_fast.optim.momentum
    s, a           = lm_steps(d̂, lrs, max_step_norm, multiple)     s = lr·d̂, capped; s = a·d if known
    apply_steps(params, s, lrs, decays)                             no acceptance test: w ← (1 − lr·wd)w + s
    lm             = lm_model(system, sol, s, a, scale, forward)    gᵀs, sᵀHs, ‖s‖² of the LM model
    verdict        = accept(loss_at, L, lm, λ, line_search, adaptive, t_prev)
                     loss_at(t): move_to(params, saved, s, t), then the loss there
    rollback(params, saved) | apply_decay(params, saved, lrs, decays)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..capture import Closure
from ..system import RowSpaceSystem, Solution
from ..system.solve import dot
from .damping import AdaptiveDamping, gain_ratio
from .line_search import ArmijoLineSearch, backtrack

__all__ = [
    "LMModel", "Verdict", "lm_direction", "lm_steps", "apply_steps", "lm_model", "accept", "move_to", "rollback", "apply_decay",
]


def lm_direction(
    system: RowSpaceSystem, damping: float, solve_dtype: torch.dtype | None = None, scale: list[Tensor] | None = None
) -> tuple[RowSpaceSystem, Solution, list[Tensor]]:
    """(the system solved, its Solution, d): d = −(H + λI)⁻¹g; with scale = D^{-1/2} (shaped like
    system.params) d = −(H + λD)⁻¹g, solved in the variables w' = D^{1/2}w (egn_fast.system.metric),
    which the returned system and Solution are in (`system.with_metric`: a data-parallel system
    rescales its global rows)."""
    if scale is not None:
        with system.clock("metric"):
            system = system.with_metric(scale)
    sol, d = system.solve_and_backproject(damping, solve_dtype)
    if scale is not None:
        d = [x * s for x, s in zip(d, scale)]
    return system, sol, d


def lm_steps(d_hat: list[Tensor], lrs: list[float], max_step_norm: float | None, multiple: bool) -> tuple[list[Tensor], float | None]:
    """(s, a): s = lr·d̂ per parameter, scaled down to norm max_step_norm when longer; a with s = a·d
    when `multiple` (d̂ = d and one lr), else None."""
    steps = [lr * x for lr, x in zip(lrs, d_hat)]
    a = lrs[0] if multiple else None
    if max_step_norm is not None:
        norm = math.sqrt(dot(steps, steps))
        if norm > max_step_norm:
            steps = [x * (max_step_norm / norm) for x in steps]
            a = None if a is None else a * max_step_norm / norm
    return steps, a


def apply_steps(params: list[nn.Parameter], steps: list[Tensor], lrs: list[float], decays: list[float]) -> None:
    """w ← (1 − lr·wd)w + s per parameter (decoupled weight decay), in place."""
    for p, x, lr, wd in zip(params, steps, lrs, decays):
        if wd:
            p.mul_(1 - lr * wd)
        p.add_(x)


@dataclass
class LMModel:
    """The LM model m(ts) = t·gᵀs + ½t²(sᵀHs + λ‖s‖²) along a step s (in the variables of the solve)."""

    g_dot_s: float
    s_H_s: float  # nan when not needed (no adaptive damping)
    s_norm2: float

    def predicted_decrease(self, t: float, damping: float) -> float:
        """−m(ts): the decrease the model predicts for w + ts."""
        return -(t * self.g_dot_s + 0.5 * t * t * (self.s_H_s + damping * self.s_norm2))


def lm_model(
    system: RowSpaceSystem, sol: Solution, steps: list[Tensor], a: float | None, scale: list[Tensor] | None, forward: Closure | None
) -> LMModel:
    """gᵀs, sᵀHs, ‖s‖² for the step s. When s = a·d they are a·gᵀd, a²·dᵀHd, a²·‖d‖², by-products of
    the solve; otherwise gᵀs from g (one back-projection) and, when `forward` is given (adaptive
    damping needs it), sᵀHs = ‖J̃s‖²/b (`system.curvature`). Under a metric s enters as s/scale."""
    if a is not None:
        return LMModel(a * sol.gtd, a * a * sol.dHd, a * a * sol.dnorm2)
    inner = steps if scale is None else [x / c for x, c in zip(steps, scale)]
    g_dot_s, s_norm2 = dot(system.gradient(), inner), dot(inner, inner)
    return LMModel(g_dot_s, math.nan if forward is None else system.curvature(forward, inner), s_norm2)


@dataclass
class Verdict:
    """Whether a step is taken. t: the step multiplier found (0.0: none); loss_after: the loss at
    the last trial point; tries: trial points evaluated; rho: the gain ratio (adaptive damping,
    once a trial point was found); reason: why the step is rejected; next_damping: λ for the next step."""

    t: float
    loss_after: float
    tries: int
    accepted: bool
    next_damping: float
    rho: float | None = None
    reason: str = ""


def accept(
    loss_at: Callable[[float], float],
    loss: float,
    lm: LMModel,
    damping: float,
    line_search: ArmijoLineSearch | None,
    adaptive_damping: AdaptiveDamping | None,
    t_prev: float,
) -> Verdict:
    """Try w + t·s (loss_at(t) moves the parameters there and returns the loss): Armijo
    backtracking on t (or t = 1 without a line search), then, with adaptive damping, the gain
    ratio ρ of the trial point against the LM model, which rejects the step when ρ < 0 and sets
    the next λ. The parameters are left at the last trial point."""
    t, loss_after, tries = backtrack(loss_at, loss, lm.g_dot_s, line_search, t_prev)
    verdict = Verdict(t, loss_after, tries, accepted=t > 0, next_damping=damping)
    if not verdict.accepted:
        verdict.reason = f"Armijo condition not met in {tries} tries"
    if adaptive_damping is not None:
        rho = math.nan
        if verdict.accepted:
            rho, verdict.reason = gain_ratio(loss, loss_after, lm.predicted_decrease(t, damping))
            verdict.rho, verdict.accepted = rho, rho >= 0
        verdict.next_damping = adaptive_damping.next(damping, rho)
    return verdict


def move_to(params: list[nn.Parameter], saved: list[Tensor], steps: list[Tensor], t: float) -> None:
    """w + t·s into the parameters (w = saved), in place."""
    for p, x, s in zip(params, saved, steps):
        p.copy_(x).add_(s, alpha=t)


def rollback(params: list[nn.Parameter], saved: list[Tensor]) -> None:
    """Restore the parameters bit for bit (a rejected step)."""
    for p, x in zip(params, saved):
        p.copy_(x)


def apply_decay(params: list[nn.Parameter], saved: list[Tensor], lrs: list[float], decays: list[float]) -> None:
    """Decoupled weight decay on an accepted trial point w + t·s: subtract lr·wd·w (w = saved)."""
    for p, x, lr, wd in zip(params, saved, lrs, decays):
        if wd:
            p.sub_(x, alpha=lr * wd)
