"""One argument check, one message, in every entry point: direction/build_system, EGN, SGN and
EGNPreconditioner refuse the same bad damping and lr the same way, before the model runs."""

import math

import pytest
import torch
from torch import nn

import egn_fast


def small_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _system(model):
    return egn_fast.build_system(model, torch.randn(4, 3), torch.randn(4, 2))


ENTRY_POINTS = {
    "direction": lambda model, damping: egn_fast.direction(model, torch.randn(4, 3), torch.randn(4, 2), damping=damping),
    "direction_with_info": lambda model, damping: egn_fast.direction_with_info(model, torch.randn(4, 3), torch.randn(4, 2), damping=damping),
    "EGN": lambda model, damping: egn_fast.EGN(model, damping=damping),
    "SGN": lambda model, damping: egn_fast.SGN(model, damping=damping),
    "EGNPreconditioner": lambda model, damping: egn_fast.EGNPreconditioner(model, damping=damping),
    "RowSpaceSystem.solve": lambda model, damping: egn_fast.build_system(model, torch.randn(4, 3), torch.randn(4, 2)).solve(damping),
    "RowSpaceSystem.solve_eigen": lambda model, damping: _system(model).solve_eigen(_system(model).eigen(), damping),
}
BAD_DAMPING = [-1.0, math.nan, math.inf, None, "1.0", True, torch.ones(2)]


@pytest.mark.parametrize("damping", BAD_DAMPING, ids=repr)
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_bad_damping_is_refused_with_one_message(entry, damping):
    model = small_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"damping must be a finite number ≥ 0, got "):
        ENTRY_POINTS[entry](model, damping)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("damping", [0, 0.5, torch.tensor(0.5), 2])
def test_numbers_of_any_kind_are_accepted_as_floats(damping):
    opt = egn_fast.EGN(small_mlp(), damping=damping)
    assert isinstance(opt.damping, float) and opt.damping == float(damping)


@pytest.mark.parametrize("lr", [-0.1, math.inf, "0.1"], ids=repr)
@pytest.mark.parametrize("cls", [egn_fast.EGN, egn_fast.SGN])
def test_bad_lr_is_refused_with_one_message(cls, lr):
    with pytest.raises(ValueError, match=r"lr must be a finite number ≥ 0, got "):
        cls(small_mlp(), lr=lr)


@pytest.mark.parametrize("cls", [egn_fast.EGN, egn_fast.SGN, egn_fast.EGNPreconditioner])
def test_parameters_from_another_model_are_refused(cls):
    with pytest.raises(ValueError, match="must be a parameter of the model"):
        cls(small_mlp(), params=[nn.Parameter(torch.ones(2))])


def test_loss_spec_is_resolved_in_one_place():
    assert isinstance(egn_fast.resolve_loss("cross_entropy"), egn_fast.CrossEntropyLoss)
    custom = egn_fast.MSELoss()
    assert egn_fast.resolve_loss(custom) is custom
    assert isinstance(egn_fast.resolve_loss(lambda f, y: (f - y).square().sum()), egn_fast.AutogradLoss)
    for entry in (lambda: egn_fast.EGN(small_mlp(), loss="hinge"), lambda: egn_fast.SGN(small_mlp(), loss="hinge"),
                  lambda: egn_fast.direction(small_mlp(), torch.randn(4, 3), torch.randn(4, 2), loss="hinge")):
        with pytest.raises(ValueError, match="unknown loss 'hinge'"):
            entry()


def test_readme_direction_blocks_run_as_written_and_agree():
    """The two python blocks of the README's "The direction" section, on a classifier: the low-level
    block's d (λ = 0.1) is direction()'s, and direction_with_info's is the same."""
    import re
    from pathlib import Path

    section = (Path(__file__).resolve().parents[1] / "README.md").read_text().split("### The direction", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 4, (5,))
    namespace = {"egn_fast": egn_fast, "torch": torch, "model": model, "x": x, "y": y, "lr": 0.5}
    before = [p.detach().clone() for p in model.parameters()]
    step = egn_fast.direction(model, x, y, loss="cross_entropy", damping=1.0)
    exec(blocks[0], namespace)  # one step p += lr·d
    assert all(torch.allclose(p - q, 0.5 * d, rtol=1e-9, atol=1e-14) for p, q, d in zip(model.parameters(), before, step))
    exec(blocks[1], namespace)
    reference = egn_fast.direction(model, x, y, loss="cross_entropy", damping=0.1)
    for got in (namespace["d"], namespace["info"].direction):
        assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-13) for a, b in zip(got, reference))
    assert namespace["info"].m == 5 * 3  # s = c − 1 rows per sample
