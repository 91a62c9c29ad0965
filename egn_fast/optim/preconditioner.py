"""EGN as a preconditioner for any torch optimizer: it writes −d into each parameter's .grad."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..capture import Closure, Inputs, forward_of
from ..checks import check_damping, check_model, check_params_in_model
from ..distributed import DataParallel, resolve_distributed, unwrap
from ..losses import LossSpec, check_curvature, resolve_loss
from ..system import RowSpaceSystem, build_system
from .step_info import StepInfo

__all__ = ["EGNPreconditioner"]

# The options of `build_system` a preconditioner passes on (it holds the batch, the parameters,
# the loss and the backend itself, and always builds the Gram).
OPTIONS = ("seq_method", "timings", "curvature", "mc_samples", "generator")


class EGNPreconditioner:
    """EGN as a preconditioner: `step(inputs, targets)` writes −d into each parameter's .grad,
    so any torch optimizer applies the EGN direction (p ← p − lr·grad = p + lr·d).

        precond = egn_fast.EGNPreconditioner(model, loss="cross_entropy", damping=1.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        precond.step(x, y); opt.step()

    Returns a StepInfo (loss, λ, ‖d‖, jitter); λ stays fixed unless changed via `damping`.
    solve_dtype: the Cholesky's dtype (default the Gram's); params: the parameters to
    precondition (default: every one with requires_grad); options: seq_method, timings,
    curvature, mc_samples, generator, as for `egn_fast.build_system` (egn_fast.losses.curvature).
    process_group, distributed: data-parallel steps, each rank on its own shard of the batch, as
    for `EGN` (egn_fast.distributed); a model sharded with FSDP2 runs over its mesh's ranks without
    them, and .grad gets each parameter's own shard of −d (a DTensor placed like the parameter).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossSpec = "mse",
        damping: float = 1.0,
        backend: str = "auto",
        *,
        solve_dtype: torch.dtype | None = None,
        params: Iterable[nn.Parameter] | None = None,
        process_group: Any = None,
        distributed: str | None = None,
        **options: Any,
    ) -> None:
        self.damping = check_damping(damping)
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(f"EGNPreconditioner got unexpected keyword argument(s) {unknown}; its options are {list(OPTIONS)}")
        check_curvature(options.get("curvature", "exact"), options.get("mc_samples", 1), options.get("generator"), self.damping)
        self.params = [p for p in (check_model(model).parameters() if params is None else params) if p.requires_grad]
        check_params_in_model(model, self.params)
        process_group, mode = resolve_distributed(unwrap(model), process_group, distributed)
        self.data_parallel = None if mode is None else DataParallel(process_group, mode, self.params[0].device)
        if self.data_parallel is not None:
            self.data_parallel.check_replicated(list(model.parameters()))
        self.model = model if self.data_parallel is None else unwrap(model)
        self.loss_fn = resolve_loss(loss)
        self.backend, self.solve_dtype, self.options = backend, solve_dtype, options

    @torch.no_grad()
    def step(self, inputs: Inputs | None = None, targets: Tensor | None = None, *, closure: Closure | None = None) -> StepInfo:
        """Set p.grad = −d for every parameter (d the EGN direction on this batch)."""
        dp = self.data_parallel
        with contextlib.nullcontext() if dp is None else dp.named_failures():
            return self._step(forward_of(self.model, inputs, targets, closure), build_system if dp is None else dp.build_system)

    def _step(self, forward: Closure, build: Callable[..., RowSpaceSystem]) -> StepInfo:
        system = build(
            self.model, closure=forward, params=self.params,
            loss=self.loss_fn, backend=self.backend, **self.options,
        )
        sol, d = system.solve_and_backproject(self.damping, self.solve_dtype)
        for p, x in zip(system.params, d):  # d is in model order, which self.params need not follow
            p.grad = -x
        return StepInfo(
            loss=system.loss, damping=self.damping, next_damping=self.damping, accepted=True,
            direction_norm=math.sqrt(max(sol.dnorm2, 0.0)), jitter=sol.jitter, timings=system.timings,
        )
