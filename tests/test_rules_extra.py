"""The rules for recurrent layers and cells, PReLU, InstanceNorm, EmbeddingBag, attention and parametrized modules
against the dense float64 oracle, and the clear refusals of what is not per-sample (the model
left bit-identical after a refused call)."""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

import egn_fast
from egn_fast import resolve_loss
from egn_fast.rules import recurrent
from oracle import dense_direction, rel_err

OUT = 3


def _targets(loss: str, b: int) -> Tensor:
    return torch.randint(0, OUT, (b,)) if loss == "cross_entropy" else torch.randn(b, OUT, dtype=torch.float64)


def _check_exact(model: nn.Module, x, loss: str = "mse", oracle_model: nn.Module | None = None, b: int | None = None) -> None:
    """egn_fast.direction vs the oracle (on `oracle_model`, default the model itself): relative error < 1e-9.
    b: the batch size, when it is not the first input's leading dimension."""
    b = b or (x[0] if isinstance(x, tuple) else x).shape[0]
    y = _targets(loss, b)
    d = egn_fast.direction(model, x, y, loss=loss, damping=0.1)
    err = rel_err(d, dense_direction(oracle_model or model, x, y, resolve_loss(loss), 0.1))
    assert err < 1e-9


def _check_refused(model: nn.Module, x, match: str) -> None:
    """ValueError matching `match`; parameters, buffers and .grad untouched."""
    before = copy.deepcopy(model.state_dict())
    y = _targets("mse", (x[0] if isinstance(x, tuple) else x).shape[0])
    with pytest.raises(ValueError, match=match):
        egn_fast.direction(model, x, y)
    assert all(torch.equal(v, before[n]) for n, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- recurrent layers


class RecurrentNet(nn.Module):
    """x (b, T, 3) always batch-major; the recurrent layer sees (T, b, 3) when not batch_first.
    head "output": its last step; "h_n": the last layer's final state. h0 (and c0) from a Linear
    of the first step (batch at dim 1: (layers·directions, b, H)) when init_state."""

    def __init__(self, cls: type[nn.RNNBase], batch_first: bool, head: str, init_state: bool, **kw):
        super().__init__()
        self.rnn = cls(3, 4, batch_first=batch_first, **kw)
        self.head, self.init_state = head, init_state
        D = 2 if self.rnn.bidirectional else 1
        H_out = self.rnn.proj_size or 4
        self.init = nn.Linear(3, self.rnn.num_layers * D * H_out)
        self.out = nn.Linear(D * H_out if head == "output" else H_out, OUT)

    def forward(self, x: Tensor) -> Tensor:
        b, L = x.shape[0], self.rnn.num_layers * (2 if self.rnn.bidirectional else 1)
        args: tuple = (x if self.rnn.batch_first else x.transpose(0, 1),)
        if self.init_state:
            h0 = torch.tanh(self.init(x[:, 0])).view(b, L, -1).transpose(0, 1)
            args += ((h0, torch.cos(h0[..., :1]).expand(L, b, 4).contiguous()) if isinstance(self.rnn, nn.LSTM) else h0,)
        output, h_n = self.rnn(*args)
        if isinstance(h_n, tuple):
            h_n = h_n[0] + h_n[1][..., : h_n[0].shape[-1]]  # h_n and c_n both reach the loss
        last = output[:, -1] if self.rnn.batch_first else output[-1]
        return self.out(last if self.head == "output" else h_n[-1])


RECURRENT_CONFIGS = [  # (batch_first, head, init_state, (b, T), loss, extra module arguments)
    (True, "output", False, (5, 3), "mse", {}),
    (False, "h_n", True, (3, 3), "mse", {}),  # T == b == s
    (False, "output", True, (4, 4), "cross_entropy", dict(num_layers=2, bidirectional=True)),  # T == b
    (True, "h_n", True, (3, 5), "mse", dict(num_layers=2, bidirectional=True, bias=False)),
]


@pytest.mark.parametrize("config", RECURRENT_CONFIGS, ids=lambda c: f"bf={c[0]}-{c[1]}-h0={c[2]}-bT={c[3]}-{c[4]}-{c[5]}")
@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM])
def test_recurrent_layers_match_the_oracle(cls, config):
    batch_first, head, init_state, (b, T), loss, kw = config
    torch.manual_seed(zlib.crc32(repr((cls.__name__, config)).encode()))
    model = RecurrentNet(cls, batch_first, head, init_state, **kw).double()
    _check_exact(model, torch.randn(b, T, 3, dtype=torch.float64), loss)


@pytest.mark.parametrize("cls, kw", [(nn.RNN, dict(nonlinearity="relu")), (nn.LSTM, dict(proj_size=2, num_layers=2))])
def test_relu_rnn_and_projected_lstm_match_the_oracle(cls, kw):
    torch.manual_seed(4)
    model = RecurrentNet(cls, False, "output", True, **kw).double()
    _check_exact(model, torch.randn(4, 4, 3, dtype=torch.float64), "cross_entropy")


class CellNet(nn.Module):
    """A cell looped over x (b, T, 3) (one module, T calls), state from a Linear; the head reads
    the last h (and c, for an LSTMCell, when read="c" or "both")."""

    def __init__(self, cell: nn.RNNCellBase, read: str):
        super().__init__()
        self.cell, self.read = cell, read
        self.init, self.out = nn.Linear(3, 4), nn.Linear(4, OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.init(x[:, 0]))
        state = (h, torch.sin(h)) if isinstance(self.cell, nn.LSTMCell) else h
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        if not isinstance(state, tuple):
            return self.out(state)
        h, c = state
        return self.out({"h": h, "c": c, "both": h + c}[self.read])


@pytest.mark.parametrize("cell, read", [(nn.RNNCell(3, 4, nonlinearity="relu"), "h"), (nn.GRUCell(3, 4), "h"),
                                        (nn.LSTMCell(3, 4), "h"), (nn.LSTMCell(3, 4), "c"), (nn.LSTMCell(3, 4, bias=False), "both")],
                         ids=["rnn_relu", "gru", "lstm_h", "lstm_c", "lstm_both_nobias"])
def test_recurrent_cells_match_the_oracle(cell, read):
    torch.manual_seed(6)
    _check_exact(CellNet(cell, read).double(), torch.randn(3, 3, 3, dtype=torch.float64), "cross_entropy")  # T == b


def test_recurrent_dropout_is_exact_in_eval_and_refused_in_train():
    torch.manual_seed(5)
    model = RecurrentNet(nn.GRU, True, "output", False, num_layers=2, dropout=0.3).double()
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    _check_exact(model.eval(), x)
    _check_refused(model.train(), x, r"module 'rnn' \(GRU\) applies dropout between layers in train mode.*\.eval\(\)")


def test_packed_sequences_are_refused():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.out = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, OUT)

        def forward(self, x: Tensor) -> Tensor:
            packed = nn.utils.rnn.pack_padded_sequence(x, [3, 2, 2, 1], batch_first=True)
            return self.out(self.rnn(packed)[1][0][-1])

    _check_refused(Packed().double(), torch.randn(4, 3, 3, dtype=torch.float64), r"received a PackedSequence.*pad_packed_sequence")


def test_a_re_implementation_that_does_not_reproduce_the_module_is_refused(monkeypatch):
    exact = recurrent.run_recurrence
    monkeypatch.setattr(recurrent, "run_recurrence", lambda *a: tuple(1.001 * o for o in exact(*a)))
    model = RecurrentNet(nn.RNN, True, "output", False).double()
    _check_refused(model, torch.randn(4, 3, 3, dtype=torch.float64), r"module 'rnn' \(RNN\) is not reproduced")


# ----------------------------------------------------------------------------- PReLU, InstanceNorm, attention, bags


@pytest.mark.parametrize("b", [3, 5])  # b == s (mse, 3 outputs) and not
@pytest.mark.parametrize("num_parameters, spatial", [(1, False), (4, False), (1, True), (4, True)])
def test_prelu_matches_the_oracle(num_parameters, spatial, b):
    torch.manual_seed(num_parameters + 2 * spatial + b)
    if spatial:  # (b, C, H, W)
        model = nn.Sequential(nn.Conv2d(2, 4, 2), nn.PReLU(num_parameters), nn.Flatten(), nn.Linear(4 * 2 * 3, OUT))
        x = torch.randn(b, 2, 3, 4, dtype=torch.float64)
    else:  # (b, C)
        model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(num_parameters), nn.Linear(4, OUT))
        x = torch.randn(b, 4, dtype=torch.float64)
    model = model.double()
    with torch.no_grad():
        model[1].weight.uniform_(-0.5, 0.5)
    _check_exact(model, x)


@pytest.mark.parametrize("track_running_stats, training", [(False, True), (False, False), (True, False)])
def test_instance_norm_matches_the_oracle(track_running_stats, training):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv1d(2, 4, 2), nn.InstanceNorm1d(4, affine=True, track_running_stats=track_running_stats),
                          nn.Tanh(), nn.Flatten(), nn.Linear(20, OUT)).double()
    with torch.no_grad():
        model[1].weight.normal_()
        model[1].bias.normal_()
        if track_running_stats:
            model[1].running_mean.normal_()
            model[1].running_var.uniform_(0.5, 2.0)
    _check_exact(model.train(training), torch.randn(5, 2, 6, dtype=torch.float64), "cross_entropy")


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_with_its_default_need_weights_matches_the_oracle(batch_first):
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.out = nn.MultiheadAttention(4, 2, batch_first=batch_first), nn.Linear(4, OUT)

        def forward(self, x: Tensor) -> Tensor:  # x (b, T, 4)
            h = x if batch_first else x.transpose(0, 1)
            a, weights = self.attn(h, h, h)  # need_weights=True: the averaged weights (b, T, T) are an output too
            a = a if batch_first else a.transpose(0, 1)
            return self.out(a.mean(1) + weights.sum(2)[:, :1])

    torch.manual_seed(8)
    for b in (3, 5):  # T == b and not
        _check_exact(Attention().double(), torch.randn(b, 3, 4, dtype=torch.float64))


class Bags(nn.Module):
    """EmbeddingBag (padding_idx 0) on 2-D bags (b, bag) or a 1-D input with offsets."""

    def __init__(self, mode: str, include_last_offset: bool = False):
        super().__init__()
        self.bag = nn.EmbeddingBag(7, 4, mode=mode, padding_idx=0, include_last_offset=include_last_offset)
        self.out = nn.Linear(4, OUT)

    def forward(self, tokens: Tensor, offsets: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
        return self.out(torch.tanh(self.bag(tokens, offsets, per_sample_weights=weights)))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_on_2d_bags_matches_the_oracle(mode):
    torch.manual_seed(9)
    tokens = torch.randint(0, 7, (3, 4))
    weights = torch.rand(3, 4, dtype=torch.float64) if mode == "sum" else None  # per_sample_weights
    _check_exact(Bags(mode).double(), (tokens, None, weights))


@pytest.mark.parametrize("include_last_offset", [False, True])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_with_offsets_maps_bags_to_samples_exactly(mode, include_last_offset):
    torch.manual_seed(10)
    tokens = torch.randint(0, 7, (9,))
    offsets = torch.tensor([0, 3, 3, 5] + ([9] if include_last_offset else []))  # bag lengths 3, 0 (empty), 2, 4
    weights = torch.rand(9, dtype=torch.float64) if mode == "sum" else None
    _check_exact(Bags(mode, include_last_offset).double(), (tokens, offsets, weights), "cross_entropy", b=4)


def test_clear_refusals_leave_the_model_untouched():
    tokens = torch.randint(0, 7, (4, 3))
    for table in (nn.Embedding(7, 4, scale_grad_by_freq=True), nn.EmbeddingBag(7, 4, scale_grad_by_freq=True)):
        model = nn.Sequential(table, nn.Flatten(), nn.LazyLinear(OUT) if isinstance(table, nn.Embedding) else nn.Linear(4, OUT)).double()
        model(tokens)  # materializes the lazy layer
        _check_refused(model, tokens, rf"module '0' \({type(table).__name__} with scale_grad_by_freq=True\).*mixes samples")
    _check_refused(nn.Sequential(nn.EmbeddingBag(7, 4, max_norm=1.0), nn.Linear(4, OUT)).double(), tokens, "max_norm")
    norm = nn.Sequential(nn.Conv1d(2, 4, 2), nn.InstanceNorm1d(4, affine=True, track_running_stats=True),
                         nn.Flatten(), nn.Linear(20, OUT)).double()
    _check_refused(norm, torch.randn(4, 2, 6, dtype=torch.float64), r"module '1' \(InstanceNorm1d\) updates its running statistics")


# ----------------------------------------------------------------------------- parametrizations


class TanhScale(nn.Module):
    """A custom parametrization W = X ∘ tanh(row sums of X)."""

    def forward(self, X: Tensor) -> Tensor:
        return X * torch.tanh(X.sum(1, keepdim=True))


class LearnableScale(nn.Module):
    """A custom parametrization with a parameter of its own: W = X ∘ g, g (1, in)."""

    def __init__(self, n_in: int):
        super().__init__()
        self.g = nn.Parameter(torch.randn(1, n_in))

    def forward(self, X: Tensor) -> Tensor:
        return X * self.g


PARAMETRIZE = {
    "weight_norm": lambda m: parametrizations.weight_norm(m),
    "spectral_norm": lambda m: parametrizations.spectral_norm(m),
    "orthogonal": lambda m: parametrizations.orthogonal(m),
    "custom": lambda m: parametrize.register_parametrization(m, "weight", TanhScale()),
    "learnable": lambda m: parametrize.register_parametrization(m, "weight", LearnableScale(m.in_features)),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", sorted(PARAMETRIZE))
def test_parametrized_linear_matches_the_oracle_and_keeps_buffers(kind, bias):
    torch.manual_seed(10 + bias)
    layer = PARAMETRIZE[kind](nn.Linear(4, 4, bias=bias).double())
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(4, OUT)).double()  # train mode: spectral_norm iterates
    x = torch.randn(3, 4, dtype=torch.float64)
    plain = copy.deepcopy(model)
    plain(x)  # one forward: what the user's own step does to spectral_norm's u, v
    # the oracle differentiates W = P(original) at the u, v of that forward: eval mode, no iteration
    _check_exact(model, x, "cross_entropy", oracle_model=copy.deepcopy(plain).eval())
    assert all(torch.equal(u, v) for u, v in zip(model.buffers(), plain.buffers()))


def test_parametrized_convolution_chains_through_its_rule():
    torch.manual_seed(12)
    model = nn.Sequential(parametrizations.weight_norm(nn.Conv1d(2, 3, 2)), nn.Tanh(), nn.Flatten(), nn.Linear(15, OUT)).double()
    _check_exact(model, torch.randn(4, 2, 6, dtype=torch.float64))


class ScaledByVector(nn.Module):
    """A custom module without a rule (the generic one), parametrized below."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.scale)


class ParametrizedFunctionalUse(nn.Module):
    """A parent using a parametrized child's weight functionally, and a parametrized custom module."""

    def __init__(self, kind: str):
        super().__init__()
        self.inp = parametrize.register_parametrization(ScaledByVector(), "scale", nn.Tanh())
        self.proj = PARAMETRIZE[kind](nn.Linear(4, OUT))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(self.inp(x), self.proj.weight, self.proj.bias)


@pytest.mark.parametrize("kind", ["spectral_norm", "weight_norm", "learnable"])
def test_parametrized_weights_under_the_generic_rule_match_the_oracle(kind):
    torch.manual_seed(13)
    model = ParametrizedFunctionalUse(kind).double()
    x = torch.randn(4, 4, dtype=torch.float64)
    plain = copy.deepcopy(model)
    plain(x)
    _check_exact(model, x, oracle_model=copy.deepcopy(plain).eval())
    assert all(torch.equal(u, v) for u, v in zip(model.buffers(), plain.buffers()))


def test_a_parametrization_that_differs_in_train_mode_is_refused():
    class TrainOnly(nn.Module):
        def forward(self, X: Tensor) -> Tensor:
            return 2 * X if self.training else X

    x = torch.randn(3, 4, dtype=torch.float64)
    layer = parametrize.register_parametrization(nn.Linear(4, 4), "weight", TrainOnly())
    _check_refused(nn.Sequential(layer, nn.Linear(4, OUT)).double(), x,
                   r"parametrization '0.parametrizations.weight' \(TrainOnly\), re-evaluated in eval mode, does not reproduce")
