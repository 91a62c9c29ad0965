"""The public layer-rule registry: the README's worked example, user rules and overrides against
the dense float64 oracle, the registry's semantics, and rules restricted to the parameters J is
taken with respect to."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import egn_fast
from egn_fast import resolve_loss
from egn_fast.rules import rule_for
from egn_fast.rules.linear import linear_factors
from oracle import dense_direction, rel_err

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_rule_example() -> str:
    """The python block under the README's "Your own layer rule" heading."""
    section = README.read_text().split("### Your own layer rule", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def readme_example():
    namespace: dict = {}
    exec(compile(readme_rule_example(), str(README), "exec"), namespace)
    yield namespace
    egn_fast.unregister_rule(namespace["Scale"], namespace["scale_rule"])


def test_readme_example_runs_its_oracle_test(readme_example):
    readme_example["test_scale_rule_matches_the_dense_oracle"]()


class Counted:
    """Wraps a rule and counts its calls, to see which rule a direction used."""

    def __init__(self, rule):
        self.rule, self.calls = rule, 0
        self.__name__ = f"counted_{rule.__name__}"

    def __call__(self, module, calls, ctx):
        self.calls += 1
        return self.rule(module, calls, ctx)


class SeqScaleNet(nn.Module):
    """The README's Scale on sequences (b, T, n), called twice (tied), inside a tanh network."""

    def __init__(self, scale_type: type[nn.Module]):
        super().__init__()
        self.inp, self.scale, self.head = nn.Linear(4, 5), scale_type(5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.scale(torch.tanh(self.inp(x)))
        return self.head(torch.tanh(self.scale(torch.tanh(h))).mean(1))


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_user_rule_on_sequences_and_two_calls_matches_oracle(readme_example, loss):
    Scale, rule = readme_example["Scale"], readme_example["scale_rule"]
    counted = Counted(rule)
    egn_fast.register_rule(Scale)(counted)
    try:
        torch.manual_seed(11)
        model = SeqScaleNet(Scale).double()
        x = torch.randn(7, 3, 4, dtype=torch.float64)
        y = torch.randint(0, 3, (7,)) if loss == "cross_entropy" else torch.randn(7, 3, dtype=torch.float64)
        d = egn_fast.direction(model, x, y, loss=loss, damping=0.05)
        assert counted.calls == 1  # one rule call for both module calls
        assert rel_err(d, dense_direction(model, x, y, resolve_loss(loss), 0.05)) < 1e-9
    finally:
        egn_fast.unregister_rule(Scale, counted)
    assert rule_for(model.scale) is rule  # the README's rule is in force again


def linear_as_per_sample(module, calls, ctx):
    """An override for nn.Linear: the built-in factors, turned into per-sample rows."""
    factors = linear_factors(module, calls, ctx)
    if factors is None:
        return None
    backend = egn_fast.ops.get_backend("torch", module.weight.device)
    return egn_fast.PerSampleFactors(factors.params, factors.per_sample_grads(backend, ctx.dtype))


def test_user_rule_overrides_the_builtin_one_and_unregistering_restores_it():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    want = dense_direction(model, x, y, resolve_loss("cross_entropy"), 0.2)
    egn_fast.direction(model, x, y, loss="cross_entropy", damping=0.2)  # caches a plan with the built-in rule
    override = Counted(linear_as_per_sample)
    egn_fast.register_rule(nn.Linear)(override)
    try:
        assert rule_for(model[0]) is override
        d = egn_fast.direction(model, x, y, loss="cross_entropy", damping=0.2)
        assert override.calls == 2  # both Linears, although a plan was cached before the override
        assert rel_err(d, want) < 1e-9
    finally:
        egn_fast.unregister_rule(nn.Linear, override)
    assert rule_for(model[0]) is linear_factors
    d = egn_fast.direction(model, x, y, loss="cross_entropy", damping=0.2)
    assert override.calls == 2 and rel_err(d, want) < 1e-9


def test_subclasses_keep_the_rule_only_when_they_keep_forward():
    class Plain(nn.Linear):
        pass

    class Lora(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2.0

    assert rule_for(Plain(2, 2)) is linear_factors
    assert rule_for(Lora(2, 2)) is None  # the generic rule: linear_factors describes Linear.forward
    egn_fast.register_rule(Lora)(linear_as_per_sample)
    try:
        assert rule_for(Lora(2, 2)) is linear_as_per_sample  # the most specific registered class decides
    finally:
        egn_fast.unregister_rule(Lora, linear_as_per_sample)


def test_registry_refuses_what_is_not_a_module_type_or_not_registered():
    with pytest.raises(TypeError, match="nn.Module subclasses"):
        egn_fast.register_rule(torch.Tensor)
    with pytest.raises(TypeError, match="nn.Module subclasses"):
        egn_fast.register_rule()
    with pytest.raises(ValueError, match="not a registered rule for Linear"):
        egn_fast.unregister_rule(nn.Linear, linear_as_per_sample)


def test_a_rule_that_covers_a_parameter_held_fixed_is_refused_by_name():
    class Sloppy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))

        def forward(self, x):
            return x * self.a + self.b

    def sloppy_rule(module, calls, ctx):  # ignores ctx.trainable: returns rows for both parameters
        (call, G), = egn_fast.rules.used_calls(calls)
        x = call.args[0].detach()
        return egn_fast.PerSampleFactors([module.a, module.b], [torch.einsum("bsn,bn->bsn", G, x), G])

    egn_fast.register_rule(Sloppy)(sloppy_rule)
    try:
        model = nn.Sequential(nn.Linear(2, 3), Sloppy()).double()
        x, y = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
        model[1].b.requires_grad_(False)
        with pytest.raises(ValueError, match=r"rule 'sloppy_rule' for module '1' returned factors for 1 parameter"):
            egn_fast.direction(model, x, y)
        model[1].b.requires_grad_(True)  # with both trainable the same rule is exact
        assert rel_err(egn_fast.direction(model, x, y, damping=0.3), dense_direction(model, x, y, resolve_loss("mse"), 0.3)) < 1e-9
    finally:
        egn_fast.unregister_rule(Sloppy, sloppy_rule)


@pytest.mark.parametrize("kind", ["linear", "conv", "norm"])
def test_optimizer_over_part_of_a_layer_takes_j_only_wrt_that_part(kind):
    """Param groups holding a layer's weight but not its bias: the bias is held fixed, exactly as
    if it had requires_grad=False (before the rules consulted ctx.trainable, its rows entered K)."""
    torch.manual_seed(21)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        x = torch.randn(5, 4, dtype=torch.float64)
    elif kind == "conv":
        model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).double()
        x = torch.randn(5, 2, 6, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
        x = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    y = torch.randn(5, 3, dtype=torch.float64)
    held = model[1].bias if kind == "norm" else model[0].bias
    ref = copy.deepcopy(model)
    dict(ref.named_parameters())["1.bias" if kind == "norm" else "0.bias"].requires_grad_(False)
    want = dense_direction(ref, x, y, resolve_loss("mse"), 0.3)
    params = [p for p in model.parameters() if p is not held]
    before = [p.detach().clone() for p in params]
    held_before = held.detach().clone()
    egn_fast.EGN(model, loss="mse", damping=0.3, params=params).step(x, y)
    assert torch.equal(held, held_before)
    assert rel_err([p.detach() - q for p, q in zip(params, before)], want) < 1e-9


def test_preconditioner_writes_each_direction_into_its_own_parameter():
    """params listed in another order than model.parameters(): each .grad is still −d of that parameter."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    d = egn_fast.direction(model, x, y, damping=0.5)
    params = list(model.parameters())
    egn_fast.EGNPreconditioner(model, damping=0.5, params=params[::-1]).step(x, y)
    for p, dp in zip(params, d):
        assert torch.allclose(p.grad, -dp, rtol=1e-12, atol=0)
