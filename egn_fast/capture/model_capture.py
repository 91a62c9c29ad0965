"""The capture stage's one entry (docs/design.md §3).

`capture_model` checks the model and the parameters J is taken with respect to, runs the model
once with hooks (again only when the plan asks: egn_fast.capture.forward), plans the capture
(which rule covers which parameter, where the samples lie: egn_fast.capture.plan) and returns a
`ModelCapture`. The stages after it use only that object:

    captured = capture_model(model, inputs, targets, params=params)
    with captured.restored_on_error():           # a refused step leaves buffers and RNG as they were
        g = captured.gradient(r / b)              # Monte-Carlo rows only: one ordinary backward
        captured.backward(S)                      # the batched backward: G for every recorded output
        factors = rules.layer_factors(captured, ctx, ops)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..checks import check_trainable
from ..clock import StageClock
from ..dtensors import fsdp_gradient, is_dtensor, reshard_fsdp
from .compiled import running_eager, uncompiled
from .forward import ModelState, capture_planned, undone_on_error
from .hooks import Closure, Inputs, ModuleCall, forward_of, output_grads
from .plan import Plan, check_inputs, collect_trainable

__all__ = ["ModelCapture", "capture_model"]


@dataclass
class ModelCapture:
    """A model run once with hooks, and its plan.

    params: the parameters J is taken with respect to (model.parameters() order); outputs: the
    model's outputs f (b, c) (detached once `backward` has run); targets as the forward returned
    them; output_shape: the outputs before flattening, (b, …); calls: every hooked module's
    recorded calls, their outputs' batch layouts applied; clock: seconds per stage, "forward" done;
    model: the (uncompiled) model that ran.
    """

    params: list[nn.Parameter]
    device: torch.device
    outputs: Tensor
    targets: Any
    output_shape: tuple[int, ...]
    plan: Plan
    calls: dict[nn.Module, list[ModuleCall]]
    state: ModelState
    clock: StageClock
    model: nn.Module

    @property
    def b(self) -> int:
        return self.outputs.shape[0]

    @property
    def trainable_ids(self) -> frozenset[int]:
        return frozenset(id(p) for p in self.params)

    def planned_calls(self) -> list[ModuleCall]:
        """The calls of every module the plan gives a rule, in plan order."""
        return [c for m in self.plan.modules() for c in self.calls[m]]

    @contextmanager
    def restored_on_error(self) -> Iterator[None]:
        """The model's buffers and RNG state as they were before the capture, if the block raises."""
        try:
            yield
        except BaseException:
            self.state.restore()
            raise

    def has_rowwise_outputs(self) -> bool:
        """Whether some planned call has an output taken row by row (hooks.output_grads)."""
        return any(c.rowwise for c in self.planned_calls())

    def gradient(self, cotangent: Tensor) -> list[Tensor]:
        """Σ_i J_iᵀ cotangent_i for every parameter (zeros where unused); cotangent: (b, c). The
        graph is kept for `backward`. Sharded parameters (FSDP2): this rank's shard of the sum
        over every rank's samples (egn_fast.dtensors.fsdp_gradient, FSDP's own reduce-scatter)."""
        if any(is_dtensor(p) for p in self.params):  # FSDP's graph holds unsharded copies, not these
            return fsdp_gradient(self.model, self.outputs, self.params, cotangent.to(self.outputs.dtype))
        grads = torch.autograd.grad(self.outputs, self.params, cotangent.to(self.outputs.dtype), retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(self.params, grads)]

    def backward(self, cotangents: Tensor) -> None:
        """The batched backward: call.grads of every planned call, ∂(S_{:,k}·f)/∂z for all k, as
        (b, s, *rest) (egn_fast.capture.hooks.output_grads). cotangents: (s, b, c). The outputs
        are detached afterwards, so the model's graph lives only as long as the recorded calls."""
        output_grads(self.outputs, cotangents.to(self.outputs.dtype), self.planned_calls())
        self.outputs = self.outputs.detach()


def capture_model(
    model: nn.Module,
    inputs: Inputs | None = None,
    targets: Tensor | None = None,
    *,
    closure: Closure | None = None,
    params: list[nn.Parameter] | None = None,
    timings: bool = False,
) -> ModelCapture:
    """Check, run with hooks and plan the model: the capture stage (docs/design.md §2, §2.1).

    inputs: a tensor, a tuple (positional arguments) or a dict (keyword arguments), with targets;
    or closure() -> (outputs, targets). params: the parameters J is taken with respect to
    (default: every parameter with requires_grad). timings: the returned clock records seconds
    per stage, starting with "forward". Refuses, before the model runs, what no rule can serve
    (batch statistics, Embedding(max_norm), parameters on several devices or the meta device,
    inputs on another device); on any error the model's buffers and RNG are left as they were.
    A compiled model (`torch.compile(model)`, `module.compile()`) is captured running its eager
    forward (egn_fast.capture.compiled); names in messages are the uncompiled model's.
    """
    model = uncompiled(model)
    reshard_fsdp(model)  # a forward of the user's may have left FSDP's root unsharded: its parameters are the DTensors again
    forward = forward_of(model, inputs, targets, closure)
    params, hooked = collect_trainable(model, None if params is None else {id(p) for p in params})
    device = check_trainable(model, params)
    if inputs is not None:
        check_inputs(inputs, device)
    clock = StageClock(device, timings)
    batch_size = targets.shape[0] if isinstance(targets, Tensor) and targets.dim() else None
    trainable = {id(p) for p in params}
    with clock("forward"), undone_on_error(model, device) as state, running_eager():
        capture, outputs, targets, plan = capture_planned(model, forward, hooked, trainable, state, batch_size)
    return ModelCapture(params, device, outputs, targets, capture.output_shape, plan, capture.calls, state, clock, model)
