"""Per-token cross-entropy and the row estimators (exact / mc / empirical) against the dense
float64 oracle: J by torch.func, the loss's g and H (or Ĥ rebuilt from the drawn labels) by
autograd of F.cross_entropy, the d×d solve."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import egn_fast
from egn_fast.checks import check_row_space
from egn_fast.losses.curvature import rows_for
from oracle import dense_batch_loss_direction, dense_jacobian, flat, rel_err, unflat
from token_models import TinyGPT, randomize, sampled_hessian, seq_ce_sum, token_data

V, T = 5, 6


def token_ce(f: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(f.reshape(-1, V), y.reshape(-1))


def damped_direction(model: nn.Module, ids: Tensor, targets: Tensor, batch_loss, H: Tensor, lam: float) -> list[Tensor]:
    out, J = dense_jacobian(model, ids)
    g = J.T @ torch.func.grad(lambda v: batch_loss(v.view(out.shape), targets))(out.reshape(-1))
    return unflat(model, -torch.linalg.solve(H + lam * torch.eye(H.shape[0], dtype=H.dtype), g))


@pytest.fixture(params=[(3, 0), (T, 1)], ids=["b3", "T==b"])
def gpt(request):
    b, seed = request.param
    model = randomize(TinyGPT(V, 8, 1, 2, T).double(), seed + 10)
    ids, y = token_data(b, T, V, seed)
    return model, ids, y


def test_token_loss_value_is_torchs(gpt):
    model, ids, y = gpt
    f = model(ids)
    f = f.detach()
    assert float(egn_fast.resolve_loss("cross_entropy").batch_mean(f, y)) == pytest.approx(float(token_ce(f, y)), rel=1e-12)


def test_exact_per_token_matches_oracle(gpt):
    model, ids, y = gpt
    got = egn_fast.direction(model, ids, y, loss="cross_entropy", damping=0.3)
    assert rel_err(got, dense_batch_loss_direction(model, ids, y, token_ce, 0.3)) < 1e-8


@pytest.mark.parametrize("k", [1, 3])
def test_mc_matches_oracle_for_its_draws(gpt, k):
    model, ids, y = gpt
    info = egn_fast.direction_with_info(model, ids, y, loss="cross_entropy", damping=0.3, curvature="mc", mc_samples=k,
                                        generator=torch.Generator().manual_seed(5))
    assert info.samples.shape == (k, *y.shape) and info.samples.dtype == torch.long
    assert ((info.samples == -100) == (y == -100)).all()  # ignored tokens stay ignored
    N = int((y != -100).sum())
    H = sampled_hessian(model, ids, info.samples, seq_ce_sum, N * k)
    want = damped_direction(model, ids, y, token_ce, H, 0.3)
    assert rel_err(info.direction, want) < 1e-8
    d = flat(want)
    out, J = dense_jacobian(model, ids)
    g = J.T @ torch.func.grad(lambda v: token_ce(v.view(out.shape), y))(out.reshape(-1))
    sol = info.solution  # the Woodbury by-products
    assert sol.gtd == pytest.approx(float(g @ d), rel=1e-8)
    assert sol.dHd == pytest.approx(float(d @ H @ d), rel=1e-8)
    assert sol.dnorm2 == pytest.approx(float(d @ d), rel=1e-8)
    assert info.m == y.shape[0] * k


def test_empirical_matches_oracle(gpt):
    model, ids, y = gpt
    got = egn_fast.direction(model, ids, y, loss="cross_entropy", damping=0.3, curvature="empirical")
    N = int((y != -100).sum())
    H = sampled_hessian(model, ids, y[None], seq_ce_sum, N)  # the "mc" estimator with the true labels
    assert rel_err(got, damped_direction(model, ids, y, token_ce, H, 0.3)) < 1e-8


def test_generator_makes_draws_reproducible(gpt):
    model, ids, y = gpt
    run = lambda seed: egn_fast.direction_with_info(model, ids, y, loss="cross_entropy", curvature="mc", mc_samples=2,
                                                    generator=torch.Generator().manual_seed(seed))
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.samples, b.samples) and flat(a.direction).equal(flat(b.direction))
    assert not torch.equal(a.samples, c.samples)


def test_fully_ignored_sequence_counts_for_nothing():
    """A sequence whose tokens are all ignored adds no rows and no loss: the direction equals that
    of the batch without it (the token mean has the same N)."""
    model = randomize(TinyGPT(V, 8, 1, 2, T).double(), 3)
    ids, y = token_data(4, T, V, 3, ignored=0)
    y_masked = y.clone()
    y_masked[2] = -100
    keep = torch.tensor([0, 1, 3])
    got = egn_fast.direction(model, ids, y_masked, loss="cross_entropy", damping=0.5)
    want = egn_fast.direction(model, ids[keep], y[keep], loss="cross_entropy", damping=0.5)
    # the two systems differ in b (K + bλI): the same d needs λ scaled the same way, which it is
    assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("loss, per_sample, make_targets", [
    ("cross_entropy", lambda f, y: F.cross_entropy(f, y), lambda g: torch.randint(7, (4,), generator=g)),
    ("mse", lambda f, y: 0.5 * (f - y).square().sum(), lambda g: torch.randn(4, 7, generator=g, dtype=torch.float64)),
    ("bce", lambda f, y: F.binary_cross_entropy_with_logits(f, y, reduction="sum"),
     lambda g: torch.rand(4, 7, generator=g, dtype=torch.float64)),
])
def test_mc_on_per_sample_outputs(loss, per_sample, make_targets):
    """(b, C) outputs: m = b·k rows instead of b·(C−1); exact for the drawn targets."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 7)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    y = make_targets(torch.Generator().manual_seed(1))
    info = egn_fast.direction_with_info(model, x, y, loss=loss, damping=0.2, curvature="mc", mc_samples=2,
                                        generator=torch.Generator().manual_seed(2))
    assert info.m == 8
    H = sampled_hessian(model, x, info.samples, per_sample, 4 * 2)
    batch = lambda f, t: torch.func.vmap(per_sample)(f, t).mean()
    assert rel_err(info.direction, damped_direction(model, x, y, batch, H, 0.2)) < 1e-8


def test_mc_rows_are_unbiased():
    """The average of the drawn rows' S Sᵀ approaches the exact factor's (Q_i, per token) as the
    draws grow: error ~ 1/√k, and far above it for a wrong estimator."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, T * V, generator=g, dtype=torch.float64)
    _, y = token_data(2, T, V, 4)
    loss = egn_fast.CrossEntropyLoss()
    exact = loss.head(f, y).S
    Q = exact @ exact.transpose(1, 2)
    errors = {}
    for k in (400, 40_000):
        S = rows_for(loss, f, y, "mc", k, torch.Generator().manual_seed(1)).head.S
        errors[k] = float((S @ S.transpose(1, 2) - Q).norm() / Q.norm())
    assert errors[40_000] < 0.03 and errors[40_000] < errors[400] / 6  # 1/√k: a factor 10
    # the empirical rows (true labels) are not an estimate of Q
    E = rows_for(loss, f, y, "empirical").head.S
    assert float((E @ E.transpose(1, 2) - Q).norm() / Q.norm()) > 0.3


def test_optimizer_mc_resume_is_bit_identical():
    def make():
        torch.manual_seed(0)
        return randomize(TinyGPT(V, 8, 1, 2, T), 2)

    batches = [token_data(4, T, V, s) for s in range(5)]
    model = make()
    opt = egn_fast.EGN(model, loss="cross_entropy", curvature="mc", mc_samples=2, lr=0.5, damping=1.0, momentum=0.9,
                       generator=torch.Generator().manual_seed(7))
    for ids, y in batches[:3]:
        opt.step(ids, y)
    buffer = io.BytesIO()
    torch.save((model.state_dict(), opt.state_dict()), buffer)  # a checkpoint on disk
    for ids, y in batches[3:]:
        opt.step(ids, y)
    buffer.seek(0)
    saved_model, saved_opt = torch.load(buffer)
    resumed = make()
    resumed.load_state_dict(saved_model)
    opt2 = egn_fast.EGN(resumed, loss="cross_entropy", curvature="mc", mc_samples=2, lr=0.5, damping=1.0, momentum=0.9,
                        generator=torch.Generator().manual_seed(99))  # another seed: the state_dict decides
    opt2.load_state_dict(saved_opt)
    for ids, y in batches[3:]:
        opt2.step(ids, y)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_optimizer_mc_lowers_the_loss():
    torch.manual_seed(0)
    model = randomize(TinyGPT(V, 8, 1, 2, T), 2)
    ids, y = token_data(8, T, V, 0)
    opt = egn_fast.EGN(model, loss="cross_entropy", curvature="mc", mc_samples=4, damping=1.0, line_search="armijo")
    first = opt.step(ids, y).loss
    for _ in range(5):
        last = opt.step(ids, y).loss
    assert last < first - 0.05


@pytest.mark.parametrize("kwargs, match", [
    (dict(curvature="fisher"), "unknown curvature"),
    (dict(curvature="mc", mc_samples=0), "mc_samples must be an int"),
    (dict(curvature="exact", mc_samples=2), "is for curvature='mc'"),
    (dict(curvature="mc", damping=0.0), "needs damping > 0"),
    (dict(curvature="mc", generator=3), "torch.Generator"),
    (dict(curvature="mc", loss=lambda f, y: F.cross_entropy(f.view(-1, V), y, reduction="sum")), "predictive distribution"),
    (dict(loss=nn.CrossEntropyLoss()), "classes\\s+on dimension 1"),
])
def test_refusals(kwargs, match):
    model = randomize(TinyGPT(V, 8, 1, 2, T).double(), 1)
    ids, y = token_data(2, T, V, 0)
    with pytest.raises(ValueError, match=match):
        egn_fast.direction(model, ids, y, **{"loss": "cross_entropy", **kwargs})


def test_refuses_classes_not_last_and_all_ignored():
    model = randomize(TinyGPT(V, 8, 1, 2, T).double(), 1)
    ids, y = token_data(2, T, V, 0)
    with pytest.raises(ValueError, match="classes last"):
        egn_fast.build_system(model, closure=lambda: (model(ids).transpose(1, 2), y), loss="cross_entropy")
    with pytest.raises(ValueError, match="every target is ignore_index"):
        egn_fast.direction(model, ids, torch.full_like(y, -100), loss="cross_entropy")
    with pytest.raises(ValueError, match=r"out of range \[0, 5\)"):
        egn_fast.direction(model, ids, y.clamp(min=0) + 5, loss="cross_entropy")


def test_row_space_guard_names_mc():
    with pytest.warns(RuntimeWarning, match="curvature='mc'"):
        check_row_space(12_000, 1, torch.float32, torch.device("cpu"))


def test_optimizer_mc_with_momentum_and_adaptive_damping():
    """s is not a multiple of d (momentum), so ρ needs sᵀĤs: from the layer factors (a double
    backward through CPU attention would raise). ρ is finite every step and moves λ."""
    torch.manual_seed(0)
    model = randomize(TinyGPT(V, 8, 1, 2, T), 2)
    opt = egn_fast.EGN(model, loss="cross_entropy", curvature="mc", mc_samples=2, damping=1.0, momentum=0.9,
                       adaptive_damping=True, lr=0.5)
    infos = [opt.step(*token_data(8, T, V, s)) for s in range(4)]
    assert all(i.rho is not None and torch.isfinite(torch.tensor(i.rho)) for i in infos)
    assert len({i.damping for i in infos}) > 1  # ρ moved λ


class Shifted(nn.Module):
    """logits[:, :-1] of a model: a non-contiguous (b, T−1, V) view, as in the README's closure."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm(ids)[:, :-1]


@pytest.mark.parametrize("curvature", ["exact", "mc"])
def test_sliced_logits(curvature):
    lm = randomize(TinyGPT(V, 8, 1, 2, T).double(), 6)
    ids, _ = token_data(3, T, V, 8, ignored=0)
    y = ids[:, 1:]
    system = egn_fast.build_system(lm, closure=lambda: (lm(ids)[:, :-1], y), loss="cross_entropy", curvature=curvature,
                                   generator=torch.Generator().manual_seed(0))
    _, d = system.solve_and_backproject(0.4)
    model = Shifted(lm)
    if curvature == "exact":
        want = dense_batch_loss_direction(model, ids, y, lambda f, t: F.cross_entropy(f.reshape(-1, V), t.reshape(-1)), 0.4)
    else:
        H = sampled_hessian(model, ids, system.samples, lambda f, t: F.cross_entropy(f.view(-1, V), t, reduction="sum"),
                            y.numel())
        want = damped_direction(model, ids, y, lambda f, t: F.cross_entropy(f.reshape(-1, V), t.reshape(-1)), H, 0.4)
    assert rel_err(d, want) < 1e-8


def test_mc_rows_in_chunks_equal_one_call(monkeypatch):
    import egn_fast.losses.curvature as curvature

    f = torch.randn(3, T * V, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, y = token_data(3, T, V, 1)
    loss = egn_fast.CrossEntropyLoss()
    whole = rows_for(loss, f, y, "mc", 5, torch.Generator().manual_seed(2)).head.S
    monkeypatch.setattr(curvature, "_CHUNK_ELEMENTS", 2 * 3 * T * V)  # 2 draws per chunk: 3 chunks
    chunked = rows_for(loss, f, y, "mc", 5, torch.Generator().manual_seed(2)).head.S
    assert torch.equal(whole, chunked)


def test_preconditioner_with_mc_rows_writes_minus_the_direction():
    model = randomize(TinyGPT(V, 8, 1, 2, T).double(), 9)
    ids, y = token_data(3, T, V, 10)
    want = egn_fast.direction(model, ids, y, loss="cross_entropy", damping=0.5, curvature="mc", mc_samples=2,
                              generator=torch.Generator().manual_seed(4))
    egn_fast.EGNPreconditioner(model, loss="cross_entropy", damping=0.5, curvature="mc", mc_samples=2,
                               generator=torch.Generator().manual_seed(4)).step(ids, y)
    assert all(torch.equal(p.grad, -d) for p, d in zip(model.parameters(), want))
    with pytest.raises(ValueError, match="needs damping > 0"):
        egn_fast.EGNPreconditioner(model, loss="cross_entropy", damping=0.0, curvature="mc")
