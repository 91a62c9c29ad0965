"""egn_fast.direction against the dense float64 oracle, for every layer rule × loss × bias × λ."""

import zlib

import pytest
import torch

import egn_fast
from egn_fast import resolve_loss
from models import MODELS, make, targets
from oracle import dense_direction, rel_err

LOSSES = ["mse", "cross_entropy", "bce"]


def seed_of(*key) -> int:
    return zlib.crc32(repr(key).encode())


@pytest.mark.parametrize("damping", [1e-3, 1.0])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_matches_dense_oracle_float64(kind, loss, bias, damping):
    seed = seed_of(kind, loss, bias, damping)
    model, x = make(kind, bias, seed)
    y = targets(loss, seed=seed)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    d = egn_fast.direction(model, x, y, loss=loss, damping=damping)
    want = dense_direction(model, x, y, resolve_loss(loss), damping)
    assert [t.shape for t in d] == [p.shape for p in model.parameters() if p.requires_grad]
    assert all(t.dtype == torch.float64 for t in d)
    assert rel_err(d, want) < 1e-8
    # the model is left exactly as it was (parameters, buffers) and no .grad appears
    for n, v in model.state_dict().items():
        assert torch.equal(v, before[n]), n
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["ghost", "per_sample"])
@pytest.mark.parametrize("kind", ["seq_linear", "conv1d", "conv2d", "tied"])
def test_sequence_methods_forced(kind, method):
    seed = seed_of(kind, method)
    model, x = make(kind, True, seed)
    y = targets("cross_entropy", seed=seed)
    d = egn_fast.direction(model, x, y, loss="cross_entropy", damping=1e-2, seq_method=method)
    want = dense_direction(model, x, y, resolve_loss("cross_entropy"), 1e-2)
    assert rel_err(d, want) < 1e-8


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("kind", ["mlp", "seq_linear", "conv2d", "norms", "embedding"])
@pytest.mark.parametrize("damping", [1e-3, 1.0])
def test_float32_within_1e_4(kind, loss, damping):
    seed = seed_of(kind, loss, damping, "f32")
    model, x = make(kind, True, seed)
    y = targets(loss, seed=seed)
    want = dense_direction(model, x, y, resolve_loss(loss), damping)  # float64 oracle, same weights
    model = model.float()
    x32 = x.float() if x.is_floating_point() else x
    y32 = y.float() if y.is_floating_point() else y
    d = egn_fast.direction(model, x32, y32, loss=loss, damping=damping)
    assert all(t.dtype == torch.float32 for t in d)
    assert rel_err(d, want) < 1e-4


def test_full_cross_entropy_factor_gives_same_direction():
    model, x = make("mlp", True, 1)
    y = targets("cross_entropy", seed=1)
    reduced = egn_fast.direction(model, x, y, loss=egn_fast.CrossEntropyLoss(reduced=True), damping=0.1)
    full = egn_fast.direction(model, x, y, loss=egn_fast.CrossEntropyLoss(reduced=False), damping=0.1)
    assert rel_err(reduced, full) < 1e-10


def test_frozen_parameters_get_no_direction_and_the_rest_is_exact():
    model, x = make("mlp", True, 2)
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    y = targets("mse", seed=2)
    d = egn_fast.direction(model, x, y, loss="mse", damping=0.1)
    assert len(d) == sum(p.requires_grad for p in model.parameters())
    assert rel_err(d, dense_direction(model, x, y, resolve_loss("mse"), 0.1)) < 1e-8


def test_inputs_as_tuple_and_dict():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 2), torch.nn.Linear(4, 2)

        def forward(self, u, v):
            return torch.tanh(self.a(u)) * self.b(v)

    torch.manual_seed(3)
    model = TwoInputs().double()
    u, v = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    d_tuple = egn_fast.direction(model, (u, v), y, damping=0.5)
    d_dict = egn_fast.direction(model, {"u": u, "v": v}, y, damping=0.5)
    want = dense_direction(model, (u, v), y, resolve_loss("mse"), 0.5)
    assert rel_err(d_tuple, want) < 1e-8
    assert rel_err(d_dict, want) < 1e-8


def test_multidimensional_outputs_are_flattened_per_sample():
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 6), torch.nn.Unflatten(1, (2, 3))).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randn(4, 2, 3, dtype=torch.float64)
    d = egn_fast.direction(model, x, y, loss="mse", damping=0.3)
    assert rel_err(d, dense_direction(model, x, y.reshape(4, 6), resolve_loss("mse"), 0.3)) < 1e-8
