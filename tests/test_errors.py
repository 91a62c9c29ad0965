"""Bad input gets a clear error naming the problem, and the model is left exactly as it was."""

import pytest
import torch
from torch import nn

import egn_fast
from models import make


@pytest.fixture
def mlp():
    model, x = make("mlp", True, 21)
    return model, x


def _unchanged(model, before):
    return all(torch.equal(v, before[n]) for n, v in model.state_dict().items()) and all(
        p.grad is None for p in model.parameters()
    )


@pytest.mark.parametrize(
    "loss,bad_targets,match",
    [
        ("mse", torch.randn(5, 4, dtype=torch.float64), r"targets of shape \(5, 4\) do not match"),
        ("mse", torch.randn(4, 3, dtype=torch.float64), r"targets of shape \(4, 3\)"),
        ("cross_entropy", torch.tensor([0, 1, 2, 3, 1]), r"class index 3 out of range \[0, 3\)"),
        ("cross_entropy", torch.tensor([0, -1, 2, 0, 1]), r"class index -1 out of range"),
        ("cross_entropy", torch.rand(5, 3, dtype=torch.float64), "integer class indices"),
        ("cross_entropy", torch.tensor([0, 1, 2]), r"targets of shape \(3,\)"),
        ("bce", 2 + torch.rand(5, 3, dtype=torch.float64), r"targets must lie in \[0, 1\]"),
        ("mse", torch.full((5, 3), float("nan"), dtype=torch.float64), "non-finite"),
    ],
)
def test_bad_targets(mlp, loss, bad_targets, match):
    model, x = mlp
    before = {n: v.clone() for n, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        egn_fast.direction(model, x, bad_targets, loss=loss)
    assert _unchanged(model, before)


def test_non_finite_outputs():
    model = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    x[2, 1] = float("inf")
    with pytest.raises(ValueError, match="outputs contain non-finite"):
        egn_fast.direction(model, x, torch.randn(4, 2, dtype=torch.float64))


def test_non_finite_activations_behind_finite_outputs(mlp):
    model, x = mlp  # tanh saturates: finite outputs, but an infinite layer input
    x = x.clone()
    x[2, 1] = float("inf")
    with pytest.raises(ValueError, match="Gram has non-finite entries"):
        egn_fast.direction(model, x, torch.randn(5, 3, dtype=torch.float64))


def test_non_finite_loss():
    model = nn.Sequential(nn.Linear(2, 2)).double()
    x = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="loss .* is not finite"):
        egn_fast.direction(model, x, torch.randn(3, 2, dtype=torch.float64), loss=lambda f, y: torch.log(f - f - 1).sum())


def test_unknown_loss_and_backend(mlp):
    model, x = mlp
    y = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        egn_fast.direction(model, x, y, loss="hinge")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        egn_fast.direction(model, x, y, backend="tpu")
    with pytest.raises(ValueError, match="unknown seq_method"):
        egn_fast.direction(model, x, y, seq_method="fast")


def test_inputs_on_another_device(mlp):
    model, x = mlp
    with pytest.raises(ValueError, match="inputs are on meta but the model's parameters are on cpu"):
        egn_fast.direction(model, x.to("meta"), torch.randn(5, 3, dtype=torch.float64))


def test_model_without_trainable_parameters(mlp):
    model, x = mlp
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        egn_fast.direction(model, x, torch.randn(5, 3, dtype=torch.float64))


def test_batchnorm_in_training_mode_is_refused_before_any_change():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    before = {n: v.clone() for n, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\) normalizes with batch statistics.*model.eval\(\)"):
        egn_fast.direction(model, torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64))
    assert _unchanged(model, before)  # running statistics not updated


def test_tied_weight_used_functionally_outside_its_module():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)

        def forward(self, tok):
            h = self.emb(tok).mean(1)
            return nn.functional.linear(h, self.emb.weight)

    with pytest.raises(ValueError, match="'emb.weight' is used outside the forward of its module 'emb'"):
        egn_fast.direction(Tied().double(), torch.randint(0, 5, (4, 2)), torch.randn(4, 5, dtype=torch.float64))


def test_dropout_inside_a_generic_module_is_explained():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3))

        def forward(self, x):
            return nn.functional.dropout(x * self.w, 0.5, self.training)

    with pytest.raises(RuntimeError, match="draws random numbers.*eval mode"):
        egn_fast.direction(Noisy().double(), torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))


def test_scalar_model_output():
    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 1)

        def forward(self, x):
            return self.l(x).sum()

    with pytest.raises(ValueError, match="scalar"):
        egn_fast.direction(Scalar(), torch.randn(4, 3), torch.randn(4))


def test_negative_damping(mlp):
    model, x = mlp
    with pytest.raises(ValueError, match="damping must be"):
        egn_fast.direction(model, x, torch.randn(5, 3, dtype=torch.float64), damping=-1.0)
