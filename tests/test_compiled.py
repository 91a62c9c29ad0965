"""Compiled models: `torch.compile(model)` (an OptimizedModule) and `module.compile()` per block are
accepted wherever a model is, with the eager model's exact direction (the capture runs the
original forwards: egn_fast/capture/compiled.py). Most tests use the "aot_eager" backend (AOT
autograd's compiled forward and backward without code generation: the wrapper is the point, and
it compiles in a fraction of a second); one uses the default inductor backend."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import egn_fast
from oracle import dense_direction, rel_err
from token_models import TinyGPT, exact_token_oracle, randomize, token_data

LAM = 0.1
V = 7


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def mlp_data(b: int = 5) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 4, generator=g, dtype=torch.float64), torch.randn(b, 3, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("warm", [False, True], ids=["first_call", "compiled_before"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_whole_mlp_compiled_is_exact(backend, warm):
    """The issue's case: inductor used to fail the capture ("did not settle … after 5 attempts")."""
    model = mlp()
    compiled = torch.compile(model, backend=backend)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is model
    x, y = mlp_data()
    if warm:
        compiled(x)
    d = egn_fast.direction(compiled, x, y, loss="mse", damping=LAM)
    assert rel_err(d, dense_direction(model, x, y, egn_fast.resolve_loss("mse"), LAM)) < 1e-10


@pytest.mark.parametrize("which", ["block", "whole"])
def test_module_compile_on_an_mlp_is_exact(which):
    """`module.compile()` on one layer, or on the whole model (its __call__ compiled, no wrapper)."""
    model = mlp()
    target = model[2] if which == "block" else model
    target.compile(backend="aot_eager")
    x, y = mlp_data()
    model(x)
    assert target._compiled_call_impl is not None
    d = egn_fast.direction(model, x, y, loss="mse", damping=LAM)
    target._compiled_call_impl = None  # the oracle's torch.func transforms run it eagerly
    assert rel_err(d, dense_direction(model, x, y, egn_fast.resolve_loss("mse"), LAM)) < 1e-10


@pytest.mark.parametrize("how", ["whole", "per_block", "nested"])
def test_compiled_transformer_per_token_is_exact(how):
    """TinyGPT (tied head, causal attention, LayerNorm), per-token cross-entropy with ignored tokens:
    compiled whole, per block by `block.compile()`, or with its blocks replaced by
    `torch.compile(block)` (OptimizedModules inside the model)."""
    model = randomize(TinyGPT(V, 8, 1, 2, 6).double(), 2)
    ids, y = token_data(3, 6, V, 3)
    want = exact_token_oracle(model, ids, y, LAM)  # before compiling: torch.func runs the eager model
    run = model
    if how == "whole":
        run = torch.compile(model, backend="aot_eager")
    elif how == "per_block":
        for block in model.blocks:
            block.compile(backend="aot_eager")
    else:
        for i, block in enumerate(model.blocks):
            model.blocks[i] = torch.compile(block, backend="aot_eager")
    run(ids)
    d = egn_fast.direction(run, ids, y, loss="cross_entropy", damping=LAM)
    assert rel_err(d, want) < 1e-10


@pytest.mark.parametrize("call", ["inputs", "closure"])
def test_egn_steps_on_a_compiled_model_equal_the_eager_ones(call):
    """Two EGN steps with Armijo line search (whose trial losses run the compiled forward) move the
    parameters as on the eager model; with (inputs, targets) or a closure over the compiled model."""
    eager_model = mlp()
    compiled_model = copy.deepcopy(eager_model)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    x, y = mlp_data(8)
    infos = []
    for model in (eager_model, compiled):
        opt = egn_fast.EGN(model, loss="mse", damping=LAM, line_search="armijo")
        step = (lambda: opt.step(x, y)) if call == "inputs" else (lambda: opt.step(closure=lambda: (model(x), y)))
        infos.append([step() for _ in range(2)])
    for a, b in zip(*infos):
        assert abs(a.loss - b.loss) <= 1e-12 * abs(a.loss)
    moved = [p.detach() - q for p, q in zip(eager_model.parameters(), mlp().parameters())]
    assert float(torch.cat([m.reshape(-1) for m in moved]).norm()) > 1e-3  # the steps did move
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-12)


def test_errors_name_parameters_as_in_the_uncompiled_model():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)

        def forward(self, tok: Tensor) -> Tensor:
            return nn.functional.linear(self.emb(tok).mean(1), self.emb.weight)

    compiled = torch.compile(Tied().double(), backend="aot_eager")
    with pytest.raises(ValueError, match="^parameter 'emb.weight' is used outside the forward of its module 'emb'"):
        egn_fast.direction(compiled, torch.randint(0, 5, (4, 2)), torch.randn(4, 5, dtype=torch.float64))
