"""The README's recipes for the trainers people use: examples/trainer_egn.py, lightning_egn.py and
accelerate_egn.py run (fewer steps) and learn, and one step through a real Lightning Trainer or a
real Accelerator is exactly `egn_fast.EGN.step` on the same batch."""

from __future__ import annotations

import copy
import importlib
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import egn_fast
from oracle import rel_err

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name: str):
    """An example script as a module (its main(argv) is what `python examples/<name>.py` runs)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state: each test (and each Trainer before it) sets its own."""
    state = importlib.import_module("accelerate.state")
    state.AcceleratorState._reset_state(reset_partial_state=True)


def batch(seed: int = 0, b: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 64, generator=g, dtype=torch.float64), torch.randint(10, (b,), generator=g)


def reference_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Plain EGN's step on (x, y) with the examples' options, as parameter changes."""
    before = [p.detach().clone() for p in model.parameters()]
    egn_fast.EGN(model, loss="cross_entropy", damping=1.0, line_search="armijo").step(x, y)
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


def test_the_trainer_example_learns():
    result = example("trainer_egn").main(["--steps", "5", "--b", "16", "--T", "12", "--layers", "1"])
    assert result["after"] < 0.9 * result["before"], result


def test_the_lightning_example_learns_and_its_step_is_egns():
    L = importlib.import_module("lightning")
    recipe = example("lightning_egn")
    result = recipe.main(["--epochs", "1", "--batches", "6"])
    assert result["steps"] == 6 and result["after"] > result["before"] + 0.3, result

    x, y = batch()
    module = recipe.DigitsEGN().double()
    reference = copy.deepcopy(module)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=len(x)))
    step = [p.detach() - b for p, b in zip(module.parameters(), before)]
    want = reference_step(reference, x, y)
    assert trainer.global_step == 1 and rel_err(want, [torch.zeros_like(w) for w in want]) > 0
    assert rel_err(step, want) < 1e-12, rel_err(step, want)


def test_the_accelerate_example_learns_and_its_step_is_egns():
    accelerate = importlib.import_module("accelerate")
    result = example("accelerate_egn").main(["--epochs", "1", "--batches", "6", "--bf16"])
    assert result["steps"] == 6 and result["after"] > result["before"] + 0.3, result

    x, y = batch(1)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    reference = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    accelerator = accelerate.Accelerator(cpu=True)
    prepared, opt = accelerator.prepare(model, egn_fast.EGN(model, loss="cross_entropy", damping=1.0, line_search="armijo"))
    opt.step(closure=lambda: (prepared(x), y))  # the wrapper passes the closure on positionally
    step = [p.detach() - b for p, b in zip(model.parameters(), before)]
    want = reference_step(reference, x, y)
    assert rel_err(want, [torch.zeros_like(w) for w in want]) > 0
    assert rel_err(step, want) < 1e-12, rel_err(step, want)


def test_accelerate_save_and_load_state_resume_egn_bit_for_bit(tmp_path):
    """accelerator.save_state / load_state carry EGN's state_dict (λ, momentum buffers, step scale)."""
    accelerate = importlib.import_module("accelerate")
    batches = [batch(seed) for seed in range(4)]

    def run(steps: range, load: bool = False) -> list[torch.Tensor]:
        state = importlib.import_module("accelerate.state")
        state.AcceleratorState._reset_state(reset_partial_state=True)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
        egn = egn_fast.EGN(model, loss="cross_entropy", damping=1.0, momentum=0.9, line_search="armijo", adaptive_damping=True)
        accelerator = accelerate.Accelerator(cpu=True)
        model, opt = accelerator.prepare(model, egn)
        if load:
            accelerator.load_state(str(tmp_path))
        for i in steps:
            x, y = batches[i]
            opt.step(closure=lambda: (model(x), y))
            if i == 1 and not load:
                accelerator.save_state(str(tmp_path))
        return [p.detach().clone() for p in model.parameters()]

    full = run(range(4))
    resumed = run(range(2, 4), load=True)
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))
