"""A linear-quadratic control task whose optimum is known exactly (discrete Riccati equation).

Dynamics and policy. x_{t+1} = A x_t + B u_t with x ∈ R^n, u ∈ R^k, and the linear state-feedback
policy u_t = −K x_t, K ∈ R^{k×n} the only trainable parameter. The cost from an initial state x_0
over a horizon T is

    J(K; x_0) = Σ_{t=0}^{T−1} (x_tᵀ Q x_t + u_tᵀ R u_t) + x_Tᵀ P x_T,

where P solves the discrete algebraic Riccati equation (DARE)

    P = Q + AᵀPA − AᵀPB (R + BᵀPB)⁻¹ BᵀPA      (scipy.linalg.solve_discrete_are(A, B, Q, R)).

Why the optimum is known. With the terminal cost V_T(x) = xᵀPx the Bellman recursion
V_t(x) = min_u [xᵀQx + uᵀRu + V_{t+1}(Ax + Bu)] returns V_t(x) = xᵀPx at every stage (that is
the DARE), with the minimizing u = −K*x at every stage, where

    K* = (R + BᵀPB)⁻¹ BᵀPA.

So the stationary gain K* minimizes J(K; x_0) for *every* x_0 and any horizon T (even among
time-varying policies), with J(K*; x_0) = x_0ᵀ P x_0. In particular K* is the exact minimizer of
E_{x_0~N(0,I)} J(K; x_0), whose optimal value is trace(P), and of the mean cost over *any* finite
batch of initial states (mini-batch noise does not move the minimizer).

Exact expected cost. With M = A − BK, x_t = M^t x_0 and E[x_0 x_0ᵀ] = I, so

    E J(K; x_0) = trace( Σ_{t<T} (M^t)ᵀ (Q + KᵀRK) M^t + (M^T)ᵀ P M^T ).

As a least-squares problem for EGN. `LinearPolicy` maps a batch of initial states x_0 (b, n) to
residuals f (b, c), c = T(n + k) + n, laid out per sample as

    [L_Q x_0, L_R u_0, L_Q x_1, L_R u_1, …, L_Q x_{T−1}, L_R u_{T−1}, L_P x_T]

with L_Q, L_R, L_P the symmetric square roots of Q, R, P (LᵀL = Q etc.), so ‖f_i‖² = J(K; x_0i).
egn_fast's "mse" loss against zero targets (½‖f_i − 0‖² per sample, mean over the batch) is
therefore ½ · (mean cost over the batch), and its minimizer is K*.

The fixed system (`make_problem()` defaults, seed 0): n = 4, k = 2, T = 15, so c = 94 residuals
per sample. A = G · 1.1/ρ(G) for G with i.i.d. N(0, 1) entries (spectral radius exactly 1.1: a
complex pair of modulus 1.1, so open-loop unstable and oscillating), B with i.i.d. N(0, 1/n)
entries (generically controllable, hence stabilizable), Q = I_n, R = 0.1·I_k. Then
trace P ≈ 7.44, ρ(A − BK*) ≈ 0.32, ‖K*‖_F ≈ 2.15, and the expected cost of K = 0 is ≈ 329 (≈ 44×
the optimum); rollouts of length 15 from K = 0 grow at most like 1.1^15 ≈ 4.2, so they stay finite.

Usage (benchmarks/ is on sys.path for scripts there):

    from lqr import make_task, gain_error, cost_gap
    task = make_task()
    policy = task.model(seed=0)                   # LinearPolicy, small random K
    opt = egn_fast.EGN(policy, loss="mse", damping=0.1)
    opt.step(task.X_train[:16], task.y_train[:16])
    gain_error(task.problem, policy.K), cost_gap(task.problem, policy.K)

On a 2-core CPU (OMP_NUM_THREADS=1, batches of 8–32 from X_train, lr = 1, damping 0.1, no line
search) EGN reaches gain_error < 1e-3 in 7 steps and < 1e-6 in 11–12 steps. In float32 the
attainable gain_error is ~1e-7–1e-5 (rounding of the rollout; smaller damping floors higher);
a float64 policy (`task.model(seed, dtype=torch.float64)`) reaches ~1e-15.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn

__all__ = [
    "LQRProblem",
    "LQRTask",
    "LinearPolicy",
    "cost_gap",
    "expected_cost",
    "expected_cost_tensor",
    "gain_error",
    "make_problem",
    "make_task",
    "riccati_residual",
]


@dataclass
class LQRProblem:
    """A discrete-time LQR problem with Riccati terminal cost. All matrices are float64 numpy.

    A: (n, n), B: (n, k), Q: (n, n) ≻ 0, R: (k, k) ≻ 0, horizon: T, P: (n, n) the DARE solution,
    K_star: (k, n) the optimal gain (R + BᵀPB)⁻¹BᵀPA, optimal_cost: trace(P) = min_K E J(K; x_0).
    """

    A: np.ndarray
    B: np.ndarray
    Q: np.ndarray
    R: np.ndarray
    horizon: int
    P: np.ndarray
    K_star: np.ndarray
    optimal_cost: float

    @property
    def n(self) -> int:
        """State dimension."""
        return self.A.shape[0]

    @property
    def k(self) -> int:
        """Control dimension."""
        return self.B.shape[1]

    @property
    def num_residuals(self) -> int:
        """c = T(n + k) + n, the residuals per sample of `LinearPolicy`."""
        return self.horizon * (self.n + self.k) + self.n


def _solve(A: np.ndarray, B: np.ndarray, Q: np.ndarray, R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P (n, n) from the DARE and K* (k, n) = (R + BᵀPB)⁻¹BᵀPA."""
    P = scipy.linalg.solve_discrete_are(A, B, Q, R)
    P = 0.5 * (P + P.T)
    K = np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)
    return P, K


def make_problem(
    n: int = 4, k: int = 2, horizon: int = 15, seed: int = 0, spectral_radius: float = 1.1, r: float = 0.1
) -> LQRProblem:
    """The fixed benchmark system (see the module docstring for the default's numbers).

    A = G·spectral_radius/ρ(G), G (n, n) i.i.d. N(0, 1); B (n, k) i.i.d. N(0, 1/n); Q = I_n;
    R = r·I_k; all drawn from numpy's default_rng(seed). Raises ValueError if the draw is not
    stabilizable (the DARE fails or ρ(A − BK*) ≥ 1), which does not happen for generic draws.
    """
    if n < 1 or k < 1 or horizon < 1:
        raise ValueError(f"need n, k, horizon ≥ 1, got {n}, {k}, {horizon}")
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((n, n))
    A = G * (spectral_radius / np.max(np.abs(np.linalg.eigvals(G))))
    B = rng.standard_normal((n, k)) / np.sqrt(n)
    Q, R = np.eye(n), r * np.eye(k)
    try:
        P, K = _solve(A, B, Q, R)
    except (ValueError, np.linalg.LinAlgError) as err:
        raise ValueError(f"make_problem(n={n}, k={k}, seed={seed}): system not stabilizable ({err})") from err
    if np.max(np.abs(np.linalg.eigvals(A - B @ K))) >= 1:
        raise ValueError(f"make_problem(n={n}, k={k}, seed={seed}): A − BK* is not stable")
    return LQRProblem(A=A, B=B, Q=Q, R=R, horizon=horizon, P=P, K_star=K, optimal_cost=float(np.trace(P)))


def riccati_residual(problem: LQRProblem) -> float:
    """‖Q + AᵀPA − AᵀPB(R + BᵀPB)⁻¹BᵀPA − P‖_F / ‖P‖_F (≈ 0 for a correct P)."""
    A, B, Q, R, P = problem.A, problem.B, problem.Q, problem.R, problem.P
    rhs = Q + A.T @ P @ A - A.T @ P @ B @ np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)
    return float(np.linalg.norm(rhs - P) / np.linalg.norm(P))


def _sym_sqrt(S: np.ndarray) -> np.ndarray:
    """The symmetric positive semidefinite square root L of a symmetric S ⪰ 0 (LᵀL = L² = S)."""
    w, V = np.linalg.eigh(0.5 * (S + S.T))
    return (V * np.sqrt(np.clip(w, 0.0, None))) @ V.T


def expected_cost_tensor(problem: LQRProblem, K: Tensor) -> Tensor:
    """E_{x_0~N(0,I)} J(K; x_0) as a differentiable 0-d tensor, in K's dtype (use float64).

    K: (k, n). trace(Σ_{t<T} (M^t)ᵀ(Q + KᵀRK)M^t + (M^T)ᵀ P M^T), M = A − BK.
    """
    A, B, Q, R, P = (torch.as_tensor(m, dtype=K.dtype, device=K.device) for m in
                     (problem.A, problem.B, problem.Q, problem.R, problem.P))
    M = A - B @ K
    W = Q + K.T @ R @ K
    X = torch.eye(problem.n, dtype=K.dtype, device=K.device)  # M^t
    total = K.new_zeros(())
    for _ in range(problem.horizon):
        total = total + torch.trace(X.T @ W @ X)
        X = M @ X
    return total + torch.trace(X.T @ P @ X)


def _as_gain(K: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(K, Tensor):
        K = K.detach().cpu().double().numpy()
    return np.asarray(K, dtype=np.float64)


def expected_cost(problem: LQRProblem, K: np.ndarray | Tensor) -> float:
    """The exact E_{x_0~N(0,I)} J(K; x_0) in float64; K: (k, n) numpy array or tensor."""
    K = _as_gain(K)
    M = problem.A - problem.B @ K
    W = problem.Q + K.T @ problem.R @ K
    X = np.eye(problem.n)
    total = 0.0
    for _ in range(problem.horizon):
        total += float(np.trace(X.T @ W @ X))
        X = M @ X
    return total + float(np.trace(X.T @ problem.P @ X))


def gain_error(problem: LQRProblem, K: np.ndarray | Tensor) -> float:
    """‖K − K*‖_F / ‖K*‖_F; K: (k, n)."""
    K = _as_gain(K)
    return float(np.linalg.norm(K - problem.K_star) / np.linalg.norm(problem.K_star))


def cost_gap(problem: LQRProblem, K: np.ndarray | Tensor) -> float:
    """(E J(K) − trace P) / trace P ≥ 0, the relative suboptimality of K: (k, n)."""
    return (expected_cost(problem, K) - problem.optimal_cost) / problem.optimal_cost


class LinearPolicy(nn.Module):
    """The policy u = −Kx rolled out over the horizon, returning the LQR cost residuals.

    `self.gain = nn.Linear(n, k, bias=False)`; its weight (k, n) is K, the only parameter. The
    system (A, B) and the cost square roots L_Q, L_R, L_P (symmetric, LᵀL = Q, R, P) are
    non-trainable buffers, built from the float64 problem directly in `dtype` (default torch's
    default dtype). For a float64 policy pass dtype=torch.float64 rather than calling `.double()`
    on a float32 one: the latter keeps the float32-rounded A, B, L_P, i.e. a slightly different
    system whose optimal gain differs from K* by ~1e-7 relative.
    Initial K: zeros if `seed` is None, else i.i.d. N(0, init_scale²) from torch.Generator(seed)
    (drawn in float64, then cast).

    forward(x0: (b, n)) -> (b, c), c = T(n + k) + n: per sample
    [L_Q x_0, L_R u_0, …, L_Q x_{T−1}, L_R u_{T−1}, L_P x_T], so ‖f_i‖² = J(K; x0_i).
    `self.gain` is called T times per forward.
    """

    def __init__(
        self, problem: LQRProblem, seed: int | None = None, init_scale: float = 0.1, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        dtype = torch.get_default_dtype() if dtype is None else dtype
        self.horizon = problem.horizon
        self.gain = nn.Linear(problem.n, problem.k, bias=False, dtype=dtype)
        with torch.no_grad():
            if seed is None:
                self.gain.weight.zero_()
            else:
                gen = torch.Generator().manual_seed(seed)
                K0 = init_scale * torch.randn(problem.k, problem.n, generator=gen, dtype=torch.float64)
                self.gain.weight.copy_(K0)
        for name, m in (("A", problem.A), ("B", problem.B), ("sqrt_Q", _sym_sqrt(problem.Q)),
                        ("sqrt_R", _sym_sqrt(problem.R)), ("sqrt_P", _sym_sqrt(problem.P))):
            self.register_buffer(name, torch.as_tensor(m, dtype=dtype))

    @property
    def K(self) -> Tensor:
        """The current gain (k, n) (a detached view of `gain.weight`)."""
        return self.gain.weight.detach()

    def forward(self, x0: Tensor) -> Tensor:
        """x0: (b, n) initial states -> (b, T(n + k) + n) cost residuals (row vectors: x_{t+1} =
        x_t Aᵀ + u_t Bᵀ)."""
        x = x0
        parts = []
        for _ in range(self.horizon):
            u = -self.gain(x)  # (b, k)
            parts.append(x @ self.sqrt_Q)  # L symmetric: (L x)ᵀ = xᵀ L
            parts.append(u @ self.sqrt_R)
            x = x @ self.A.T + u @ self.B.T
        parts.append(x @ self.sqrt_P)
        return torch.cat(parts, dim=1)


@dataclass
class LQRTask:
    """The LQR benchmark task: initial states and zero targets for egn_fast's "mse" loss.

    X_train: (n_train, n) float32 from N(0, I); y_train: (n_train, c) float32 zeros; X_test,
    y_test likewise. ½·mean‖f_i‖² over a batch is the "mse" loss; `model(seed)` builds a
    LinearPolicy with a small random initial K (seed-given, see LinearPolicy).
    """

    name: str
    problem: LQRProblem
    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor
    init_scale: float = 0.1

    loss = "mse"

    @property
    def num_outputs(self) -> int:
        """c = T(n + k) + n."""
        return self.problem.num_residuals

    def model(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> LinearPolicy:
        """A fresh LinearPolicy in `dtype` with K ~ N(0, init_scale²) drawn from `seed`."""
        return LinearPolicy(self.problem, seed=seed, init_scale=self.init_scale, dtype=dtype)

    def test_cost(self, K: np.ndarray | Tensor) -> float:
        """Mean J(K; x_0) over X_test, in float64."""
        policy = LinearPolicy(self.problem, dtype=torch.float64)
        with torch.no_grad():
            policy.gain.weight.copy_(torch.as_tensor(_as_gain(K)))
            return float(policy(self.X_test.double()).pow(2).sum(1).mean())


def make_task(
    n_train: int = 1024, n_test: int = 1024, seed: int = 0, problem: LQRProblem | None = None
) -> LQRTask:
    """The task on `problem` (default `make_problem()`): X_train (n_train, n) and X_test
    (n_test, n) float32 initial states from N(0, I) (torch.Generator(seed)), zero targets (·, c)."""
    problem = make_problem() if problem is None else problem
    gen = torch.Generator().manual_seed(seed)
    X_train = torch.randn(n_train, problem.n, generator=gen)
    X_test = torch.randn(n_test, problem.n, generator=gen)
    c = problem.num_residuals
    return LQRTask(
        name="lqr", problem=problem,
        X_train=X_train, y_train=torch.zeros(n_train, c), X_test=X_test, y_test=torch.zeros(n_test, c),
    )
