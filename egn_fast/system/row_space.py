"""The row-space systems: the damped solve and the back-projection, after one capture
(egn_fast.system.build makes them).

`RowSpaceSystem`: the rows span g (exact or empirical curvature): (K + bλI)γ = w, d = −J̃ᵀγ.
`WoodburySystem`: Monte-Carlo rows, g outside their span: d = −(Ĥ + λI)⁻¹g with Ĥ = (1/b)J̃ᵀJ̃ by
Woodbury, (λI + J̃ᵀJ̃/b)⁻¹ = (1/λ)(I − J̃ᵀ(K + bλI)⁻¹J̃): γ = (K + bλI)⁻¹J̃g, d = −(g − J̃ᵀγ)/λ.
Both give the direction and its by-products (gᵀd, dᵀĤd, ‖d‖²) without touching J.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..capture import Closure
from ..checks import check_damping
from ..clock import StageClock
from ..dtensors import as_shard, full_value, is_dtensor, own_rows, sum_over_shards
from ..losses import LossHead
from ..ops import Backend
from ..rules import Factors
from .jvp import row_jvp
from .solve import EigenSolver, damped_solve

__all__ = ["Solution", "RowSpaceSystem", "WoodburySystem", "project"]


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
    `backproject` works); w (m,): the right-hand side of the solve (the loss's coefficients; J̃g
    in a WoodburySystem); head: the loss head at the current parameters; factors: per-layer
    factors; params: the trainable parameters in model.parameters() order; clock: seconds per
    stage so far (`timings`), empty unless built with timings=True; samples: the targets the
    Monte-Carlo rows were drawn with, (k, *targets.shape), else None.
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
    samples: Tensor | None = None

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
        w_Kg, Kg_Kg, g_Kg = (torch.stack([self.w, Kg, gamma]) @ Kg).tolist()  # one product, one read
        return Solution(damping=damping, gamma=gamma, jitter=jitter, gtd=-w_Kg / self.b, dHd=Kg_Kg / self.b, dnorm2=g_Kg)

    def backproject(self, gamma: Tensor) -> list[Tensor]:
        """d = −J̃ᵀγ, one tensor per trainable parameter (shape, dtype and device of the parameter;
        a sharded parameter's as a DTensor placed like it: each layer computes only this rank's rows,
        `Factors.backproject_rows`)."""
        u = -gamma.view(self.b, self.s)
        out: dict[int, Tensor] = {}
        for f in self.factors:
            rows = [own_rows(p) for p in f.params]
            whole = all(r == slice(None) for r in rows)
            parts = f.backproject(u, self.backend) if whole else f.backproject_rows(u, self.backend, rows)
            for p, d in zip(f.params, parts):
                out[id(p)] = as_shard(p, d.to(p.dtype))
        return [out[id(p)] if id(p) in out else torch.zeros_like(p) for p in self.params]

    def project(self, v: list[Tensor]) -> Tensor:
        """J̃v (b, s) in the Gram's dtype for v shaped like `params`, from the layer factors (no
        model run): sᵀHs = ‖J̃s‖²/b. Custom Factors without `project` raise NotImplementedError."""
        return project(self.factors, self.params, v, self.backend, self.w.dtype, (self.b, self.s))

    def curvature(self, forward: Closure, steps: list[Tensor]) -> float:
        """sᵀHs = (1/b) Σ_i ‖S_iᵀ (J s)_i‖² = ‖J̃s‖²/b at the parameters the system was built at
        (steps ordered like `params`): J̃s from the layer factors (no model run, and no double
        backward, which CPU attention kernels lack), or, for custom factors without `project`, by
        `row_jvp` (two reverse passes through `forward`, the model on the same batch; the same number)."""
        try:
            rows = self.project(steps)
        except NotImplementedError:
            rows = row_jvp(self, forward, steps)
        return float(rows.double().pow(2).sum()) / self.b

    def with_metric(self, scale: list[Tensor]) -> RowSpaceSystem:
        """This system in the variables w' = D^{1/2}w for scale = D^{-1/2} (egn_fast.system.metric)."""
        from .metric import with_diagonal_metric  # metric.py builds on this module

        return with_diagonal_metric(self, scale)

    def gradient(self) -> list[Tensor]:
        """g = (1/b)J̃ᵀw, the gradient of the batch-mean loss, shaped like `params`."""
        return self.backproject(-self.w / self.b)  # backproject(γ) = −J̃ᵀγ

    def direction(self, sol: Solution) -> list[Tensor]:
        """The LM direction of a solve: d = −J̃ᵀγ."""
        return self.backproject(sol.gamma)

    def solve_and_backproject(self, damping: float, solve_dtype: torch.dtype | None = None) -> tuple[Solution, list[Tensor]]:
        """The LM direction d = −(H + λI)⁻¹g for λ = damping, and its Solution (stages timed)."""
        with self.clock("solve"):
            sol = self.solve(damping, solve_dtype)
        with self.clock("backproject"):
            d = self.direction(sol)
        return sol, d


@dataclass
class WoodburySystem(RowSpaceSystem):
    """Rows that do not span g (Monte-Carlo): d = −(Ĥ + λI)⁻¹g, Ĥ = (1/b)J̃ᵀJ̃, by Woodbury.

    w = J̃g (m,) is the solve's right-hand side (zeros when built with gram=False: no solve, no
    J̃g; `egn_fast.system.metric` forms its own): γ = (K + bλI)⁻¹J̃g, d = −(g − J̃ᵀγ)/λ (λ > 0:
    Ĥ has rank ≤ m). grad: g, shaped like `params`; grad_norm2 = ‖g‖². By-products with z = J̃g:
    gᵀd = −(‖g‖² − zᵀγ)/λ, J̃d = −(z − Kγ)/λ so dᵀĤd = ‖z − Kγ‖²/(bλ²),
    ‖d‖² = (‖g‖² − 2zᵀγ + γᵀKγ)/λ².
    """

    grad: list[Tensor] | None = None
    grad_norm2: float = 0.0

    def solve(self, damping: float, solve_dtype: torch.dtype | None = None) -> Solution:
        return super().solve(_positive(damping), solve_dtype)

    def solve_eigen(self, eig: EigenSolver, damping: float) -> Solution:
        return super().solve_eigen(eig, _positive(damping))

    def _solution(self, damping: float, gamma: Tensor, jitter: float) -> Solution:
        Kg = (self._gram() @ gamma).double()
        z, lam, gamma64 = self.w.double(), damping, gamma.double()  # differences of near-equal terms
        zg = float(z @ gamma64)
        return Solution(
            damping=damping,
            gamma=gamma,
            jitter=jitter,
            gtd=-(self.grad_norm2 - zg) / lam,
            dHd=float((z - Kg).square().sum()) / (self.b * lam * lam),
            dnorm2=(self.grad_norm2 - 2 * zg + float(gamma64 @ Kg)) / (lam * lam),
        )

    def direction(self, sol: Solution) -> list[Tensor]:
        back = self.backproject(sol.gamma)  # −J̃ᵀγ
        return [-(g + x) / sol.damping for g, x in zip(self.grad, back)]

    def gradient(self) -> list[Tensor]:
        return [g.clone() for g in self.grad]


def _positive(damping: float) -> float:
    """λ > 0, which Woodbury's (1/λ) needs."""
    if check_damping(damping) == 0:
        raise ValueError(
            "curvature='mc' needs damping > 0: its estimate Ĥ = J̃ᵀJ̃/b has rank ≤ b·mc_samples, so Ĥ + λI is "
            "singular at λ = 0"
        )
    return damping


def project(
    factors: list[Factors], params: list[nn.Parameter], v: list[Tensor], ops: Backend, dtype: torch.dtype, shape: tuple[int, int]
) -> Tensor:
    """J̃v (b, s) for v shaped like `params`, summed over the layers' factors. A layer whose
    parameters are all sharded contributes from this rank's rows of v only (`project_rows`), the
    ranks' parts summed by one all-reduce at the end; other layers take v whole (a sharded v
    all-gathered one layer at a time)."""
    by_id = {id(p): x for p, x in zip(params, v)}
    z = torch.zeros(shape, dtype=dtype, device=v[0].device if v else None)
    part, sharded = None, None  # this rank's rows' share of J̃v, and a parameter to sum it like
    for f in factors:
        vs = [by_id[id(p)] for p in f.params]
        if f.params and all(is_dtensor(p) for p in f.params):
            rows = [own_rows(p) for p in f.params]
            try:
                mine = f.project_rows([x.to_local() if is_dtensor(x) else x[r] for x, r in zip(vs, rows)], ops, dtype, rows)
                part, sharded = mine if part is None else part + mine, f.params[0]
                continue
            except NotImplementedError:
                pass
        z += f.project([full_value(x) for x in vs], ops, dtype)
    if part is not None:
        z += sum_over_shards(part, sharded)
    return z
