"""EGN as a preconditioner for any torch optimizer: it writes −d into each parameter's .grad."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn

from .capture import Closure, Inputs, forward_of
from .checks import LossSpec, check_damping, check_model, check_params_in_model, resolve_loss
from .curvature import check_curvature
from .step_info import StepInfo
from .system import build_system

__all__ = ["EGNPreconditioner"]


class EGNPreconditioner:
    """EGN as a preconditioner: `step(inputs, targets)` writes −d into each parameter's .grad,
    so any torch optimizer applies the EGN direction (p ← p − lr·grad = p + lr·d).

        precond = egn_fast.EGNPreconditioner(model, loss="cross_entropy", damping=1.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        precond.step(x, y); opt.step()

    Returns a StepInfo (loss, λ, ‖d‖, jitter); λ stays fixed unless changed via `damping`.
    curvature / mc_samples / generator as for `egn_fast.direction` (egn_fast.curvature).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossSpec = "mse",
        damping: float = 1.0,
        backend: str = "auto",
        *,
        solve_dtype: torch.dtype | None = None,
        seq_method: str = "auto",
        timings: bool = False,
        params: Iterable[nn.Parameter] | None = None,
        curvature: str = "exact",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        self.damping = check_damping(damping)
        check_curvature(curvature, mc_samples, generator, self.damping)
        self.rows = dict(curvature=curvature, mc_samples=mc_samples, generator=generator)  # build_system's (egn_fast.curvature)
        self.params = [p for p in (check_model(model).parameters() if params is None else params) if p.requires_grad]
        check_params_in_model(model, self.params)
        self.model = model
        self.loss_fn = resolve_loss(loss)
        self.backend, self.seq_method, self.solve_dtype, self.timings = backend, seq_method, solve_dtype, timings

    @torch.no_grad()
    def step(self, inputs: Inputs | None = None, targets: Tensor | None = None, *, closure: Closure | None = None) -> StepInfo:
        """Set p.grad = −d for every parameter (d the EGN direction on this batch)."""
        system = build_system(
            self.model, closure=forward_of(self.model, inputs, targets, closure), params=self.params,
            loss=self.loss_fn, backend=self.backend, seq_method=self.seq_method, timings=self.timings, **self.rows,
        )
        sol, d = system.solve_and_backproject(self.damping, self.solve_dtype)
        for p, x in zip(system.params, d):  # d is in model order, which self.params need not follow
            p.grad = -x
        return StepInfo(
            loss=system.loss, damping=self.damping, next_damping=self.damping, accepted=True,
            direction_norm=math.sqrt(max(sol.dnorm2, 0.0)), jitter=sol.jitter, timings=system.timings,
        )
