"""The damped solve, its jitter retry, the eigen path, and the row-space by-products."""

import pytest
import torch

import egn_fast
from egn_fast import resolve_loss
from egn_fast.ops import Backend
from egn_fast.clock import StageClock
from egn_fast.system.solve import EigenSolver, SolveError, conjugate_gradient, damped_solve, dot
from models import make, targets
from oracle import rel_err


def _psd(m, rank, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(m, rank, generator=g, dtype=torch.float64)
    return X @ X.T


def test_damped_solve_matches_linalg_solve():
    K = _psd(9, 9, 0)
    w = torch.randn(9, dtype=torch.float64)
    res = damped_solve(K, w, 0.7, Backend())
    torch.testing.assert_close(res.gamma, torch.linalg.solve(K + 0.7 * torch.eye(9, dtype=K.dtype), w))
    assert res.jitter == 0.0


def test_singular_system_takes_the_reported_jitter_retry():
    K = _psd(8, 3, 1) - 1e-10 * torch.eye(8, dtype=torch.float64)  # rank 3, tiny negative eigenvalues
    w = torch.randn(8, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="jitter"):
        res = damped_solve(K, w, 0.0, Backend())
    assert res.jitter > 0
    A = K + res.jitter * torch.eye(8, dtype=K.dtype)
    assert (A @ res.gamma - w).norm() / w.norm() < 1e-4  # cond(A) ≈ 1e10


def test_solve_error_when_retries_run_out():
    K = -torch.eye(4, dtype=torch.float64)
    with pytest.raises(SolveError, match="increase damping"):
        damped_solve(K, torch.ones(4, dtype=torch.float64), 0.0, Backend(), max_retries=2)


def test_solve_dtype_float64_for_a_float32_system():
    K = _psd(6, 6, 2).float()
    w = torch.randn(6)
    res = damped_solve(K, w, 0.1, Backend(), solve_dtype=torch.float64)
    assert res.gamma.dtype == torch.float32
    torch.testing.assert_close(res.gamma.double(), torch.linalg.solve(K.double() + 0.1 * torch.eye(6, dtype=torch.float64), w.double()))


def test_eigen_solver_matches_cholesky_for_many_shifts():
    K = _psd(10, 4, 3)
    w = torch.randn(10, dtype=torch.float64)
    eig = EigenSolver(K)
    for shift in [1e-3, 0.1, 1.0, 10.0]:
        torch.testing.assert_close(eig.solve(w, shift), damped_solve(K, w, shift, Backend()).gamma)
    with pytest.raises(ValueError):
        eig.solve(w, 0.0)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_row_space_by_products_match_parameter_space(loss):
    model, x = make("mlp", True, 7)
    y = targets(loss, seed=7)
    lam = 0.05
    system = egn_fast.build_system(model, x, y, loss=loss)
    sol = system.solve(lam)
    d = torch.cat([t.reshape(-1) for t in system.backproject(sol.gamma)])
    # parameter-space reference from the dense Jacobian
    params = {n: p.detach() for n, p in model.named_parameters()}
    f = lambda ps: torch.func.functional_call(model, ps, (x,))
    out = f(params)
    jac = torch.func.jacrev(f)(params)
    b, c = out.shape
    J = torch.cat([jac[n].reshape(b * c, -1) for n in params], 1)
    L = resolve_loss(loss)
    yy = L.check_targets(out, y)
    r = torch.func.grad(lambda o: L.per_sample(o, yy).sum())(out).reshape(-1)
    Hf = torch.func.hessian(lambda o: L.per_sample(o, yy).sum())(out).reshape(b * c, b * c)
    g = J.T @ r / b
    H = J.T @ Hf @ J / b
    assert sol.gtd == pytest.approx(float(g @ d), rel=1e-9)
    assert sol.dHd == pytest.approx(float(d @ H @ d), rel=1e-9)
    assert sol.dnorm2 == pytest.approx(float(d @ d), rel=1e-9)
    pred = -(g @ d + 0.5 * d @ H @ d + 0.5 * lam * d @ d)
    assert sol.predicted_decrease == pytest.approx(float(pred), rel=1e-9)
    assert sol.gtd < 0  # a descent direction
    assert system.loss == pytest.approx(float(L.per_sample(out, yy).mean()))
    # the eigen path re-solves for other λ without a new capture
    eig = system.eigen()
    for lam2 in [1e-3, 1.0]:
        d_eig = system.backproject(system.solve_eigen(eig, lam2).gamma)
        assert rel_err(d_eig, system.backproject(system.solve(lam2).gamma)) < 1e-8


def test_direction_with_info_reports_timings_and_m():
    model, x = make("mlp", True, 8)
    y = targets("cross_entropy", seed=8)
    info = egn_fast.direction_with_info(model, x, y, loss="cross_entropy", damping=0.1, timings=True)
    assert info.m == x.shape[0] * 2  # reduced cross-entropy: c − 1 rows per sample
    assert set(info.timings) == {"forward", "loss_head", "backward", "gram", "solve", "backproject"}
    assert all(t >= 0 for t in info.timings.values())
    assert rel_err(info.direction, egn_fast.direction(model, x, y, loss="cross_entropy", damping=0.1)) == 0.0


def _as_parts(v, shapes):  # a flat vector as a list of tensors shaped like parameters
    return [x.view(shape) for x, shape in zip(v.split([torch.Size(sh).numel() for sh in shapes]), shapes)]


def test_conjugate_gradient_on_lists_of_tensors_matches_linalg_solve():
    shapes = [(2, 3), (4,), (1, 2)]
    A = _psd(12, 12, 7) + 0.5 * torch.eye(12, dtype=torch.float64)
    rhs = torch.randn(12, generator=torch.Generator().manual_seed(8), dtype=torch.float64)

    def apply_A(v):
        return _as_parts(A @ torch.cat([x.reshape(-1) for x in v]), shapes)

    res = conjugate_gradient(apply_A, _as_parts(rhs.clone(), shapes), max_iters=50, tol=1e-13)
    got = torch.cat([x.reshape(-1) for x in res.x])
    torch.testing.assert_close(got, torch.linalg.solve(A, rhs), rtol=1e-10, atol=1e-12)
    assert 1 <= res.iterations <= 24 and res.residual_norm  # 12 in exact arithmetic <= 1e-13 * float(rhs.norm())
    short = conjugate_gradient(apply_A, _as_parts(rhs.clone(), shapes), max_iters=2, tol=0.0)
    assert short.iterations == 2 and short.residual_norm > 0
    assert dot(short.x, short.x) == pytest.approx(float(torch.cat([x.reshape(-1) for x in short.x]).square().sum()))


def test_conjugate_gradient_stops_on_a_direction_without_curvature():
    """A singular A (rank 3) and rhs outside its range: pᵀAp reaches 0 and CG stops, finite."""
    A = _psd(6, 3, 9)
    rhs = [torch.randn(6, generator=torch.Generator().manual_seed(10), dtype=torch.float64)]
    res = conjugate_gradient(lambda v: [A @ v[0]], rhs, max_iters=100, tol=0.0)
    assert res.iterations <= 5 and torch.isfinite(res.x[0]).all()


def test_conjugate_gradient_raises_on_a_non_finite_product():
    with pytest.raises(egn_fast.NonFiniteError, match="conjugate gradients"):
        conjugate_gradient(lambda v: [v[0] * float("nan")], [torch.ones(3)], max_iters=5, tol=0.0)


def test_stage_clock_synchronizes_a_gpu_before_reading_the_time(monkeypatch):
    """Asynchronous GPU work must be finished inside the stage it belongs to: the clock syncs the
    stage's device at its end (and records nothing, syncing nothing, when timings are off)."""
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    gpu = torch.device("cuda", 0)
    clock = StageClock(gpu, enabled=True)
    with clock("gram"):
        assert synced == []
    with clock("gram"):
        pass
    assert synced == [gpu, gpu] and set(clock.seconds) == {"gram"} and clock.seconds["gram"] >= 0
    off = StageClock(gpu, enabled=False)
    with off("solve"):
        pass
    assert off.seconds == {} and len(synced) == 2
    with StageClock(torch.device("cpu"), enabled=True)("solve"):
        pass
    assert len(synced) == 2  # nothing to wait for on the CPU
