"""Small models covering every layer rule, for the oracle tests. Each factory returns
(model, inputs) with fresh random float64 inputs; outputs are (b, C) with C = OUT."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OUT = 3


class SeqMLP(nn.Module):
    """Linear on (b, T, in) inputs, mean-pooled over T."""

    def __init__(self, bias: bool):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6, bias=bias), nn.Linear(6, OUT, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(torch.tanh(self.l1(x))).mean(1)


class Conv1dNet(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, stride=2, padding=1, bias=bias)
        self.conv2 = nn.Conv1d(4, 4, 2, dilation=2, groups=2, padding="same", padding_mode="circular", bias=bias)
        self.head = nn.Linear(4 * 5, OUT, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv2(torch.tanh(self.conv(x))))
        return self.head(h.flatten(1))


class Conv2dNet(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(4, 4, (2, 3), dilation=(2, 1), groups=2, padding=(1, 1), padding_mode="reflect", bias=bias)
        self.head = nn.Linear(4, OUT, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv2(torch.tanh(self.conv(x))))
        return self.head(h.mean((2, 3)))


class EmbedNet(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.emb = nn.Embedding(7, 5, padding_idx=0)
        self.head = nn.Linear(5, OUT, bias=bias)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(tokens)).mean(1))


class NormNet(nn.Module):
    """LayerNorm, RMSNorm, GroupNorm and BatchNorm (eval) affine parameters."""

    def __init__(self, bias: bool):
        super().__init__()
        self.l1 = nn.Linear(4, 6, bias=bias)
        self.ln = nn.LayerNorm(6, bias=bias)
        self.rms = nn.RMSNorm(6)
        self.conv = nn.Conv1d(2, 4, 2, bias=bias)
        self.gn = nn.GroupNorm(2, 4, affine=True)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(6 + 4, OUT, bias=bias)

    def forward(self, x: Tensor) -> Tensor:  # x: (b, T=5, 4)
        h = self.rms(torch.tanh(self.ln(self.l1(x)))).mean(1)  # (b, 6)
        c = self.bn(self.gn(self.conv(x[:, :, :2].transpose(1, 2)))).mean(2)  # (b, 4)
        return self.head(torch.tanh(torch.cat([h, c], 1)))


class TiedNet(nn.Module):
    """One Linear called twice (tied weights across depth)."""

    def __init__(self, bias: bool):
        super().__init__()
        self.inp, self.shared, self.head = nn.Linear(4, 5, bias=bias), nn.Linear(5, 5, bias=bias), nn.Linear(5, OUT, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        return self.head(torch.tanh(self.shared(h)))


class SharedAcrossModules(nn.Module):
    """An Embedding whose table is also the weight of a Linear (LM-style weight tying)."""

    def __init__(self, bias: bool):
        super().__init__()
        self.emb = nn.Embedding(OUT, 4)
        self.mix = nn.Linear(4, 4, bias=bias)
        self.out = nn.Linear(4, OUT, bias=bias)
        self.out.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(torch.tanh(self.mix(self.emb(tokens).mean(1))))


class Scaled(nn.Module):
    """A custom module that owns a parameter: the generic (torch.func) rule."""

    def __init__(self, n: int):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(n))
        self.shift = nn.Parameter(torch.randn(n))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.scale) + self.shift * x.square()


class CustomNet(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.l1, self.custom, self.l2 = nn.Linear(4, 5, bias=bias), Scaled(5), nn.Linear(5, OUT, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(self.custom(self.l1(x)))


class AttentionNet(nn.Module):
    """nn.MultiheadAttention (its out_proj is used functionally: generic rule on the MHA)."""

    def __init__(self, bias: bool):
        super().__init__()
        self.inp = nn.Linear(4, 6, bias=bias)
        self.attn = nn.MultiheadAttention(6, 2, bias=bias, batch_first=True)
        self.head = nn.Linear(6, OUT, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(torch.tanh(a + h).mean(1))


class InplaceNet(nn.Module):
    """Recorded layer outputs modified in place afterwards: LeakyReLU(inplace), y += residual."""

    def __init__(self, bias: bool):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 6, bias=bias), nn.Linear(6, 6, bias=bias), nn.Linear(6, OUT, bias=bias)
        self.act = nn.LeakyReLU(0.3, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.l1(x))
        y = self.l2(h)
        y += h
        return self.l3(torch.tanh(y))


class FunctionalUse(nn.Module):
    """A parent that uses a child's weight functionally; the child itself is never called."""

    def __init__(self, bias: bool):
        super().__init__()
        self.l1 = nn.Linear(4, 5, bias=bias)
        self.proj = nn.Linear(5, OUT, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(torch.tanh(self.l1(x)), self.proj.weight, self.proj.bias)


def _x(*shape: int) -> Tensor:
    return torch.randn(*shape, dtype=torch.float64)


B = 5
MODELS = {
    "mlp": lambda bias: (nn.Sequential(nn.Linear(4, 6, bias=bias), nn.Tanh(), nn.Linear(6, 5, bias=bias), nn.Tanh(), nn.Linear(5, OUT, bias=bias)), _x(B, 4)),
    "seq_linear": lambda bias: (SeqMLP(bias), _x(B, 3, 4)),
    "conv1d": lambda bias: (Conv1dNet(bias), _x(B, 3, 10)),
    "conv2d": lambda bias: (Conv2dNet(bias), _x(B, 2, 6, 5)),
    "embedding": lambda bias: (EmbedNet(bias), torch.randint(0, 7, (B, 4))),
    "norms": lambda bias: (NormNet(bias), _x(B, 5, 4)),
    "tied": lambda bias: (TiedNet(bias), _x(B, 4)),
    "shared_across_modules": lambda bias: (SharedAcrossModules(bias), torch.randint(0, OUT, (B, 3))),
    "custom_module": lambda bias: (CustomNet(bias), _x(B, 4)),
    "multihead_attention": lambda bias: (AttentionNet(bias), _x(B, 3, 4)),
    "inplace": lambda bias: (InplaceNet(bias), _x(B, 4)),
    "functional_use": lambda bias: (FunctionalUse(bias), _x(B, 4)),
}


def make(kind: str, bias: bool, seed: int) -> tuple[nn.Module, Tensor]:
    """A float64 model of `kind` with random (non-zero) parameters, and its inputs."""
    torch.manual_seed(seed)
    model, inputs = MODELS[kind](bias)
    model = model.double()
    with torch.no_grad():  # make every affine/norm parameter non-trivial (not 1s and 0s)
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.eval() if kind == "norms" else model.train()
    if kind == "norms":
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    return model, inputs


def targets(loss: str, b: int = B, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if loss == "cross_entropy":
        return torch.randint(0, OUT, (b,), generator=g)
    if loss == "bce":
        return torch.rand(b, OUT, generator=g, dtype=torch.float64)
    return torch.randn(b, OUT, generator=g, dtype=torch.float64)
