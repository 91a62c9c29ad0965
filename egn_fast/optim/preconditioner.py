"""EGN as a preconditioner for any torch optimizer: it writes −d into each parameter's .grad."""

from __future__ import annotations

import inspect
import math
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..capture import Closure, Inputs
from ..checks import check_damping, check_model, check_params_in_model
from ..losses import LossSpec, check_curvature, resolve_loss
from ..system import direction_with_info
from .step_info import StepInfo

__all__ = ["EGNPreconditioner"]

# The options of `direction_with_info` a preconditioner passes on each step (the batch, the
# parameters, the loss, λ and the backend it holds itself; no process group).
OPTIONS = ("solve_dtype", "seq_method", "timings", "curvature", "mc_samples", "generator")


class EGNPreconditioner:
    """EGN as a preconditioner: `step(inputs, targets)` writes −d into each parameter's .grad,
    so any torch optimizer applies the EGN direction (p ← p − lr·grad = p + lr·d).

        precond = egn_fast.EGNPreconditioner(model, loss="cross_entropy", damping=1.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        precond.step(x, y); opt.step()

    Returns a StepInfo (loss, λ, ‖d‖, jitter); λ stays fixed unless changed via `damping`.
    params: the parameters to precondition (default: every one with requires_grad).
    options: solve_dtype, seq_method, timings, curvature, mc_samples, generator, as for
    `egn_fast.direction_with_info`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossSpec = "mse",
        damping: float = 1.0,
        backend: str = "auto",
        *,
        params: Iterable[nn.Parameter] | None = None,
        **options: Any,
    ) -> None:
        self.damping = check_damping(damping)
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(f"EGNPreconditioner got unexpected keyword argument(s) {unknown}; it takes {list(OPTIONS)}")
        defaults = inspect.signature(direction_with_info).parameters
        check_curvature(*(options.get(k, defaults[k].default) for k in ("curvature", "mc_samples", "generator")), self.damping)
        self.params = [p for p in (check_model(model).parameters() if params is None else params) if p.requires_grad]
        check_params_in_model(model, self.params)
        self.model = model
        self.loss_fn = resolve_loss(loss)
        self.backend, self.options = backend, options

    @torch.no_grad()
    def step(self, inputs: Inputs | None = None, targets: Tensor | None = None, *, closure: Closure | None = None) -> StepInfo:
        """Set p.grad = −d for every parameter (d the EGN direction on this batch)."""
        result = direction_with_info(
            self.model, inputs, targets, closure=closure, params=self.params, loss=self.loss_fn, damping=self.damping,
            backend=self.backend, **self.options,
        )
        # d comes in model.parameters() order, which self.params need not follow
        ids = {id(p) for p in self.params}
        for p, x in zip([p for p in self.model.parameters() if id(p) in ids], result.direction):
            p.grad = -x
        sol = result.solution
        return StepInfo(
            loss=result.loss, damping=self.damping, next_damping=self.damping, accepted=True,
            direction_norm=math.sqrt(max(sol.dnorm2, 0.0)), jitter=sol.jitter, timings=result.timings,
        )
