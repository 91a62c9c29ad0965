"""Loss heads: S Sᵀ = Q and S w = r against autograd of the per-sample loss, on random outputs."""

import pytest
import torch

import egn_fast
from egn_fast import resolve_loss


def _autograd_r_Q(loss, f, y):
    total = lambda fo: loss.per_sample(fo, y).sum()
    r = torch.func.grad(total)(f)
    H = torch.func.hessian(total)(f)
    Q = torch.stack([H[i, :, i, :] for i in range(f.shape[0])])
    return r, Q


def _targets(name, b, c, g):
    if name == "cross_entropy":
        return torch.randint(0, c, (b,), generator=g)
    if name == "bce":
        return torch.rand(b, c, generator=g, dtype=torch.float64)
    return torch.randn(b, c, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("c", [2, 5])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy", egn_fast.CrossEntropyLoss(reduced=False), "bce"])
def test_head_factors_match_autograd(loss, c):
    g = torch.Generator().manual_seed(c)
    loss = resolve_loss(loss)
    f = 3 * torch.randn(7, c, generator=g, dtype=torch.float64)
    y = loss.check_targets(f, _targets(loss.name, 7, c, g))
    head = loss.head(f, y)
    r, Q = _autograd_r_Q(loss, f, y)
    torch.testing.assert_close(head.r, r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.S @ head.S.transpose(1, 2), Q, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close((head.S @ head.w[:, :, None]).squeeze(2), r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.per_sample, loss.per_sample(f, y))


def test_reduced_cross_entropy_has_one_row_fewer_per_sample():
    f = torch.randn(4, 6, dtype=torch.float64)
    head = egn_fast.CrossEntropyLoss().head(f, torch.tensor([0, 5, 2, 2]))
    assert head.S.shape == (4, 6, 5) and head.w.shape == (4, 5)


def test_cross_entropy_with_saturated_softmax_stays_finite():
    f = torch.tensor([[200.0, -200.0, 0.0]], dtype=torch.float32)
    head = egn_fast.CrossEntropyLoss().head(f, torch.tensor([1]))
    assert torch.isfinite(head.w).all() and torch.isfinite(head.S).all()


def test_mse_value_has_the_half():
    f = torch.tensor([[1.0, 2.0]])
    y = torch.tensor([[0.0, 0.0]])
    assert float(egn_fast.MSELoss().head(f, y).value) == pytest.approx(2.5)


def logcosh(f, y):
    return torch.log(torch.cosh(f - y)).sum()


def test_autograd_loss_from_a_per_sample_function():
    g = torch.Generator().manual_seed(0)
    loss = egn_fast.AutogradLoss(logcosh)
    f = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64)
    head = loss.head(f, y)
    r, Q = _autograd_r_Q(loss, f, y)
    torch.testing.assert_close(head.r, r)
    torch.testing.assert_close(head.S @ head.S.transpose(1, 2), Q, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close((head.S @ head.w[:, :, None]).squeeze(2), r, rtol=1e-9, atol=1e-12)


def test_autograd_loss_rejects_nonconvex_output_hessian():
    loss = egn_fast.AutogradLoss(lambda f, y: -(f - y).square().sum())
    with pytest.raises(ValueError, match="not positive semi-definite"):
        loss.head(torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))


class HalfSquaredScaled(egn_fast.Loss):
    """A custom Loss object that gives only r and S: ℓ = ½ Σ_k a_k (f_k − y_k)², S = diag(√a)."""

    name = "scaled_mse"

    def __init__(self, a):
        self.a = a

    def per_sample(self, f, y):
        return 0.5 * (self.a * (f - y).square()).sum(1)

    def residual_and_factor(self, f, y):
        r = self.a * (f - y)
        return r, torch.diag_embed(self.a.sqrt().expand_as(f))


@pytest.mark.parametrize("loss_kind", ["object", "callable"])
def test_custom_losses_through_direction_match_oracle(loss_kind):
    from models import make
    from oracle import dense_direction, rel_err

    model, x = make("mlp", True, 11)
    y = torch.randn(x.shape[0], 3, dtype=torch.float64)
    a = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    loss = HalfSquaredScaled(a) if loss_kind == "object" else logcosh
    d = egn_fast.direction(model, x, y, loss=loss, damping=0.2)
    want = dense_direction(model, x, y, egn_fast.resolve_loss(loss), 0.2)
    assert rel_err(d, want) < 1e-8


TORCH_MODULES = {
    "MSELoss": (torch.nn.MSELoss(), lambda g: torch.randn(5, 3, generator=g, dtype=torch.float64)),
    "CrossEntropyLoss": (torch.nn.CrossEntropyLoss(), lambda g: torch.randint(0, 3, (5,), generator=g)),
    "BCEWithLogitsLoss": (torch.nn.BCEWithLogitsLoss(), lambda g: torch.rand(5, 3, generator=g, dtype=torch.float64)),
}


@pytest.mark.parametrize("name", sorted(TORCH_MODULES))
def test_torch_loss_modules_give_their_own_lm_direction(name):
    """loss=torch.nn.MSELoss() etc.: the direction −(H + λI)⁻¹g of the module's own value (H, g and λ
    on its scale: MSELoss is (2/c)× our mse), against the dense oracle of the module itself."""
    from models import make
    from oracle import dense_batch_loss_direction, rel_err

    module, make_targets = TORCH_MODULES[name]
    model, x = make("mlp", True, 12)
    y = make_targets(torch.Generator().manual_seed(4))
    info = egn_fast.direction_with_info(model, x, y, loss=module, damping=0.3)
    assert rel_err(info.direction, dense_batch_loss_direction(model, x, y, module, 0.3)) < 1e-8
    assert info.loss == pytest.approx(float(module(model(x).detach(), y)), rel=1e-12)


def test_torch_mse_module_is_our_mse_at_a_rescaled_damping():
    from models import make
    from oracle import rel_err

    model, x = make("mlp", True, 13)
    y = torch.randn(5, 3, dtype=torch.float64)
    d_torch = egn_fast.direction(model, x, y, loss=torch.nn.MSELoss(), damping=0.2)
    d_ours = egn_fast.direction(model, x, y, loss="mse", damping=0.2 * 3 / 2)  # λ·c/2
    assert rel_err(d_torch, d_ours) < 1e-10


@pytest.mark.parametrize(
    "module,match",
    [
        (torch.nn.MSELoss(reduction="sum"), r"MSELoss\(reduction='sum'\) is not supported: .* use reduction='mean'"),
        (torch.nn.CrossEntropyLoss(weight=torch.ones(3)), r"CrossEntropyLoss\(weight=…\) is not supported"),
        (torch.nn.CrossEntropyLoss(label_smoothing=0.1), r"CrossEntropyLoss\(label_smoothing=0.1\) is not supported"),
        (torch.nn.CrossEntropyLoss(ignore_index=0), r"CrossEntropyLoss\(ignore_index=0\) is not supported"),
        (torch.nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), r"BCEWithLogitsLoss\(pos_weight=…\) is not supported"),
        (torch.nn.L1Loss(), r"torch.nn.L1Loss\(\) is not supported; use torch.nn.MSELoss\(\).* a per-sample callable"),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_torch_loss_modules_with_other_options_are_refused(module, match):
    from models import make

    model, x = make("mlp", True, 14)
    y = torch.randint(0, 3, (5,)) if isinstance(module, torch.nn.CrossEntropyLoss) else torch.rand(5, 3, dtype=torch.float64)
    before = {n: v.clone() for n, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        egn_fast.direction(model, x, y, loss=module)
    with pytest.raises(ValueError, match=match):
        egn_fast.EGN(model, loss=module)
    assert all(torch.equal(v, before[n]) for n, v in model.state_dict().items())


def huber(f, y):
    return torch.nn.functional.huber_loss(f, y, reduction="sum", delta=0.5)


@pytest.mark.parametrize("fn", [torch.nn.functional.cross_entropy, huber], ids=["cross_entropy", "huber"])
def test_float32_callable_losses_match_the_oracle(fn):
    """Convex losses with a singular (softmax) or piecewise output Hessian, in float32: the factor is
    computed in float64, so no jitter failure and float32 accuracy."""
    from models import make
    from oracle import dense_direction, rel_err

    model, x = make("mlp", True, 15)
    model, x = model.float(), x.float()
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 3, (5,), generator=g) if fn is torch.nn.functional.cross_entropy else torch.randn(5, 3, generator=g)
    d = egn_fast.direction(model, x, y, loss=fn, damping=0.1)
    assert all(t.dtype == torch.float32 for t in d)
    assert rel_err(d, dense_direction(model, x, y, egn_fast.resolve_loss(fn), 0.1)) < 1e-4


def test_callable_loss_emits_no_warning():
    """torch.func.hessian's forward mode scripts decompositions with the deprecated torch.jit.script
    on first use in a process (a FutureWarning): checked in a fresh interpreter with warnings as errors."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import torch, egn_fast\n"
        "egn_fast.direction(torch.nn.Linear(3, 2), torch.randn(4, 3), torch.randn(4, 2),"
        " loss=lambda f, y: torch.log(torch.cosh(f - y)).sum())\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]


def test_per_token_cross_entropy_is_the_per_sequence_sum_rescaled():
    """loss="cross_entropy" on (b, T, C) is the token mean, (b/N)·(1/b) Σ_i Σ_t: the per-sequence sum
    (a per-sample callable, AutogradLoss) scaled by α = b/N, so its LM direction at λ equals the
    callable's at λ/α."""
    from oracle import dense_direction, rel_err

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    x, y = torch.randn(2, 6, 4, dtype=torch.float64), torch.randint(0, 3, (2, 6))
    y[1, 2] = -100
    N = int((y != -100).sum())

    def per_sequence(f, y):
        return torch.nn.functional.cross_entropy(f.view(6, 3), y, reduction="sum", ignore_index=-100)

    d = egn_fast.direction(model, x, y, loss="cross_entropy", damping=0.2 * 2 / N)
    assert rel_err(d, dense_direction(model, x, y, egn_fast.resolve_loss(per_sequence), 0.2)) < 1e-8


def test_cross_entropy_residual_keeps_its_digits_when_the_model_is_sure_and_right():
    """r_y = p_y − 1 cancels to 0 (or a rounding step) when p_y ≈ 1; the head and the "mc" residual
    give −Σ_{k≠y} p_k, so r sums to zero per sample and S w = r holds to the last digits."""
    ce = resolve_loss("cross_entropy")
    f = torch.tensor([[0.3, 38.0, -60.0], [2.0, -1.5, 0.5]], dtype=torch.float64)
    y = torch.tensor([1, 2])
    p = torch.softmax(f, 1)
    others = p.clone()
    others[torch.arange(2), y] = 0.0
    head = ce.head(f, y)
    for r in (head.r, ce.residual(f, y)):
        assert float(r[0, 1]) == -float(others[0].sum())  # about −2.3e-17; p_y − 1 gives 0 here
        assert float(r.sum(1).abs().max()) < 1e-30 + 1e-16 * float(r.abs().max())
    Sw = (head.S @ head.w[:, :, None])[..., 0]
    # per sample, relative to that sample's r (sample 0's is ~1e-17)
    assert ((Sw - head.r).abs().amax(1) <= 1e-14 * head.r.abs().amax(1)).all()
