"""The row-space system, stage by stage (docs/design.md §3):

    capture (forward with hooks) → loss head / rows (r, S, w) → batched backward (G) → layer
    factors → Gram K → damped solve (K + bλI) γ = w → back-projection d = −J̃ᵀγ

`build_system` runs the stages up to the Gram and returns a `RowSpaceSystem` (K, w and the layer
factors, egn_fast.row_space); its `solve` and `backproject` run the last two, so several λ can be
tried on one capture, and `solve_and_backproject` is both at once (what `direction` and the
optimizers use). Monte-Carlo rows (curvature="mc", egn_fast.curvature) add two stages, the
gradient g (one backward) and J̃g from the layer factors, and give a `WoodburySystem`.
`row_jvp` is the other product, J̃v, for matrix-free methods that need Hv = (1/b)J̃ᵀ(J̃v).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
from torch import Tensor, nn

from .capture import Capture, Closure, Inputs, ModuleCall, forward_of, output_grads
from .checks import LossSpec, check_row_space, check_seq_method, check_trainable, resolve_loss
from .clock import StageClock
from .errors import NonFiniteError
from .curvature import check_curvature, rows_for
from .ops import Backend, get_backend
from .forward import capture_planned, undone_on_error
from .plan import Plan, check_inputs, collect_trainable
from .row_space import RowSpaceSystem, Solution, WoodburySystem, project
from .rules import Factors, RuleContext, generic_factors, merge_shared
from .rules.parametrized import reevaluated_parametrizations
from .solve import dot

__all__ = ["Solution", "RowSpaceSystem", "WoodburySystem", "build_system", "layer_factors", "project", "row_jvp", "row_jvp_fn"]


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
    WoodburySystem) | "empirical" (egn_fast.curvature).
    The model's parameters, buffers and .grad fields are left untouched.
    """
    forward = forward_of(model, inputs, targets, closure)
    params, hooked = collect_trainable(model, None if params is None else {id(p) for p in params})
    loss_fn = resolve_loss(loss)
    device = check_trainable(model, params)
    ops = get_backend(backend, device)
    check_seq_method(seq_method)
    check_curvature(curvature, mc_samples, generator)
    if inputs is not None:
        check_inputs(inputs, device)
    acc_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    trainable = {id(p) for p in params}
    clock = StageClock(device, timings)

    with undone_on_error(model, device) as state:  # a refused call leaves buffers and RNG as they were
        with clock("forward"):
            b_known = targets.shape[0] if isinstance(targets, Tensor) and targets.dim() else None
            capture, f_flat, targets, plan = capture_planned(model, forward, hooked, trainable, state, b_known)
            b = f_flat.shape[0]

        with clock("loss_head"):
            loss_fn.check_output_shape(capture.output_shape, targets)
            targets = loss_fn.check_targets(f_flat, targets)
            # under autocast the logits may be bf16: the loss head computes in fp32 at least
            f_head = f_flat.detach().float() if f_flat.dtype in (torch.float16, torch.bfloat16) else f_flat.detach()
            rows = rows_for(loss_fn, f_head, targets, curvature, mc_samples, generator, ops)
            head = rows.head
            if not torch.isfinite(head.per_sample).all():
                raise NonFiniteError(f"the loss ({loss_fn.name}) is not finite at the current parameters")
            s = head.S.shape[2]
            if gram:
                check_row_space(b, s, acc_dtype, device)

        grad = None
        if head.w is None:  # Monte-Carlo rows: g = (1/b) Σ_i J_iᵀ r_i by one backward, before the batched one
            with clock("gradient"):
                grad = _gradient(f_flat, head.r / b, params)

        with clock("backward"):
            calls: list[ModuleCall] = [c for m in plan.modules() for c in capture.calls[m]]
            output_grads(f_flat, head.S.permute(2, 0, 1).to(f_flat.dtype), calls)
            del f_flat

        with clock("gram"):
            # torch.func transforms in the generic rule still differentiate under no_grad
            with torch.no_grad(), reevaluated_parametrizations(plan.named_modules(), capture.calls):
                ctx = RuleContext("", b, s, acc_dtype, frozenset(trainable), seq_method)
                factors = layer_factors(plan, capture, ctx, ops)
                K = None
                if gram:
                    K = torch.zeros(b * s, b * s, dtype=acc_dtype, device=device)
                    for f in factors:
                        f.add_gram(K, ops)
            # A nan/inf anywhere in the factors shows on the diagonal (|K_ij|² ≤ K_ii K_jj): O(m) check.
            if K is not None and not torch.isfinite(K.diagonal().sum()):
                raise NonFiniteError("the Gram has non-finite entries: some layer input or output-gradient is nan/inf")
        if grad is None:
            w = head.w.reshape(-1).to(acc_dtype)
            return RowSpaceSystem(params, K, w, b, s, head, factors, ops, clock, rows.samples)
        z = torch.zeros(b, s, dtype=acc_dtype, device=device)  # gram=False: no solve, so no J̃g (e.g. a metric's own)
        if gram:
            with clock("project"):
                z = project(factors, params, grad, ops, acc_dtype, (b, s))
        return WoodburySystem(params, K, z.reshape(-1), b, s, head, factors, ops, clock, rows.samples, grad, dot(grad, grad))


def _gradient(f_flat: Tensor, cotangent: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
    """Σ_i J_iᵀ cotangent_i for every parameter (zeros where unused), keeping the graph for the
    batched backward that follows."""
    grads = torch.autograd.grad(f_flat, params, cotangent.to(f_flat.dtype), retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def layer_factors(plan: Plan, capture: Capture, ctx: RuleContext, ops: Backend) -> list[Factors]:
    """Every planned module's factors from its captured calls (then the calls are released), with
    layers that share a parameter merged. ctx: the context of every rule, less the module's name."""
    factors: list[Factors] = []
    for name, m, rule in plan.specific:
        f = rule(m, capture.calls[m], replace(ctx, name=name))
        if f is not None:
            stray = [p for p in f.params if id(p) not in ctx.trainable_ids]
            if stray:
                raise ValueError(
                    f"the rule {getattr(rule, '__name__', rule)!r} for module {name!r} returned factors for "
                    f"{len(stray)} parameter(s) J is not taken with respect to; a rule must use ctx.trainable(p)"
                )
            factors.append(f)
    for name, m, ps in plan.generic:
        f = generic_factors(m, capture.calls[m], replace(ctx, name=name), ps, plan.in_dims[m])
        if f is not None:
            factors.append(f)
    capture.calls.clear()
    return merge_shared(factors, ops, ctx.dtype)


def row_jvp_fn(system: RowSpaceSystem, forward: Closure) -> Callable[[list[Tensor]], Tensor]:
    """Linearize the model once at the current parameters; return v ↦ J̃v (see `row_jvp`).

    Runs `forward` once and one reverse pass with create_graph=True; each call of the returned
    function is then one more reverse pass (through the first one), so an iterative method pays
    the forward only once. The graph is kept alive by the returned function: drop it when done.
    The parameters must not change while it is in use.
    """
    with torch.enable_grad():  # callers are usually optimizer steps under no_grad
        out, _ = forward()
        if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != system.b:
            raise ValueError(f"forward() must return outputs of batch size {system.b}, as when the system was built")
        f = out.reshape(out.shape[0], -1)
        if f.shape[1] != system.head.S.shape[1]:
            raise ValueError(f"forward() returned {f.shape[1]} outputs per sample; the system has {system.head.S.shape[1]}")
        # Jᵀu is linear in u, so ∂/∂u ⟨Jᵀu, v⟩ = Jv at any u: u = 0 is as good as any and keeps
        # the values out of the graph. Unused parameters get None (their columns of J are 0).
        u = torch.zeros_like(f, requires_grad=True)
        JTu = torch.autograd.grad(f, system.params, u, create_graph=True, allow_unused=True)
    S = system.head.S  # (b, c, s)

    def jvp(steps: list[Tensor]) -> Tensor:
        if len(steps) != len(system.params):
            raise ValueError(f"expected {len(system.params)} tensors shaped like system.params, got {len(steps)}")
        with torch.enable_grad():
            inner = sum(((g * v).sum() for g, v in zip(JTu, steps) if g is not None and g.requires_grad), f.new_zeros(()))
            # retain_graph: the graph of JᵀU is reused by every call
            (Jv,) = torch.autograd.grad(inner, u, retain_graph=True, allow_unused=True) if inner.requires_grad else (None,)
        if Jv is None:  # no trainable parameter reaches the outputs through a u-dependent path
            Jv = torch.zeros_like(f)
        return torch.einsum("bcs,bc->bs", S.to(Jv.dtype), Jv.detach())

    return jvp


def row_jvp(system: RowSpaceSystem, forward: Closure, steps: list[Tensor]) -> Tensor:
    """J̃v: the rows of `system` applied to a parameter-space vector v, at the current parameters.

    system: from `build_system` (gram=False is enough); forward: `closure() -> (outputs,
    targets)` that runs the model on the same batch (e.g. `forward_of(model, inputs, targets,
    None)`); steps: v, one tensor per parameter of `system.params`, with its shape.
    Returns (b, s): entry (i, k) = S_{i,:,k}ᵀ (J v)_i, so ‖J̃v‖²/b = vᵀHv and
    (1/b)J̃ᵀ(J̃v) = Hv (J̃ᵀu is `system.backproject(-u.reshape(-1))`). Dtype of the outputs.

    J v is computed as ∂/∂u ⟨Jᵀu, v⟩ with two reverse passes, so it works for any model the
    closure can run (no forward-mode support needed). For many products at one point use
    `row_jvp_fn`, which runs the forward once.
    """
    return row_jvp_fn(system, forward)(steps)
