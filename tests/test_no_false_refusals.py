"""Architectures that were refused although exact rows exist (found by a fuzz against the dense
oracle), now exact: a path dead for the two probed samples but alive for others, a root module
owning a parameter with recurrent layers inside (the torch.func rule, which cannot vmap them), and
a constant table through a layer that the model broadcasts itself. The checks that catch real
sample mixing still refuse (tests/test_layouts.py, the fuzz's `mixing` family)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import egn_fast
from egn_fast.capture.plan import _PLANS
from egn_fast.losses import resolve_loss
from oracle import dense_direction, rel_err

D = 6


def direction_error(model: nn.Module, x, y: torch.Tensor, loss: str, damping: float = 0.1) -> float:
    got = egn_fast.direction(model, x, y, loss=loss, damping=damping)
    return rel_err(got, dense_direction(model, x, y, resolve_loss(loss), damping))


def switches(b: int) -> torch.Tensor:
    """+1 per sample, −1 for samples 0 and b − 1 (the two the layout probe asks first)."""
    s = torch.ones(b, dtype=torch.float64)
    s[0] = s[-1] = -1
    return s


class ScaleShift(nn.Module):
    """A custom module (the torch.func rule covers it): x·γ + β."""

    def __init__(self, n: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(n) + 0.5)
        self.beta = nn.Parameter(torch.randn(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma + self.beta


class GatedScaleShift(nn.Module):
    """ReLU → ScaleShift → a ReLU gate that is off for switched-off samples: the ScaleShift's
    outputs move no output of samples 0 and b − 1, but do move the others'."""

    def __init__(self):
        super().__init__()
        self.inp, self.ss, self.head = nn.Linear(D, D), ScaleShift(D), nn.Linear(D, 2)

    def forward(self, x: torch.Tensor, switch: torch.Tensor) -> torch.Tensor:
        h = self.ss(F.relu(self.inp(x)))
        return self.head(F.relu(h + 100 * switch[:, None]))


class GatedSeqFirstAttention(nn.Module):
    """GELU → seq-first MultiheadAttention (the torch.func rule) with an in-place residual, then the gate."""

    def __init__(self):
        super().__init__()
        self.inp, self.att, self.head = nn.Linear(D, D), nn.MultiheadAttention(D, 2), nn.Linear(D, 3)

    def forward(self, x: torch.Tensor, switch: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.inp(x)).transpose(0, 1)  # (T, b, D)
        a, _ = self.att(h, h, h, need_weights=False)
        h += a
        return self.head(F.relu(h.transpose(0, 1).mean(1) + 100 * switch[:, None]))


@pytest.mark.parametrize("b", [5, 3])
def test_a_module_dead_for_the_probed_samples_but_alive_for_others(b):
    torch.manual_seed(b)
    model = GatedScaleShift().double()
    x, y = torch.randn(b, D, dtype=torch.float64), torch.randn(b, 2, dtype=torch.float64)
    assert direction_error(model, (x, switches(b)), y, "mse") < 1e-10
    # the layouts were read from the live samples, so the plan is kept (not re-probed every step)
    assert any(pattern.plans for pattern in _PLANS[model].values())  # only plans not guessed are kept


@pytest.mark.parametrize("T", [4, 5], ids=["T==b", "T!=b"])
def test_seq_first_attention_dead_for_the_probed_samples(T):
    torch.manual_seed(T)
    model = GatedSeqFirstAttention().double()
    b = 4
    x, y = torch.randn(b, T, D, dtype=torch.float64), torch.randn(b, 3, dtype=torch.float64)
    assert direction_error(model, (x, switches(b)), y, "mse") < 1e-9  # attention re-runs sum in another order


class RootWithParameter(nn.Module):
    """A root module that owns a parameter used in its own forward, so the torch.func rule covers
    the root (re-running everything inside it per sample), with a layer vmap cannot batch."""

    def __init__(self, inner: str):
        super().__init__()
        self.inner_kind = inner
        self.scale = nn.Parameter(torch.rand(D) + 0.5)
        self.emb = nn.Embedding(10, D, padding_idx=0)
        self.inner = {"gru": nn.GRU(D, D, batch_first=True), "lstm": nn.LSTM(D, D), "batch_norm": nn.BatchNorm1d(D)}[inner]
        self.head = nn.Linear(D, 3)

    def forward(self, ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) * self.scale + feats
        if self.inner_kind == "gru":
            h = self.inner(h)[0]
        elif self.inner_kind == "lstm":
            h = self.inner(h.transpose(0, 1))[0].transpose(0, 1)
        else:
            h = self.inner(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h.mean(1))


@pytest.mark.parametrize("T", [4, 5], ids=["T==b", "T!=b"])
@pytest.mark.parametrize("inner", ["gru", "lstm", "batch_norm"])
def test_root_owning_a_parameter_with_recurrent_layers_inside(inner, T):
    torch.manual_seed(len(inner) + T)
    model = RootWithParameter(inner).double()
    if inner == "batch_norm":
        model.eval()  # running statistics: per sample
        with torch.no_grad():
            model.inner.running_mean.normal_()
            model.inner.running_var.uniform_(0.5, 2.0)
    b = 4
    ids = torch.randint(1, 10, (b, T))
    ids[0, 0] = 0  # a padding token
    feats, y = torch.randn(b, T, D, dtype=torch.float64), torch.randint(0, 3, (b,))
    assert direction_error(model, (ids, feats), y, "cross_entropy") < 1e-10


class Tanh(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.rand(D) + 0.5)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(t * self.w)


class TableFeatures(nn.Module):
    """A constant (T, D) table through a layer, broadcast by the model itself: `x + pf(table)[None]`.
    Handing pf's output on as b copies would change the output's shape."""

    def __init__(self, layer: str, T: int):
        super().__init__()
        self.register_buffer("table", torch.randn(T, D))
        self.pf = nn.Linear(D, D) if layer == "linear" else Tanh()
        self.inp, self.head = nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) + self.pf(self.table)[None]
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("layer", ["linear", "generic"])
def test_a_constant_table_broadcast_by_the_model(layer, loss):
    torch.manual_seed(7)
    T = 5
    model = TableFeatures(layer, T).double()
    for b in (5, 3, 5):  # T == b, another batch size, and back (the shared outputs are remembered)
        x = torch.randn(b, T, D, dtype=torch.float64)
        y = torch.randn(b, 3, dtype=torch.float64) if loss == "mse" else torch.randint(0, 3, (b,))
        assert direction_error(model, x, y, loss) < 1e-10


class CenteredTable(nn.Module):
    """The same broadcast, but the layer's input is the batch itself, centered: samples mix."""

    def __init__(self):
        super().__init__()
        self.pf, self.head = nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.pf(x.mean(0))  # (T, D) from every sample's input
        return self.head(torch.tanh(x + z[None]).mean(1))


def test_a_broadcast_layer_fed_by_the_batch_is_still_refused():
    torch.manual_seed(8)
    model = CenteredTable().double()
    x, y = torch.randn(4, 5, D, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="mixes samples"):
        egn_fast.direction(model, x, y, loss="mse", damping=0.1)
