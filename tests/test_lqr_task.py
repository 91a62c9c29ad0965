"""The LQR benchmark task (benchmarks/lqr.py): the Riccati optimum, the residual model, and EGN on it.

Everything is float64 unless a test says otherwise.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import egn_fast
from egn_fast import resolve_loss
from oracle import dense_direction, rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from lqr import (  # noqa: E402
    LinearPolicy,
    cost_gap,
    expected_cost,
    expected_cost_tensor,
    gain_error,
    make_problem,
    make_task,
    riccati_residual,
)

F64 = torch.float64


@pytest.fixture(scope="module")
def problem():
    return make_problem()


def spectral_radius(M: np.ndarray) -> float:
    return float(np.max(np.abs(np.linalg.eigvals(M))))


def rollout_cost(problem, K: np.ndarray, x0: np.ndarray) -> float:
    """J(K; x0) by a plain numpy rollout (independent of LinearPolicy)."""
    x, J = x0.astype(np.float64), 0.0
    for _ in range(problem.horizon):
        u = -K @ x
        J += x @ problem.Q @ x + u @ problem.R @ u
        x = problem.A @ x + problem.B @ u
    return float(J + x @ problem.P @ x)


def stabilizing_gain(problem, seed: int, scale: float = 0.3) -> np.ndarray:
    """K* + scale·N(0, 1) entries, redrawn until A − BK is stable and K is not near K*."""
    rng = np.random.default_rng(seed)
    while True:
        K = problem.K_star + scale * rng.standard_normal(problem.K_star.shape)
        if spectral_radius(problem.A - problem.B @ K) < 0.9 and gain_error(problem, K) > 0.05:
            return K


def policy_with(problem, K: np.ndarray) -> LinearPolicy:
    policy = LinearPolicy(problem, dtype=F64)
    with torch.no_grad():
        policy.gain.weight.copy_(torch.as_tensor(K))
    return policy


# ---------------------------------------------------------------- the problem and its optimum


def test_problem_is_the_documented_system(problem):
    n, k, T = problem.n, problem.k, problem.horizon
    assert (n, k, T) == (4, 2, 15)
    assert problem.num_residuals == T * (n + k) + n == 94
    assert spectral_radius(problem.A) == pytest.approx(1.1, rel=1e-12)  # open-loop unstable
    assert spectral_radius(problem.A - problem.B @ problem.K_star) < 0.5  # K* stabilizes
    assert np.allclose(problem.Q, np.eye(n)) and np.allclose(problem.R, 0.1 * np.eye(k))
    # K = 0 is a bad but finite policy; the optimal value is trace P
    zero = expected_cost(problem, np.zeros((k, n)))
    assert np.isfinite(zero) and zero > 10 * problem.optimal_cost
    assert problem.optimal_cost == pytest.approx(np.trace(problem.P), rel=1e-15)
    # deterministic in the seed, different across seeds
    again = make_problem()
    assert np.array_equal(again.A, problem.A) and np.array_equal(again.K_star, problem.K_star)
    assert not np.allclose(make_problem(seed=1).A, problem.A)


def test_riccati_solution_and_optimal_cost(problem):
    assert riccati_residual(problem) < 1e-12
    assert np.allclose(problem.P, problem.P.T) and np.all(np.linalg.eigvalsh(problem.P) > 0)
    A, B, R, P = problem.A, problem.B, problem.R, problem.P
    assert np.allclose(problem.K_star, np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A), rtol=1e-13, atol=0)
    assert expected_cost(problem, problem.K_star) == pytest.approx(problem.optimal_cost, rel=1e-10)
    # the torch (autograd) version is the same function
    for K in (problem.K_star, np.zeros_like(problem.K_star), stabilizing_gain(problem, 3)):
        want = expected_cost(problem, K)
        assert expected_cost_tensor(problem, torch.as_tensor(K)).item() == pytest.approx(want, rel=1e-13)


@pytest.mark.parametrize("horizon", [1, 3, 15, 40])
def test_k_star_is_optimal_for_every_horizon(horizon):
    """The Bellman claim: with terminal cost P, K* is a stationary point (zero gradient, positive
    definite Hessian) of E J(K; x0) for any T, with value trace P, and random gains do worse."""
    problem = make_problem(horizon=horizon)
    assert expected_cost(problem, problem.K_star) == pytest.approx(problem.optimal_cost, rel=1e-10)
    K = torch.tensor(problem.K_star, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(expected_cost_tensor(problem, K), K)
    assert grad.norm().item() < 1e-11 * problem.optimal_cost
    flat = lambda v: expected_cost_tensor(problem, v.view_as(K))  # noqa: E731
    H = torch.autograd.functional.hessian(flat, K.detach().reshape(-1))
    assert torch.linalg.eigvalsh(H).min().item() > 1e-3
    # central finite differences agree with autograd away from the optimum (checks the autograd path)
    K1 = stabilizing_gain(problem, 7)
    K1t = torch.tensor(K1, requires_grad=True)
    (g1,) = torch.autograd.grad(expected_cost_tensor(problem, K1t), K1t)
    h, fd = 1e-6, np.zeros_like(K1)
    for idx in np.ndindex(K1.shape):
        E = np.zeros_like(K1)
        E[idx] = h
        fd[idx] = (expected_cost(problem, K1 + E) - expected_cost(problem, K1 - E)) / (2 * h)
    assert np.allclose(g1.numpy(), fd, rtol=1e-5, atol=1e-6 * np.abs(fd).max())
    assert np.abs(fd).max() > 1e-2  # K1 is genuinely not optimal
    # random perturbations of K*, small and large, all increase the cost
    rng = np.random.default_rng(horizon)
    for scale in (1e-4, 1e-2, 0.3, 3.0):
        for _ in range(10):
            K2 = problem.K_star + scale * rng.standard_normal(problem.K_star.shape)
            assert cost_gap(problem, K2) > 0
            assert gain_error(problem, K2) > 0


def test_gain_error_and_cost_gap(problem):
    K = problem.K_star.copy()
    assert gain_error(problem, K) == 0 and abs(cost_gap(problem, K)) < 1e-12
    assert gain_error(problem, torch.as_tensor(2 * K, dtype=torch.float32)) == pytest.approx(1.0, rel=1e-6)
    assert gain_error(problem, np.zeros_like(K)) == 1.0
    gap = cost_gap(problem, np.zeros_like(K))
    assert gap == pytest.approx(expected_cost(problem, np.zeros_like(K)) / problem.optimal_cost - 1, rel=1e-14)


# ---------------------------------------------------------------- the residual model


def test_forward_residuals_equal_rollout_cost(problem):
    K = stabilizing_gain(problem, 0)
    policy = policy_with(problem, K)
    x0 = torch.randn(5, problem.n, dtype=F64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = policy(x0)
    assert f.shape == (5, problem.num_residuals) and f.dtype == F64
    want = [rollout_cost(problem, K, x.numpy()) for x in x0]
    assert np.allclose(f.pow(2).sum(1).numpy(), want, rtol=1e-12, atol=0)
    # the layout: the first n entries are L_Q x0 = x0 (Q = I), the last n are L_P x_T
    assert torch.allclose(f[:, : problem.n], x0, rtol=1e-14, atol=1e-14)
    # and egn_fast's "mse" against zero targets is ½ · the mean cost
    loss = resolve_loss("mse").batch_mean(f, torch.zeros_like(f)).item()
    assert loss == pytest.approx(0.5 * np.mean(want), rel=1e-12)


@pytest.mark.parametrize("which", ["random", "zero", "optimal"])
def test_unit_vectors_give_the_expected_cost_exactly(problem, which):
    """Σ_j ‖f(e_j)‖² = trace(Σ_t …) = E J(K; x0), since E[x0 x0ᵀ] = I."""
    K = {"random": stabilizing_gain(problem, 1), "zero": np.zeros_like(problem.K_star), "optimal": problem.K_star}[which]
    policy = policy_with(problem, K)
    with torch.no_grad():
        total = policy(torch.eye(problem.n, dtype=F64)).pow(2).sum().item()
    assert total == pytest.approx(expected_cost(problem, K), rel=1e-12)


def test_monte_carlo_batch_loss_converges_to_expected_cost(problem):
    K = stabilizing_gain(problem, 2)
    policy = policy_with(problem, K)
    x0 = torch.randn(40_000, problem.n, dtype=F64, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        costs = policy(x0).pow(2).sum(1)
    mean, stderr = costs.mean().item(), costs.std().item() / np.sqrt(len(costs))
    want = expected_cost(problem, K)
    assert abs(mean - want) < 4 * stderr
    assert stderr < 0.01 * want  # the tolerance is meaningful (K* would be many stderrs away)
    assert abs(mean - problem.optimal_cost) > 10 * stderr


def test_policy_init_and_task(problem):
    assert torch.count_nonzero(LinearPolicy(problem).gain.weight) == 0  # seed=None: K = 0
    task = make_task(n_train=64, n_test=32)
    a, b, c = task.model(0), task.model(0), task.model(1)
    assert [n for n, p in a.named_parameters()] == ["gain.weight"]
    assert {n for n, _ in a.named_buffers()} == {"A", "B", "sqrt_Q", "sqrt_R", "sqrt_P"}
    assert torch.equal(a.K, b.K) and not torch.equal(a.K, c.K)
    assert a.K.dtype == torch.float32 and 0 < a.K.abs().max() < 1
    assert task.model(0, dtype=F64).K.dtype == F64
    assert task.X_train.shape == (64, 4) and task.X_test.shape == (32, 4)
    assert task.X_train.dtype == torch.float32
    assert task.y_train.shape == (64, task.num_outputs) and not task.y_train.any() and not task.y_test.any()
    assert abs(task.X_train.mean()) < 0.5 and 0.5 < task.X_train.std() < 1.5
    assert torch.equal(make_task(n_train=64, n_test=32).X_train, task.X_train)
    # float32 forward agrees with the float64 cost (K = 0: unstable open loop, still finite)
    with torch.no_grad():
        f = LinearPolicy(problem)(torch.eye(4))
    assert torch.isfinite(f).all()
    assert f.pow(2).sum().item() == pytest.approx(expected_cost(problem, np.zeros((2, 4))), rel=1e-5)
    assert task.test_cost(problem.K_star) == pytest.approx(
        np.mean([rollout_cost(problem, problem.K_star, x.double().numpy()) for x in task.X_test]), rel=1e-12
    )


# ---------------------------------------------------------------- egn_fast on it


@pytest.mark.parametrize("damping", [1e-3, 1.0])
@pytest.mark.parametrize("which", ["random", "zero"])
def test_direction_matches_dense_oracle(problem, which, damping):
    """One nn.Linear called T times: egn_fast's row-space direction equals the dense LM solve."""
    K = stabilizing_gain(problem, 4) if which == "random" else np.zeros_like(problem.K_star)
    policy = policy_with(problem, K)
    x0 = torch.randn(6, problem.n, dtype=F64, generator=torch.Generator().manual_seed(5))
    y = torch.zeros(6, problem.num_residuals, dtype=F64)
    d = egn_fast.direction(policy, x0, y, loss="mse", damping=damping)
    want = dense_direction(policy, x0, y, resolve_loss("mse"), damping)
    assert [t.shape for t in d] == [policy.gain.weight.shape] and d[0].dtype == F64
    assert rel_err(d, want) < 1e-8
    assert want[0].norm() > 1e-3  # a real step, not a trivial zero


def test_egn_converges_to_riccati_gain(problem):
    """Mini-batches of initial states, zero targets: every batch's minimizer is K*, so EGN's
    full LM steps should reach K* (to float64 precision) in a handful of steps."""
    task = make_task(n_train=512, n_test=16)
    policy = task.model(0, dtype=F64)
    opt = egn_fast.EGN(policy, loss="mse", lr=1.0, damping=1e-2)
    X, Y = task.X_train.double(), task.y_train.double()
    gen = torch.Generator().manual_seed(0)
    errors, losses = [gain_error(problem, policy.K)], []
    for _ in range(25):
        idx = torch.randint(0, len(X), (8,), generator=gen)
        info = opt.step(X[idx], Y[idx])
        losses.append(info.loss)
        errors.append(gain_error(problem, policy.K))
    assert errors[0] > 0.5
    first = next(i for i, e in enumerate(errors) if e < 1e-3)
    assert first <= 15, errors
    assert errors[-1] < 1e-9, errors
    assert cost_gap(problem, policy.K) < 1e-12
    # the batch loss at the end is ½ · the batch's optimal cost x0ᵀPx0 (mean)
    x = X[:8]
    with torch.no_grad():
        final = resolve_loss("mse").batch_mean(policy(x), Y[:8]).item()
    P = torch.as_tensor(problem.P)
    assert final == pytest.approx(0.5 * torch.einsum("bi,ij,bj->b", x, P, x).mean().item(), rel=1e-10)
