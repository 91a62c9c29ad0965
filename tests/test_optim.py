"""egn_fast.EGN and EGNPreconditioner: update rules against hand-written recurrences on the exact
direction, line search and adaptive damping against the dense oracle, exact restoration, resume."""

import copy
import io
import math

import pytest
import torch
from torch import nn

import egn_fast
from egn_fast import resolve_loss
from oracle import dense_gradient_and_gn, flat, rel_err

LOSSES = ["mse", "cross_entropy"]


def mlp(seed: int, out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, out)).double()


def batches(loss: str, n: int, seed: int, b: int = 8, out: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    res = []
    for _ in range(n):
        x = torch.randn(b, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, out, (b,), generator=g) if loss == "cross_entropy" else torch.randn(b, out, generator=g, dtype=torch.float64)
        res.append((x, y))
    return res


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def batch_loss(model: nn.Module, loss: str, x: torch.Tensor, y: torch.Tensor) -> float:
    fn = resolve_loss(loss)
    with torch.no_grad():
        f = model(x)
        return float(fn.per_sample(f, fn.check_targets(f, y)).mean())


@pytest.mark.parametrize("momentum_type", ["ema", "heavy_ball", "nesterov"])
@pytest.mark.parametrize("loss", LOSSES)
def test_momentum_matches_recurrence(loss, momentum_type):
    beta, lr, lam = 0.7, 0.6, 0.5
    model = mlp(1)
    ref = copy.deepcopy(model)
    opt = egn_fast.EGN(model, loss=loss, lr=lr, damping=lam, momentum=beta, momentum_type=momentum_type)
    buf = None
    for k, (x, y) in enumerate(batches(loss, 4, seed=2), start=1):
        d = egn_fast.direction(ref, x, y, loss=loss, damping=lam)
        if momentum_type == "ema":
            buf = [(1 - beta) * v for v in d] if buf is None else [beta * m + (1 - beta) * v for m, v in zip(buf, d)]
            step = [m / (1 - beta**k) for m in buf]
        else:
            buf = [v.clone() for v in d] if buf is None else [beta * m + v for m, v in zip(buf, d)]
            step = buf if momentum_type == "heavy_ball" else [v + beta * m for v, m in zip(d, buf)]
        with torch.no_grad():
            for p, s in zip(ref.parameters(), step):
                p.add_(lr * s)
        info = opt.step(x, y)
        assert info.accepted and info.step_size == lr
        assert rel_err(params_of(model), params_of(ref)) < 1e-12


def test_plain_step_is_lr_times_direction_and_reports():
    model = mlp(3)
    (x, y), = batches("mse", 1, seed=4)
    d = egn_fast.direction(model, x, y, loss="mse", damping=0.3)
    before = params_of(model)
    info = egn_fast.EGN(model, loss="mse", lr=0.4, damping=0.3).step(x, y)
    moved = [a - b for a, b in zip(params_of(model), before)]
    assert rel_err(moved, [0.4 * v for v in d]) < 1e-12
    assert info.loss == pytest.approx(batch_loss(mlp(3), "mse", x, y), rel=1e-12)
    assert info.direction_norm == pytest.approx(float(flat(d).norm()), rel=1e-9)
    assert info.damping == info.next_damping == 0.3 and info.loss_after is None and info.rho is None


@pytest.mark.parametrize("loss", LOSSES)
def test_every_accepted_line_search_step_satisfies_armijo(loss):
    # lr 3 with small λ overshoots, so the search has to backtrack on some steps
    model = mlp(5)
    ls = egn_fast.ArmijoLineSearch(c1=0.1, shrink=0.8, max_tries=15)
    opt = egn_fast.EGN(model, loss=loss, lr=3.0, damping=1e-3, line_search=ls)
    backtracked = 0
    for x, y in batches(loss, 6, seed=6):
        g, _ = dense_gradient_and_gn(model, x, y, resolve_loss(loss))
        before = params_of(model)
        f0 = batch_loss(model, loss, x, y)
        info = opt.step(x, y)
        s = flat(params_of(model)) - flat(before)
        if not info.accepted:
            assert torch.equal(flat(params_of(model)), flat(before))
            continue
        backtracked += info.line_search_tries > 1
        f1 = batch_loss(model, loss, x, y)
        assert info.loss_after == pytest.approx(f1, rel=1e-12)
        assert f1 <= f0 + ls.c1 * float(g @ s) + 1e-12
        assert float(g @ s) < 0
        # the step is t·lr·d with t = 0.8^k times the previous start (capped at 1)
        assert info.step_size == pytest.approx(float(s.norm()) / info.direction_norm, rel=1e-9)
    assert backtracked > 0


def test_line_search_starts_from_growth_times_previous():
    model = mlp(7)
    opt = egn_fast.EGN(model, loss="mse", lr=2.0, damping=1e-3, line_search="armijo")
    prev_t = 1.0
    for x, y in batches("mse", 5, seed=8):
        info = opt.step(x, y)
        if info.accepted:
            t = info.step_size / 2.0
            assert t == pytest.approx(min(1.5 * prev_t, 1.0) * 0.8 ** (info.line_search_tries - 1), rel=1e-12)
            prev_t = t


@pytest.mark.parametrize("momentum", [0.0, 0.5])
@pytest.mark.parametrize("loss", LOSSES)
def test_adaptive_damping_rho_and_rule(loss, momentum):
    """ρ against the dense oracle's LM model (by-products without momentum, JVP path with it)."""
    model = mlp(9)
    rule = egn_fast.AdaptiveDamping()
    opt = egn_fast.EGN(model, loss=loss, lr=1.0, damping=0.05, momentum=momentum, adaptive_damping=rule)
    seen = set()
    for x, y in batches(loss, 8, seed=10):
        g, H = dense_gradient_and_gn(model, x, y, resolve_loss(loss))
        before = params_of(model)
        lam = opt.damping
        info = opt.step(x, y)
        assert info.damping == lam
        want_next = min(max(lam * (1.5 if not (info.rho is not None and info.rho >= 0.25) else 0.5 if info.rho > 0.75 else 1.0), 1e-12), 1e6)
        assert info.next_damping == pytest.approx(want_next, rel=1e-15) and opt.damping == info.next_damping
        if info.accepted:
            s = flat(params_of(model)) - flat(before)
            predicted = -(float(g @ s) + 0.5 * float(s @ H @ s) + 0.5 * lam * float(s @ s))
            assert info.rho == pytest.approx((info.loss - info.loss_after) / predicted, rel=1e-7)
            seen.add("up" if info.rho < 0.25 else "down" if info.rho > 0.75 else "keep")
        else:
            assert torch.equal(flat(params_of(model)), flat(before))
    assert seen, "no step was accepted"


def test_rejected_step_restores_parameters_bit_for_bit_and_raises_damping():
    model = mlp(11)
    # nearly undamped (59 parameters, 24 rows): the full step overshoots and the loss goes up
    opt = egn_fast.EGN(model, loss="mse", lr=1.0, damping=1e-6, adaptive_damping=True, momentum=0.5)
    (x, y), = batches("mse", 1, seed=12)
    before = [p.detach().clone() for p in model.parameters()]
    info = opt.step(x, y)
    assert not info.accepted and info.rho < 0 and "went up" in info.reason
    assert info.loss_after > info.loss and info.step_size == 0.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.damping == pytest.approx(1.5e-6)
    # not committed: the buffers are still the zeros they start as, and no momentum step counted
    assert all(torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in model.parameters())
    assert opt.egn_state["momentum_steps"] == 0


def test_step_the_model_predicts_no_decrease_for_is_rejected():
    model = mlp(11)
    opt = egn_fast.EGN(model, loss="mse", lr=200.0, damping=0.1, adaptive_damping=True)
    (x, y), = batches("mse", 1, seed=12)
    before = [p.detach().clone() for p in model.parameters()]
    info = opt.step(x, y)
    assert not info.accepted and math.isnan(info.rho) and "predicts no decrease" in info.reason
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.damping == pytest.approx(0.15)


def test_line_search_failure_rejects_and_restores():
    model = mlp(13)
    opt = egn_fast.EGN(model, loss="mse", lr=1e4, damping=1e-6, line_search=egn_fast.ArmijoLineSearch(max_tries=2))
    (x, y), = batches("mse", 1, seed=14)
    before = [p.detach().clone() for p in model.parameters()]
    info = opt.step(x, y)
    assert not info.accepted and info.line_search_tries == 2 and "Armijo" in info.reason
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def _run(opt_kwargs, loss, data, model=None, state=None):
    model = model or mlp(15)
    opt = egn_fast.EGN(model, loss=loss, **opt_kwargs)
    if state is not None:
        opt.load_state_dict(state)
    infos = [opt.step(x, y) for x, y in data]
    return model, opt, infos


@pytest.mark.parametrize("momentum_type", ["ema", "nesterov"])
def test_state_dict_round_trip_continues_identically(momentum_type):
    kwargs = dict(lr=1.5, damping=0.01, momentum=0.6, momentum_type=momentum_type, line_search="armijo", adaptive_damping=True)
    data = batches("cross_entropy", 6, seed=16)
    straight, _, infos = _run(kwargs, "cross_entropy", data)
    first, opt, _ = _run(kwargs, "cross_entropy", data[:3])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed = mlp(99)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    resumed, opt2, infos2 = _run(kwargs, "cross_entropy", data[3:], model=resumed, state=saved["opt"])
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))
    assert [i.damping for i in infos[3:]] == [i.damping for i in infos2]
    assert [i.step_size for i in infos[3:]] == [i.step_size for i in infos2]
    assert opt2.egn_state["steps"] == 6
    assert any(i.damping != 0.01 for i in infos)  # λ actually moved, so restoring it mattered


def test_load_state_dict_rejects_non_egn():
    model = mlp(17)
    with pytest.raises(ValueError, match="EGN state_dict"):
        egn_fast.EGN(model).load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


@pytest.mark.parametrize("loss", LOSSES)
def test_preconditioner_with_sgd_equals_egn(loss):
    data = batches(loss, 3, seed=18)
    egn_model, pre_model = mlp(19), mlp(19)
    opt = egn_fast.EGN(egn_model, loss=loss, lr=0.7, damping=0.2)
    pre = egn_fast.EGNPreconditioner(pre_model, loss=loss, damping=0.2)
    sgd = torch.optim.SGD(pre_model.parameters(), lr=0.7)
    for x, y in data:
        opt.step(x, y)
        sgd.zero_grad()
        info = pre.step(x, y)
        sgd.step()
        assert info.loss > 0 and info.direction_norm > 0
    assert rel_err(params_of(pre_model), params_of(egn_model)) < 1e-13


@pytest.mark.parametrize("groups_reversed", [False, True])
def test_param_groups_frozen_and_weight_decay(groups_reversed):
    """Per-group lr and decoupled weight decay; frozen params untouched; the groups may list the
    parameters in any order (the direction comes back in model order)."""
    model = mlp(21)
    model[0].bias.requires_grad_(False)
    (x, y), = batches("mse", 1, seed=22)
    d = egn_fast.direction(model, x, y, loss="mse", damping=0.4)  # w.r.t. the trainable ones
    before = params_of(model)
    groups = [
        {"params": [model[0].weight, model[0].bias], "lr": 0.5, "weight_decay": 0.1},
        {"params": list(model[2].parameters()), "lr": 0.2},
    ]
    opt = egn_fast.EGN(model, loss="mse", damping=0.4, params=groups[::-1] if groups_reversed else groups)
    opt.step(x, y)
    after = params_of(model)
    assert torch.equal(after[1], before[1])  # frozen bias untouched
    want = [(1 - 0.5 * 0.1) * before[0] + 0.5 * d[0], before[2] + 0.2 * d[1], before[3] + 0.2 * d[2]]
    assert rel_err([after[0], after[2], after[3]], want) < 1e-12


def test_direction_over_a_parameter_subset():
    """Only the second layer in the optimizer: J is taken w.r.t. it, the first layer held fixed."""
    model = mlp(23)
    (x, y), = batches("mse", 1, seed=24)
    ref = copy.deepcopy(model)
    ref[0].requires_grad_(False)
    d = egn_fast.direction(ref, x, y, loss="mse", damping=0.3)
    before = params_of(model)
    egn_fast.EGN(model, loss="mse", damping=0.3, params=model[2].parameters()).step(x, y)
    after = params_of(model)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert rel_err([after[2] - before[2], after[3] - before[3]], d) < 1e-12


def test_lr_scheduler_scales_the_step():
    model = mlp(25)
    opt = egn_fast.EGN(model, loss="mse", lr=1.0, damping=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sizes = []
    for x, y in batches("mse", 3, seed=26):
        sizes.append(opt.step(x, y).step_size)
        sched.step()
    assert sizes == [1.0, 0.5, 0.25]


def test_max_step_norm_caps_the_step():
    model = mlp(27)
    (x, y), = batches("mse", 1, seed=28)
    d = egn_fast.direction(model, x, y, loss="mse", damping=1e-3)
    cap = 0.25 * float(flat(d).norm())
    before = params_of(model)
    egn_fast.EGN(model, loss="mse", damping=1e-3, max_step_norm=cap).step(x, y)
    s = flat(params_of(model)) - flat(before)
    assert float(s.norm()) == pytest.approx(cap, rel=1e-10)
    assert float(s @ flat(d)) == pytest.approx(cap * float(flat(d).norm()), rel=1e-10)  # same direction


def test_closure_equals_inputs_targets():
    (x, y), = batches("cross_entropy", 1, seed=30)
    a, b = mlp(31), mlp(31)
    egn_fast.EGN(a, loss="cross_entropy", line_search="armijo").step(x, y)
    egn_fast.EGN(b, loss="cross_entropy", line_search="armijo").step(closure=lambda: (b(x), y))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_nonfinite_raises_or_skips_with_parameters_unchanged():
    model = mlp(33)
    (x, y), = batches("mse", 1, seed=34)
    x = x.clone()
    x[2, 1] = math.nan
    before = params_of(model)
    with pytest.raises(egn_fast.NonFiniteError):
        egn_fast.EGN(model, loss="mse").step(x, y)
    opt = egn_fast.EGN(model, loss="mse", skip_nonfinite=True)
    with pytest.warns(RuntimeWarning, match="skipped"):
        info = opt.step(x, y)
    assert not info.accepted and math.isnan(info.loss)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_mismatched_targets_leave_the_model_unchanged():
    model = mlp(35)
    x, y = batches("mse", 1, seed=36)[0]
    before = params_of(model)
    with pytest.raises(ValueError):
        egn_fast.EGN(model, loss="mse").step(x, y[:5])
    with pytest.raises(ValueError):
        egn_fast.EGN(model, loss="cross_entropy").step(x, torch.full((8,), 3))  # class 3 of 3
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(damping=-1.0), "damping"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum_type="adam"), "momentum_type"),
        (dict(line_search="wolfe"), "line_search"),
        (dict(adaptive_damping="yes"), "adaptive_damping"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(max_step_norm=0.0), "max_step_norm"),
        (dict(params=[nn.Parameter(torch.ones(2))]), "parameter of the model"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        egn_fast.EGN(mlp(37), **kwargs)


def test_step_needs_exactly_one_form():
    model = mlp(39)
    (x, y), = batches("mse", 1, seed=40)
    opt = egn_fast.EGN(model)
    with pytest.raises(ValueError, match="either"):
        opt.step(x, y, closure=lambda: (model(x), y))
    with pytest.raises(ValueError, match="inputs, targets"):
        opt.step(x)
    with pytest.raises(ValueError, match="closure"):
        opt.step(closure=lambda: model(x))


def test_timings_per_stage_when_asked():
    model = mlp(41)
    (x, y), = batches("mse", 1, seed=42)
    info = egn_fast.EGN(model, loss="mse", timings=True).step(x, y)
    assert {"forward", "gram", "solve", "backproject"} <= set(info.timings)
    assert all(v >= 0 for v in info.timings.values())
    assert egn_fast.EGN(mlp(41), loss="mse").step(x, y).timings == {}
