"""The solvers: the damped row-space solve (K + shift·I) γ = w, and conjugate gradients for a
parameter-space system given only its matrix-vector product.

`damped_solve`: Cholesky first; when it breaks down (K is only semi-definite and the shift is
tiny next to rounding), a jitter ε·mean(diag K) is added, ×10 per retry, and the jitter used is
reported. `EigenSolver` factors K once (K = VΛVᵀ) and then solves for any shift in O(m²).
`conjugate_gradient` is SGN's solver of (H + λI)d = −g with matrix-free products.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..dtensors import is_dtensor, own_rows, sum_over_shards

from ..errors import NonFiniteError, SolveError
from ..ops import Backend

__all__ = ["DampedSolve", "damped_solve", "EigenSolver", "SolveError", "CGResult", "conjugate_gradient", "dot"]


@dataclass
class DampedSolve:
    """γ (m,) or (m, k) in K's dtype, and the jitter that had to be added to the diagonal (0.0 if none)."""

    gamma: Tensor
    jitter: float


def damped_solve(
    K: Tensor,
    rhs: Tensor,
    shift: float,
    backend: Backend,
    solve_dtype: torch.dtype | None = None,
    first_jitter: float = 1e-10,
    max_retries: int = 6,
) -> DampedSolve:
    """Solve (K + shift·I) γ = rhs by Cholesky, with a reported jitter retry.

    K: (m, m) symmetric PSD; rhs: (m,) or (m, k); shift = b·λ ≥ 0. The factorization runs in
    `solve_dtype` (default K's dtype); γ is returned in K's dtype.
    """
    dtype = solve_dtype or K.dtype
    A = K.to(dtype)
    B = rhs.to(dtype).reshape(rhs.shape[0], -1)
    jitter = 0.0
    for attempt in range(max_retries + 1):
        M = A.clone()
        M.diagonal().add_(shift + jitter)
        X, info = backend.cholesky_solve(M, B)
        if X is not None:
            if jitter:
                warnings.warn(
                    f"egn_fast: Cholesky of K + {shift:.3g}·I failed; solved with jitter {jitter:.3g} "
                    f"({attempt} retr{'y' if attempt == 1 else 'ies'})",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return DampedSolve(X.reshape(rhs.shape).to(K.dtype), jitter)
        jitter = first_jitter * _diagonal_scale(A) if jitter == 0.0 else jitter * 10.0
    raise SolveError(
        f"Cholesky of the {A.shape[0]}×{A.shape[0]} damped Gram failed (info={info}) even with "
        f"jitter {jitter / 10.0:.3g}; increase damping or use solve_dtype=torch.float64"
    )


def _diagonal_scale(A: Tensor) -> float:
    """mean(diag A), or 1 where that is not positive: the unit of the jitter (read only on a retry)."""
    scale = float(A.diagonal().mean()) if A.numel() else 1.0
    return scale if scale > 0 else 1.0


class EigenSolver:
    """K = VΛVᵀ once (O(m³)); then γ(shift) = V (Λ + shift)⁻¹ Vᵀ rhs in O(m²) per shift.

    K: (m, m) symmetric PSD. Negative eigenvalues from rounding are clipped to 0. The
    decomposition runs on `backend` (default: torch).
    """

    def __init__(self, K: Tensor, solve_dtype: torch.dtype | None = None, backend: Backend | None = None):
        self.dtype = K.dtype
        evals, self.V = (backend or Backend()).eigh(K.to(solve_dtype or K.dtype))
        self.evals = evals.clamp(min=0)

    def solve(self, rhs: Tensor, shift: float) -> Tensor:
        """γ with (K + shift·I) γ = rhs; rhs (m,) or (m, k); shift > 0."""
        if shift <= 0:
            raise ValueError(f"EigenSolver needs a positive shift, got {shift}")
        coeff = self.V.T @ rhs.to(self.V.dtype)
        scale = 1.0 / (self.evals + shift)
        coeff = coeff * (scale if coeff.dim() == 1 else scale[:, None])
        return (self.V @ coeff).to(self.dtype)


def dot(xs: list[Tensor], ys: list[Tensor]) -> float:
    """Σ_q ⟨xs[q], ys[q]⟩ of two lists of tensors shaped like the parameters, in float64 (sharded
    ones, DTensors: this rank's rows, then one sum over the shards — the same number on every rank)."""
    plain = sum((x.double() * y.double()).sum() for x, y in zip(xs, ys) if not is_dtensor(x))
    sharded = [(x, y) for x, y in zip(xs, ys) if is_dtensor(x)]
    if not sharded:
        return float(plain)
    mine = sum((x.to_local().double() * (y.to_local() if is_dtensor(y) else y[own_rows(x)]).double()).sum() for x, y in sharded).reshape(1)
    return float(plain) + float(sum_over_shards(mine, sharded[0][0]))


@dataclass
class CGResult:
    """x: the solution (tensors shaped like rhs); iterations: matrix-vector products used;
    residual_norm: ‖rhs − A x‖ by CG's recursion."""

    x: list[Tensor]
    iterations: int
    residual_norm: float


def conjugate_gradient(
    apply_A: Callable[[list[Tensor]], list[Tensor]], rhs: list[Tensor], max_iters: int, tol: float
) -> CGResult:
    """Textbook CG for A x = rhs from x = 0, A symmetric positive semi-definite, given v ↦ Av.

    Stops after `max_iters` products, once ‖residual‖ ≤ tol·‖rhs‖, or when a search direction p
    has pᵀAp ≤ 0 (A is only semi-definite and p lies in its null space: CG cannot go on).
    Raises NonFiniteError when a product is not finite.
    """
    rhs_norm = math.sqrt(dot(rhs, rhs))
    x = [torch.zeros_like(v) for v in rhs]
    r = [v.clone() for v in rhs]  # r = rhs − A x
    p = [v.clone() for v in r]
    rr = rhs_norm * rhs_norm
    iters = 0
    while iters < max_iters and math.sqrt(rr) > tol * rhs_norm:
        Ap = apply_A(p)
        pAp = dot(p, Ap)
        iters += 1
        if not math.isfinite(pAp):
            raise NonFiniteError("a matrix-vector product in conjugate gradients is not finite (nan/inf)")
        if pAp <= 0:
            break
        alpha = rr / pAp
        for xq, pq in zip(x, p):
            xq.add_(pq, alpha=alpha)
        for rq, Apq in zip(r, Ap):
            rq.sub_(Apq, alpha=alpha)
        rr_new = dot(r, r)
        beta = rr_new / rr
        p = [rq + beta * pq for rq, pq in zip(r, p)]
        rr = rr_new
    return CGResult(x, iters, math.sqrt(rr))
