"""Bad input gets a clear error naming the problem, and the model is left exactly as it was."""

import pytest
import torch
from torch import nn

import egn_fast
from egn_fast.losses import resolve_loss
from models import make
from oracle import dense_direction, rel_err


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


def _snapshot(model):
    """state_dict and .grad fields, cloned (the .grad fields set to random values first)."""
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return {n: v.clone() for n, v in model.state_dict().items()}, [p.grad.clone() for p in model.parameters()]


def _same(model, snapshot):
    state, grads = snapshot
    return all(torch.equal(v, state[n]) for n, v in model.state_dict().items()) and all(
        torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads)
    )


def _tiny_memory(monkeypatch):
    monkeypatch.setattr(egn_fast.checks, "MEMORY_CHECKED_FROM", 0)
    monkeypatch.setattr(egn_fast.checks, "available_memory", lambda device: 1000)


REFUSED = {  # name: (call(model, x, monkeypatch), exception, message)
    "EGN(model.parameters())": (lambda model, x, mp: egn_fast.EGN(model.parameters()), TypeError,
                                r"model must be a torch.nn.Module, got generator; pass the model itself, e.g. EGN\(model\) rather than "
                                r"EGN\(model.parameters\(\)\), and params=\[…\]"),
    "SGN(list of parameters)": (lambda model, x, mp: egn_fast.SGN(list(model.parameters())), TypeError, "got list; pass the model itself"),
    "empty batch": (lambda model, x, mp: egn_fast.direction(model, x[:0], torch.randn(0, 3, dtype=torch.float64)), ValueError,
                    r"the batch is empty \(outputs of shape \(0, 3\)\); pass at least one sample"),
    "EGN.step on an empty batch": (lambda model, x, mp: egn_fast.EGN(model).step(x[:0], torch.randn(0, 3, dtype=torch.float64)),
                                   ValueError, "the batch is empty"),
    "torch loss with options": (lambda model, x, mp: egn_fast.direction(model, x, torch.randn(5, 3, dtype=torch.float64),
                                                                        loss=nn.MSELoss(reduction="sum")), ValueError, "reduction='sum'"),
    "EGN.step with float class targets": (lambda model, x, mp: egn_fast.EGN(model, loss=nn.CrossEntropyLoss()).step(x, torch.rand(5, 3)),
                                          ValueError, "targets must be integer class indices"),
    "row space too large": (lambda model, x, mp: (_tiny_memory(mp), egn_fast.direction(model, x, torch.randn(5, 3, dtype=torch.float64))),
                            ValueError, r"m = 15 rows \(batch 5 × 3 per sample\): its 15×15 torch.float64 Gram and Cholesky need about "
                                        r"5.4 kB, 1 kB is available on cpu; use a smaller batch .* egn_fast.SGN"),
    "damping inf": (lambda model, x, mp: egn_fast.direction(model, x, torch.randn(5, 3, dtype=torch.float64), damping=float("inf")),
                    ValueError, "damping must be a finite number ≥ 0, got inf"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_calls_leave_parameters_buffers_and_grads_bit_identical(mlp, monkeypatch, name):
    call, error, match = REFUSED[name]
    model, x = mlp
    model.register_buffer("scale", torch.randn(3, dtype=torch.float64))
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        call(model, x, monkeypatch)
    assert _same(model, before)


def test_row_space_guard_allows_what_fits_and_sgn_needs_no_gram(mlp, monkeypatch):
    model, x = mlp
    y = torch.randn(5, 3, dtype=torch.float64)
    need = egn_fast.checks.ROW_SPACE_MATRICES * 15 * 15 * 8  # three 15×15 float64 matrices
    monkeypatch.setattr(egn_fast.checks, "MEMORY_CHECKED_FROM", 0)
    monkeypatch.setattr(egn_fast.checks, "available_memory", lambda device: need)
    egn_fast.direction(model, x, y)  # exactly fits
    monkeypatch.setattr(egn_fast.checks, "available_memory", lambda device: need - 1)
    with pytest.raises(ValueError, match="m = 15 rows"):
        egn_fast.direction(model, x, y)
    info = egn_fast.SGN(model).step(x, y)  # matrix-free: no m×m matrix, not refused
    assert info.direction_norm > 0


def test_small_systems_do_not_read_the_free_memory(mlp, monkeypatch):
    model, x = mlp

    def unreadable(device):
        raise AssertionError("the free memory was read for a system far under MEMORY_CHECKED_FROM")

    monkeypatch.setattr(egn_fast.checks, "available_memory", unreadable)
    egn_fast.direction(model, x, torch.randn(5, 3, dtype=torch.float64))  # 15 rows: no file read per step
    monkeypatch.setattr(egn_fast.checks, "MEMORY_CHECKED_FROM", 0)
    with pytest.raises(AssertionError, match="free memory was read"):
        egn_fast.direction(model, x, torch.randn(5, 3, dtype=torch.float64))


def test_large_row_space_warns_once_it_fits(mlp, monkeypatch):
    model, x = mlp
    monkeypatch.setattr(egn_fast.checks, "LARGE_ROW_SPACE", 10)
    with pytest.warns(RuntimeWarning, match=r"m = 15 rows \(batch 5 × 3 per sample\): each step builds a 15×15 Gram .*m³/3"):
        egn_fast.direction(model, x, torch.randn(5, 3, dtype=torch.float64))


def test_available_memory_is_a_plausible_byte_count():
    have = egn_fast.checks.available_memory(torch.device("cpu"))
    assert have is None or 2**20 < have < 2**50
    assert egn_fast.checks.available_memory(torch.device("meta")) is None


def test_model_on_the_meta_device_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to("meta")
    with pytest.raises(ValueError, match=r"the model is on the meta device .* initialize its weights first"):
        egn_fast.direction(model, torch.randn(4, 3, device="meta"), torch.randn(4, 2, device="meta"))


def test_zero_dimensional_parameter_is_exact():
    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.gain = nn.Linear(3, 2), nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            return self.lin(x) * self.gain

    torch.manual_seed(0)
    model = Gain().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    got = egn_fast.direction(model, x, y, loss="mse", damping=0.1)
    want = dense_direction(model, x, y, resolve_loss("mse"), 0.1)
    assert got[0].shape == () and rel_err(got, want) < 1e-10  # the root's own parameter comes first


def test_preconditioner_given_parameters_says_to_pass_the_model():
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match=r"pass the model itself"):
        egn_fast.EGNPreconditioner(model.parameters())
