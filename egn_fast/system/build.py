"""The row-space system, stage by stage (docs/design.md §3):

    capture (forward with hooks) → loss head / rows (r, S, w) → batched backward (G) → layer
    factors → Gram K → damped solve (K + bλI) γ = w → back-projection d = −J̃ᵀγ

`build_system` runs the stages up to the Gram and returns a `RowSpaceSystem` (K, w and the layer
factors, egn_fast.system.row_space); its `solve` and `backproject` run the last two, so several λ
can be tried on one capture, and `solve_and_backproject` is both at once (what `direction` and the
optimizers use). Monte-Carlo rows (curvature="mc", egn_fast.losses.curvature) add two stages, the
gradient g (one backward) and J̃g from the layer factors, and give a `WoodburySystem`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ..capture import Closure, Inputs, capture_model
from ..checks import all_finite, check_row_space, check_seq_method
from ..dtensors import is_dtensor
from ..errors import NonFiniteError
from ..losses import BatchShare, LossSpec, check_curvature, resolve_loss, rows_for
from ..ops import check_backend, get_backend
from ..rules import RuleContext, layer_factors
from .row_space import RowSpaceSystem, WoodburySystem, project
from .solve import dot

__all__ = ["build_system"]


def build_system(
    model: nn.Module,
    inputs: Inputs | None = None,
    targets: Tensor | None = None,
    *,
    closure: Closure | None = None,
    params: list[nn.Parameter] | None = None,
    loss: LossSpec = "mse",
    backend: str = "auto",
    seq_method: str = "auto",
    timings: bool = False,
    gram: bool = True,
    curvature: str = "exact",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    batch_share: Callable[[int, int], BatchShare] | None = None,
) -> RowSpaceSystem:
    """Capture, loss head, batched backward and Gram: the row-space system at the current parameters.

    inputs: a tensor, a tuple (positional arguments) or a dict (keyword arguments); the model's
    output is (b, …), flattened to (b, c). targets as the loss expects (see `egn_fast.losses`).
    Instead of (inputs, targets), `closure()` may run the model itself and return (outputs, targets).
    params: the parameters J is taken with respect to (default: all with requires_grad); the rest
    of the model is held fixed.
    seq_method: "auto" (cost model per layer) | "ghost" | "per_sample" for sequence layers.
    gram=False stops after the layer factors (K is None): for callers that only need J̃ᵀu
    (`backproject`) and J̃v (`row_jvp`), it saves the Σ_l (m²·out_l + b²·in_l) Gram work and the
    m×m memory (and, for Monte-Carlo rows, the J̃g of the right-hand side). Non-finite factors
    are then not detected here (the Gram's diagonal is the check).
    curvature: "exact" | "mc" (mc_samples rows per sample drawn with `generator`; a
    WoodburySystem) | "empirical" (egn_fast.losses.curvature).
    batch_share: on one rank of a data-parallel group (egn_fast.distributed), called once with
    (b_r, counted tokens of the checked targets) after the capture and before the loss head: it
    returns this rank's `BatchShare` of the global batch (a collective), which the loss head, the
    draws and the gradient's 1/b then use; the system holds this rank's rows, and a Monte-Carlo
    system's `grad` is this rank's part (1/b) Σ_{i ∈ rank} J_iᵀ r_i of the global gradient.
    None (one process): the batch is whole — and the parameters must not be sharded (DTensors,
    FSDP2): alone, a rank's system would give its shard of its own batch's direction.
    The model's parameters, buffers and .grad fields are left untouched.
    """
    loss_fn = resolve_loss(loss)
    check_backend(backend)
    check_seq_method(seq_method)
    check_curvature(curvature, mc_samples, generator)
    if batch_share is None and any(is_dtensor(p) for p in (model.parameters() if params is None else params)):
        raise ValueError(  # before the forward, whose FSDP all-gathers would wait for the other ranks
            "the model's parameters are sharded (DTensors, FSDP2): build its system with egn_fast.direction, EGN or "
            "egn_fast.distributed.DataParallel(...).build_system, which run over the ranks of the mesh"
        )
    captured = capture_model(model, inputs, targets, closure=closure, params=params, timings=timings)
    params, device, b, clock = captured.params, captured.device, captured.b, captured.clock
    acc_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32

    with captured.restored_on_error():  # a refused call leaves buffers and RNG as they were
        if batch_share is not None and any(is_dtensor(p) for p in params) and captured.has_rowwise_outputs():
            raise ValueError(
                "the model broadcasts a constant table itself (x + f(table)[None]), whose output-gradients take one "
                "backward per 32 rows, a number that depends on this rank's batch; with sharded (FSDP) parameters "
                "every rank's backward passes must match (each all-gathers parameters): not supported"
            )
        ops = get_backend(backend, device)
        with clock("loss_head"):
            loss_fn.check_output_shape(captured.output_shape, captured.targets)
            targets = loss_fn.check_targets(captured.outputs, captured.targets)
            share = None if batch_share is None else batch_share(b, loss_fn.count_tokens(targets))
            outputs = captured.outputs.detach()
            # under autocast the logits may be bf16: the loss head computes in fp32 at least
            if outputs.dtype in (torch.float16, torch.bfloat16):
                outputs = outputs.float()
            rows = rows_for(loss_fn.with_share(share), outputs, targets, curvature, mc_samples, generator, ops)
            head = rows.head
            if not all_finite(head.per_sample):
                raise NonFiniteError(f"the loss ({loss_fn.name}) is not finite at the current parameters")
            s = head.S.shape[2]
            if gram:
                check_row_space(b, s, acc_dtype, device)

        grad = None
        if head.w is None:  # Monte-Carlo rows: g = (1/b) Σ_i J_iᵀ r_i by one backward, before the batched one
            with clock("gradient"):
                grad = captured.gradient(head.r / (b if share is None else share.b))

        with clock("backward"):
            captured.backward(head.S.permute(2, 0, 1))

        with clock("gram"):
            # torch.func transforms in the generic rule still differentiate under no_grad
            with torch.no_grad():
                factors = layer_factors(captured, RuleContext("", b, s, acc_dtype, captured.trainable_ids, seq_method), ops)
                K = None
                if gram:
                    K = torch.zeros(b * s, b * s, dtype=acc_dtype, device=device)
                    for f in factors:
                        f.add_gram(K, ops)
            # A nan/inf anywhere in the factors shows on the diagonal (|K_ij|² ≤ K_ii K_jj): O(m) check.
            if K is not None and not all_finite(K.diagonal()):
                raise NonFiniteError("the Gram has non-finite entries: some layer input or output-gradient is nan/inf")
        if grad is None:
            w = head.w.reshape(-1).to(acc_dtype)
            return RowSpaceSystem(params, K, w, b, s, head, factors, ops, clock, rows.samples)
        z = torch.zeros(b, s, dtype=acc_dtype, device=device)  # gram=False: no solve, so no J̃g (e.g. a metric's own)
        if gram:
            with clock("project"):
                z = project(factors, params, grad, ops, acc_dtype, (b, s))
        return WoodburySystem(params, K, z.reshape(-1), b, s, head, factors, ops, clock, rows.samples, grad, dot(grad, grad))
