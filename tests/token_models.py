"""Language models for the per-token tests: a nanoGPT-style char model built from standard modules,
and random per-token targets with ignored tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Block(nn.Module):
    """Pre-norm transformer block: causal F.scaled_dot_product_attention (qkv one Linear) + GELU MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, T, d)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Token + position embeddings (positions (T,), broadcast over the batch), blocks, final
    LayerNorm, a Linear head tied to the token embedding. ids (b, T) -> logits (b, T, V)."""

    def __init__(self, vocab: int = 5, d: int = 8, layers: int = 1, heads: int = 2, T: int = 6):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied, as in nanoGPT

    def forward(self, ids: Tensor) -> Tensor:
        h = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Fresh random parameters of a scale that gives non-trivial softmaxes (no zeros, no identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def token_data(b: int, T: int, vocab: int, seed: int, ignored: int = 2) -> tuple[Tensor, Tensor]:
    """ids (b, T) and next-token targets (b, T) with `ignored` tokens set to −100 (never a whole
    sequence)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (b, T + 1), generator=g)
    y = ids[:, 1:].clone()
    flat = torch.randperm(b * T, generator=g)[:ignored]
    y.view(-1)[flat] = -100
    return ids[:, :-1], y
