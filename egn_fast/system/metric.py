"""A diagonal metric for the LM step: d = −(H + λD)⁻¹g with D > 0 diagonal (docs/design.md §1.1).

With Monte-Carlo rows the plain λI damping makes the step −g/λ off the rows' span (SGD-like);
a metric D from Adam's second moment (D = √v̂ + ε, `EGN(metric="adam")`) scales that part like
Adam while the rows still carry the curvature they see.

By the change of variables w' = D^{1/2}w: rows J̃' = J̃D^{-1/2}, g' = D^{-1/2}g, so
(Ĥ' + λI)d' = −g' and d = D^{-1/2}d'. Every layer's rows are made per-sample
(`Factors.per_sample_grads`, b·s·n numbers per layer) and scaled, the Gram K' = J̃'J̃'ᵀ is
rebuilt, and the system's own solve runs unchanged (row space or Woodbury). Its by-products
are those of the λD model: g'ᵀd' = gᵀd, d'ᵀĤ'd' = dᵀĤd, ‖d'‖² = dᵀDd.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ..checks import all_finite, check_row_space
from ..dtensors import full_value
from ..errors import NonFiniteError
from ..rules import PerSampleFactors
from .row_space import RowSpaceSystem, WoodburySystem, project
from .solve import dot

__all__ = ["check_metric", "with_diagonal_metric", "adam_metric"]


def check_metric(metric: str | None, beta: float, eps: float) -> None:
    if metric not in (None, "adam"):
        raise ValueError(f"unknown metric {metric!r}; expected None or 'adam'")
    if not 0 <= beta < 1 or not eps > 0:
        raise ValueError(f"metric_beta must be in [0, 1) and metric_eps > 0, got {beta}, {eps}")


def with_diagonal_metric(system: RowSpaceSystem, scale: list[Tensor]) -> RowSpaceSystem:
    """The system in the variables w' = D^{1/2}w, scale = D^{-1/2} (positive, shaped like
    system.params); `system` may be built with gram=False (its own K is not used). Its
    `solve_and_backproject` gives d' (multiply by `scale` for d), its `gradient()` g' = scale ⊙ g;
    vectors v in the original variables enter as v / scale."""
    dtype, ops = system.w.dtype, system.backend
    m = system.w.shape[0]
    check_row_space(system.b, system.s, dtype, system.w.device)
    by_id = dict(zip(map(id, system.params), scale))  # a sharded scale all-gathered one layer at a time
    factors = [
        PerSampleFactors(f.params, [P * full_value(by_id[id(p)]).to(dtype) for p, P in zip(f.params, f.per_sample_grads(ops, dtype))])
        for f in system.factors
    ]
    K = torch.zeros(m, m, dtype=dtype, device=system.w.device)
    for f in factors:
        f.add_gram(K, ops)
    if not all_finite(K.diagonal()):
        raise NonFiniteError("the Gram has non-finite entries: some layer input, output-gradient or metric is nan/inf")
    if not isinstance(system, WoodburySystem):
        return replace(system, K=K, factors=factors)
    grad = [g * s.to(g.dtype) for g, s in zip(system.grad, scale)]
    z = project(factors, system.params, grad, ops, dtype, (system.b, system.s)).reshape(-1)
    return replace(system, K=K, factors=factors, w=z, grad=grad, grad_norm2=dot(grad, grad))


def adam_metric(v: Tensor | None, g: Tensor, beta: float, eps: float, t: int) -> tuple[Tensor, Tensor]:
    """Adam's second moment for one parameter: v ← βv + (1−β)g² (v = (1−β)g² at first), then
    D = √(v / (1 − βᵗ)) + eps at step t ≥ 1. Returns (v, D^{-1/2})."""
    v = (1 - beta) * g.square() if v is None else beta * v + (1 - beta) * g.square()
    return v, (v / (1 - beta**t)).sqrt().add_(eps).rsqrt()
