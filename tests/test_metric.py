"""The diagonal metric d = −(H + λD)⁻¹g (egn_fast.system.metric, EGN(metric="adam")) against the dense
float64 oracle, for exact and Monte-Carlo rows."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

import egn_fast
from egn_fast.system.metric import with_diagonal_metric
from oracle import dense_jacobian, flat, rel_err, unflat
from token_models import TinyGPT, randomize, sampled_hessian, seq_ce_sum, token_data

V, T, LAM = 5, 6, 0.3


def token_ce(f, y):
    return F.cross_entropy(f.reshape(-1, V), y.reshape(-1))


def oracle(model, ids, y, H, D, lam):
    """−(H + λD)⁻¹g, g by autograd of the batch loss through the dense J."""
    out, J = dense_jacobian(model, ids)
    g = J.T @ torch.func.grad(lambda v: token_ce(v.view(out.shape), y))(out.reshape(-1))
    return unflat(model, -torch.linalg.solve(H + lam * torch.diag(D), g)), g


def exact_H(model, ids, y):
    out, J = dense_jacobian(model, ids)
    Q = torch.func.hessian(lambda v: token_ce(v.view(out.shape), y))(out.reshape(-1))
    return J.T @ Q @ J


@pytest.mark.parametrize("curvature", ["exact", "mc"])
def test_metric_direction_matches_oracle(curvature):
    model = randomize(TinyGPT(V, 8, 1, 2, T).double(), 1)
    ids, y = token_data(3, T, V, 2)
    system = egn_fast.build_system(model, ids, y, loss="cross_entropy", curvature=curvature,
                                   mc_samples=2 if curvature == "mc" else 1, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    scale = [torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5 for p in system.params]  # D^{-1/2} ∈ [0.5, 1.5]
    sol, d_prime = with_diagonal_metric(system, scale).solve_and_backproject(LAM)
    d = [x * s for x, s in zip(d_prime, scale)]
    D = flat(scale) ** -2
    if curvature == "exact":
        H = exact_H(model, ids, y)
    else:
        H = sampled_hessian(model, ids, system.samples, seq_ce_sum, int((y != -100).sum()) * 2)
    want, grad = oracle(model, ids, y, H, D, LAM)
    assert rel_err(d, want) < 1e-8
    w = flat(want)
    assert sol.gtd == pytest.approx(float(grad @ w), rel=1e-8)
    assert sol.dHd == pytest.approx(float(w @ H @ w), rel=1e-8)
    assert sol.dnorm2 == pytest.approx(float(w @ (D * w)), rel=1e-8)  # the λD model's damping term


def test_adam_metric_first_step_is_the_oracle_step():
    """Step 1: v = (1−β)g², so v̂ = g² and D = |g| + eps: the update is −(H + λD)⁻¹g."""
    model = randomize(TinyGPT(V, 8, 1, 2, T).double(), 5)
    ids, y = token_data(3, T, V, 6)
    before = flat([p.detach() for p in model.parameters()])
    H = exact_H(model, ids, y)
    out, J = dense_jacobian(model, ids)
    grad = J.T @ torch.func.grad(lambda v: token_ce(v.view(out.shape), y))(out.reshape(-1))
    want, _ = oracle(model, ids, y, H, grad.abs() + 1e-8, LAM)
    egn_fast.EGN(model, loss="cross_entropy", damping=LAM, metric="adam").step(ids, y)
    assert rel_err([flat([p.detach() for p in model.parameters()]) - before], [flat(want)]) < 1e-6  # eps = 1e-8 next to |g|


def test_adam_metric_trains_and_resumes():
    def make():
        torch.manual_seed(0)
        model = randomize(TinyGPT(V, 8, 1, 2, T), 2)
        opt = egn_fast.EGN(model, loss="cross_entropy", curvature="mc", metric="adam", damping=30.0, momentum=0.9,
                           adaptive_damping=True, generator=torch.Generator().manual_seed(1))
        return model, opt

    batches = [token_data(8, T, V, s) for s in range(6)]
    model, opt = make()
    infos = [opt.step(*batch) for batch in batches[:4]]
    assert "metric_sq" in opt.state_dict()["state"][0]
    buffer = io.BytesIO()
    torch.save((model.state_dict(), opt.state_dict()), buffer)
    later = [opt.step(*batch).loss for batch in batches[4:]]
    buffer.seek(0)
    saved_model, saved_opt = torch.load(buffer)
    model2, opt2 = make()
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    assert [opt2.step(*batch).loss for batch in batches[4:]] == later
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    assert infos[-1].loss < infos[0].loss


def test_metric_refusals():
    model = TinyGPT(V, 8, 1, 2, T)
    with pytest.raises(ValueError, match="unknown metric"):
        egn_fast.EGN(model, loss="cross_entropy", metric="rms")
    with pytest.raises(ValueError, match="metric_beta"):
        egn_fast.EGN(model, loss="cross_entropy", metric="adam", metric_beta=1.0)
