r"""SGN: Gauss-Newton with conjugate gradients on matrix-free Gauss-Newton products
(Gargiani, Zanelli, Diehl, Hutter, "On the Promise of the Stochastic Generalized Gauss-Newton
Method for Training DNNs", 2020), the baseline the EGN paper compares against.

Each step, at the current parameters w and for one mini-batch (docs/design.md §1):

    g      = (1/b) J̃ᵀw                          gradient of the batch-mean loss
    d      ≈ −(H + λI)⁻¹ g,  H = (1/b) J̃ᵀJ̃      ≤ cg_iters iterations of conjugate gradients from d = 0
    w_g    ← w_g + lr_g · d_g                   per parameter group g

CG never forms H: Hv = (1/b) J̃ᵀ(J̃v), with J̃v from `row_jvp_fn` (one reverse pass through a
linearization built once per step) and J̃ᵀu from the layer factors' back-projection
(`RowSpaceSystem.backproject`). With cg_iters ≥ d (or ≥ m + 1 = b·s + 1, the number of
distinct eigenvalues H + λI can have) it is the exact LM step that EGN computes directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..capture import Closure, Inputs, forward_of
from ..checks import check_damping, check_lr, finite_nonnegative, group_of, trainable
from ..errors import NonFiniteError
from ..losses import LossSpec
from ..ops import get_backend
from ..system import RowSpaceSystem, build_system, row_jvp_fn
from ..system.solve import CGResult, conjugate_gradient, dot
from .model_optimizer import ModelOptimizer, ParamGroups

__all__ = ["SGN", "SGNInfo"]


@dataclass
class SGNInfo:
    """What one `SGN.step` did.

    loss: batch loss before the step; cg_iterations: Hessian-vector products used;
    relative_residual: ‖(H + λI)d + g‖ / ‖g‖ at the end (CG's recursive residual; 0 when g = 0);
    direction_norm: ‖d‖ (before the learning rates).
    """

    loss: float
    cg_iterations: int
    relative_residual: float
    direction_norm: float


class SGN(ModelOptimizer):
    """Gauss-Newton with a truncated conjugate-gradient solve of the damped system (H + λI)d = −g.

    Args:
        model: the network; the step is taken with respect to the parameters in the param groups
            (default: all of `model.parameters()`); parameters with requires_grad=False are skipped.
        loss: "mse" (½‖f−y‖² per sample) | "cross_entropy" | "bce" | a `Loss` | a per-sample
            callable `fn(outputs (c,), target) -> scalar`. The batch loss is the mean over samples.
        lr: step multiplier per group (1.0 applies d as solved).
        damping: λ ≥ 0 in (H + λI) (fixed; change it with `opt.damping = …`).
        cg_iters: at most this many CG iterations (one Hv product each), ≥ 1.
        cg_tol: stop early once ‖residual‖ ≤ cg_tol·‖g‖.
        backend: op backend for the layer factors' back-projection ("auto" | "torch" | "triton" | "cuda").
        params: torch-style param groups (an iterable of parameters or of dicts with "params" and
            per-group "lr"); all must belong to `model`.

    `step(inputs, targets)` or `step(closure=fn)` with fn() -> (outputs, targets) returns an
    `SGNInfo`. The closure is called twice per step (capture, then the linearization for J̃v),
    so the model must be deterministic between those calls (e.g. dropout off).

    Cost per step: the same capture as EGN (forward, s batched activation-gradient passes, layer
    factors; the Gram is skipped), one more forward and one reverse pass with create_graph, and per
    CG iteration one double-backward pass (J̃v) plus one back-projection (J̃ᵀu). Memory holds the
    factors and that linearization's graph. Raises `NonFiniteError` (parameters untouched) when
    the outputs, the loss or the gradient are not finite.
    """

    def __init__(self, model: nn.Module, loss: LossSpec = "mse", lr: float = 1.0, damping: float = 1.0, cg_iters: int = 10,
                 cg_tol: float = 1e-10, backend: str = "auto", *, params: ParamGroups | None = None) -> None:
        lr, damping = check_lr(lr), check_damping(damping)
        if isinstance(cg_iters, bool) or not isinstance(cg_iters, int) or cg_iters < 1:
            raise ValueError(f"cg_iters must be an integer ≥ 1, got {cg_iters!r}")
        cg_tol = finite_nonnegative("cg_tol", cg_tol)
        super().__init__(model, loss, params, dict(lr=lr))
        all_params = [p for g in self.param_groups for p in g["params"]]
        if all_params:  # unknown or unsupported backends fail here, not at step 1
            get_backend(backend, all_params[0].device)
        self.damping = damping
        self.cg_iters = cg_iters
        self.cg_tol = cg_tol
        self.backend = backend

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, inputs: Inputs | None = None, targets: Tensor | None = None, *, closure: Closure | None = None
    ) -> SGNInfo:
        """One SGN step on a mini-batch: (inputs, targets), or closure() -> (outputs, targets)."""
        forward = forward_of(self.model, inputs, targets, closure)
        system = build_system(
            self.model, closure=forward, params=trainable(self.param_groups), loss=self.loss_fn,
            backend=self.backend, gram=False,
        )
        params = system.params  # model order, the order of backproject's and row_jvp's lists
        groups = group_of(self.param_groups)
        g = _transpose_rows(system, system.w / system.b)
        g_norm = math.sqrt(dot(g, g))
        if not math.isfinite(g_norm):
            # without the Gram, build_system does not see non-finite factors; the gradient does
            raise NonFiniteError("the gradient has non-finite entries: some layer input or output-gradient is nan/inf")
        cg = self._solve(system, forward, g)  # the linearization's graph is freed when it returns
        d = cg.x

        for q, x in zip(params, d):
            q.add_(x, alpha=groups[id(q)]["lr"])
        return SGNInfo(
            loss=system.loss,
            cg_iterations=cg.iterations,
            relative_residual=cg.residual_norm / g_norm if g_norm > 0 else 0.0,
            direction_norm=math.sqrt(dot(d, d)),
        )

    def _solve(self, system: RowSpaceSystem, forward: Closure, g: list[Tensor]) -> CGResult:
        """CG on (H + λI)d = −g with (H + λI)v = (1/b)J̃ᵀ(J̃v) + λv."""
        Jv = row_jvp_fn(system, forward)
        b, lam = system.b, self.damping

        def apply_A(v: list[Tensor]) -> list[Tensor]:
            return [h + lam * x for h, x in zip(_transpose_rows(system, Jv(v) / b), v)]

        return conjugate_gradient(apply_A, [-x for x in g], self.cg_iters, self.cg_tol)


def _transpose_rows(system: RowSpaceSystem, u: Tensor) -> list[Tensor]:
    """J̃ᵀu for u (b, s) or (m,); backproject(γ) = −J̃ᵀγ."""
    return system.backproject(-u.reshape(-1).to(system.w.dtype))
