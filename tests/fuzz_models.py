"""Random model builders for the property-based fuzz (tests/test_fuzz.py) and the fuzz report
(benchmarks/fuzz_report.py). One builder per layer family; every choice goes through a `Draw`,
so hypothesis (`HypothesisDraw`) and a seeded `random.Random` (`RandomDraw`) run the same code.

`build_case(family, draw)` returns a `Case`: a float64 model with random non-trivial parameters,
random inputs and targets for a loss, and a description of the architecture. Every model's output
is (b, c). Families in MIXING mix samples: egn_fast must refuse them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations

T_ = TypeVar("T_")
LOSSES = ("mse", "cross_entropy", "bce")


class Draw:
    """The choices a builder makes. Subclasses supply `int`; the rest derives from it."""

    def int(self, lo: int, hi: int) -> int:  # inclusive
        raise NotImplementedError

    def choice(self, options: Sequence[T_]) -> T_:
        return options[self.int(0, len(options) - 1)]

    def bool(self) -> bool:
        return self.int(0, 1) == 1


class RandomDraw(Draw):
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


class HypothesisDraw(Draw):
    def __init__(self, data: Any):  # hypothesis.strategies.data()
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))


@dataclass
class Sizes:
    """b samples, sequence length T, c outputs per sample, s rows per sample of the loss."""

    b: int
    T: int
    c: int
    s: int
    loss: str


def draw_sizes(draw: Draw) -> Sizes:
    """Batch sizes include b == T and b == s (s = c for mse/bce, c − 1 for cross_entropy)."""
    loss, c, T = draw.choice(LOSSES), draw.int(2, 4), draw.int(2, 4)
    s = c - 1 if loss == "cross_entropy" else c
    b = {"free": draw.int(1, 5), "b=T": T, "b=s": s}[draw.choice(["free", "b=T", "b=s"])]
    return Sizes(b, T, c, s, loss)


@dataclass
class Case:
    family: str
    description: str
    model: nn.Module
    inputs: Tensor | tuple
    targets: Tensor
    loss: str
    damping: float
    sizes: Sizes
    must_refuse: bool = False


def activation(draw: Draw, channels: int) -> nn.Module:
    """A random activation; PReLU per channel acts on dim 1, of size `channels`."""
    kind = draw.choice(["tanh", "relu", "gelu", "silu", "softplus", "elu", "sigmoid", "leaky_relu", "prelu", "prelu_ch"])
    if kind == "prelu_ch":
        return nn.PReLU(channels)
    return {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "softplus": nn.Softplus, "elu": nn.ELU,
            "sigmoid": nn.Sigmoid, "leaky_relu": lambda: nn.LeakyReLU(0.2), "prelu": nn.PReLU}[kind]()


def _x(*shape: int) -> Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def pool(h: Tensor, mode: str) -> Tensor:
    """(b, T, D) -> (b, D)."""
    return h[:, -1] if mode == "last" else h.mean(1)


# --------------------------------------------------------------------------- families


class MLP(nn.Module):
    """Linear on (b, in), optional residual blocks."""

    def __init__(self, draw: Draw, z: Sizes):
        super().__init__()
        width, bias = draw.int(2, 6), draw.bool()
        self.residual = draw.bool()
        self.inp = nn.Linear(draw.int(2, 5), width, bias=bias)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width, bias=draw.bool()), activation(draw, width)) for _ in range(draw.int(0, 2)))
        self.act = activation(draw, width)
        self.head = nn.Linear(width, z.c, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.inp(x))
        for block in self.blocks:
            h = h + block(h) if self.residual else block(h)
        return self.head(h)


def build_mlp(draw: Draw, z: Sizes) -> tuple[nn.Module, Any]:
    model = MLP(draw, z)
    return model, _x(z.b, model.inp.in_features)


class SeqNet(nn.Module):
    """Linear on (b, T, D) in several layouts: plain, x.reshape(-1, D) and back (per sample),
    seq-first (transpose(0, 1) around a Linear), a (T, D) buffer through a Linear, a LayerNorm."""

    VARIANTS = ("plain", "reshape", "seq_first", "buffer", "layernorm")

    def __init__(self, draw: Draw, z: Sizes, variant: str):
        super().__init__()
        self.variant, self.mode, bias = variant, draw.choice(["mean", "last"]), draw.bool()
        d_in, w = draw.int(2, 4), draw.int(2, 5)
        self.inp, self.mid = nn.Linear(d_in, w, bias=bias), nn.Linear(w, w, bias=draw.bool())
        self.act = activation(draw, z.T)  # sees (b, T, w): dim 1 is T
        if variant == "buffer":
            self.register_buffer("table", _x(z.T, w))
        if variant == "layernorm":
            self.norm = draw.choice([lambda: nn.LayerNorm(w, bias=draw.bool()), lambda: nn.RMSNorm(w)])()
        self.head = nn.Linear(w, z.c, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.inp(x))
        if self.variant == "reshape":
            b, T, w = h.shape
            h = self.mid(h.reshape(-1, w)).reshape(b, T, -1)
        elif self.variant == "seq_first":
            h = self.mid(h.transpose(0, 1)).transpose(0, 1)
        elif self.variant == "buffer":
            h = h + self.mid(self.table)
        elif self.variant == "layernorm":
            h = self.norm(self.mid(h))
        else:
            h = self.mid(h)
        return self.head(pool(torch.tanh(h), self.mode))


def build_sequence(draw: Draw, z: Sizes) -> tuple[nn.Module, Any]:
    model = SeqNet(draw, z, draw.choice(SeqNet.VARIANTS))
    return model, _x(z.b, z.T, model.inp.in_features)


class ConvNet(nn.Module):
    """Conv1d/Conv2d (groups, stride, dilation, padding modes), optionally a ConvTranspose, a
    GroupNorm or BatchNorm (eval), then pooled or flattened into a Linear head."""

    def __init__(self, draw: Draw, z: Sizes):
        super().__init__()
        self.dim = dim = draw.int(1, 2)
        Conv, ConvT = (nn.Conv1d, nn.ConvTranspose1d) if dim == 1 else (nn.Conv2d, nn.ConvTranspose2d)
        groups = draw.int(1, 2)
        c_in, c_mid = groups * draw.int(1, 2), 2 * draw.int(1, 2)
        stride = draw.int(1, 2)
        padding = "same" if stride == 1 and draw.bool() else draw.int(0, 1)
        self.size = (draw.int(5, 8),) if dim == 1 else (draw.int(5, 7), draw.int(5, 7))
        layers: list[nn.Module] = [
            Conv(c_in, c_mid, draw.int(1, 3), stride=stride, padding=padding, dilation=draw.int(1, 2), groups=groups,
                 bias=draw.bool(), padding_mode=draw.choice(["zeros", "reflect", "replicate", "circular"])),
            activation(draw, c_mid),
        ]
        if draw.bool():
            st = draw.int(1, 2)
            layers += [ConvT(c_mid, 2, draw.int(1, 3), stride=st, padding=draw.int(0, 1), output_padding=st - 1,
                             groups=draw.choice([1, 2]), bias=draw.bool()), nn.Tanh()]
        norm = draw.choice(["none", "group", "batch_eval"])
        channels = layers[-2].out_channels
        if norm == "group":
            layers.append(nn.GroupNorm(draw.choice([1, 2]), channels, affine=True))
        elif norm == "batch_eval":
            layers.append((nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d)(channels))
        self.body = nn.Sequential(*layers)
        self.c_in = c_in
        with torch.no_grad():
            n = self.body.eval()(torch.zeros(1, c_in, *self.size)).numel()
        self.flatten = n <= 40 and draw.bool()
        self.head = nn.Linear(n if self.flatten else channels, z.c)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        return self.head(h.flatten(1) if self.flatten else h.mean(tuple(range(2, h.dim()))))


def build_conv(draw: Draw, z: Sizes) -> tuple[nn.Module, Any]:
    model = ConvNet(draw, z)
    return model, _x(z.b, model.c_in, *model.size)


class EmbedNet(nn.Module):
    """Embedding (+ padding_idx), optionally a broadcast (1, T) position embedding and/or a head
    tied to the token table (vocabulary = c)."""

    def __init__(self, draw: Draw, z: Sizes):
        super().__init__()
        self.vocab, dim = draw.int(z.c, 6), draw.int(2, 5)
        self.tied = draw.bool()
        if self.tied:
            self.vocab = z.c
        self.emb = nn.Embedding(self.vocab, dim, padding_idx=draw.choice([None, 0]))
        self.positions = draw.choice(["none", "broadcast", "expanded"])
        self.pos = nn.Embedding(z.T, dim)
        self.mix = nn.Linear(dim, dim, bias=draw.bool())
        self.mode = draw.choice(["mean", "last"])
        self.head = nn.Linear(dim, z.c, bias=draw.bool())
        if self.tied:
            self.head.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.emb(tokens)
        if self.positions != "none":
            ids = torch.arange(tokens.shape[1], device=tokens.device)[None]  # (1, T), like HF models
            h = h + self.pos(ids if self.positions == "broadcast" else ids.expand(tokens.shape[0], -1))
        return self.head(pool(torch.tanh(self.mix(h)), self.mode))


def build_embedding(draw: Draw, z: Sizes) -> tuple[nn.Module, Any]:
    model = EmbedNet(draw, z)
    return model, torch.randint(0, model.vocab, (z.b, z.T))


class NormNet(nn.Module):
    """A stack of normalizations on (b, D) or (b, T, D): LayerNorm, RMSNorm, GroupNorm, BatchNorm eval."""

    def __init__(self, draw: Draw, z: Sizes):
        super().__init__()
        self.seq, w = draw.bool(), 2 * draw.int(1, 3)
        self.inp = nn.Linear(3, w)
        makers: dict[str, Callable[[], nn.Module]] = {
            "layer": lambda: nn.LayerNorm(w, elementwise_affine=True, bias=draw.bool()),
            "rms": lambda: nn.RMSNorm(w),
            "group": lambda: nn.GroupNorm(draw.choice([1, 2]), w),
            "batch_eval": lambda: nn.BatchNorm1d(w),
        }
        self.kinds = [draw.choice(sorted(makers)) for _ in range(draw.int(1, 3))]
        self.norms = nn.ModuleList(makers[k]() for k in self.kinds)
        self.head = nn.Linear(w, z.c)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for kind, norm in zip(self.kinds, self.norms):  # channel norms want (b, C, …)
            channel_first = self.seq and kind in ("group", "batch_eval")
            h = torch.tanh(norm(h.transpose(1, 2)).transpose(1, 2) if channel_first else norm(h))
        return self.head(h.mean(1) if self.seq else h)


def build_norms(draw: Draw, z: Sizes) -> tuple[nn.Module, Any]:
    model = NormNet(draw, z)
    return model, _x(z.b, z.T, 3) if model.seq else _x(z.b, 3)


class Scaled(nn.Module):
    """A custom module owning parameters used functionally: the generic torch.func rule."""

    def __init__(self, n: int):
        super().__init__()
        self.scale, self.shift = nn.Parameter(torch.randn(n)), nn.Parameter(torch.randn(n, n))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.scale) + x @ self.shift


class TiedNet(nn.Module):
    """Weight sharing and functional use: one Linear called twice, a Linear whose weight a parent
    uses through F.linear, a custom module with raw parameters, optional frozen layers."""

    def __init__(self, draw: Draw, z: Sizes):
        super().__init__()
        w = draw.int(2, 5)
        self.inp, self.shared, self.proj = nn.Linear(3, w), nn.Linear(w, w, bias=draw.bool()), nn.Linear(w, w)
        self.custom = Scaled(w)
        self.repeat, self.functional, self.use_custom = draw.int(1, 3), draw.bool(), draw.bool()
        self.head = nn.Linear(w, z.c)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        for _ in range(self.repeat):
            h = torch.tanh(self.shared(h))
        if self.functional:
            h = torch.tanh(F.linear(h, self.proj.weight, self.proj.bias))
        if self.use_custom:
            h = self.custom(h)
        return self.head(h)


def build_tied(draw: Draw, z: Sizes) -> tuple[nn.Module, Any]:
    return TiedNet(draw, z), _x(z.b, 3)


def causal_mask(T: int, kind: str) -> Tensor | None:
    if kind == "none":
        return None
    upper = torch.ones(T, T, dtype=torch.bool).triu(1)
    return upper if kind == "bool" else torch.zeros(T, T, dtype=torch.float64).masked_fill(upper, float("-inf"))


class AttentionNet(nn.Module):
    """nn.MultiheadAttention or nn.TransformerEncoderLayer, batch_first True or False (the model
    transposes to (T, b, D) itself), with or without a (T, T) causal mask."""

    def __init__(self, draw: Draw, z: Sizes):
        super().__init__()
        heads = draw.int(1, 2)
        d = heads * draw.int(1, 3)
        self.batch_first, self.kind = draw.bool(), draw.choice(["mha", "encoder"])
        self.inp = nn.Linear(3, d)
        if self.kind == "mha":
            self.block = nn.MultiheadAttention(d, heads, bias=draw.bool(), batch_first=self.batch_first)
        else:
            self.block = nn.TransformerEncoderLayer(d, heads, dim_feedforward=draw.int(2, 6), dropout=0.0,
                                                    activation=draw.choice(["relu", "gelu"]), batch_first=self.batch_first,
                                                    norm_first=draw.bool(), bias=draw.bool())
        self.register_buffer("mask", causal_mask(z.T, draw.choice(["none", "bool", "float"])), persistent=False)
        self.mode = draw.choice(["mean", "last"])
        self.head = nn.Linear(d, z.c)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h = h if self.batch_first else h.transpose(0, 1)
        if self.kind == "mha":
            a = self.block(h, h, h, attn_mask=self.mask, need_weights=False)[0] + h
        else:
            a = self.block(h, src_mask=self.mask)
        a = a if self.batch_first else a.transpose(0, 1)
        return self.head(pool(torch.tanh(a), self.mode))


def build_attention(draw: Draw, z: Sizes) -> tuple[nn.Module, Any]:
    return AttentionNet(draw, z), _x(z.b, z.T, 3)


class RNNNet(nn.Module):
    """nn.RNN / GRU / LSTM, batch_first either way (seq-first: the model transposes), 1–2 layers,
    uni- or bidirectional; the head reads the last output step or the final hidden state."""

    def __init__(self, draw: Draw, z: Sizes):
        super().__init__()
        self.kind, self.batch_first = draw.choice(["RNN", "GRU", "LSTM"]), draw.bool()
        hidden, bi = draw.int(2, 4), draw.bool()
        self.rnn = getattr(nn, self.kind)(3, hidden, num_layers=draw.int(1, 2), bias=draw.bool(),
                                          batch_first=self.batch_first, bidirectional=bi)
        self.read = draw.choice(["output", "hidden"])
        self.head = nn.Linear(hidden * (2 if bi and self.read == "output" else 1), z.c)

    def forward(self, x: Tensor) -> Tensor:
        out, state = self.rnn(x if self.batch_first else x.transpose(0, 1))
        if self.read == "hidden":
            return self.head((state[0] if self.kind == "LSTM" else state)[-1])
        return self.head(out[:, -1] if self.batch_first else out[-1])


def build_rnn(draw: Draw, z: Sizes) -> tuple[nn.Module, Any]:
    return RNNNet(draw, z), _x(z.b, z.T, 3)


class ParamNet(nn.Module):
    """A Linear or Conv1d under a parametrization: weight_norm, spectral_norm (eval, or train with
    its power iteration updating u/v in forward), orthogonal."""

    def __init__(self, draw: Draw, z: Sizes):
        super().__init__()
        self.kind, w = draw.choice(["weight_norm", "spectral_eval", "spectral_train", "orthogonal"]), draw.int(2, 4)
        self.conv = self.kind == "weight_norm" and draw.bool()
        self.inp = nn.Conv1d(2, w, 2) if self.conv else nn.Linear(3, w)
        self.mid = nn.Linear(w, w, bias=draw.bool())
        target = self.inp if self.conv else draw.choice([self.inp, self.mid])
        if self.kind == "weight_norm":
            parametrizations.weight_norm(target, dim=draw.choice([0, None]))
        elif self.kind == "orthogonal":
            parametrizations.orthogonal(self.mid)
        else:
            parametrizations.spectral_norm(target)
        self.head = nn.Linear(w, z.c)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = h.mean(2) if self.conv else h
        return self.head(torch.tanh(self.mid(h)))


def build_parametrize(draw: Draw, z: Sizes) -> tuple[nn.Module, Any]:
    model = ParamNet(draw, z)
    return model, _x(z.b, 2, 5) if model.conv else _x(z.b, 3)


class MixingNet(nn.Module):
    """Models whose outputs mix samples (or whose autograd does): egn_fast must refuse them."""

    KINDS = ("center", "batch_norm_functional", "batch_norm_train", "scale_grad_by_freq")

    def __init__(self, draw: Draw, z: Sizes):
        super().__init__()
        self.kind, w = draw.choice(self.KINDS), draw.int(2, 4)
        self.emb = nn.Embedding(5, 3, scale_grad_by_freq=True)
        self.inp, self.head = nn.Linear(3, w), nn.Linear(w, z.c)
        self.bn = nn.BatchNorm1d(w)
        self.weight = nn.Parameter(torch.randn(w))

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "scale_grad_by_freq":
            return self.head(torch.tanh(self.inp(self.emb(x).mean(1))))
        h = self.inp(x)
        if self.kind == "center":
            h = h - h.mean(0)
        elif self.kind == "batch_norm_functional":
            h = F.batch_norm(h, None, None, self.weight, training=True)
        else:
            h = self.bn(h)
        return self.head(torch.tanh(h))


def build_mixing(draw: Draw, z: Sizes) -> tuple[nn.Module, Any]:
    model = MixingNet(draw, z)
    return model, torch.randint(0, 5, (z.b, z.T)) if model.kind == "scale_grad_by_freq" else _x(z.b, 3)


FAMILIES: dict[str, Callable[[Draw, Sizes], tuple[nn.Module, Any]]] = {
    "mlp": build_mlp, "sequence": build_sequence, "conv": build_conv, "embedding": build_embedding,
    "norms": build_norms, "tied_functional": build_tied, "attention": build_attention, "rnn": build_rnn,
    "parametrize": build_parametrize, "mixing": build_mixing,
}
MIXING = {"mixing"}


def describe(model: nn.Module) -> str:
    """One line: the model's class, its drawn options and its leaf modules."""
    opts = {k: v for k, v in vars(model).items() if not k.startswith("_") and k != "training" and isinstance(v, (str, bool, int, tuple, list))}
    leaves = [f"{n}={type(m).__name__}" for n, m in model.named_modules() if n and not list(m.children())]
    return f"{type(model).__name__}{opts} [{', '.join(leaves)}]"


def build_case(family: str, draw: Draw) -> Case:
    """A random float64 model of `family` with non-trivial parameters, its inputs and targets.

    Norm statistics are random; BatchNorm is in eval mode except where the family trains it; some
    draws freeze one parameter (requires_grad=False) and give some parameters a .grad already."""
    z = draw_sizes(draw)
    if family in MIXING:  # one sample cannot mix with others (and F.batch_norm needs two)
        z.b = max(z.b, 2)
    seed = draw.int(0, 2**31 - 1)
    torch.manual_seed(seed)
    model, inputs = FAMILIES[family](draw, z)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not (family in MIXING and model.kind == "batch_norm_train"):
            m.eval()
    if getattr(model, "kind", "") == "spectral_eval":
        model.eval()
    params = list(model.parameters())
    if len(params) > 1 and draw.int(0, 3) == 0:
        params[draw.int(0, len(params) - 1)].requires_grad_(False)
    for p in params:
        if draw.int(0, 3) == 0:
            p.grad = torch.randn_like(p)
    g = torch.Generator().manual_seed(seed)
    if z.loss == "cross_entropy":
        y = torch.randint(0, z.c, (z.b,), generator=g)
    else:
        y = (torch.rand if z.loss == "bce" else torch.randn)(z.b, z.c, generator=g, dtype=torch.float64)
    desc = f"{family} b={z.b} T={z.T} c={z.c} loss={z.loss} seed={seed}: {describe(model)}"
    return Case(family, desc, model, inputs, y, z.loss, draw.choice([1e-2, 0.3]), z, must_refuse=family in MIXING)


def find_case(family: str, wanted: Callable[[Case], bool], tries: int = 2000) -> Case:
    """The first seeded case of `family` for which `wanted(case)` holds (for targeted tests)."""
    for seed in range(tries):
        case = build_case(family, RandomDraw(seed))
        if wanted(case):
            return case
    raise LookupError(f"no {family} case in {tries} seeds satisfies the predicate")
