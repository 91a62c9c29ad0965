"""The row-space system, stage by stage (docs/design.md §3):

    capture (forward with hooks) → loss head (r, S, w) → batched backward (G) → layer factors
    → Gram K → damped solve (K + bλI) γ = w → back-projection d = −J̃ᵀγ

`build_system` runs the stages up to the Gram and returns a `RowSpaceSystem` (K, w and the layer
factors); its `solve` and `backproject` run the last two, so several λ can be tried on one
capture, and `solve_and_backproject` is both at once (what `direction` and the optimizers use).
`row_jvp` is the other product, J̃v, for matrix-free methods that need Hv = (1/b)J̃ᵀ(J̃v).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor, nn

from .capture import Capture, Closure, Inputs, ModuleCall, forward_of, output_grads
from .checks import LossSpec, check_damping, check_row_space, check_seq_method, check_trainable, resolve_loss
from .clock import StageClock
from .errors import NonFiniteError
from .losses import LossHead
from .ops import Backend, get_backend
from .forward import capture_planned, undone_on_error
from .plan import Plan, check_inputs, collect_trainable
from .rules import Factors, RuleContext, generic_factors, merge_shared
from .rules.parametrized import reevaluated_parametrizations
from .solve import EigenSolver, damped_solve

__all__ = ["Solution", "RowSpaceSystem", "build_system", "layer_factors", "row_jvp", "row_jvp_fn"]


@dataclass
class Solution:
    """The damped solve and its row-space by-products (docs/design.md §1), all without touching J.

    gamma (m,): (K + bλI)γ = w.  With d = −J̃ᵀγ, g = (1/b)J̃ᵀw, H = (1/b)J̃ᵀJ̃:
    gtd = gᵀd = −(1/b)wᵀKγ,  dHd = dᵀHd = (1/b)‖Kγ‖²,  dnorm2 = ‖d‖² = γᵀKγ,
    predicted_decrease = −(gᵀd + ½dᵀHd + ½λ‖d‖²) (decrease of the LM model along d).
    """

    damping: float
    gamma: Tensor
    jitter: float
    gtd: float
    dHd: float
    dnorm2: float

    @property
    def predicted_decrease(self) -> float:
        return -(self.gtd + 0.5 * self.dHd + 0.5 * self.damping * self.dnorm2)


@dataclass
class RowSpaceSystem:
    """Everything the solve and back-projection need, after one capture.

    K (m, m) symmetric Gram J̃J̃ᵀ in fp32/fp64 (None when built with gram=False: then only
    `backproject` works); w (m,); head: the loss head at the current parameters; factors:
    per-layer factors; params: the trainable parameters in model.parameters() order; clock:
    seconds per stage so far (`timings`), empty unless built with timings=True.
    """

    params: list[nn.Parameter]
    K: Tensor | None
    w: Tensor
    b: int
    s: int
    head: LossHead
    factors: list[Factors]
    backend: Backend
    clock: StageClock

    @property
    def loss(self) -> float:
        """The batch loss L(w) at the parameters the system was built at."""
        return float(self.head.value)

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per stage ("forward", "loss_head", "backward", "gram", "solve", "backproject")."""
        return self.clock.seconds

    def _gram(self) -> Tensor:
        if self.K is None:
            raise ValueError("this system was built with gram=False; build it with gram=True to solve")
        return self.K

    def solve(self, damping: float, solve_dtype: torch.dtype | None = None) -> Solution:
        """γ for damping λ ≥ 0 (Cholesky with jitter retry), with its by-products."""
        damping = check_damping(damping)
        res = damped_solve(self._gram(), self.w, self.b * damping, self.backend, solve_dtype)
        return self._solution(damping, res.gamma, res.jitter)

    def eigen(self, solve_dtype: torch.dtype | None = None) -> EigenSolver:
        """K = VΛVᵀ once; then `solve_eigen(eig, λ)` costs O(m²) per λ."""
        return EigenSolver(self._gram(), solve_dtype, self.backend)

    def solve_eigen(self, eig: EigenSolver, damping: float) -> Solution:
        """γ for damping λ > 0 from a precomputed eigendecomposition of K."""
        damping = check_damping(damping)
        return self._solution(damping, eig.solve(self.w, self.b * damping), 0.0)

    def _solution(self, damping: float, gamma: Tensor, jitter: float) -> Solution:
        Kg = self._gram() @ gamma
        b = self.b
        return Solution(
            damping=damping,
            gamma=gamma,
            jitter=jitter,
            gtd=float(-(self.w @ Kg) / b),
            dHd=float(Kg @ Kg / b),
            dnorm2=float(gamma @ Kg),
        )

    def backproject(self, gamma: Tensor) -> list[Tensor]:
        """d = −J̃ᵀγ, one tensor per trainable parameter (shape, dtype and device of the parameter)."""
        u = -gamma.view(self.b, self.s)
        out: dict[int, Tensor] = {}
        for f in self.factors:
            for p, d in zip(f.params, f.backproject(u, self.backend)):
                out[id(p)] = d
        return [out[id(p)].to(p.dtype) if id(p) in out else torch.zeros_like(p) for p in self.params]

    def gradient(self) -> list[Tensor]:
        """g = (1/b)J̃ᵀw, the gradient of the batch-mean loss, shaped like `params`."""
        return self.backproject(-self.w / self.b)  # backproject(γ) = −J̃ᵀγ

    def solve_and_backproject(self, damping: float, solve_dtype: torch.dtype | None = None) -> tuple[Solution, list[Tensor]]:
        """The LM direction d = −J̃ᵀ(K + bλI)⁻¹w for λ = damping, and its Solution (stages timed)."""
        with self.clock("solve"):
            sol = self.solve(damping, solve_dtype)
        with self.clock("backproject"):
            d = self.backproject(sol.gamma)
        return sol, d


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
    m×m memory. Non-finite factors are then not detected here (the Gram's diagonal is the check).
    The model's parameters, buffers and .grad fields are left untouched.
    """
    forward = forward_of(model, inputs, targets, closure)
    params, hooked = collect_trainable(model, None if params is None else {id(p) for p in params})
    loss_fn = resolve_loss(loss)
    device = check_trainable(model, params)
    ops = get_backend(backend, device)
    check_seq_method(seq_method)
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
            targets = loss_fn.check_targets(f_flat, targets)
            head = loss_fn.head(f_flat.detach(), targets, ops)
            if not torch.isfinite(head.per_sample).all():
                raise NonFiniteError(f"the loss ({loss_fn.name}) is not finite at the current parameters")
            s = head.S.shape[2]
            if gram:
                check_row_space(b, s, acc_dtype, device)

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
        w = head.w.reshape(-1).to(acc_dtype)
        return RowSpaceSystem(params, K, w, b, s, head, factors, ops, clock)


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
