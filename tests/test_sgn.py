"""egn_fast.row_jvp and egn_fast.SGN against the dense float64 oracle: J̃v from a jacrev Jacobian,
Hv against the oracle's H, the full-CG step against the exact LM step (and EGN's), k CG
iterations against textbook dense CG, and the optimizer's conventions."""

import copy
import math

import pytest
import torch
from torch import nn

import egn_fast
from egn_fast.capture import forward_of
from egn_fast.system import row_jvp_fn
from egn_fast import resolve_loss
from models import make, targets
from oracle import dense_direction, dense_gradient_and_gn, flat, rel_err, unflat

LOSSES = ["mse", "cross_entropy"]
KINDS = ["mlp", "conv2d", "tied", "shared_across_modules", "custom_module"]


def tiny(seed: int, out: int = 3) -> nn.Module:
    """d = 4·7 + 7 + 7·3 + 3 = 59 parameters."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, out)).double()


def batch(loss: str, seed: int, b: int = 6, out: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, out, (b,), generator=g) if loss == "cross_entropy" else torch.randn(b, out, generator=g, dtype=torch.float64)
    return x, y


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def moved(model: nn.Module, before: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach() - q for p, q in zip(model.parameters(), before)]


def dense_jacobian(model: nn.Module, inputs) -> torch.Tensor:
    """J (b, c, d) over the trainable parameters in model order, by torch.func.jacrev."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def f(ps: dict) -> torch.Tensor:
        out = torch.func.functional_call(model, ps, (inputs,), strict=False)
        return out.reshape(out.shape[0], -1)

    jac = torch.func.jacrev(f)(params)
    b, c = f(params).shape
    return torch.cat([jac[n].reshape(b, c, -1) for n in names], 2)


def dense_cg(A: torch.Tensor, rhs: torch.Tensor, k: int) -> torch.Tensor:
    """k iterations of textbook CG on A x = rhs from x = 0 (no early stop)."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    for _ in range(k):
        Ap = A @ p
        alpha = (r @ r) / (p @ Ap)
        x = x + alpha * p
        r_new = r - alpha * Ap
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
    return x


# ----------------------------------------------------------------------------- row_jvp


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("kind", KINDS)
def test_row_jvp_matches_dense_jacobian_and_oracle_H(kind, loss):
    model, x = make(kind, bias=True, seed=11)
    y = targets(loss, x.shape[0], seed=3)
    system = egn_fast.build_system(model, x, y, loss=loss, gram=False)
    assert system.K is None
    v = [torch.randn_like(p) for p in system.params]
    forward = forward_of(model, x, y, None)

    got = egn_fast.row_jvp(system, forward, v)  # (b, s)
    J = dense_jacobian(model, x)  # (b, c, d)
    want = torch.einsum("bcs,bc->bs", system.head.S, J @ flat(v))  # S_iᵀ (J v)_i
    assert got.shape == (system.b, system.s)
    assert float((got - want).norm() / want.norm()) < 1e-10

    # Independently of egn_fast's S: ‖J̃v‖²/b = vᵀHv and (1/b)J̃ᵀ(J̃v) = Hv with the oracle's H.
    _, H = dense_gradient_and_gn(model, x, y, resolve_loss(loss))
    Hv = H @ flat(v)
    assert float(got.pow(2).sum() / system.b) == pytest.approx(float(flat(v) @ Hv), rel=1e-10)
    JTJv = system.backproject(-got.reshape(-1) / system.b)
    assert float((flat(JTJv) - Hv).norm() / Hv.norm()) < 1e-10


def test_row_jvp_is_linear_and_zero_for_zero_steps():
    model, x = make("mlp", bias=True, seed=2)
    y = targets("mse", x.shape[0], seed=1)
    system = egn_fast.build_system(model, x, y, loss="mse")
    fn = row_jvp_fn(system, forward_of(model, x, y, None))
    v, w = [torch.randn_like(p) for p in system.params], [torch.randn_like(p) for p in system.params]
    both = fn([2 * a - 3 * c for a, c in zip(v, w)])
    assert torch.allclose(both, 2 * fn(v) - 3 * fn(w), rtol=1e-12, atol=1e-12)
    assert fn([torch.zeros_like(p) for p in system.params]).abs().max() == 0
    with pytest.raises(ValueError, match="tensors shaped like system.params"):
        fn(v[:-1])


def test_build_system_without_gram_backprojects_the_same():
    model, x = make("conv2d", bias=True, seed=4)
    y = targets("cross_entropy", x.shape[0], seed=2)
    full = egn_fast.build_system(model, x, y, loss="cross_entropy")
    lean = egn_fast.build_system(model, x, y, loss="cross_entropy", gram=False)
    gamma = torch.randn_like(full.w)
    assert rel_err(lean.backproject(gamma), full.backproject(gamma)) < 1e-14
    with pytest.raises(ValueError, match="gram=False"):
        lean.solve(1.0)


# ----------------------------------------------------------------------------- SGN vs oracle


@pytest.mark.parametrize("loss", LOSSES)
def test_full_cg_is_the_exact_lm_step_and_egn_step(loss):
    lam = 0.05  # small λ: the step is far from a scaled gradient step
    model = tiny(1)
    d_params = sum(p.numel() for p in model.parameters())
    assert d_params <= 60
    x, y = batch(loss, seed=5)
    exact = dense_direction(model, x, y, resolve_loss(loss), lam)
    ref = copy.deepcopy(model)

    before = params_of(model)
    info = egn_fast.SGN(model, loss=loss, damping=lam, cg_iters=d_params, cg_tol=1e-13).step(x, y)
    step = moved(model, before)
    assert rel_err(step, exact) < 1e-8
    assert info.relative_residual <= 1e-13
    # CG ends in at most (#distinct eigenvalues of H + λI) ≤ m + 1 iterations in exact arithmetic;
    # allow a few more for rounding, but far fewer than d
    m = x.shape[0] * 3  # b·c ≥ rank of H
    assert info.cg_iterations <= m + 6 < d_params

    egn_fast.EGN(ref, loss=loss, lr=1.0, damping=lam).step(x, y)
    assert rel_err(step, moved(ref, before)) < 1e-8


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("kind", ["tiny", "tied"])
def test_k_iterations_equal_dense_cg(kind, loss):
    lam, k = 0.3, 3
    if kind == "tiny":
        model = tiny(2)
        x, y = batch(loss, seed=6)
    else:
        model, x = make("tied", bias=True, seed=7)
        y = targets(loss, x.shape[0], seed=4)
    g, H = dense_gradient_and_gn(model, x, y, resolve_loss(loss))
    A = H + lam * torch.eye(H.shape[0], dtype=H.dtype)
    want = dense_cg(A, -g, k)
    # the k-step iterate differs from the converged solution, so the comparison is not vacuous
    assert float((want - torch.linalg.solve(A, -g)).norm() / want.norm()) > 1e-4

    before = params_of(model)
    info = egn_fast.SGN(model, loss=loss, damping=lam, cg_iters=k, cg_tol=0.0).step(x, y)
    got = flat(moved(model, before))
    assert info.cg_iterations == k
    assert float((got - want).norm() / want.norm()) < 1e-8
    true_res = float((A @ want + g).norm() / g.norm())
    assert info.relative_residual == pytest.approx(true_res, rel=1e-6)
    assert info.direction_norm == pytest.approx(float(want.norm()), rel=1e-10)


def test_cg_tol_stops_early_at_the_first_iterate_below_it():
    lam, tol = 0.1, 1e-3
    model = tiny(3)
    x, y = batch("mse", seed=7)
    g, H = dense_gradient_and_gn(model, x, y, resolve_loss("mse"))
    A = H + lam * torch.eye(H.shape[0], dtype=H.dtype)
    res = lambda k: float((A @ dense_cg(A, -g, k) + g).norm() / g.norm())

    before = params_of(model)
    info = egn_fast.SGN(model, damping=lam, cg_iters=50, cg_tol=tol).step(x, y)
    k = info.cg_iterations
    assert 1 < k < 50
    assert info.relative_residual <= tol
    assert res(k) <= tol * 1.01 and res(k - 1) > tol  # stopped at the first iterate that met it
    assert rel_err(moved(model, before), unflat(model, dense_cg(A, -g, k))) < 1e-8


def test_loss_and_report():
    model = tiny(4)
    x, y = batch("cross_entropy", seed=8)
    fn = resolve_loss("cross_entropy")
    with torch.no_grad():
        want = float(fn.per_sample(model(x), y).mean())
    info = egn_fast.SGN(model, loss="cross_entropy", cg_iters=2).step(x, y)
    assert isinstance(info, egn_fast.SGNInfo)
    assert info.loss == pytest.approx(want, rel=1e-12)
    assert info.cg_iterations == 2 and 0 < info.relative_residual < 1 and info.direction_norm > 0


# ----------------------------------------------------------------------------- optimizer conventions


def test_closure_form_equals_inputs_form():
    model = tiny(5)
    twin = copy.deepcopy(model)
    x, y = batch("cross_entropy", seed=9)
    a = egn_fast.SGN(model, loss="cross_entropy", damping=0.2, cg_iters=4).step(x, y)
    b = egn_fast.SGN(twin, loss="cross_entropy", damping=0.2, cg_iters=4).step(closure=lambda: (twin(x), y))
    assert rel_err(params_of(twin), params_of(model)) < 1e-14
    assert (a.loss, a.cg_iterations) == (b.loss, b.cg_iterations)
    assert b.loss != 0


def test_lr_scales_the_step():
    model = tiny(6)
    twin = copy.deepcopy(model)
    x, y = batch("mse", seed=10)
    before = params_of(model)
    egn_fast.SGN(model, lr=1.0, damping=0.5, cg_iters=5).step(x, y)
    egn_fast.SGN(twin, lr=0.3, damping=0.5, cg_iters=5).step(x, y)
    full = moved(model, before)
    assert flat(full).norm() > 0
    assert rel_err(moved(twin, before), [0.3 * s for s in full]) < 1e-12


def test_param_groups_and_frozen_parameters():
    lam = 0.2
    model = tiny(7)
    model[0].weight.requires_grad_(False)  # frozen: never moves, not part of H or g
    x, y = batch("cross_entropy", seed=11)
    exact = dense_direction(model, x, y, resolve_loss("cross_entropy"), lam)  # over trainable params
    before = params_of(model)
    # groups listed in the opposite of model order, with their own lrs; the frozen weight is included
    opt = egn_fast.SGN(
        model, loss="cross_entropy", damping=lam, cg_iters=59, cg_tol=1e-13,
        params=[{"params": [model[2].weight, model[2].bias], "lr": 0.5}, {"params": [model[0].bias, model[0].weight], "lr": 0.2}],
    )
    opt.step(x, y)
    step = moved(model, before)
    assert torch.equal(step[0], torch.zeros_like(step[0]))
    lrs = [0.2, 0.5, 0.5]  # model order of the trainable ones: l0.bias, l2.weight, l2.bias
    assert rel_err(step[1:], [lr * d for lr, d in zip(lrs, exact)]) < 1e-8


def test_parameters_outside_the_groups_stay_fixed():
    model = tiny(8)
    x, y = batch("mse", seed=12)
    before = params_of(model)
    egn_fast.SGN(model, params=[model[2].weight], cg_iters=3).step(x, y)
    step = moved(model, before)
    assert all(torch.equal(s, torch.zeros_like(s)) for i, s in enumerate(step) if i != 2)
    assert step[2].abs().max() > 0


def test_non_finite_loss_raises_and_leaves_parameters():
    model = tiny(9)
    x, y = batch("mse", seed=13)
    opt = egn_fast.SGN(model)
    bad = x.clone()
    bad[2, 1] = math.nan
    before = params_of(model)
    with pytest.raises(egn_fast.NonFiniteError, match="outputs"):
        opt.step(bad, y)
    # an inf input saturates tanh: outputs and loss are finite, the first layer's factors are not
    bad = x.clone()
    bad[0, 0] = math.inf
    with pytest.raises(egn_fast.NonFiniteError, match="gradient"):
        opt.step(bad, y)
    assert all(torch.equal(p, q) for p, q in zip(params_of(model), before))
    with torch.no_grad():
        model[2].weight.mul_(1e200)  # outputs ~1e200 are finite, ½‖f − y‖² overflows
    before = params_of(model)
    with pytest.raises(egn_fast.NonFiniteError, match="loss"):
        opt.step(x, y)
    assert all(torch.equal(p, q) for p, q in zip(params_of(model), before))


def test_float32_model_close_to_float64_oracle():
    model = tiny(10)
    x, y = batch("cross_entropy", seed=14)
    exact = dense_direction(model, x, y, resolve_loss("cross_entropy"), 0.5)
    model32 = copy.deepcopy(model).float()
    before = params_of(model32)
    egn_fast.SGN(model32, loss="cross_entropy", damping=0.5, cg_iters=59, cg_tol=1e-6).step(x.float(), y)
    step = moved(model32, before)
    assert all(s.dtype == torch.float32 for s in step)
    assert rel_err(step, exact) < 1e-4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr must be"),
        (dict(lr=math.nan), "lr must be"),
        (dict(damping=-0.1), "damping must be"),
        (dict(cg_iters=0), "cg_iters must be"),
        (dict(cg_iters=2.5), "cg_iters must be"),
        (dict(cg_iters=True), "cg_iters must be"),
        (dict(cg_tol=-1e-3), "cg_tol must be"),
        (dict(cg_tol=math.inf), "cg_tol must be"),
        (dict(loss="hinge"), "unknown loss"),
        (dict(backend="nope"), "unknown backend"),
        (dict(params=[nn.Parameter(torch.ones(2))]), "parameter of the model"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        egn_fast.SGN(tiny(0), **kwargs)


def test_model_and_step_argument_errors():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        egn_fast.SGN(lambda x: x)
    model = tiny(0)
    x, y = batch("mse", seed=0)
    opt = egn_fast.SGN(model)
    with pytest.raises(ValueError, match="not both"):
        opt.step(x, y, closure=lambda: (model(x), y))
    with pytest.raises(ValueError, match="pass"):
        opt.step(x)
