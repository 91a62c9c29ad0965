"""Draws and the basic layer families of the fuzz (tests/fuzz_models.py assembles the cases).

`Draw` is every choice a builder makes: hypothesis (`HypothesisDraw`) and a seeded
`random.Random` (`RandomDraw`) run the same builders. Each `build_<family>(draw, sizes)` returns
(model, inputs) with outputs (b, c).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
            st, k = draw.int(1, 2), draw.int(1, 3)  # padding ≤ (k − 1)/2 keeps every output length ≥ 1
            layers += [ConvT(c_mid, 2, k, stride=st, padding=draw.int(0, (k - 1) // 2), output_padding=st - 1,
                             groups=draw.choice([1, 2]), bias=draw.bool()), nn.Tanh()]
        norm = draw.choice(["none", "group", "batch_eval"])
        channels = layers[-2].out_channels
        if norm == "group":
            layers.append(nn.GroupNorm(draw.choice([1, 2]) if channels > 2 else 1, channels, affine=True))
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
            "group": lambda: nn.GroupNorm(draw.choice([1, 2]) if w > 2 else 1, w),  # ≥ 2 values per group
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
