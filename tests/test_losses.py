"""Loss heads: S Sᵀ = Q and S w = r against autograd of the per-sample loss, on random outputs."""

import pytest
import torch

import egn_fast
from egn_fast import resolve_loss


def _autograd_r_Q(loss, f, y):
    total = lambda fo: loss.per_sample(fo, y).sum()
    r = torch.func.grad(total)(f)
    H = torch.func.hessian(total)(f)
    Q = torch.stack([H[i, :, i, :] for i in range(f.shape[0])])
    return r, Q


def _targets(name, b, c, g):
    if name == "cross_entropy":
        return torch.randint(0, c, (b,), generator=g)
    if name == "bce":
        return torch.rand(b, c, generator=g, dtype=torch.float64)
    return torch.randn(b, c, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("c", [2, 5])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy", egn_fast.CrossEntropyLoss(reduced=False), "bce"])
def test_head_factors_match_autograd(loss, c):
    g = torch.Generator().manual_seed(c)
    loss = resolve_loss(loss)
    f = 3 * torch.randn(7, c, generator=g, dtype=torch.float64)
    y = loss.check_targets(f, _targets(loss.name, 7, c, g))
    head = loss.head(f, y)
    r, Q = _autograd_r_Q(loss, f, y)
    torch.testing.assert_close(head.r, r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.S @ head.S.transpose(1, 2), Q, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close((head.S @ head.w[:, :, None]).squeeze(2), r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.per_sample, loss.per_sample(f, y))


def test_reduced_cross_entropy_has_one_row_fewer_per_sample():
    f = torch.randn(4, 6, dtype=torch.float64)
    head = egn_fast.CrossEntropyLoss().head(f, torch.tensor([0, 5, 2, 2]))
    assert head.S.shape == (4, 6, 5) and head.w.shape == (4, 5)


def test_cross_entropy_with_saturated_softmax_stays_finite():
    f = torch.tensor([[200.0, -200.0, 0.0]], dtype=torch.float32)
    head = egn_fast.CrossEntropyLoss().head(f, torch.tensor([1]))
    assert torch.isfinite(head.w).all() and torch.isfinite(head.S).all()


def test_mse_value_has_the_half():
    f = torch.tensor([[1.0, 2.0]])
    y = torch.tensor([[0.0, 0.0]])
    assert float(egn_fast.MSELoss().head(f, y).value) == pytest.approx(2.5)


def logcosh(f, y):
    return torch.log(torch.cosh(f - y)).sum()


def test_autograd_loss_from_a_per_sample_function():
    g = torch.Generator().manual_seed(0)
    loss = egn_fast.AutogradLoss(logcosh)
    f = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64)
    head = loss.head(f, y)
    r, Q = _autograd_r_Q(loss, f, y)
    torch.testing.assert_close(head.r, r)
    torch.testing.assert_close(head.S @ head.S.transpose(1, 2), Q, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close((head.S @ head.w[:, :, None]).squeeze(2), r, rtol=1e-9, atol=1e-12)


def test_autograd_loss_rejects_nonconvex_output_hessian():
    loss = egn_fast.AutogradLoss(lambda f, y: -(f - y).square().sum())
    with pytest.raises(ValueError, match="not positive semi-definite"):
        loss.head(torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))


class HalfSquaredScaled(egn_fast.Loss):
    """A custom Loss object that gives only r and S: ℓ = ½ Σ_k a_k (f_k − y_k)², S = diag(√a)."""

    name = "scaled_mse"

    def __init__(self, a):
        self.a = a

    def per_sample(self, f, y):
        return 0.5 * (self.a * (f - y).square()).sum(1)

    def residual_and_factor(self, f, y):
        r = self.a * (f - y)
        return r, torch.diag_embed(self.a.sqrt().expand_as(f))


@pytest.mark.parametrize("loss_kind", ["object", "callable"])
def test_custom_losses_through_direction_match_oracle(loss_kind):
    from models import make
    from oracle import dense_direction, rel_err

    model, x = make("mlp", True, 11)
    y = torch.randn(x.shape[0], 3, dtype=torch.float64)
    a = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    loss = HalfSquaredScaled(a) if loss_kind == "object" else logcosh
    d = egn_fast.direction(model, x, y, loss=loss, damping=0.2)
    want = dense_direction(model, x, y, egn_fast.resolve_loss(loss), 0.2)
    assert rel_err(d, want) < 1e-8
