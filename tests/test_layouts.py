"""Batch layouts (egn_fast/capture/layout.py, docs/design.md §2.1): samples that are not on dimension 0 of a
layer's input (seq-first layers, x.transpose(0, 1), x.reshape(-1, D)), tensors shared by all samples
(broadcast position ids, a buffer through a Linear), arguments that are not per-sample (masks), and
sample mixing, which is refused. Each case is checked against the dense float64 oracle, with the
awkward T == b among them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import egn_fast
from egn_fast.losses import resolve_loss
from oracle import dense_direction, rel_err

D = 6


def assert_exact(model: nn.Module, x, y: torch.Tensor, loss: str = "mse", damping: float = 0.1) -> None:
    got = egn_fast.direction(model, x, y, loss=loss, damping=damping)
    want = dense_direction(model, x, y, resolve_loss(loss), damping)
    assert rel_err(got, want) < 1e-9


class Encoder(nn.Module):
    """A transformer layer in either layout; the model's own input and output are batch-first."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.enc = nn.TransformerEncoderLayer(D, 2, 8, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(x if self.batch_first else x.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(1))


class Attention(nn.Module):
    """nn.MultiheadAttention with an optional causal (T, T) mask, which must never be sliced per sample."""

    def __init__(self, batch_first: bool, causal: bool):
        super().__init__()
        self.batch_first, self.causal = batch_first, causal
        self.att = nn.MultiheadAttention(D, 2, batch_first=batch_first)
        self.head = nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1) if self.causal else None
        x = x if self.batch_first else x.transpose(0, 1)
        h, _ = self.att(x, x, x, attn_mask=mask, need_weights=False)
        return self.head((h if self.batch_first else h.transpose(0, 1))[:, -1])


@pytest.mark.parametrize("T", [4, 5], ids=["T==b", "T!=b"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_layer_in_either_layout(batch_first, T):
    torch.manual_seed(T)
    assert_exact(Encoder(batch_first).double().eval(), torch.randn(4, T, D, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", [4, 5], ids=["T==b", "T!=b"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_with_a_mask_that_is_not_per_sample(batch_first, T, causal):
    torch.manual_seed(10 + T)
    assert_exact(Attention(batch_first, causal).double(), torch.randn(4, T, D, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))


class Transposed(nn.Module):
    def __init__(self, T: int):
        super().__init__()
        self.fc, self.head = nn.Linear(D, 3), nn.Linear(3 * T, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the Linear sees (T, b, D)
        return self.head(self.fc(x.transpose(0, 1)).transpose(0, 1).reshape(x.shape[0], -1))


class TokensAsRows(nn.Module):
    def __init__(self, T: int, seq_first: bool):
        super().__init__()
        self.seq_first = seq_first
        self.fc, self.head = nn.Linear(D, 3), nn.Linear(3 * T, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the Linear sees (b·T, D), sample-major or not
        b, T, _ = x.shape
        if self.seq_first:
            z = self.fc(x.transpose(0, 1).reshape(-1, D)).view(T, b, 3).transpose(0, 1)
        else:
            z = self.fc(x.reshape(-1, D)).view(b, T, 3)
        return self.head(z.reshape(b, -1))


@pytest.mark.parametrize("T", [4, 5], ids=["T==b", "T!=b"])
def test_linear_on_seq_first_and_folded_inputs(T):
    torch.manual_seed(20 + T)
    x, y = torch.randn(4, T, D, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    for model in (Transposed(T), TokensAsRows(T, False), TokensAsRows(T, True)):
        assert_exact(model.double(), x, y)


class Positions(nn.Module):
    """GPT-2's pattern: position ids (1, T) broadcast over the batch, and a (T, D) buffer through a Linear."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.mix = nn.Embedding(10, D), nn.Embedding(8, D), nn.Linear(D, D)
        self.register_buffer("table", torch.randn(8, D))
        self.head = nn.Linear(D, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(T).unsqueeze(0)) + self.mix(self.table[:T])
        return self.head(torch.tanh(h).mean(1))


def test_shared_tensors_broadcast_over_the_batch_as_batch_size_changes():
    torch.manual_seed(30)
    model = Positions().double()
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    for b, T in [(4, 5), (4, 4), (4, 5), (3, 5), (1, 5)]:  # T == b, a cached plan, smaller batches
        ids, y = torch.randint(0, 10, (b, T)), torch.randint(0, 3, (b,))
        calls.clear()
        got = egn_fast.direction(model, ids, y, loss="cross_entropy", damping=0.1)
        assert len(calls) <= 2  # a new plan: the forward and, when new tensors are shared, one with them expanded
        assert rel_err(got, dense_direction(model, ids, y, resolve_loss("cross_entropy"), 0.1)) < 1e-9
    calls.clear()
    egn_fast.direction(model, torch.randint(0, 10, (1, 5)), torch.randint(0, 3, (1,)), loss="cross_entropy", damping=0.1)
    assert len(calls) == 1  # a known pattern costs one forward


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(D, 2)), nn.Parameter(torch.randn(D, 2))

    def forward(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        return x @ (self.w1 if first else self.w2)


def test_plan_follows_which_parameters_a_forward_uses():
    torch.manual_seed(40)
    model, x, y = Branching().double(), torch.randn(4, D, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    for first in (True, False, True):
        got = egn_fast.direction(model, (x, first), y, loss="mse", damping=0.1)
        used = model.w1 if first else model.w2
        other = model.w2 if first else model.w1
        got_used = got[[p is used for p in model.parameters()].index(True)]
        # the oracle: d for the one used matrix; the unused one gets no step
        g = x.T @ (x @ used - y) / 4
        H = torch.kron(x.T @ x / 4, torch.eye(2, dtype=x.dtype))  # rows: (i, j) of used[i, j]
        want = -torch.linalg.solve(H + 0.1 * torch.eye(2 * D, dtype=x.dtype), g.reshape(-1)).view(D, 2)
        assert torch.allclose(got_used, want, rtol=1e-9, atol=1e-12)
        assert torch.equal(got[[p is other for p in model.parameters()].index(True)], torch.zeros_like(other))


class MeanCentred(nn.Module):
    def __init__(self, batch_norm: bool):
        super().__init__()
        self.batch_norm = batch_norm
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, 2)
        self.register_buffer("running_mean", torch.randn(D))
        self.register_buffer("running_var", torch.rand(D) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.batch_norm:
            return self.b(F.batch_norm(h, self.running_mean, self.running_var, training=True))
        return self.b(h - h.mean(0))


@pytest.mark.parametrize("batch_norm", [False, True], ids=["x-x.mean(0)", "F.batch_norm"])
def test_sample_mixing_is_refused_and_the_model_left_as_it_was(batch_norm):
    torch.manual_seed(50)
    model = MeanCentred(batch_norm).double()
    model.a.weight.grad = torch.randn_like(model.a.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grad = model.a.weight.grad.clone()
    with pytest.raises(ValueError, match=r"module 'a' \(Linear\).*mixes samples"):
        egn_fast.direction(model, torch.randn(4, D, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model.a.weight.grad, grad)


def test_a_buffer_updated_by_the_forward_changes_once_per_step():
    """A model whose forward counts its calls (like running statistics): re-runs of the forward
    for a new plan are undone, so one direction() is one update."""

    class Counting(Positions):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            self.table[0].add_(1.0)
            return super().forward(ids)

    torch.manual_seed(60)
    model = Counting().double()
    start = model.table[0].clone()
    egn_fast.direction(model, torch.randint(0, 10, (4, 5)), torch.randint(0, 3, (4,)), loss="cross_entropy", damping=0.1)
    assert torch.equal(model.table[0], start + 1)


class TwoOutputs(nn.Module):
    """A custom module (generic rule) whose second output is computed from its first."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(x * self.a)
        return h, h * h


class UsesBoth(nn.Module):
    def __init__(self):
        super().__init__()
        self.two, self.out = TwoOutputs(), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, q = self.two(x)
        return self.out(torch.cat([h, q], 1))


def test_outputs_computed_from_one_another_are_not_counted_twice():
    torch.manual_seed(70)
    assert_exact(UsesBoth().double(), torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64))
