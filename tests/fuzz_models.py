"""Random model builders for the property-based fuzz (tests/test_fuzz.py) and the fuzz report
(benchmarks/fuzz_report.py). One builder per layer family; every choice goes through a `Draw`,
so hypothesis (`HypothesisDraw`) and a seeded `random.Random` (`RandomDraw`) run the same code.

`build_case(family, draw)` returns a `Case`: a float64 model with random non-trivial parameters,
random inputs and targets for a loss, and a description of the architecture. Every model's output
is (b, c). Families in MIXING mix samples: egn_fast must refuse them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from fuzz_layers import (  # the Draw types are re-exported for the tests and the report
    Draw, HypothesisDraw, RandomDraw, Sizes, build_conv, build_embedding, build_mlp, build_norms,
    build_sequence, build_tied, draw_sizes, pool, _x,
)

__all__ = ["Case", "FAMILIES", "MIXING", "build_case", "find_case", "Draw", "RandomDraw", "HypothesisDraw", "Sizes"]


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


class _ScaleShift(nn.Module):
    """A custom module (the torch.func rule covers it): x·γ + β."""

    def __init__(self, n: int):
        super().__init__()
        self.gamma, self.beta = nn.Parameter(torch.rand(n) + 0.5), nn.Parameter(torch.randn(n))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma + self.beta


class AwkwardNet(nn.Module):
    """Patterns once refused although exact rows exist. root_*: the root owns a parameter used in
    its own forward, so the torch.func rule re-runs the whole model per sample, a GRU, LSTM,
    Embedding(padding_idx) or eval BatchNorm included; table: a constant table through a layer that
    the model broadcasts itself (x + pf(table)[None]); dead_path: a custom module after a ReLU whose
    outputs a 0/1 gate switches off for samples 0 and b − 1 (the two the layout probe asks first)."""

    KINDS = ("root_gru", "root_lstm", "root_embedding", "root_batch_norm", "table", "dead_path")

    def __init__(self, draw: Draw, z: Sizes):
        super().__init__()
        self.kind, w = draw.choice(self.KINDS), draw.int(2, 4)
        self.scale = nn.Parameter(torch.rand(3) + 0.5)
        self.emb = nn.Embedding(6, 3, padding_idx=0)
        self.inner = {"root_gru": nn.GRU(3, w, batch_first=True), "root_lstm": nn.LSTM(3, w),
                      "root_batch_norm": nn.BatchNorm1d(3)}.get(self.kind, nn.Identity())
        self.register_buffer("table", torch.randn(z.T, 3))
        self.pf = nn.Linear(3, 3) if draw.bool() else _ScaleShift(3)
        self.inp, self.gated = nn.Linear(3, w), _ScaleShift(w)
        self.head = nn.Linear(w if self.kind in ("root_gru", "root_lstm", "dead_path") else 3, z.c)

    def forward(self, packed: Tensor) -> Tensor:
        # one input (b, T, 5): features, a token id, and the gate's switch (the same at every t)
        x, ids, switch = packed[..., :3], packed[..., 3].long(), packed[:, 0, 4]
        if self.kind == "table":
            return self.head(torch.tanh(x + self.pf(self.table)[None]).mean(1))
        if self.kind == "dead_path":
            h = self.gated(F.relu(self.inp(x.mean(1))))
            return self.head(h * (switch[:, None] > 0))  # exactly zero gradient for switched-off samples
        h = self.emb(ids) * self.scale + x
        if self.kind == "root_gru":
            h = self.inner(h)[0]
        elif self.kind == "root_lstm":
            h = self.inner(h.transpose(0, 1))[0].transpose(0, 1)
        elif self.kind == "root_batch_norm":
            h = self.inner(h.transpose(1, 2)).transpose(1, 2)
        return self.head(torch.tanh(h).mean(1))


def build_awkward(draw: Draw, z: Sizes) -> tuple[nn.Module, Any]:
    switch = torch.ones(z.b, dtype=torch.float64)
    if z.b > 2:  # samples 0 and b − 1 switched off, some stay alive
        switch[0] = switch[-1] = -1.0
    ids = torch.randint(0, 6, (z.b, z.T)).double()
    return AwkwardNet(draw, z), torch.cat([_x(z.b, z.T, 3), ids[..., None], switch[:, None, None].expand(z.b, z.T, 1)], 2)


FAMILIES: dict[str, Callable[[Draw, Sizes], tuple[nn.Module, Any]]] = {
    "mlp": build_mlp, "sequence": build_sequence, "conv": build_conv, "embedding": build_embedding,
    "norms": build_norms, "tied_functional": build_tied, "attention": build_attention, "rnn": build_rnn,
    "parametrize": build_parametrize, "awkward": build_awkward, "mixing": build_mixing,
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
